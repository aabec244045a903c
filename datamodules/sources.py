"""Reading an M5Product release as it comes: the two layouts, and the one field table.

Two layouts are read (`open_source` detects which, or takes `layout=`):

``jsonl`` (what `scale demo-data` writes, see `datamodules/demo.py`)::

    SRC/meta.jsonl     one object per line: {"id", "title", "table", "category", ...,
                       "image": "images/<id>.jpg", "video": ..., "audio": ...,
                       "image_regions": ..., "image_boxes": ..., "video_features": ..., "audio_mel": ...}

  File fields are paths relative to SRC (or absolute); ``null`` means the product lacks it. Every
  other field goes into the sample's JSON unchanged.

``official`` (the M5Product release)::

    SRC/<name>.json              {"<id>": {"title": ..., "pv": "key#:#value#;#...", "label": ...}, ...}
    SRC/image/<id>.jpg           SRC/video/<id>.mp4        SRC/audio/<id>.wav|.flac|.mp3
    SRC/image_regions/<id>.npy   SRC/image_boxes/<id>.npy  SRC/video_features/<id>.npy
    SRC/audio_mel/<id>.npy

  Each record field is read under its official name (``pv`` becomes the sample's ``table``) and
  ``label`` becomes its ``category`` (an int when it is one, as the decoder expects; other labels
  are kept as they are); other keys are kept. A file that is not in its folder means the product
  lacks it. The folder names are the defaults of `DEFAULT_DIRS` (one per file field, named like
  it); `dirs=` / the `--<field>-dir` flags override them.

Derived files: a modality may declare that a product without its file can have one made from
another (audio from the video's sound track, `scale.modalities.base.Derived`), listed in
`Product.derive`. In the official layout that is every product without such a file. In the jsonl
layout only a record with *no* key for it: ``"audio": null`` says the audio is deliberately absent
(`scale corrupt --kind missing` blanks audio that way while the video keeps its track), and must
stay absent.

`FIELD_TABLE` is the field table: which metadata field carries which modality, and how (a record
field, or a file with its shard members), gathered from every registered modality's declarations;
`scale corrupt` (`FIELDS`) and the converter both read it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from scale.modalities import REGISTRY
from scale.modalities.spec import Field, FileField, RecordField

FIELD_TABLE: dict[str, tuple[str, Field]] = {
    source.name: (spec.name, source) for spec in REGISTRY.values() for source in spec.fields
}
"""Field name -> (modality, its declaration), from every registered modality, in registry order."""
RECORD_FIELDS: tuple[RecordField, ...] = tuple(f for _, f in FIELD_TABLE.values() if isinstance(f, RecordField))
TEXT_FIELDS: tuple[str, ...] = tuple(f.name for f in RECORD_FIELDS)
"""The fields kept in the sample's JSON record (title, table)."""
FILE_FIELDS: tuple[str, ...] = tuple(name for name, (_, f) in FIELD_TABLE.items() if isinstance(f, FileField))
"""The fields that are files (media and features), each one shard member."""
FIELDS: dict[str, tuple[str, ...]] = {m: tuple(f for f, (owner, _) in FIELD_TABLE.items() if owner == m) for m in REGISTRY}
"""Modality -> the metadata fields that carry it (record fields, media and pre-extracted features)."""
DERIVABLE: tuple[str, ...] = tuple(name for name in FILE_FIELDS if FIELD_TABLE[name][1].derive is not None)
"""File fields the converter can make from another field's file (audio from a video's sound track)."""
DEFAULT_DIRS: dict[str, str] = {f: f for f in FILE_FIELDS}
"""Official layout: file field -> folder under SRC (`image/`, `video/`, `audio/`, `image_regions/`, ...)."""
LAYOUTS = ("auto", "jsonl", "official")


def shard_extension(field_name: str, path: str | Path) -> str | None:
    """The shard member for a file of `field_name` at `path` (None: an unsupported file type)."""
    return FIELD_TABLE[field_name][1].extensions.get(Path(path).suffix.lower())


@dataclass
class Product:
    """One product record as read from the release, before any file is opened."""

    id: str
    where: str
    """Where the record is, for messages: `meta.jsonl:12` or `products.json["<id>"]`."""
    meta: dict[str, Any]
    """Everything that goes into the sample's JSON (id, title, table, category, ...)."""
    files: dict[str, str] = field(default_factory=dict)
    """File field -> path (may not exist: the planner checks)."""
    derive: tuple[str, ...] = ()
    """File fields the converter may make from another field's file when the product has none."""


@dataclass
class BadRecord:
    """A record that cannot be read as a product (not JSON, not an object, no id)."""

    where: str
    reason: str
    detail: str
    id: str | None = None


@dataclass(frozen=True)
class Source:
    layout: str
    meta: Path
    """The metadata file (meta.jsonl or the official JSON)."""
    root: Path
    """Media paths are relative to this folder."""
    dirs: dict[str, str]
    derive: bool = True
    """Make a product's missing file from another of its files where a modality can (audio from a
    video's sound track)."""

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this source for a restart: the metadata's bytes and how it is read."""
        digest = hashlib.sha256()
        with open(self.meta, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"layout": self.layout, "meta": str(self.meta.resolve()), "meta_sha256": digest.hexdigest(),
                "dirs": self.dirs if self.layout == "official" else None, "derive": self.derive}


def open_source(src: str | Path, layout: str = "auto", meta: str | Path | None = None,
                dirs: dict[str, str] | None = None, derive: bool = True) -> Source:
    """Resolve SRC (a folder, or the metadata file itself) to a `Source`, or fail with one line."""
    src = Path(src).absolute()  # the plan's manifests hold file paths: independent of the working directory
    if layout not in LAYOUTS:
        raise ValueError(f"shards --layout {layout!r}: expected one of {LAYOUTS}")
    unknown = set(dirs or {}) - set(DEFAULT_DIRS)
    if unknown:
        raise ValueError(f"shards: unknown folder field(s) {sorted(unknown)}; expected {list(DEFAULT_DIRS)}")
    if meta is None and src.is_file():
        src, meta = src.parent, src
    if not src.is_dir():
        raise FileNotFoundError(f"shards --src: {src} not found (expected a release folder with meta.jsonl or "
                                "an official *.json, or that metadata file)")
    if meta is None:
        meta = src / "meta.jsonl" if layout != "official" else None
        if meta is None or not meta.is_file():
            if layout == "jsonl":
                raise FileNotFoundError(f"shards --src: {src / 'meta.jsonl'} not found (layout jsonl)")
            found = sorted(p for p in src.glob("*.json") if p.is_file())
            if not found:
                raise FileNotFoundError(f"shards --src: {src} has neither meta.jsonl nor a *.json product file")
            if len(found) > 1:
                raise ValueError(f"shards --src: {src} has several JSON files ({', '.join(p.name for p in found)}); "
                                 "name the product file with --meta")
            meta = found[0]
    meta = Path(meta) if Path(meta).is_absolute() or Path(meta).exists() else src / meta
    if not meta.is_file():
        raise FileNotFoundError(f"shards --meta: {meta} not found")
    if layout == "auto":
        layout = "jsonl" if meta.suffix == ".jsonl" else "official"
    return Source(layout, meta, src, {**DEFAULT_DIRS, **(dirs or {})}, derive)


def iter_products(source: Source) -> Iterator[Product | BadRecord]:
    """Every record of the source in source order, read but not checked against the disk."""
    if source.layout == "jsonl":
        yield from _jsonl(source)
    else:
        yield from _official(source)


def _jsonl(source: Source) -> Iterator[Product | BadRecord]:
    name = source.meta.name
    with open(source.meta, "rb") as lines:
        for number, line in enumerate(lines, 1):
            where = f"{name}:{number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                yield BadRecord(where, "bad_record", f"{where}: not valid JSON ({error})")
                continue
            if not isinstance(record, dict):
                yield BadRecord(where, "bad_record", f"{where}: a JSON {type(record).__name__}, not an object")
                continue
            if not isinstance(record.get("id"), (str, int)) or str(record["id"]) == "":
                yield BadRecord(where, "bad_record", f"{where}: no product id")
                continue
            pid = str(record["id"])
            files = {f: str(source.root / str(record[f])) for f in FILE_FIELDS if record.get(f)}
            meta = {k: v for k, v in record.items() if k not in FILE_FIELDS}
            # A key present as null says the file is deliberately absent: never derive it.
            derive = tuple(f for f in DERIVABLE if f not in record) if source.derive else ()
            yield Product(pid, where, meta, files, derive)


def _category(label: Any) -> Any:
    """M5Product labels are category numbers; as JSON they may be ints or digit strings."""
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return int(label)
    return label


def _official(source: Source) -> Iterator[Product | BadRecord]:
    name = source.meta.name
    try:
        with open(source.meta, "rb") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"shards: {source.meta} is not valid JSON ({error})") from None
    if not isinstance(records, dict):
        raise ValueError(f"shards: {source.meta} holds a JSON {type(records).__name__}; expected an object "
                         '{"<id>": {"title": ..., "pv": ..., "label": ...}}')
    for pid, record in records.items():
        where = f"{name}[{pid!r}]"
        if not isinstance(record, dict):
            yield BadRecord(where, "bad_record", f"{where}: a JSON {type(record).__name__}, not an object", pid)
            continue
        if not pid or pid in (".", "..") or any(c in pid for c in "/\\\0"):
            yield BadRecord(where, "bad_record", f"{where}: the id is not usable as a file name", pid)
            continue
        meta: dict[str, Any] = {"id": pid, **{f.name: record.get(f.official, "") for f in RECORD_FIELDS}}
        if "label" in record:
            meta["category"] = _category(record["label"])
        renamed = {f.official for f in RECORD_FIELDS} | {"label", "id"}
        meta.update((k, v) for k, v in record.items() if k not in renamed)
        files = {}
        for f in FILE_FIELDS:
            folder = source.root / source.dirs[f]
            for suffix in FIELD_TABLE[f][1].extensions:
                path = folder / f"{pid}{suffix}"
                if path.is_file():
                    files[f] = str(path)
                    break
        yield Product(pid, where, meta, files, DERIVABLE if source.derive else ())
