"""Fuzz: shards with 14 kinds of corruption planted among good products (real JPEG, MP4 and WAV
bytes), streamed through one exact epoch by two data workers. Nothing crashes, every sample is
read once, the counts per kind are exactly what was planted, and `scale fit` on the same shards
stops at the configured error rate (and only past it)."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from datamodules.decode import SampleDecoder
from datamodules.error_budget import COUNTS_KEY, DataCounts
from datamodules.limits import DataLimits
from datamodules.streams import ExactEpochStream, shard_sizes
from tests.conftest import ROOT, TINY_YAML, tiny_config
from tests.test_bad_data import audio, jpeg, mp4, with_jpeg_size

LIMITS = {"max_json_member_bytes": 20_000, "max_image_bytes": 30_000}
"""Small limits, so that over-limit members are cheap to plant."""

# kind -> (what the decoder counts for one such sample, whether the sample is dropped)
KINDS: dict[str, tuple[dict[str, int], bool]] = {
    "record not JSON": ({"json": 1}, True),
    "record not an object": ({"json": 1}, True),
    "record over the member limit": ({"json": 1, "json: too large": 1}, True),
    "record not UTF-8": ({"json": 1, "json: not utf-8": 1}, False),
    "title not a string": ({"text": 1}, False),
    "table not a string": ({"table": 1}, False),
    "JPEG truncated": ({"image": 1}, False),
    "JPEG header bomb": ({"image": 1, "image: too large": 1}, False),
    "image over the byte limit": ({"image": 1, "image: too large": 1}, False),
    "MP4 garbage": ({"video": 1}, False),
    "audio garbage": ({"audio": 1}, False),
    "image is a symlink": ({"tar": 1, "tar: not a file": 1}, False),
    "key is a .. path": ({"tar": 1, "tar: unsafe name": 1}, True),
    "key repeated": ({"tar": 1, "tar: repeated key": 1}, True),
    "nothing usable": ({"image": 1}, True),  # an image-only product whose image is broken: `dropped`
}
PER_KIND, GOOD, SHARDS = 6, 150, 3


def member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def record(index: int, **fields) -> bytes:
    return json.dumps({"title": f"red kettle number {index}", "table": f"colour#:#red#;#size#:#{index % 5}",
                       "category": index % 4, "instance": f"i{index}", **fields}).encode()  # fmt: skip


def plant(folder: Path) -> dict:
    """Write the shards; returns the counts the decoder must report."""
    media = {"jpg": jpeg(32, 32), "mp4": mp4(frames=6, size=32), "wav": audio("WAV", seconds=0.5)}
    products = [("good", i) for i in range(GOOD)] + [(kind, i) for kind in KINDS for i in range(PER_KIND)]
    random.Random(0).shuffle(products)
    folder.mkdir(parents=True)
    tars = [tarfile.open(folder / f"shard-{s:06d}.tar", "w") for s in range(SHARDS)]
    for number, (kind, i) in enumerate(products):
        tar, key = tars[number % SHARDS], f"p{number:05d}"
        members = {"json": record(number), "jpg": media["jpg"]}
        if number % 4 == 0:
            members["mp4"] = media["mp4"]
        if number % 4 == 1:
            members["wav"] = media["wav"]
        if kind == "record not JSON":
            members["json"] = b'{"title": "kettle", '
        elif kind == "record not an object":
            members["json"] = b'["kettle"]'
        elif kind == "record over the member limit":
            members["json"] = record(number, notes="x" * LIMITS["max_json_member_bytes"])
        elif kind == "record not UTF-8":
            members["json"] = record(number).replace(b"red kettle", b"caf\xe9 kettle")
        elif kind == "title not a string":
            members["json"] = record(number, title=12345)
        elif kind == "table not a string":
            members["json"] = record(number, table={"colour": "red"})
        elif kind == "JPEG truncated":
            members["jpg"] = media["jpg"][: len(media["jpg"]) // 3]
        elif kind == "JPEG header bomb":
            members["jpg"] = with_jpeg_size(media["jpg"], 30_000, 30_000)
        elif kind == "image over the byte limit":
            members["jpg"] = media["jpg"] + b"\0" * LIMITS["max_image_bytes"]
        elif kind == "MP4 garbage":
            members["mp4"] = b"\0\0\0\x18ftypmp42" + bytes(random.Random(number).randbytes(3000))
        elif kind == "audio garbage":
            members["wav"] = b"RIFF\x24\0\0\0WAVEfmt " + bytes(random.Random(number).randbytes(500))
        elif kind == "key is a .. path":
            key = f"../../{key}"
        elif kind == "nothing usable":
            members = {"json": json.dumps({"category": 1}).encode(), "jpg": media["jpg"][:200]}
        for field, data in members.items():
            if kind == "image is a symlink" and field == "jpg":
                link = tarfile.TarInfo(f"{key}.jpg")
                link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(link)
            else:
                member(tar, f"{key}.{field}", data)
        if kind == "key repeated":  # the same key again straight after: a sample of its own, not merged
            member(tar, f"{key}.json", record(number + 100_000))
            member(tar, f"{key}.jpg", media["jpg"])
    for tar in tars:
        tar.close()

    expected = DataCounts()
    for kind, _ in products:
        expected.samples += 1 + (kind == "key repeated")  # the first of a repeated key is a good sample
        if kind == "good":
            continue
        errors, dropped = KINDS[kind]
        expected.bad_samples += 1
        expected.errors.update(errors)
        expected.dropped += dropped and not any(k.startswith(("json", "tar")) for k in errors)
    return expected.to_dict()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("fuzz") / "shards"
    return folder, plant(folder)


def test_an_exact_epoch_with_two_workers_counts_exactly_what_was_planted(shards):
    folder, expected = shards
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    decoder = SampleDecoder(tiny_config(), DataLimits(**LIMITS), enforce_error_rate=False)
    stream = ExactEpochStream(urls, shard_sizes(urls), decoder, batch_size=8, shuffle_buffer=16, seed=3)
    seen, counts = Counter(), DataCounts()
    for batch in DataLoader(stream, batch_size=None, num_workers=2):
        counts.add(batch.pop(COUNTS_KEY))
        seen.update(batch["key"])
    assert counts.to_dict() == expected
    usable = expected["samples"] - PER_KIND * sum(dropped for _, dropped in KINDS.values())
    assert sum(seen.values()) == usable and max(seen.values()) == 1, "every usable sample once, none twice"
    assert not any(key.startswith("..") or key.startswith("/") for key in seen)


def fit(folder: Path, run: Path, max_error_rate: float) -> subprocess.CompletedProcess:
    limits = [f"--data.limits.{name}={value}" for name, value in LIMITS.items()]
    command = [sys.executable, "-m", "scale.cli", "fit", "--config", str(TINY_YAML), "--data.train_shards", str(folder),
               "--data.mode", "exact", "--trainer.max_steps", "-1", "--trainer.max_epochs", "1",
               "--data.num_workers", "2", "--data.batch_size", "16", "--trainer.default_root_dir", str(run),
               f"--data.limits.max_error_rate={max_error_rate}", *limits]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_error_rate_stop_fires_at_the_configured_rate(shards, tmp_path):
    folder, expected = shards
    share = expected["bad_samples"] / expected["samples"]
    under = fit(folder, tmp_path / "under", round(share + 0.01, 3))
    assert under.returncode == 0, under.stderr[-3000:]
    over = fit(folder, tmp_path / "over", round(share - 0.01, 3))
    assert over.returncode == 1
    last = over.stderr.strip().splitlines()[-1]
    assert last.startswith("scale fit: stopped: ") and "Traceback" not in over.stderr
    assert f"{expected['bad_samples']} of {expected['samples']} samples" in last
    assert f"json: not utf-8={PER_KIND}" in last and f"tar: repeated key={PER_KIND}" in last
