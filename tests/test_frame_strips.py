"""Frames extracted once at conversion (`scale shards --extract-frames TxS`): one JPEG strip per
video that the `frames` stem decodes instead of the MP4."""

from __future__ import annotations

import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from datamodules.limits import DataLimits
from datamodules.shards import write_shards
from scale.media import MediaError
from scale.media.video import extract_strip, frames_to_strip, read_frames, strip_to_frames
from tests.conftest import ROOT, one_batch_and_warnings, tiny_config


def _members(shards):
    names = []
    for path in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            names += tar.getnames()
    return names


@pytest.fixture(scope="module")
def converted(demo_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("strips")
    config = tiny_config()
    frames, size = config.video.frames, config.video.size
    out = {"plain": demo_shards["train"]}
    for name, (count, side) in {"matching": (frames, size), "other": (frames + 1, size)}.items():
        out[name] = root / name
        summary = write_shards(demo_shards["raw_train"], out[name], max_count=10,
                               limits=DataLimits(extract_frames=count, extract_size=side))  # fmt: skip
        out[f"{name}_summary"] = summary
    return out


def test_every_video_gets_one_strip_and_the_report_counts_them(converted):
    members = _members(converted["matching"])
    videos = {m.rsplit(".", 1)[0] for m in members if m.endswith(".mp4")}
    strips = {m[: -len(".frames.jpg")] for m in members if m.endswith(".frames.jpg")}
    assert videos and strips == videos
    report = converted["matching_summary"]
    assert report["derived"]["video/frames_extracted"] == len(videos)
    assert _members(converted["plain"]) == [m for m in members if not m.endswith(".frames.jpg")]


def test_the_stem_reads_the_strip_with_the_frames_the_mp4_gives(converted):
    """The same samples, the same frames up to JPEG's rounding; every other modality bitwise equal."""
    config = tiny_config()
    plain, _ = one_batch_and_warnings(converted["plain"], config)
    strip, messages = one_batch_and_warnings(converted["matching"], config)
    assert not [m for m in messages if "frames.jpg" in m]
    assert plain["key"] == strip["key"]
    present = plain["video"]["present"]
    assert present.any() and torch.equal(present, strip["video"]["present"])
    assert strip["video"]["frames"].dtype == torch.uint8  # normalised on the device, not in the workers
    ours, theirs = (batch["video"]["frames"][present].float() for batch in (strip, plain))  # 0..255 units
    error = (ours - theirs).abs().mean()
    assert 0 < error < 4.0  # JPEG at quality 90 of noisy synthetic frames; 0: it read the MP4
    # Each frame is closest to its own: the right frames in the right order, not just similar ones.
    for video_a, video_b in zip(ours, theirs):
        distances = (video_a[:, None] - video_b[None, :]).abs().flatten(2).mean(-1)  # (T, T)
        assert torch.equal(distances.argmin(dim=1), torch.arange(len(video_a)))
    for name in ("text", "table", "image", "audio"):
        for key, value in plain[name].items():
            assert torch.equal(value, strip[name][key]), (name, key)


def test_strips_of_another_shape_fall_back_to_the_mp4_with_a_warning(converted):
    config = tiny_config()
    plain, _ = one_batch_and_warnings(converted["plain"], config)
    other, messages = one_batch_and_warnings(converted["other"], config)
    assert torch.equal(plain["video"]["frames"], other["video"]["frames"])
    assert any("--extract-frames 3x32" in m for m in messages), messages


def test_strip_round_trip_and_refusals():
    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    back = strip_to_frames(frames_to_strip(frames, quality=100))
    assert back.shape == frames.shape and np.abs(back.astype(int) - frames).mean() < 12
    with pytest.raises(MediaError, match="not a JPEG of square frames"):
        strip_to_frames(frames_to_strip(frames[:, :, :12]))
    with pytest.raises(MediaError, match="over max_video_pixels"):
        strip_to_frames(frames_to_strip(frames), max_pixels=100)
    with pytest.raises(MediaError, match="frame strip"):
        strip_to_frames(b"not an image")


def test_the_strip_holds_the_frames_read_frames_samples(demo_shards):
    """Conversion samples the frames the loader would: the strip decodes to read_frames' output."""
    data = next(iter(sorted((demo_shards["raw_train"] / "videos").glob("*.mp4")))).read_bytes()
    expected = read_frames(data, 3, 32)
    strip = strip_to_frames(extract_strip(data, 3, 32, DataLimits()))
    assert strip.shape == expected.shape
    assert np.abs(strip.astype(int) - expected).mean() < 4.0


def test_the_cli_flag_is_checked(tmp_path):
    run = subprocess.run([sys.executable, "-m", "scale.cli", "shards", "--src", str(tmp_path), "--out", str(tmp_path / "o"),
                          "--extract-frames", "12"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "--extract-frames: not FRAMESxSIZE: '12'" in run.stderr


def test_a_resumed_epoch_through_workers_is_the_same_with_the_mp4s_left_in_the_shard(converted, monkeypatch):
    """What a user runs on strip shards: the training stream through 2 workers, epoch 1 and epoch 1
    resumed after 2 batches. The batches (keys and frames) are the same whether the MP4s beside the
    strips stay in the shard or are read, and the resumed run yields the batches not yet taken."""
    from datamodules.decode import SampleDecoder
    from datamodules.m5product import M5ProductDataModule

    def batches(skip: int) -> list[tuple[list[str], torch.Tensor]]:
        module = M5ProductDataModule(train_shards=str(converted["matching"]), batch_size=8, num_workers=2,
                                     mode="exact", shuffle_buffer=10, model_config=tiny_config())  # fmt: skip
        module.setup("fit")
        loader = module.train_dataloader()
        loader.position = lambda: (1, skip)
        return [(batch["key"], batch["video"]["frames"]) for batch in loader]

    assert SampleDecoder(tiny_config()).deferred_members()["mp4"] == {"frames.jpg"}
    deferred, resumed = batches(0), batches(2)
    monkeypatch.setattr(SampleDecoder, "deferred_members", lambda self: {})  # forked workers see it too
    read = batches(0)
    assert len(deferred) == len(read) == 5
    for (keys, frames), (read_keys, read_frames) in zip(deferred, read):
        assert keys == read_keys and torch.equal(frames, read_frames)
    assert sorted(k for keys, _ in resumed for k in keys) == sorted(k for keys, _ in deferred[2:] for k in keys)
