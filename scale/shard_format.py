"""The shard format: what a shard set on disk is, for the converter that writes it and the loader
that reads it (neither imports the other; both import this).

    OUT/shard-000000.tar ...   webdataset tars: members `<key>.<member>` (`json` and the modalities'
                               members, see each modality's file fields), grouped by key
    OUT/sizes.json             {"shard-000000.tar": 5000, ...}: samples per shard, in shard order
    OUT/labels.json            the label vocabulary: {"format", "labels": [name, ...] (index = class id),
                               "counts": [products per label], "unlabeled": products without a label}

A sample's `json` record holds the product's fields (title, table, category, ...). The table is
M5Product's property-value string `key#:#value#;#key#:#value...`. The category is kept as the
release gives it (a number, a digit string or a name); the loader turns it into a class id through
the label vocabulary, so names and numbers both keep their category (`canonical_label`).
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

from braceexpand import braceexpand

SIZES_FILE = "sizes.json"
"""The size index beside the shards: {shard file name: sample count}, in shard order."""
IN_PROGRESS = "_progress"
"""The converter's working folder inside OUT: a folder holding it but no size index is a conversion
not finished yet, which the loader refuses rather than train on part of it."""
RECORD_MEMBER = "json"
"""Every sample's record member: the product's JSON fields."""
TABLE_PAIR_SEPARATOR = "#;#"
TABLE_KEY_VALUE_SEPARATOR = "#:#"

LABELS_FILE = "labels.json"
"""The label vocabulary beside the shards (written by the converter with `sizes.json`)."""
LABELS_FORMAT = "scale-labels/1"

MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")
"""`<key>.<member>`: webdataset splits a tar member's name at the first dot of its base name."""


def sample_key(product_id: str) -> str:
    """A product id as a sample key: webdataset splits names at the first dot, so keys hold no dot,
    slash or white space (each becomes `_`)."""
    return re.sub(r"[./\\\s]", "_", product_id)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def brace_pattern(out: str | Path, shards: int) -> str:
    """`OUT/shard-{000000..000041}.tar` (webdataset / braceexpand syntax) for `shards` shards."""
    if shards == 1:
        return f"{out}/{shard_name(0)}"
    return f"{out}/shard-{{{0:06d}..{shards - 1:06d}}}.tar"


def split_member(name: str) -> tuple[str, str] | None:
    """A tar member's name -> (sample key, member), None when it is not `<key>.<member>`."""
    match = MEMBER_NAME.match(name)
    return (match[1], match[2]) if match else None


def read_size_index(folder: str | Path) -> dict[str, int]:
    """The folder's `sizes.json` ({} when there is none)."""
    index = Path(folder) / SIZES_FILE
    return json.loads(index.read_text()) if index.is_file() else {}


def list_shards(spec: str) -> list[str]:
    """A shard folder (with `sizes.json` or `*.tar`), a brace pattern, or a glob -> shard paths."""
    path = Path(spec)
    if path.is_dir():
        indexed = (path / SIZES_FILE).is_file()
        if not indexed and (path / IN_PROGRESS).is_dir():
            raise FileNotFoundError(f"shards {spec!r}: a conversion that has not finished (no {SIZES_FILE} yet); "
                                    "run the same `scale shards` command again to finish it")  # fmt: skip
        names = list(read_size_index(path)) if indexed else sorted(p.name for p in path.glob("*.tar"))
        shards = [str(path / name) for name in names]
    else:
        shards = [match for pattern in braceexpand(spec) for match in (sorted(glob.glob(pattern)) or [pattern])]
        shards = [s for s in shards if Path(s).is_file()]
    if not shards:
        raise FileNotFoundError(f"shards {spec!r}: no shard found (not a folder with .tar files, nor a matching pattern)")
    return shards


def parse_table(table: str) -> list[tuple[str, str]]:
    """M5Product's `key#:#value#;#key#:#value` -> [(key, value)]; malformed pairs are skipped."""
    pairs = []
    for item in table.split(TABLE_PAIR_SEPARATOR):
        key, sep, value = item.partition(TABLE_KEY_VALUE_SEPARATOR)
        if sep and key.strip() and value.strip():
            pairs.append((key.strip(), value.strip()))
    return pairs


def format_table(pairs) -> str:
    """[(key, value)] -> M5Product's table string."""
    return TABLE_PAIR_SEPARATOR.join(f"{key}{TABLE_KEY_VALUE_SEPARATOR}{value}" for key, value in pairs)


def is_number(label: str) -> bool:
    """A label that is an integer (digits, an optional minus; short enough to be an id, not a code)."""
    digits = label.lstrip("-")
    return digits.isdigit() and len(digits) < 20


def canonical_label(value: object) -> str | None:
    """A record's category as the vocabulary's key, None when the product has none.

    Numbers and digit strings are one label (`3`, `"3"`, `" 03 "` and `3.0` are all `"3"`): the
    official release stores category numbers, as ints or strings. Any other non-empty string is a
    name, kept as written (stripped). Booleans, lists, objects, empty strings and null are no label.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else (repr(value) if value == value else None)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        return str(int(text)) if is_number(text) else text
    return None


def label_order(label: str) -> tuple[int, int, str]:
    """Numbers first, in numeric order, then names alphabetically: the vocabulary's order."""
    return (0, int(label), "") if is_number(label) else (1, 0, label)


def labels_path(spec: str) -> Path | None:
    """The `labels.json` that goes with a shard folder, pattern or glob (beside its shards)."""
    path = Path(spec)
    folder = path if path.is_dir() else Path(spec.split("{")[0]).parent if "{" in spec else path.parent
    candidate = folder / LABELS_FILE
    return candidate if candidate.is_file() else None


def read_labels(spec: str) -> list[str] | None:
    """The label vocabulary of a shard set (class id -> label), None when it has no `labels.json`
    (a conversion by an older version, or hand-made tars: integer labels are then used as they are)."""
    path = labels_path(spec)
    if path is None:
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable label vocabulary ({error})") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if meta.get("format") != LABELS_FORMAT or not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{path}: field 'labels' must be a list of strings (format {LABELS_FORMAT!r})")
    return labels
