"""Raw products -> webdataset tar shards (+ `sizes.json`), and shard-set discovery for readers.

Input: a raw folder in the demo layout (`meta.jsonl` + media files, see `datamodules/demo.py`).
Output, in OUT:

    shard-000000.tar, shard-000001.tar, ...   samples `<key>.json|.jpg|.mp4|.wav`, and the
                                               pre-extracted features when the raw folder has
                                               them: `<key>.regions.npy|.boxes.npy|.video.npy|.mel.npy`
    sizes.json                                 {"shard-000000.tar": n_samples, ...}

Feature files are copied byte for byte, like media (webdataset splits a name at its first dot, so
their fields are `regions.npy`, `boxes.npy`, `video.npy`, `mel.npy`); the decoder reads them for
the feature stems of the model config (`datamodules/decode.py`).

A shard closes at `max_count` samples or `max_bytes` bytes, whichever comes first, and is written
to a temporary name and renamed when complete, so a crash never leaves a truncated shard under a
real name. A media file that the metadata names but that does not exist makes that modality
missing for the product (counted), not an error.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import tarfile
import time
from collections import Counter
from pathlib import Path

from braceexpand import braceexpand

MEDIA = {"image": "jpg", "video": "mp4", "audio": "wav"}
FEATURES = {
    "image_regions": "regions.npy",
    "image_boxes": "boxes.npy",
    "video_features": "video.npy",
    "audio_mel": "mel.npy",
}
"""meta.jsonl field (a path relative to the raw folder) -> shard field of M5Product's pre-extracted features."""
FILES = {**MEDIA, **FEATURES}
"""Every meta.jsonl field naming a file, and its shard field (in shard order: media, then features)."""
SIZES_FILE = "sizes.json"


class ShardWriter:
    """Writes numbered tar shards bounded by count and bytes, each renamed into place when full."""

    def __init__(self, out: Path, max_count: int, max_bytes: int, prefix: str = "shard"):
        self.out, self.max_count, self.max_bytes, self.prefix = out, max_count, max_bytes, prefix
        self.sizes: dict[str, int] = {}
        self.tar: tarfile.TarFile | None = None

    def write(self, key: str, files: dict[str, bytes]) -> None:
        size = sum(len(data) for data in files.values())
        if self.tar is not None and (self.count >= self.max_count or self.bytes + size > self.max_bytes):
            self.close()
        if self.tar is None:
            self.name = f"{self.prefix}-{len(self.sizes):06d}.tar"
            self.tar = tarfile.open(self.out / (self.name + ".tmp"), "w")
            self.count, self.bytes = 0, 0
        for extension, data in files.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: reproducible shards
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.bytes += size

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        os.replace(self.out / (self.name + ".tmp"), self.out / self.name)
        self.sizes[self.name] = self.count
        self.tar = None


def sample_key(product_id: str) -> str:
    """webdataset splits file names at the first dot: keys must not contain one (or a slash)."""
    return re.sub(r"[./\\\s]", "_", product_id)


def write_shards(src: str | Path, out: str | Path, max_count: int = 2000, max_bytes: int = 512 * 2**20) -> dict:
    """Convert a raw folder to shards; returns a summary (samples, shards, missing media counts)."""
    src, out = Path(src), Path(out)
    meta_path = src / "meta.jsonl"
    if not meta_path.is_file():
        raise FileNotFoundError(f"shards --src: {meta_path} not found (expected a raw folder with meta.jsonl)")
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, max_count, max_bytes)
    missing: Counter[str] = Counter()
    start = time.time()
    with open(meta_path) as lines:
        for line_number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                product = json.loads(line)
                key = sample_key(str(product["id"]))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{meta_path}:{line_number}: bad product record ({error})") from None
            files = {"json": json.dumps({k: v for k, v in product.items() if k not in FILES}).encode()}
            for name, extension in FILES.items():  # a modality (media) or a feature array
                if product.get(name):
                    path = src / product[name]
                    if path.is_file():
                        files[extension] = path.read_bytes()
                    else:
                        missing[name] += 1
            writer.write(key, files)
    writer.close()
    (out / SIZES_FILE).write_text(json.dumps(writer.sizes, indent=1))
    return {
        "samples": sum(writer.sizes.values()),
        "shards": len(writer.sizes),
        "missing_media": dict(missing),
        "seconds": round(time.time() - start, 2),
    }


def list_shards(spec: str) -> list[str]:
    """A shard folder (with `sizes.json` or `*.tar`), a brace pattern, or a glob -> shard paths."""
    path = Path(spec)
    if path.is_dir():
        sizes = path / SIZES_FILE
        names = list(json.loads(sizes.read_text())) if sizes.is_file() else sorted(p.name for p in path.glob("*.tar"))
        shards = [str(path / name) for name in names]
    else:
        shards = [match for pattern in braceexpand(spec) for match in (sorted(glob.glob(pattern)) or [pattern])]
        shards = [s for s in shards if Path(s).is_file()]
    if not shards:
        raise FileNotFoundError(f"shards {spec!r}: no shard found (not a folder with .tar files, nor a matching pattern)")
    return shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="raw folder with meta.jsonl")
    parser.add_argument("--out", required=True, help="output folder for shards")
    parser.add_argument("--max-count", type=int, default=2000, help="samples per shard at most")
    parser.add_argument("--max-bytes", type=int, default=512 * 2**20, help="bytes per shard at most")


def run(args: argparse.Namespace) -> None:
    summary = write_shards(args.src, args.out, args.max_count, args.max_bytes)
    print(f"wrote {summary['samples']} samples in {summary['shards']} shards to {args.out} "
          f"({summary['seconds']} s; missing media: {summary['missing_media'] or 'none'})")  # fmt: skip
