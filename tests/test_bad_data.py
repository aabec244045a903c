"""Bad data never stops training: every kind of broken field makes its modality absent (or drops the
sample), is counted per kind, and only a high error rate stops the run. Real encoded files throughout
(PIL, PyAV, soundfile), real forked helper processes, a real DataLoader with two workers."""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import signal
import struct
import tarfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from datamodules.collate import collate
from datamodules.decode import SampleDecoder
from datamodules.error_budget import DataErrorRateExceeded
from datamodules.limits import DataLimits
from scale.media import MediaTooLarge
from scale.media import video as video_reader
from scale.media.image import decode_image
from scale.media.video import read_frames
from scale.modalities.audio.stems import WaveformStem
from scale.modalities.image.stems import PixelStem
from scale.modalities.spec import RawSample
from tests.conftest import ROOT, TINY_YAML, helper_endings, tiny_config
from tests.test_features import UNPICKLED, Tripwire  # an object that records being unpickled

# ---- real media, made here (small and fast) ----------------------------------------------------


def jpeg(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=85)
    return out.getvalue()


def with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its SOF0 header claiming width x height (the scan data unchanged)."""
    sof = data.index(b"\xff\xc0")
    # SOF0: marker (2), segment length (2), sample precision (1), height (2), width (2)
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def mp4(frames: int = 12, size: int = 32, fps: int = 6, gop: int | None = None, bframes: int = 0) -> bytes:
    """H.264 MP4 whose frame k is uniformly grey at level 10 * k + 5 (mod 250): frame indices can be read back."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast" if not bframes else "veryfast", "bf": str(bframes),
                          **({"g": str(gop), "keyint_min": str(gop)} if gop else {})}  # fmt: skip
        stream.codec_context.thread_count = 1
        stream.codec_context.time_base = Fraction(1, fps)
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), (10 * k + 5) % 250, np.uint8), format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return out.getvalue()


def frame_levels(frames: np.ndarray) -> list[int]:
    """Frame indices read back from the grey levels `mp4()` writes."""
    return [int(round((f.mean() - 5) / 10)) for f in frames]


def audio(fmt: str, seconds: float = 1.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(0).standard_normal(len(t))  # energy in every band, over 16-bit rounding
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) * np.exp(-2 * t) + 0.05 * noise).astype(np.float32)
    out = io.BytesIO()
    soundfile.write(out, wave, rate, format=fmt)
    return out.getvalue()


META = {"title": "red enamel kettle", "table": "color#:#red#;#material#:#steel", "category": 3, "instance": "i1"}


def record(**fields) -> bytes:
    return json.dumps({**META, **fields}).encode()


@pytest.fixture(scope="module")
def media() -> dict[str, bytes]:
    return {"jpg": jpeg(), "mp4": mp4(), "wav": audio("WAV"), "flac": audio("FLAC"), "mp3": audio("MP3")}


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture
def decoder(config) -> SampleDecoder:
    return SampleDecoder(config, DataLimits(video_timeout_s=20.0))


def present(decoded: dict) -> dict[str, bool]:
    return {m: bool(decoded[m]["present"]) for m in ("text", "table", "image", "video", "audio")}


def errors(decoder: SampleDecoder) -> dict[str, int]:
    return {kind: count for kind, count in decoder.errors.items() if count}


# ---- images ----------------------------------------------------------------------------------


def test_clean_sample_decodes_every_modality(decoder, media):
    decoded = decoder({"__key__": "ok", "json": record(), "jpg": media["jpg"], "mp4": media["mp4"], "wav": media["wav"]})
    assert all(present(decoded).values()) and not errors(decoder)
    assert decoder.samples == 1 and decoder.bad_samples == 0


def test_truncated_and_corrupt_jpeg_make_the_image_absent(decoder, media):
    good = media["jpg"]
    cases = {
        "truncated": good[: len(good) // 2],
        "junk after the SOI marker": b"\xff\xd8\xff" + bytes(np.random.default_rng(0).integers(0, 256, 2000, np.uint8)),
        "empty": b"",
        "a PNG signature and nothing else": b"\x89PNG\r\n\x1a\n",
    }
    for name, data in cases.items():
        decoded = decoder({"__key__": name, "json": record(), "jpg": data})
        assert present(decoded) == {"text": True, "table": True, "image": False, "video": False, "audio": False}, name
        assert not decoded["image"]["pixels"].any()
    assert errors(decoder) == {"image": len(cases)}
    assert decoder.bad_samples == decoder.samples == len(cases)


def test_decompression_bomb_header_is_refused_before_decoding(decoder, media, monkeypatch):
    """A 3-KB JPEG whose header claims 30000 x 30000 (2.7 GB of RGB) is refused from the header,
    without the allocation (the peak memory stays within 200 MB). 8000 x 6000 is under PIL's own bomb check (which only warns
    below 2x Image.MAX_IMAGE_PIXELS) but over max_image_pixels: refused by ours."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for width, height in ((30000, 30000), (8000, 6000)):
        bomb = with_jpeg_size(media["jpg"], width, height)
        with monkeypatch.context() as patch:
            patch.setattr(Image, "MAX_IMAGE_PIXELS", None)
            with Image.open(io.BytesIO(bomb)) as image:
                assert image.size == (width, height)  # the header really claims it
        decoded = decoder({"__key__": f"bomb{width}", "json": record(), "jpg": bomb})
        assert not present(decoded)["image"] and present(decoded)["text"]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 * 1024
    assert errors(decoder) == {"image": 2, "image: too large": 2}


def test_image_byte_limit_and_draft_decoding(config, media):
    decoder = SampleDecoder(config, DataLimits(max_image_bytes=len(media["jpg"]) - 1))
    assert not present(decoder({"__key__": "big", "json": record(), "jpg": media["jpg"]}))["image"]
    assert errors(decoder) == {"image": 1, "image: too large": 1}
    # A large JPEG decodes at reduced DCT scale (draft) and still matches the full decode closely.
    big = jpeg(1600, 1200)
    transform = PixelStem.transform(config.image)
    drafted = decode_image(big, transform, max_pixels=10**8, size=config.image.size)
    full = decode_image(big, transform)
    assert drafted.shape == full.shape == (3, config.image.size, config.image.size)
    assert (drafted - full).abs().mean() < 0.15  # normalised units; noise images are the worst case


# ---- video -----------------------------------------------------------------------------------


def test_videos_decord_cannot_open_make_the_video_absent(decoder, media):
    good = media["mp4"]
    cases = {
        "random bytes": bytes(np.random.default_rng(1).integers(0, 256, 5000, np.uint8)),
        "truncated": good[: len(good) // 2],
        "header only": good[:64],
        "empty": b"",
    }
    for name, data in cases.items():
        decoded = decoder({"__key__": name, "json": record(), "mp4": data})
        assert not present(decoded)["video"] and present(decoded)["text"], name
        assert not decoded["video"]["frames"].any()
    assert errors(decoder) == {"video": len(cases)}
    # The helper survives failed decodes: a good video still decodes through it.
    assert present(decoder({"__key__": "ok", "json": record(), "mp4": good}))["video"]


def test_video_header_and_byte_limits(config, media):
    data = media["mp4"]  # 32 x 32, 2 s
    for limits in (DataLimits(max_video_pixels=32 * 32 - 1), DataLimits(max_video_seconds=1.5),
                   DataLimits(max_video_bytes=len(data) - 1)):  # fmt: skip
        decoder = SampleDecoder(config, limits)
        assert not present(decoder({"__key__": "v", "json": record(), "mp4": data}))["video"]
        assert errors(decoder) == {"video": 1, "video: too large": 1}, limits
    with pytest.raises(MediaTooLarge, match="max_video_pixels"):
        read_frames(data, 3, 16, max_pixels=100)  # in process
    with pytest.raises(MediaTooLarge, match="max_video_seconds"):
        read_frames(data, 3, 16, timeout_s=10, max_seconds=1.0)  # raised in the helper, re-raised here


def test_video_timeout_kills_the_helper_and_the_next_call_works(decoder, media, monkeypatch):
    data = media["mp4"]
    expected = read_frames(data, 3, 32)  # in process
    np.testing.assert_array_equal(read_frames(data, 3, 32, timeout_s=10), expected)
    # 1) A real decode (every frame of 120 at 128 x 128: tens of ms) that overruns a 1-ms limit;
    # the helper is killed (and reaped).
    helper, pid = video_reader._helper, video_reader._helper.pid
    with pytest.raises(TimeoutError, match="video decode exceeded"):
        read_frames(mp4(frames=120, size=128), 120, 128, timeout_s=1e-3)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    np.testing.assert_array_equal(read_frames(data, 3, 32, timeout_s=10), expected)  # a fresh helper
    assert video_reader._helper is not helper and video_reader._helper.pid != pid
    # 2) A decode that genuinely hangs (as decord does, inside C code): the helper, forked after the
    # patch, sleeps; the call returns at the limit, the helper is killed, and the next call works.
    video_reader.shutdown_helper()
    monkeypatch.setattr(video_reader, "helper_target", lambda *args: time.sleep(60))
    endings = helper_endings(monkeypatch)
    with pytest.raises(TimeoutError, match="exceeded 0.5 s"):
        read_frames(data, 3, 32, timeout_s=0.5)
    # Killed while still asleep (a helper the call had waited for would have ended by itself).
    assert endings == ["signal 9"], endings
    hung = SampleDecoder(decoder.config, DataLimits(video_timeout_s=0.5))
    decoded = hung({"__key__": "hang", "json": record(), "mp4": data})  # a hung helper again
    assert not present(decoded)["video"] and errors(hung) == {"video": 1, "video: timeout": 1}
    monkeypatch.undo()
    np.testing.assert_array_equal(read_frames(data, 3, 32, timeout_s=10), expected)


def test_a_crashing_decoder_process_is_reported_and_replaced(media, monkeypatch):
    """A segfault inside decord would kill a data worker; in the helper it is one failed video."""
    data = media["mp4"]
    video_reader.shutdown_helper()
    monkeypatch.setattr(video_reader, "helper_target", lambda *args: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(RuntimeError, match=r"video decoder process died \(signal 9\)"):
        read_frames(data, 3, 32, timeout_s=10)
    monkeypatch.undo()
    assert read_frames(data, 3, 32, timeout_s=10).shape == (3, 32, 32, 3)
    # Died between two calls (e.g. the OOM killer): the next call starts another and succeeds.
    os.kill(video_reader._helper.pid, signal.SIGKILL)
    time.sleep(0.1)
    assert read_frames(data, 3, 32, timeout_s=10).shape == (3, 32, 32, 3)


def test_helper_is_not_reused_by_a_forked_child(media):
    data = media["mp4"]
    expected = read_frames(data, 3, 32, timeout_s=10)
    parent_helper = video_reader._helper.pid
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: must start its own helper, and must not kill the parent's
        try:
            frames = read_frames(data, 3, 32, timeout_s=10)
            ok = np.array_equal(frames, expected) and video_reader._helper.pid not in (0, parent_helper)
            video_reader.shutdown_helper()
            os.write(write_end, b"ok" if ok else b"no")
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    assert os.read(read_end, 2) == b"ok"
    os.close(read_end)
    assert video_reader._helper.pid == parent_helper  # the parent's helper still runs, and works
    np.testing.assert_array_equal(read_frames(data, 3, 32, timeout_s=10), expected)


@pytest.mark.parametrize("gop, bframes", [(None, 0), (4, 2)])
def test_pyav_seeking_reads_the_same_frames_as_decord_and_a_full_decode(gop, bframes):
    """Frame k is grey level 10k + 5: decoded levels name the frame indices each backend returned.
    (None, 0) is the demo's encoding (x264 ultrafast, one keyframe); (4, 2) has a keyframe every
    4 frames and B-frames, so the PyAV reader seeks, and decodes out of order."""
    data = mp4(frames=21, gop=gop, bframes=bframes)
    wanted = video_reader.sample_indices(21, 6).tolist()  # [0, 4, 8, 12, 16, 20]
    seek = video_reader._read_pyav(data, 6, 32)
    assert frame_levels(seek) == wanted
    assert frame_levels(video_reader._read_decord(data, 6, 32)) == wanted
    with av.open(io.BytesIO(data)) as container:
        full = video_reader._read_pyav_all(container, container.streams.video[0], 6, 32)
    np.testing.assert_array_equal(seek, full)
    assert frame_levels(read_frames(data, 5, 32, backend="pyav", timeout_s=10)) == [0, 5, 10, 15, 20]


# ---- audio -----------------------------------------------------------------------------------


def test_audio_from_wav_flac_or_mp3(decoder, media):
    fbanks = {}
    for field in ("wav", "flac", "mp3"):
        decoded = decoder({"__key__": field, "json": record(), field: media[field]})
        assert present(decoded)["audio"], field
        audio = decoded["audio"]
        fbanks[field] = WaveformStem.fbank(audio["wave"][None], audio["samples"][None], decoder.config.audio)["fbank"][0]
    assert not errors(decoder)
    # The same sound: FLAC differs from WAV by 16-bit rounding only, MP3 is lossy.
    assert (fbanks["flac"] - fbanks["wav"]).abs().max() < 0.01
    assert (fbanks["mp3"] - fbanks["wav"]).abs().mean() < 0.08  # a 3-frame shift: 0.12
    audio_file = decoder.stems["audio"].reads[0]  # the member read is whichever the sample has, wav first
    assert audio_file.members[0] == "wav" and RawSample("k", {}, {"mp3": b""}, decoder.limits).member(audio_file) == "mp3"


def test_empty_or_too_short_audio_is_absent_and_counted(config, media):
    decoder = SampleDecoder(config, DataLimits(max_audio_seconds=5.0))
    cases = {"wav": audio("WAV", seconds=0.0), "flac": audio("FLAC", seconds=0.01), "mp3": b"ID3junk"}
    for field, data in cases.items():
        assert not present(decoder({"__key__": field, "json": record(), field: data}))["audio"], field
    assert errors(decoder) == {"audio": 3}
    long = audio("FLAC", seconds=6.0, rate=8000)
    assert not present(decoder({"__key__": "long", "json": record(), "flac": long}))["audio"]
    assert errors(decoder) == {"audio": 4, "audio: too large": 1}


# ---- JSON, text, table, other members ---------------------------------------------------------


def test_unusable_json_records_drop_the_sample(decoder, media):
    cases = {
        "malformed": b'{"title": "kettle", ',
        "a list": b'[{"title": "kettle"}]',
        "a string": b'"kettle"',
        "deeply nested": b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "over the member limit": record(notes="x" * (decoder.limits.max_json_member_bytes + 1)),
    }
    for name, data in cases.items():
        assert decoder({"__key__": name, "json": data, "jpg": media["jpg"]}) is None, name
    assert decoder({"__key__": "no record", "jpg": media["jpg"]}) is None
    assert errors(decoder) == {"json": len(cases) + 1, "json: too large": 1}
    assert decoder.bad_samples == decoder.samples == len(cases) + 1


def test_a_bad_field_is_cut_or_replaced_not_its_product(decoder, media):
    """Field-level tolerance: a title over the record limit is cut (the limit applies to the record
    as used), a field the model does not read is never counted, a non-UTF-8 byte becomes U+FFFD."""
    limit = decoder.limits.max_json_bytes
    long_title = record(title="kettle " * (limit // 7 + 1), category="3")
    long_table = record(table="colour#:#" + "red " * limit)
    unread_field = record(description="y" * 2 * limit)
    for name, data in {"long title": long_title, "long table": long_table, "unread field": unread_field}.items():
        decoded = decoder({"__key__": name, "json": data, "jpg": media["jpg"]})
        assert decoded is not None and present(decoded)["text"] and present(decoded)["image"], name
    assert decoder({"__key__": "t", "json": long_title})["category"] == 3
    assert not errors(decoder) and decoder.bad_samples == 0
    not_utf8 = decoder({"__key__": "latin-1", "json": b'{"title": "caf\xe9 kettle", "category": 5}', "jpg": media["jpg"]})
    assert present(not_utf8)["text"] and present(not_utf8)["image"] and not_utf8["category"] == 5
    assert errors(decoder) == {"json": 1, "json: not utf-8": 1} and decoder.bad_samples == 1
    # The limit still holds for what is used: cut fields under a small record limit.
    small = SampleDecoder(decoder.config, DataLimits(max_json_bytes=100))
    assert small({"__key__": "s", "json": record(title="kettle " * 40)}) is None
    assert errors(small) == {"json": 1, "json: too large": 1}


def test_bad_title_and_table_values(decoder):
    cases = [({"title": ["a", "list"]}, "text"), ({"title": 12345}, "text"), ({"table": {"color": "red"}}, "table"),
             ({"table": "color red; size L"}, "table"), ({"table": "#;##:#x#;#"}, "table")]  # fmt: skip
    for fields, modality in cases:
        decoded = decoder({"__key__": "v", "json": record(**fields)})
        assert decoded is not None and not present(decoded)[modality], fields
    assert errors(decoder) == {"text": 2, "table": 3}
    # Missing or empty values are a missing modality, not an error; partly malformed tables keep the good pairs.
    decoded = decoder({"__key__": "v", "json": record(title="", table="broken#;#size#:#L", category="7")})
    assert present(decoded)["table"] and not present(decoded)["text"] and decoded["category"] == 7
    assert errors(decoder) == {"text": 2, "table": 3}


def test_megabyte_title_is_cut_before_tokenising(config, monkeypatch):
    """The tokenizer's cost grows with its input however little it keeps: it never sees more than
    the limits (asserted on what it is given, not on a wall clock, which a loaded machine breaks)."""
    decoder = SampleDecoder(config, DataLimits(max_json_bytes=4 * 2**20))
    title = "kettle " * 150_000  # ~1 MB
    decoder({"__key__": "warm", "json": record()})  # loads the tokenizer
    tokenizer, seen = decoder.context.tokenizer, []
    tokenize = type(tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        seen.append(sum(map(len, text)) if isinstance(text, list) else len(text))
        return tokenize(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    decoded = decoder({"__key__": "long", "json": record(title=title, table="k#:#" + "v " * 500_000)})
    monkeypatch.undo()
    limits = decoder.limits
    assert seen and max(seen) <= max(limits.max_title_chars, limits.max_table_chars), seen
    cut = decoder({"__key__": "cut", "json": record(title=title[: decoder.limits.max_title_chars])})
    torch.testing.assert_close(decoded["text"]["input_ids"], cut["text"]["input_ids"])
    assert present(decoded)["text"] and present(decoded)["table"] and not errors(decoder)




def test_pickle_members_are_ignored_never_unpickled(decoder, media):
    payload = pickle.dumps(Tripwire())
    sample = {"__key__": "p", "json": record(), "jpg": media["jpg"], "pyd": payload, "pickle": payload,
              "pth": payload, "wav.pyd": payload}  # fmt: skip
    decoded = decoder(sample)
    assert present(decoded)["image"] and not errors(decoder)
    assert not any(isinstance(v, bytes) for v in decoded.values())
    assert not UNPICKLED


# ---- the error-rate stop ---------------------------------------------------------------------


def test_error_rate_stops_only_after_min_samples(config, media):
    limits = DataLimits(max_error_rate=0.25, error_rate_min_samples=10)
    decoder = SampleDecoder(config, limits)
    bad_json = {"__key__": "j", "json": b"[1]"}
    bad_image = {"__key__": "i", "json": record(), "jpg": b"\xff\xd8 junk"}
    for _ in range(5):  # 100% bad, but under min_samples: no stop
        decoder(bad_json)
    for _ in range(4):
        decoder(bad_image)
    assert decoder.samples == decoder.bad_samples == 9
    with pytest.raises(DataErrorRateExceeded) as stop:
        decoder(bad_json)
    message = str(stop.value)
    assert "\n" not in message and "10 of 10 samples (100.0%)" in message
    assert "json=6" in message and "image=4" in message and "data.limits.max_error_rate=0.25" in message

    # Under the rate: 2 bad samples (one with two bad modalities) and a truncated shard in 12.
    decoder = SampleDecoder(config, limits)
    for index in range(9):
        decoder({"__key__": f"g{index}", "json": record()})
    decoder({"__key__": "two", "json": record(), "jpg": b"junk", "mp4": b"junk"})
    decoder(bad_json)
    decoder.count_error("tar", "shard-000003.tar", "unexpected end of data")
    assert decoder.samples == 12 and decoder.bad_samples == 3 and decoder.errors["tar"] == 1
    # One more bad sample: 4 of 13 (30.8%) is over 25%.
    with pytest.raises(DataErrorRateExceeded, match=r"tar=1.*video=1"):
        decoder(bad_image)


# ---- through a real DataLoader with two workers ----------------------------------------------


def write_shard(path: Path, samples: list[dict[str, bytes]], truncate: bool = False) -> str:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for field, data in sample.items():
                if field != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{field}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    if truncate:  # cut in the middle, inside some member's data
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 55 // 100])
    return str(path)


class WithErrorCounts(IterableDataset):
    """The batches of a webdataset pipeline, then the worker's decoder counts as a last item."""

    def __init__(self, urls: list[str], decoder: SampleDecoder):
        self.urls, self.decoder = urls, decoder

    def __iter__(self):
        decoder = self.decoder

        def on_tar_error(error: Exception) -> bool:  # what the stream code does with a bad shard
            decoder.count_error("tar", "shard", error)
            return True

        yield from wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=on_tar_error),
            wds.map(decoder),
            wds.batched(3, collation_fn=collate, partial=True),
        )
        yield {"errors": dict(decoder.errors), "samples": decoder.samples}


def test_dataloader_workers_train_through_bad_samples_to_the_end(tmp_path, config, media):
    good = {"json": record(), "jpg": media["jpg"], "mp4": media["mp4"], "flac": media["flac"]}
    payload = pickle.dumps(Tripwire())
    bad = [
        {"json": record(), "jpg": media["jpg"][:300]},  # truncated JPEG: image absent
        {"json": record(), "mp4": media["mp4"][:500], "wav": audio("WAV", 0.0)},  # both absent
        {"json": b"[not, json"},  # dropped
        {"json": record(title=7, table=""), "jpg": b"junk"},  # nothing usable: dropped
        {"json": record(), "pyd": payload},  # ignored member
    ]
    urls, expected = [], []
    for shard in range(2):
        samples = []
        for index in range(6):
            key = f"s{shard}_{index}"
            samples.append({"__key__": key, **(good if index % 2 else bad[(index // 2 + 3 * shard) % len(bad)])})
        urls.append(write_shard(tmp_path / f"shard-{shard}.tar", samples))
        expected += [s["__key__"] for s in samples if s["__key__"] not in ("s0_4", "s1_0")]
    # A third shard cut short: webdataset reports it, the stream counts it as "tar", and goes on.
    urls.append(write_shard(tmp_path / "shard-2.tar", [{"__key__": f"t{i}", **good} for i in range(3)], truncate=True))
    decoder = SampleDecoder(config, DataLimits(video_timeout_s=20.0, error_rate_min_samples=1000))
    loader = DataLoader(WithErrorCounts(urls, decoder), batch_size=None, num_workers=2, multiprocessing_context="fork")
    keys, counts = [], []
    for item in loader:  # training-style iteration: every batch, to the end
        if "errors" in item:
            counts.append(item)
            continue
        keys += item["key"]
        assert item["image"]["pixels"].shape[1:] == (3, config.image.size, config.image.size)
    assert len(counts) == 2  # both workers finished
    assert set(expected) <= set(keys) and {"s0_4", "s1_0"}.isdisjoint(keys) and len(keys) == len(set(keys))
    assert set(keys) - set(expected) <= {"t0", "t1", "t2"}  # what the truncated shard still held
    merged: dict[str, int] = {}
    for item in counts:
        for kind, count in item["errors"].items():
            merged[kind] = merged.get(kind, 0) + count
    # image: 2 truncated JPEGs + 1 junk; text: the title 7; video + audio: one sample. webdataset
    # 1.0 hands a truncated shard to the handler twice (from the tar reader, then re-raised).
    assert merged.pop("tar") in (1, 2)
    assert merged == {"image": 3, "video": 1, "audio": 1, "json": 1, "text": 1}


def test_dataloader_worker_error_rate_stop_reaches_the_training_loop(tmp_path, config, media):
    samples = [{"__key__": f"k{i}", "json": record(), "jpg": b"\xff\xd8 junk" if i % 2 else media["jpg"]} for i in range(12)]
    url = write_shard(tmp_path / "bad.tar", samples)
    decoder = SampleDecoder(config, DataLimits(max_error_rate=0.2, error_rate_min_samples=6))
    loader = DataLoader(WithErrorCounts([url], decoder), batch_size=None, num_workers=2, multiprocessing_context="fork")
    with pytest.raises(DataErrorRateExceeded, match=r"image=3.*data.limits.max_error_rate"):
        for _ in loader:
            pass


@pytest.mark.slow
def test_fit_stops_with_one_clear_line_past_the_error_rate(tmp_path):
    """Mostly broken shards stop `scale fit` (not a hang, not a traceback) with the counts per kind."""
    import subprocess
    import sys

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "shard-000000.tar", "w") as tar:
        for index in range(40):
            data = record(title=f"product {index}") if index % 2 else b"{not json"
            info = tarfile.TarInfo(f"p{index:03d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = subprocess.run(
        [sys.executable, "-m", "scale.cli", "fit", "--config", str(TINY_YAML), "--data.train_shards", str(shards),
         "--trainer.default_root_dir", str(tmp_path / "run"), "--data.num_workers", "1",
         "--data.limits.max_error_rate", "0.2", "--data.limits.error_rate_min_samples", "10"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0
    assert last.startswith("scale fit: stopped: ") and "json=" in last and "max_error_rate" in last, last
