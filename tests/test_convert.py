"""`scale shards` on real files: both release layouts, bounds, parallelism, a real crash, bad media."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
from braceexpand import braceexpand
from PIL import Image

from datamodules import demo
from datamodules.limits import DataLimits
from datamodules.shards import KILL_ENV, PROGRESS, write_shards
from datamodules.sources import FILE_FIELDS
from scale.cli import main as cli_main
from scale.shard_format import list_shards, sample_key
from tests.conftest import helper_endings

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(image_size=32, video_size=16, video_seconds=1.0, fps=4, audio_seconds=1.0,
             missing={"video": 0.25, "audio": 0.25, "table": 0.2}, features=True,
             region_dim=8, video_feature_dim=8, mel_bins=8, mel_frames=20)  # fmt: skip
N = 24
EXTENSION = {"image": "jpg", "video": "mp4", "image_regions": "regions.npy", "image_boxes": "boxes.npy",
             "video_features": "video.npy", "audio_mel": "mel.npy"}


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, Path]:
    """The same 24 products in both layouts (with features; official: wav, mp3 and audio only in the video)."""
    root = tmp_path_factory.mktemp("releases")
    demo.generate(root / "jsonl", N, seed=0, **SMALL)
    demo.generate(root / "official", N, seed=0, layout="official", **SMALL)
    rows = [json.loads(line) for line in (root / "jsonl" / "meta.jsonl").read_text().splitlines()]
    return {"jsonl": root / "jsonl", "official": root / "official", "rows": {r["id"]: r for r in rows}}


def read_shards(out: Path) -> tuple[dict[str, dict[str, bytes]], dict[str, int]]:
    """{key: {extension: bytes}} over the shards of sizes.json, asserting each key is in one shard,
    once, and that sizes.json counts the samples of each tar; also returns sizes.json."""
    sizes = json.loads((out / "sizes.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for name, count in sizes.items():
        keys: list[str] = []
        with tarfile.open(out / name) as tar:
            for member in tar.getmembers():
                key, _, extension = member.name.partition(".")
                if not keys or keys[-1] != key:
                    assert key not in samples, f"{key} in two places"
                    keys.append(key)
                    samples[key] = {}
                assert extension not in samples[key], f"{member.name} twice"
                samples[key][extension] = tar.extractfile(member).read()
        assert len(keys) == count, (name, len(keys), count)
    return samples, sizes


def test_demo_layout_round_trip_every_product_once_with_source_bytes(releases, tmp_path):
    raw = releases["jsonl"]
    summary = write_shards(raw, tmp_path / "out", max_count=5)
    samples, sizes = read_shards(tmp_path / "out")
    assert sorted(samples) == sorted(sample_key(i) for i in releases["rows"])
    assert summary["samples"] == N and summary["shards"] == 5 and max(sizes.values()) <= 5
    assert summary["skipped_products"] == 0 and not summary["dropped"]
    for pid, row in releases["rows"].items():
        sample = samples[sample_key(pid)]
        assert json.loads(sample["json"]) == {k: v for k, v in row.items() if k not in FILE_FIELDS}
        expected = {"json"} | {EXTENSION[f] for f in EXTENSION if row[f]} | ({"wav"} if row["audio"] else set())
        assert set(sample) == expected, pid  # explicit "audio": null: nothing taken from the video
        for field, extension in [*EXTENSION.items(), ("audio", "wav")]:
            if row[field]:
                assert sample[extension] == (raw / row[field]).read_bytes(), (pid, field)
    assert list_shards(str(tmp_path / "out")) == [str(tmp_path / "out" / n) for n in sizes]
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_official_layout_mp3_wav_audio_from_video_and_features(releases, tmp_path):
    raw = releases["official"]
    write_shards(raw, tmp_path / "official", max_count=7)
    write_shards(releases["jsonl"], tmp_path / "jsonl", max_count=7)
    samples, _ = read_shards(tmp_path / "official")
    twins, _ = read_shards(tmp_path / "jsonl")
    products = json.loads((raw / "products.json").read_text())
    assert sorted(samples) == sorted(sample_key(i) for i in products)
    formats = set()
    for pid, row in releases["rows"].items():
        sample, twin = samples[sample_key(pid)], twins[sample_key(pid)]
        meta = json.loads(sample["json"])
        assert meta == {"id": pid, "title": products[pid]["title"], "table": products[pid]["pv"],
                        "category": products[pid]["label"], "instance": row["instance"]}
        assert sample["json"] == twin["json"]  # the two layouts give the same sample metadata
        for field, extension in EXTENSION.items():
            path = raw / field / f"{pid}{'.npy' if extension.endswith('npy') else '.' + extension}"
            assert (extension in sample) == path.exists() == bool(row[field]), (pid, field)
            if path.exists():
                assert sample[extension] == path.read_bytes() == twin[extension]
        audio = [e for e in ("wav", "mp3", "flac") if e in sample]
        assert len(audio) == (1 if row["audio"] else 0), (pid, audio)
        for extension in audio:
            formats.add(extension)
            if extension != "flac":
                assert sample[extension] == (raw / "audio" / f"{pid}.{extension}").read_bytes()
                continue
            assert not list((raw / "audio").glob(f"{pid}.*")) and row["video"]
            wave, rate = soundfile.read(io.BytesIO(sample["flac"]))
            reference, _ = soundfile.read(io.BytesIO(twin["wav"]))
            n = min(len(wave), len(reference))
            assert rate == 16000 and wave.ndim == 1 and abs(len(wave) - len(reference)) <= 2048
            assert np.corrcoef(wave[:n], reference[:n])[0, 1] > 0.95  # the AAC track carries the same sound
    assert formats == {"wav", "mp3", "flac"}


def test_byte_and_count_bounds_hold_and_pattern_lists_the_shards(releases, tmp_path, capsys):
    out = tmp_path / "out"
    max_bytes = 60 * 1024
    cli_main(["shards", "--src", str(releases["official"]), "--out", str(out), "--max-count", "4",
              "--max-bytes", "60K", "--processes", "1"])
    pattern = capsys.readouterr().out.strip().splitlines()[-1]
    samples, sizes = read_shards(out)
    assert len(samples) == N and all(0 < c <= 4 for c in sizes.values())
    assert all((out / name).stat().st_size <= max_bytes for name in sizes)
    assert [str(out / n) for n in sizes] == list(braceexpand(pattern))
    assert any(c < 4 for c in list(sizes.values())[:-1]), "the byte bound never closed a shard early"
    # One product larger than max_bytes gets a shard of its own, flagged in the report.
    small = write_shards(releases["jsonl"], tmp_path / "tiny", max_count=4, max_bytes=20480)
    assert small["samples"] == N and small["oversized_shards"]
    assert all(json.loads((tmp_path / "tiny" / "sizes.json").read_text())[n] == 1 for n in small["oversized_shards"])


def test_two_processes_write_the_same_shards_as_one(releases, tmp_path):
    one = write_shards(releases["official"], tmp_path / "one", max_count=5, processes=1)
    two = write_shards(releases["official"], tmp_path / "two", max_count=5, processes=2)
    assert one["shards"] == two["shards"] == 5 and two["this_run"]["shards_written"] == 5
    for k in range(5):
        name = f"shard-{k:06d}.tar"
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*.tar")}


def test_restart_after_sigkill_keeps_finished_shards_and_completes(releases, tmp_path):
    """A real crash: the conversion SIGKILLs its own process group (main + 2 workers) mid-shard."""
    out = tmp_path / "out"
    code = (f"from datamodules.shards import write_shards; "
            f"write_shards({str(releases['official'])!r}, {str(out)!r}, max_count=3, processes=2)")
    crashed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, KILL_ENV: "2"},
                             start_new_session=True, capture_output=True, timeout=120)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    records = sorted((out / PROGRESS).glob("shard-*.json"))
    assert 2 <= len(records) < 8 and not (out / "sizes.json").exists()
    done = {r.name.replace(".json", ".tar") for r in records}
    before = {name: stat for name, stat in _snapshot(out).items() if name in done}
    assert set(before) == done
    assert list(out.glob("*.tar.tmp")), "the crash should have left a partial shard behind"

    summary = write_shards(releases["official"], out, max_count=3, processes=1)
    assert summary["this_run"]["shards_written"] == 8 - len(done)
    assert {n: s for n, s in _snapshot(out).items() if n in done} == before, "a finished shard was rewritten"
    samples, sizes = read_shards(out)
    assert len(sizes) == 8 and sorted(samples) == sorted(sample_key(i) for i in releases["rows"])
    assert not list(out.rglob("*.tmp"))
    fresh = tmp_path / "fresh"
    write_shards(releases["official"], fresh, max_count=3)
    assert all((out / n).read_bytes() == (fresh / n).read_bytes() for n in sizes)
    # Once everything is done, the same command rewrites nothing.
    finished = _snapshot(out)
    again = write_shards(releases["official"], out, max_count=3, processes=2)
    assert again["this_run"]["shards_written"] == 0 and _snapshot(out) == finished


def _jpeg(path: Path, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return path.read_bytes()


def _bad_release(raw: Path, good: Path, good_row: dict) -> None:
    """Hand-made broken products next to good ones (media copied from a demo product)."""
    media = raw / "m"
    media.mkdir(parents=True)
    data = _jpeg(media / "good.jpg")
    (media / "trunc.jpg").write_bytes(data[: len(data) // 2])
    sof = data.index(b"\xff\xc0")  # baseline SOF0: length(2) precision(1) height(2) width(2)
    (media / "bomb.jpg").write_bytes(data[: sof + 5] + (30000).to_bytes(2, "big") * 2 + data[sof + 9:])
    mp4 = (good / good_row["video"]).read_bytes()
    (media / "random.mp4").write_bytes(np.random.default_rng(0).bytes(len(mp4)))
    (media / "trunc.mp4").write_bytes(mp4[: len(mp4) * 2 // 5])
    (media / "good.mp4").write_bytes(mp4)
    soundfile.write(media / "zero.wav", np.zeros(0, np.float32), 16000)
    np.save(media / "pickle.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(media / "video.npy", np.ones((3, 8), np.float32))
    rows = [
        {"id": "trunc-jpeg", "title": "kept title", "image": "m/trunc.jpg"},
        {"id": "bomb", "title": "kept title", "image": "m/bomb.jpg"},
        {"id": "random-mp4", "title": "t", "table": "k#:#v", "video": "m/random.mp4", "image": "m/good.jpg"},
        {"id": "trunc-mp4", "title": "t", "video": "m/trunc.mp4", "video_features": "m/video.npy"},
        {"id": "zero-wav", "title": "t", "audio": "m/zero.wav", "video": "m/good.mp4"},
        {"id": "pickle", "title": "t", "video": "m/good.mp4", "video_features": "m/pickle.npy"},
        {"id": "long-title", "title": "x" * 500},
        {"id": "bad-table", "title": "t", "table": "just words#;#no pairs here"},
        {"id": "half-table", "table": "colour#:#red#;#broken#;#size#:#L"},
        {"id": "number-title", "title": 12345, "image": "m/good.jpg"},
        {"id": "all-bad", "title": "", "table": "", "image": "m/trunc.jpg", "video": "m/random.mp4", "audio": "m/zero.wav"},
        {"id": "gone", "title": "t", "image": "m/nowhere.jpg"},
        {"id": "trunc-jpeg", "title": "a duplicate id"},
    ]
    lines = [json.dumps(r) for r in rows]
    lines[3:3] = ["not json at all", "[1, 2]"]  # lines 4 and 5 of the file
    (raw / "meta.jsonl").write_text("\n".join(lines) + "\n")


def test_bad_media_and_records_are_reported_and_the_rest_kept(releases, tmp_path):
    good_row = next(r for r in releases["rows"].values() if r["video"] and r["audio"])
    _bad_release(tmp_path / "raw", releases["jsonl"], good_row)
    summary = write_shards(tmp_path / "raw", tmp_path / "out", max_count=1, limits=DataLimits(max_title_chars=100))
    samples, sizes = read_shards(tmp_path / "out")
    items = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    found = {(i["id"], i["modality"], i["reason"], i["action"]) for i in items}
    expected = {
        ("trunc-jpeg", "image", "truncated", "dropped"), ("bomb", "image", "too_many_pixels", "dropped"),
        ("random-mp4", "video", "corrupt", "dropped"), ("trunc-mp4", "video", "corrupt", "dropped"),
        ("zero-wav", "audio", "empty", "dropped"), ("pickle", "video", "object_dtype", "dropped"),
        ("long-title", "text", "cut", "cut"), ("bad-table", "table", "malformed", "dropped"),
        ("half-table", "table", "malformed_pairs", "kept"), ("number-title", "text", "not_string", "dropped"),
        ("all-bad", "image", "truncated", "dropped"), ("all-bad", "video", "corrupt", "dropped"),
        ("all-bad", "audio", "empty", "dropped"), ("all-bad", "*", "no_usable_modality", "skipped"),
        ("gone", "image", "not_found", "dropped"), ("trunc-jpeg", "*", "duplicate_id", "skipped"),
        (None, "*", "bad_record", "skipped"),
    }
    assert expected <= found, expected - found
    details = " ".join(i["detail"] for i in items)
    assert "meta.jsonl:4: not valid JSON" in details and "meta.jsonl:5: a JSON list" in details
    assert "30000x30000" in details and "pickle" in details
    # What was kept: every other modality of those products, byte for byte.
    kept = {k: set(v) for k, v in samples.items()}
    assert kept == {
        "trunc-jpeg": {"json"}, "bomb": {"json"}, "random-mp4": {"json", "jpg"},
        "trunc-mp4": {"json", "video.npy"}, "zero-wav": {"json", "mp4"},
        "pickle": {"json", "mp4", "flac"},  # no "audio" key at all: the audio comes from the video's track
        "long-title": {"json"}, "bad-table": {"json"}, "half-table": {"json"}, "number-title": {"json", "jpg"},
        "gone": {"json"},
    }
    assert json.loads(samples["long-title"]["json"])["title"] == "x" * 100
    assert "table" not in json.loads(samples["bad-table"]["json"]) and "title" not in json.loads(samples["number-title"]["json"])
    assert json.loads(samples["half-table"]["json"])["table"] == "colour#:#red#;#broken#;#size#:#L"
    assert samples["zero-wav"]["mp4"] == (tmp_path / "raw" / "m" / "good.mp4").read_bytes()
    # The skipped product's planned shard is still there, empty: numbering stays contiguous.
    assert len(sizes) == 12 and list(sizes.values()).count(0) == 1 and summary["empty_shards"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["skipped_products"] == 4 and report["skipped"]["*/bad_record"] == 2
    assert report["dropped"]["image/truncated"] == 2 and report["missing_media"] == {"image": 1}


def test_bad_inputs_are_one_line_errors(releases, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope"):
        write_shards(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither meta.jsonl nor"):
        write_shards(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "two").mkdir()
    for name in ("a.json", "b.json"):
        (tmp_path / "two" / name).write_text("{}")
    with pytest.raises(ValueError, match="several JSON files"):
        write_shards(tmp_path / "two", tmp_path / "out")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json holds a JSON list"):
        write_shards(tmp_path / "list.json", tmp_path / "out")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match=r"no usable product record.*meta.jsonl:1"):
        write_shards(tmp_path / "bad", tmp_path / "out")
    # Another plan in OUT is never replaced silently.
    write_shards(releases["jsonl"], tmp_path / "done", max_count=12)
    with pytest.raises(ValueError, match=r"plan.json.*max_count: 12 -> 6"):
        write_shards(releases["jsonl"], tmp_path / "done", max_count=6)
    assert write_shards(releases["jsonl"], tmp_path / "done", max_count=6, overwrite=True)["shards"] == 4
    assert len(list((tmp_path / "done").glob("shard-*.tar"))) == 4
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["shards", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert str(exit_info.value).startswith("scale shards: error:") and "\n" not in str(exit_info.value)


def test_an_overwrite_that_crashes_leaves_the_old_shard_set_whole(releases, tmp_path):
    """--overwrite writes the new conversion beside OUT and swaps it in when done: killed midway,
    the old set is still there and loadable, and the same command resumes and replaces it."""
    out = tmp_path / "done"
    write_shards(releases["jsonl"], out, max_count=12)
    old, old_sizes = read_shards(out)
    code = (f"from datamodules.shards import write_shards; "
            f"write_shards({str(releases['jsonl'])!r}, {str(out)!r}, max_count=6, overwrite=True)")
    crashed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, KILL_ENV: "1"},
                             start_new_session=True, capture_output=True, timeout=120)  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    assert read_shards(out) == (old, old_sizes) and len(list_shards(str(out))) == 2
    assert (tmp_path / ".done.replacing" / PROGRESS / "plan.json").is_file()
    summary = write_shards(releases["jsonl"], out, max_count=6, overwrite=True)
    assert summary["shards"] == 4 and summary["pattern"].startswith(str(out))
    assert read_shards(out)[0] == old, "the same products, in more shards"
    assert len(list_shards(str(out))) == 4 and not list(tmp_path.glob(".done.*"))


def test_official_folder_flags_and_bad_official_records(releases, tmp_path, capsys):
    raw = tmp_path / "raw"
    products = json.loads((releases["official"] / "products.json").read_text())
    pid, record = next((k, v) for k, v in products.items() if (releases["official"] / "image" / f"{k}.jpg").exists())
    (raw / "pics").mkdir(parents=True)
    (raw / "pics" / f"{pid}.jpg").write_bytes((releases["official"] / "image" / f"{pid}.jpg").read_bytes())
    (raw / "items.json").write_text(json.dumps({pid: record, "../escape": {"title": "t"}, "x": "not an object"}))
    cli_main(["shards", "--src", str(raw), "--out", str(tmp_path / "out"), "--image-dir", "pics", "--processes", "1"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"{tmp_path / 'out'}/shard-000000.tar"
    samples, _ = read_shards(tmp_path / "out")
    assert set(samples) == {sample_key(pid)} and "jpg" in samples[sample_key(pid)]
    items = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(i["id"] for i in items if i["reason"] == "bad_record") == ["../escape", "x"]


def test_a_video_that_hangs_the_decoder_is_dropped_after_the_time_limit(releases, tmp_path, monkeypatch):
    """The converter's frame check runs under `video_timeout_s` in a helper process: a decoder that
    never returns costs that long, and the product keeps its other modalities."""
    import time

    from scale.media import video as video_reader

    monkeypatch.setattr(video_reader, "helper_target", lambda *args: time.sleep(60))
    video_reader.shutdown_helper()  # the next helper forks with the hanging target
    rows = [json.loads(line) for line in (releases["jsonl"] / "meta.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["video"])
    raw = tmp_path / "raw"
    raw.mkdir()
    only_video = {**row, **{name: None for name in FILE_FIELDS}, "video": str(releases["jsonl"] / row["video"])}
    (raw / "meta.jsonl").write_text(json.dumps(only_video) + "\n")
    endings = helper_endings(monkeypatch)
    try:
        write_shards(raw, tmp_path / "out", limits=DataLimits(video_timeout_s=1.0))  # one process: this one
    finally:
        video_reader.shutdown_helper()
    # The hung helper was killed while still asleep (not waited for): the first kill, by signal.
    assert endings and endings[0] == "signal 9", endings
    items = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [(i["modality"], i["reason"]) for i in items] == [("video", "timeout")]
    samples, _ = read_shards(tmp_path / "out")
    assert set(samples[sample_key(row["id"])]) == {"json"}  # title and table kept
