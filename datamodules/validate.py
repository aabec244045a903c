"""Check every field of a product once, when its shard is written, so training never meets it broken.

What "usable" means is each modality's (`scale/modalities/<name>.py`): a record field's `clean`
(titles and tables are cut to their limits, a table without one `key#:#value` pair dropped), a file
field's `check` (through `scale/media/`, the checks the loader decodes with: JPEG / PNG / WebP
pixels from the header before any decode, MP4 header limits and one frame under the time limit,
audio headers, `.npy` headers without pickle), and the modality's `check_members` across its files
(region features need their boxes). Each check reads the header first and refuses on the limits
*before* decoding, then decodes the least that proves the file usable.

A failed check drops that file (one `item` naming the product, modality, field, reason code and a
human detail). A product keeps every modality that still has a usable field; a product with none
left is skipped. A modality that can make a missing file from another (audio from a video's sound
track) does so here. The reason codes are the report's counting keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datamodules.limits import DataLimits
from datamodules.sources import FIELD_TABLE, FILE_FIELDS, RECORD_FIELDS
from scale.media import MediaError
from scale.modalities import REGISTRY
from scale.modalities.spec import FileField
from scale.shard_format import RECORD_MEMBER

MEMBER_MODALITY: dict[str, str] = {
    member: modality for modality, source in FIELD_TABLE.values() if isinstance(source, FileField) for member in source.members
}
"""Shard member -> the modality it carries."""


def size_limit(field_name: str, limits: DataLimits) -> int:
    """Largest file accepted for a file field (checked from `stat`, before the file is read)."""
    return getattr(limits, FIELD_TABLE[field_name][1].max_bytes)


def clean_record(meta: dict[str, Any], limits: DataLimits, note) -> set[str]:
    """Apply every record field's `clean` to `meta` in place (cut, or removed when unusable);
    returns the modalities with a usable record field. `note(modality, field, reason, detail,
    action)` records what was done."""
    usable = set()
    for source in RECORD_FIELDS:
        modality, value = FIELD_TABLE[source.name][0], meta.get(source.name)
        if value is None or value == "":
            continue
        kept, notes = source.clean(value, limits)
        for reason, detail, action in notes:
            note(modality, source.name, reason, detail, action)
        if kept is None:
            del meta[source.name]  # removed, not blanked: the record only shrinks (the plan's byte bound)
            continue
        meta[source.name] = kept
        if not isinstance(kept, str) or kept.strip():
            usable.add(modality)
    return usable


def check_product(entry: dict[str, Any], limits: DataLimits) -> tuple[dict[str, bytes] | None, list[dict]]:
    """A planned product -> its shard members (`{"json": ..., "jpg": ..., ...}`, None when nothing
    is usable) and the items to report. `entry` is a plan line: id, meta, files {field: [path,
    member]}, derive {field: budget reserved for a derived file}, notes (from planning)."""
    items = list(entry.get("notes", []))

    def note(modality: str, field_name: str, reason: str, detail: str, action: str = "dropped") -> None:
        items.append({"id": entry["id"], "modality": modality, "field": field_name, "reason": reason,
                      "detail": detail, "action": action})

    meta = dict(entry["meta"])
    present = clean_record(meta, limits, note)
    members: dict[str, bytes] = {}
    checked: dict[str, Any] = {}  # field -> what its check returned (for check_members)
    for name, (path, member) in entry["files"].items():
        modality, source = FIELD_TABLE[name]
        try:
            data = Path(path).read_bytes()
            if len(data) > size_limit(name, limits):  # the plan checked stat(); the file may have grown
                raise MediaError(f"{len(data)} bytes, over the {name} limit {size_limit(name, limits)}", "too_large")
            checked[name] = source.check(data, limits)
            members[member] = data
        except OSError as error:
            note(modality, name, "unreadable", f"{path}: {error.strerror or error}")
        except MediaError as error:
            note(modality, name, error.reason, f"{Path(path).name}: {error}")
    for spec in REGISTRY.values():
        if spec.check_members is None:
            continue
        own = {name: checked[name] for name in checked if FIELD_TABLE[name][0] == spec.name}
        for name, reason, detail in spec.check_members(own):
            members.pop(entry["files"][name][1], None)
            note(spec.name, name, reason, detail)
    _derive(entry, members, limits, note)
    present |= {MEMBER_MODALITY[m] for m in members}
    if not present:
        note("*", "*", "no_usable_modality", "no usable modality left: product skipped", "skipped")
        return None, items
    ordered = {RECORD_MEMBER: json.dumps(meta).encode()}
    for name in FILE_FIELDS:  # shard member order: the field table's
        for member in FIELD_TABLE[name][1].members:
            if member in members:
                ordered[member] = members.pop(member)
    return ordered, items


def _derive(entry: dict[str, Any], members: dict[str, bytes], limits: DataLimits, note) -> None:
    """Make the derived files the plan reserved room for, where the product still lacks that field."""
    for name, budget in entry.get("derive", {}).items():
        modality, source = FIELD_TABLE[name]
        derived, origin = source.derive, FIELD_TABLE[source.derive.source][1]
        made_from = next((members[m] for m in origin.members if m in members), None)
        if made_from is None or any(m in members for m in source.members):
            continue
        try:
            data = derived.make(made_from, budget, limits)
        except MediaError as error:
            note(modality, name, error.reason, str(error))
            continue
        if data is not None:
            members[derived.member] = data
            note(modality, name, derived.reason, f"{len(data)} bytes of {derived.member} from the {derived.source} file", "added")
