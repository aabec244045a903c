"""The shard format: what a shard set on disk is, for the converter that writes it and the loader
that reads it (neither imports the other; both import this).

    OUT/shard-000000.tar ...   webdataset tars: members `<key>.<member>` (`json` and the modalities'
                               members, see each modality's file fields), grouped by key
    OUT/sizes.json             {"shard-000000.tar": 5000, ...}: samples per shard, in shard order

A sample's `json` record holds the product's fields (title, table, category, ...). The table is
M5Product's property-value string `key#:#value#;#key#:#value...`.
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
