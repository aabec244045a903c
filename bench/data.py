"""Data-pipeline throughput: samples/s per CPU core of the full decode, pipeline against the libraries.

For each modality alone and for all five together, the real data path (shard tar reading ->
`SampleDecoder` -> collate into batches, one process, one thread) is timed side by side with the
*library-direct* decode of the same bytes (pre-read into memory, the same operations as
`datamodules/decode.py` called straight on PIL + timm, PyAV, soundfile + torchaudio and the
tokenizer; without the pipeline's safety checks, which are part of its cost). The sum-of-parts
limit of all five is 1 / (sum over modalities of direct seconds per sample); the target is a
pipeline at >= 90 % of it. Rates are samples per CPU-second of this process
and its helper processes (the video decoder may run in a forked helper), so they are per-core rates
and stay meaningful on a shared machine; the best of `--repeats` interleaved rounds is kept.

Also measured: video with few frames by seeking (decord `get_batch`, PyAV keyframe seeks) against
decoding every frame (PyAV), and how many cores feed one GPU at the training rate of
configs/base.yaml (forward FLOPs counted on the base model, training = 3 x forward, an assumed GPU
throughput and MFU).

The benchmark media are generated procedurally with M5Product-like sizes (JPEG 800 x 800 q90, H.264
480 x 480 24 fps 15 s with a 2-s GOP and an AAC track, WAV 16 kHz mono 15 s, 20-40-word titles,
10-20-pair tables), written to webdataset tar shards and cached under `--out`, keyed by the settings.

    python bench/data.py                  # the full benchmark (make bench-data), a few minutes on 2 cores
    python bench/data.py --quick          # tiny media, one round (the test)
    python bench/data.py --gpu-samples-per-s 1500   # cores per GPU from a measured training rate

Writes `<out>/results.json`.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # one core: set before torch
    os.environ.setdefault(_name, "1")

import argparse
import hashlib
import io
import json
import math
import platform
import resource
import statistics
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODALITIES = ("text", "table", "image", "video", "audio")
TARGET_RATIO = 0.90


# ---- the benchmark media -------------------------------------------------------------------------
@dataclass(frozen=True)
class MediaSettings:
    samples: int = 64
    samples_per_shard: int = 16
    image_size: int = 800
    jpeg_quality: int = 90
    video_width: int = 480
    video_height: int = 480
    fps: int = 24
    video_seconds: float = 15.0
    gop_seconds: float = 2.0
    audio_seconds: float = 15.0
    sample_rate: int = 16000
    aac_rate: int = 44100
    title_words: tuple[int, int] = (20, 40)
    table_pairs: tuple[int, int] = (10, 20)
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


QUICK = MediaSettings(samples=6, samples_per_shard=4, image_size=240, video_width=128, video_height=96,
                      video_seconds=2.0, gop_seconds=1.0, audio_seconds=3.0)  # fmt: skip

WORDS = (
    "new summer women men cotton linen loose casual slim fit dress shirt jacket coat trousers shoes sneakers "
    "leather genuine waterproof breathable lightweight portable wireless bluetooth smart phone case charger "
    "cable fast stainless steel kitchen pot pan non-stick ceramic bowl cup glass bottle insulated travel "
    "outdoor sports running yoga fitness baby kids toddler toy educational wooden plastic storage box home "
    "office desk lamp led light usb rechargeable mini large small plus size vintage korean style fashion "
    "elegant premium quality gift set pack pcs black white red blue green pink grey beige brown navy"
).split()
KEYS = ("brand material colour size style season origin weight model pattern collar sleeve fit closure "
        "occasion thickness capacity power voltage package warranty gender age_group craft").split()  # fmt: skip


def _title(rng: np.random.Generator, s: MediaSettings) -> str:
    words = list(rng.choice(WORDS, rng.integers(s.title_words[0], s.title_words[1] + 1)))
    for _ in range(2):  # brand and model codes: out-of-vocabulary pieces, as in real titles
        words.insert(int(rng.integers(len(words))), f"{rng.choice(list('ABCDKXZ'))}{rng.integers(10, 9999)}")
    return " ".join(words)


def _table(rng: np.random.Generator, s: MediaSettings) -> str:
    count = int(rng.integers(s.table_pairs[0], s.table_pairs[1] + 1))
    keys = [f"{k}{i // len(KEYS) or ''}" for i, k in enumerate(rng.permutation(KEYS * 2)[:count])]
    values = [" ".join(rng.choice(WORDS, rng.integers(1, 4))) if rng.random() < 0.7 else f"{rng.integers(1, 999)}cm"
              for _ in keys]  # fmt: skip
    return "#;#".join(f"{k}#:#{v}" for k, v in zip(keys, values))


def _texture(rng: np.random.Generator, h: int, w: int, cell: int, amplitude: float) -> np.ndarray:
    coarse = rng.normal(0, amplitude, (-(-h // cell), -(-w // cell), 3)).astype(np.float32)
    return coarse.repeat(cell, 0).repeat(cell, 1)[:h, :w]


def _image(rng: np.random.Generator, s: MediaSettings) -> bytes:
    """A product-photo-like JPEG: gradient background, a few shapes, texture and sensor noise."""
    from PIL import Image, ImageDraw

    n = s.image_size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    c0, c1 = rng.uniform(60, 240, (2, 3)).astype(np.float32)
    img = c0 + (c1 - c0) * (0.6 * xx + 0.4 * yy)[..., None]
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(4, 9))):
        box = sorted(rng.uniform(0, n, 2)), sorted(rng.uniform(0, n, 2))
        xy = [box[0][0], box[1][0], box[0][1], box[1][1]]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        [draw.ellipse, draw.rectangle, draw.rounded_rectangle][int(rng.integers(3))](xy, fill=colour)
    arr = np.asarray(pil, np.float32) + _texture(rng, n, n, 4, 10) + rng.normal(0, 4, (n, n, 3)).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=s.jpeg_quality)
    return out.getvalue()


def _wave(rng: np.random.Generator, seconds: float, rate: int) -> np.ndarray:
    """Tones with harmonics under an envelope, plus noise (float32 mono in [-1, 1])."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = rng.uniform(120, 600)
    wave = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) / k for k in (1, 2, 3, 5))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(0.2, 2.0) * t)
    wave = 0.3 * envelope * wave + rng.normal(0, 0.03, t.shape)
    return np.clip(wave, -1, 1).astype(np.float32)


def _video(rng: np.random.Generator, s: MediaSettings) -> bytes:
    """H.264 (libx264 veryfast, crf 23, fixed GOP) MP4 with a moving shape over a scrolling textured
    gradient, per-frame noise, and an AAC mono track."""
    import av

    w, h, fps = s.video_width, s.video_height, s.fps
    count, gop = max(1, round(s.video_seconds * fps)), max(1, round(s.gop_seconds * fps))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(30, 200, (2, 3)).astype(np.float32)
    base = c0 + (c1 - c0) * (xx / w * 0.5 + yy / h * 0.5)[..., None] + _texture(rng, h, w, 4, 25)
    base = np.clip(base, 0, 235).astype(np.uint8)
    noise = [rng.integers(0, 20, (h, w, 3), dtype=np.uint8) for _ in range(12)]
    colour, radius, speed = rng.integers(0, 256, 3).astype(np.uint8), int(0.15 * h), int(rng.integers(1, 4))
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        stream.codec_context.thread_count = 1
        stream.codec_context.time_base = Fraction(1, fps)
        audio = container.add_stream("aac", rate=s.aac_rate, layout="mono")
        for k in range(count):
            frame = np.roll(base, k * speed, axis=1) + noise[k % len(noise)]
            cx = int(w * (0.2 + 0.6 * k / count))
            cy = int(h * (0.5 + 0.2 * np.sin(k / 10)))
            frame[max(cy - radius, 0) : cy + radius, max(cx - radius, 0) : cx + radius] = colour
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = k
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
        sound = av.AudioFrame.from_ndarray(_wave(rng, s.video_seconds, s.aac_rate)[None], format="fltp", layout="mono")
        sound.sample_rate, sound.pts = s.aac_rate, 0
        container.mux(audio.encode(sound))
        container.mux(audio.encode())
    return out.getvalue()


def render_sample(job: tuple[dict, int]) -> tuple[str, dict[str, bytes]]:
    """One sample's shard members (runs in a generation worker)."""
    import soundfile

    settings, index = MediaSettings(**job[0]), job[1]
    rng = np.random.default_rng([settings.seed, index])
    key = f"bench{index:06d}"
    meta = {"title": _title(rng, settings), "table": _table(rng, settings), "category": int(rng.integers(100)),
            "instance": f"i{index:06d}"}  # fmt: skip
    wav = io.BytesIO()
    soundfile.write(wav, _wave(rng, settings.audio_seconds, settings.sample_rate), settings.sample_rate,
                    format="WAV", subtype="PCM_16")  # fmt: skip
    files = {"json": json.dumps(meta).encode(), "jpg": _image(rng, settings), "mp4": _video(rng, settings),
             "wav": wav.getvalue()}  # fmt: skip
    return key, files


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w") as tar:
        for key, files in samples:
            for extension, data in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def build_shards(out: Path, settings: MediaSettings, workers: int) -> Path:
    """The benchmark shard set under `out/media-<settings key>/` (reused when complete)."""
    folder = out / f"media-{settings.key()}"
    if (folder / "sizes.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=1))
    start = time.time()
    jobs = [(asdict(settings), i) for i in range(settings.samples)]
    sizes, pending = {}, []
    with ProcessPoolExecutor(max(1, workers), mp_context=get_context("spawn")) as pool:
        for sample in pool.map(render_sample, jobs, chunksize=1):
            pending.append(sample)
            if len(pending) == settings.samples_per_shard:
                name = f"shard-{len(sizes):06d}.tar"
                _write_tar(folder / name, pending)
                sizes[name], pending = len(pending), []
    if pending:
        name = f"shard-{len(sizes):06d}.tar"
        _write_tar(folder / name, pending)
        sizes[name] = len(pending)
    (folder / "sizes.json").write_text(json.dumps(sizes, indent=1))  # written last: marks the set complete
    print(f"generated {settings.samples} samples in {time.time() - start:.0f} s -> {folder}", flush=True)
    return folder


def read_samples(folder: Path) -> list[dict[str, bytes]]:
    """Every sample's members, in memory (for the library-direct decode)."""
    samples: dict[str, dict[str, bytes]] = {}
    for name in json.loads((folder / "sizes.json").read_text()):
        with tarfile.open(folder / name) as tar:
            for member in tar:
                key, _, extension = member.name.partition(".")
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return list(samples.values())


def media_summary(samples: list[dict[str, bytes]]) -> dict[str, float]:
    extensions = ("jpg", "mp4", "wav", "json")
    return {f"{ext}_kb": round(statistics.mean(len(s[ext]) for s in samples) / 1024, 1) for ext in extensions}


# ---- CPU accounting ------------------------------------------------------------------------------
def cpu_seconds() -> float:
    """CPU time of this process (all threads), its reaped children and its live descendants (the
    video decoder may run in a forked helper process that lives across calls)."""
    total = time.process_time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total += children.ru_utime + children.ru_stime
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                times = child.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    except ImportError:  # pragma: no cover - psutil comes with the project's dependencies
        pass
    return total


def timed(fn) -> dict[str, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    samples = fn()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {"samples": samples, "cpu_s": cpu, "wall_s": wall, "rate": samples / max(cpu, 1e-9)}


# ---- the library-direct decode (the same operations as datamodules/decode.py) ----------------------
class Direct:
    """Bytes -> tensors with the libraries called directly, mirroring datamodules/decode.py."""

    def __init__(self, config):
        from scale.modalities.image.stems import PixelStem
        from scale.pretrained_paths import resolve
        from transformers import AutoTokenizer

        self.config = config
        # timm's resize and crop, then uint8: pixels and frames are normalised on the device (and
        # the fbank computed there), in the pipeline as here, so neither side does that work.
        self.transform = PixelStem.byte_transform(config.image)
        self.tokenizer = AutoTokenizer.from_pretrained(str(resolve(config.tokenizer)), local_files_only=True)

    def text(self, sample):
        title = json.loads(sample["json"])["title"].strip()
        encoded = self.tokenizer(title, max_length=self.config.text.max_tokens, truncation=True,
                                 padding="max_length", return_tensors="pt")  # fmt: skip
        return encoded["input_ids"][0], encoded["attention_mask"][0]

    def table(self, sample):
        # The tokenizer call and the [CLS] k v ... [SEP] layout, as the pipeline does them.
        from scale.modalities.table.stems import tokenize_table
        from scale.shard_format import parse_table

        config = self.config.table
        pairs = parse_table(json.loads(sample["json"])["table"])[: config.max_pairs]
        return tokenize_table(self.tokenizer, pairs, config.max_tokens)

    def image(self, sample, draft: bool = True):
        from PIL import Image

        with Image.open(io.BytesIO(sample["jpg"])) as image:
            if draft:  # JPEG DCT-domain downscale to 1/2, 1/4 or 1/8, staying >= the target size
                image.draft("RGB", (self.config.image.size, self.config.image.size))
            return self.transform(image.convert("RGB"))

    def video(self, sample):
        import torch

        # PyAV with keyframe seeks, the pipeline's first backend, called in-process without the
        # helper process and header checks (decord, its fallback, is compared in the video table).
        config = self.config.video
        frames = torch.from_numpy(video_pyav_seek(sample["mp4"], config.frames, config.size))
        return frames.permute(0, 3, 1, 2)

    def audio(self, sample):
        import soundfile
        import torch

        # The benchmark's clips are 16-bit mono WAVs at the sample rate: read as stored, as the
        # pipeline reads them (int16; the fbank is computed on the device on both sides).
        config = self.config.audio
        samples = int(round(config.seconds * config.sample_rate))
        with soundfile.SoundFile(io.BytesIO(sample["wav"])) as sound:  # only the first `seconds` decoded
            wave = torch.from_numpy(sound.read(frames=samples, dtype="int16", always_2d=True)[:, 0])
        padded = torch.zeros(samples, dtype=torch.int16)
        padded[: wave.numel()] = wave
        return padded, wave.numel()


def frame_indices(available: int, wanted: int) -> list[int]:
    return np.linspace(0, available - 1, wanted).round().astype(np.int64).tolist()


# ---- video: few frames by seeking vs decoding every frame ----------------------------------------
def video_decord_seek(data: bytes, frames: int, size: int) -> np.ndarray:
    import decord

    reader = decord.VideoReader(io.BytesIO(data), num_threads=1, width=size, height=size)
    return reader.get_batch(frame_indices(len(reader), frames)).asnumpy()


def video_pyav_seek(data: bytes, frames: int, size: int) -> np.ndarray:
    """The pipeline's PyAV reader called in-process, without the helper process or header limits:
    demux once for timestamps and keyframes, then per wanted frame seek to its keyframe (unless it
    is reached by decoding on) and decode forward to it."""
    from scale.media.video import decode_frames

    return decode_frames(data, frames, size, backend="pyav")


def video_pyav_all(data: bytes, frames: int, size: int, convert_all: bool) -> np.ndarray:
    """Decode every frame; convert (scale + RGB) every frame (`convert_all`) or only the wanted ones."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        if convert_all:
            decoded = [f.to_ndarray(width=size, height=size, format="rgb24") for f in container.decode(stream)]
            return np.stack([decoded[i] for i in frame_indices(len(decoded), frames)])
        wanted = frame_indices(stream.frames, frames)
        keep = {}
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                keep[index] = frame.to_ndarray(width=size, height=size, format="rgb24")
        return np.stack([keep[i] for i in wanted])


def video_pyav_keyframes(data: bytes, frames: int, size: int) -> np.ndarray:
    """Keyframes only (the decoder skips every other frame): for each wanted time the nearest
    keyframe. Not the exact frames (one per GOP at most): shown as the cost floor of few-frame video."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        stream.codec_context.skip_frame = "NONKEY"
        keyframes = [frame for frame in container.decode(stream) if frame.pts is not None]
        stamps = np.array([frame.pts for frame in keyframes])
        end = stream.duration if stream.duration else int(stamps[-1])
        step = end / stream.frames if stream.frames else 0
        wanted = np.linspace(0, end - step, frames)
        picked = [int(np.abs(stamps - t).argmin()) for t in wanted]
        converted = {i: keyframes[i].to_ndarray(width=size, height=size, format="rgb24") for i in set(picked)}
        return np.stack([converted[i] for i in picked])


VIDEO_METHODS = {
    "decord seek (get_batch)": lambda d, f, s: video_decord_seek(d, f, s),
    "PyAV keyframe seek": lambda d, f, s: video_pyav_seek(d, f, s),
    "PyAV every frame, convert wanted": lambda d, f, s: video_pyav_all(d, f, s, convert_all=False),
    "PyAV every frame, convert all": lambda d, f, s: video_pyav_all(d, f, s, convert_all=True),
    "PyAV keyframes only (not exact)": lambda d, f, s: video_pyav_keyframes(d, f, s),
}


def compare_video(samples: list[dict[str, bytes]], frames: int, size: int, count: int) -> dict[str, dict]:
    """Each method on the same `count` videos, interleaved per video; CPU seconds per video."""
    cpu = dict.fromkeys(VIDEO_METHODS, 0.0)
    for sample in samples[:count]:
        for name, method in VIDEO_METHODS.items():
            start = cpu_seconds()
            out = method(sample["mp4"], frames, size)
            cpu[name] += cpu_seconds() - start
            assert out.shape == (frames, size, size, 3), (name, out.shape)
    n = min(count, len(samples))
    seek = cpu["decord seek (get_batch)"]
    return {name: {"videos_per_cpu_s": n / value, "cpu_s_per_video": value / n, "cost_vs_decord_seek": value / seek}
            for name, value in cpu.items()}  # fmt: skip


# ---- the pipeline ---------------------------------------------------------------------------------
def train_datamodule_available() -> bool:
    """True when datamodules.m5product offers the exact-mode training stream
    (`M5ProductDataModule(..., mode="exact")`, one finite pass)."""
    import inspect

    from datamodules.m5product import M5ProductDataModule

    return "mode" in inspect.signature(M5ProductDataModule.__init__).parameters


def pipeline_pass(path: str, shards: Path, config, batch_size: int, modalities: list[str],
                  num_workers: int = 0, shuffle_buffer: int | None = None) -> int:  # fmt: skip
    """One pass over the shard set through the real data path (the training stream's shuffle
    buffer: the data module's default unless given); returns the samples it yielded and checks
    every modality was decoded for every sample (a failing decode would look fast)."""
    if path == "train":
        from datamodules.m5product import M5ProductDataModule

        buffer = {} if shuffle_buffer is None else {"shuffle_buffer": shuffle_buffer}
        module = M5ProductDataModule(train_shards=str(shards), batch_size=batch_size, num_workers=num_workers,
                                     mode="exact", model_config=config, **buffer)  # fmt: skip
        module.setup("fit")
        loader = module.train_dataloader()
    else:
        from datamodules.m5product import eval_dataloader

        loader = eval_dataloader(str(shards), config, batch_size=batch_size, num_workers=0)
    samples, present, bitstreams = 0, dict.fromkeys(modalities, 0), {}
    for batch in loader:
        samples += len(batch["key"])
        for modality in modalities:
            present[modality] += int(batch[modality]["present"].sum())
            if "encoded_length" in batch[modality]:  # decode_on: device
                bitstreams[modality] = bitstreams.get(modality, 0) + int((batch[modality]["encoded_length"] > 0).sum())
    short = {m: n for m, n in present.items() if n != samples}
    if not samples or short:
        raise RuntimeError(f"pipeline ({path}) decoded only {short} of {samples} samples: decode errors")
    decoded_here = {m: samples - n for m, n in bitstreams.items() if n != samples}
    if decoded_here:  # the device row would then time the workers' decoding, not its absence
        raise RuntimeError(f"pipeline ({path}) with decode_on device decoded {decoded_here} samples in the workers")
    return samples


def read_pass(shards: Path) -> int:
    """Shard reading alone: webdataset's tar reader over the set, every member read, no decoding."""
    import webdataset as wds

    urls = [str(shards / name) for name in json.loads((shards / "sizes.json").read_text())]
    return sum(1 for _ in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def direct_pass(direct: Direct, samples: list[dict[str, bytes]], modality: str, **options) -> int:
    decode = getattr(direct, modality)
    for sample in samples:
        decode(sample, **options)
    return len(samples)


def measure_throughput(shards: Path, samples: list[dict[str, bytes]], base: dict, paths: list[str],
                       batch_size: int, repeats: int) -> dict:  # fmt: skip
    """Pipeline and direct rates (samples per CPU-second), best of `repeats` interleaved rounds."""
    from scale.config import ModelConfig

    configs = {m: ModelConfig.from_dict({**base, "modalities": [m]}) for m in MODALITIES}
    configs["all"] = ModelConfig.from_dict({**base, "modalities": list(MODALITIES)})
    direct = Direct(configs["all"])
    # Warm-up on one sample (its own one-sample shard): tokenizers, timm, decord and the codecs
    # loaded, the video helper process (if any) started, before anything is timed.
    warmup = shards / "warmup"
    if not (warmup / "sizes.json").is_file():
        warmup.mkdir(exist_ok=True)
        _write_tar(warmup / "shard-000000.tar", [("warmup000000", samples[0])])
        (warmup / "sizes.json").write_text(json.dumps({"shard-000000.tar": 1}))
    for path in paths:
        pipeline_pass(path, warmup, configs["all"], batch_size, list(MODALITIES))
    for modality in MODALITIES:
        direct_pass(direct, samples[:1], modality)
    runs: dict[str, list[dict]] = {}
    for round_ in range(repeats):
        runs.setdefault("read/tar", []).append(timed(lambda: read_pass(shards)))
        for name, config in configs.items():
            modalities = list(config.modalities)
            for path in paths:
                runs.setdefault(f"{name}/{path}", []).append(
                    timed(lambda: pipeline_pass(path, shards, config, batch_size, modalities)))
            if name != "all":
                runs.setdefault(f"{name}/direct", []).append(timed(lambda: direct_pass(direct, samples, name)))
            if name == "image":
                runs.setdefault("image/direct-full-size", []).append(
                    timed(lambda: direct_pass(direct, samples, "image", draft=False)))
        print(f"round {round_ + 1}/{repeats}: " + "  ".join(
            f"{key} {value[-1]['rate']:.1f}/s" for key, value in runs.items()), flush=True)  # fmt: skip
    return {key: {"best_rate": max(r["rate"] for r in value),
                  "median_rate": statistics.median(r["rate"] for r in value), "runs": value}
            for key, value in runs.items()}  # fmt: skip


def throughput_rows(measured: dict, paths: list[str]) -> list[dict]:
    rows = []
    direct = {m: measured[f"{m}/direct"]["best_rate"] for m in MODALITIES}
    limit = 1.0 / sum(1.0 / rate for rate in direct.values())
    for path in paths:
        for name in (*MODALITIES, "all"):
            pipeline = measured[f"{name}/{path}"]["best_rate"]
            reference = limit if name == "all" else direct[name]
            ratio = pipeline / reference
            rows.append({"modality": "all five" if name == "all" else name, "path": path, "pipeline": pipeline,
                         "direct": reference, "reference": "sum-of-parts" if name == "all" else "direct",
                         "ratio": ratio, "below_target": ratio < TARGET_RATIO,
                         "overhead_ms": 1e3 * (1 / pipeline - 1 / reference)})  # fmt: skip
    return rows


# ---- frames extracted at conversion ---------------------------------------------------------------
def build_strip_shards(shards: Path, samples: list[dict[str, bytes]], frames: int, size: int,
                       shrink: int = 0) -> tuple[Path, float, float]:  # fmt: skip
    """The same samples with the frame strip `scale shards --extract-frames` adds (`frames.jpg`)
    and, with `shrink`, the downscaled image `--shrink-images` adds (`small.jpg`), cached beside
    the shard set; returns (folder, CPU s per video to extract, strip KB)."""
    from datamodules.limits import DataLimits
    from scale.media.image import probe_shrink, shrink_image
    from scale.media.video import extract_strip

    folder = shards.parent / (f"{shards.name}-strips-{frames}x{size}" + (f"-small-{shrink}" if shrink else ""))
    stats = folder / "strips.json"
    if stats.is_file():
        values = json.loads(stats.read_text())
        return folder, values["extract_cpu_s_per_video"], values["strip_kb"]
    folder.mkdir(parents=True, exist_ok=True)
    limits, start, members = DataLimits(), cpu_seconds(), []
    for index, sample in enumerate(samples):
        members.append((f"bench{index:06d}", {**sample, "frames.jpg": extract_strip(sample["mp4"], frames, size, limits)}))
    extract = (cpu_seconds() - start) / len(samples)
    for _, files in members if shrink else ():
        if small := probe_shrink(io.BytesIO(files["jpg"]), shrink):
            files["small.jpg"] = shrink_image(files["jpg"], small, limits.max_image_pixels)
    strip_kb = statistics.mean(len(files["frames.jpg"]) for _, files in members) / 1024
    _write_tar(folder / "shard-000000.tar", members)
    (folder / "sizes.json").write_text(json.dumps({"shard-000000.tar": len(members)}))
    stats.write_text(json.dumps({"extract_cpu_s_per_video": extract, "strip_kb": strip_kb}))
    return folder, extract, strip_kb


def measure_strips(strips: Path, base: dict, paths: list[str], batch_size: int, repeats: int,
                   alone: str | None = "video") -> dict[str, float]:  # fmt: skip
    """Pipeline rates (samples per CPU-second) of all five (and the modality `alone`, on its own)
    from the strip shards."""
    from scale.config import ModelConfig

    configs = {"all": ModelConfig.from_dict({**base, "modalities": list(MODALITIES)})}
    if alone:
        configs[alone] = ModelConfig.from_dict({**base, "modalities": [alone]})
    rates: dict[str, float] = {}
    for _ in range(repeats):
        for name, config in configs.items():
            for path in paths:
                run = timed(lambda: pipeline_pass(path, strips, config, batch_size, list(config.modalities)))
                rates[f"{name}/{path}"] = max(rates.get(f"{name}/{path}", 0.0), run["rate"])
    return rates


# ---- through data workers ------------------------------------------------------------------------
WORKER_COUNTS = (0, 1, 2)
"""Data workers per rank timed in the workers row (0: decoding in the training process)."""


def replicate_shards(folder: Path, products: int) -> Path:
    """`folder`'s samples repeated under new keys, one shard per copy, to at least `products`
    (cached beside it): enough that forking the workers is a small part of a pass."""
    count = sum(json.loads((folder / "sizes.json").read_text()).values())
    copies = max(1, -(-products // count))
    out = folder.parent / f"{folder.name}-x{copies}"
    if (out / "sizes.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    samples = read_samples(folder)
    sizes = {}
    for copy in range(copies):
        name = f"shard-{copy:06d}.tar"
        _write_tar(out / name, [(f"copy{copy:03d}x{index:06d}", files) for index, files in enumerate(samples)])
        sizes[name] = len(samples)
    (out / "sizes.json").write_text(json.dumps(sizes))
    return out


def on_device(base: dict) -> dict:
    """`base` with the image and the frame strips decoded after the transfer (`decode_on: device`)."""
    return {**base, **{m: {**base.get(m, {}), "decode_on": "device"} for m in ("image", "video")}}


def bitstream_decode_ms(folder: Path) -> float:
    """CPU milliseconds per product to decode its `small.jpg` and `frames.jpg` with torchvision's
    `decode_jpeg` (libjpeg-turbo), one thread: the work `decode_on: device` moves off the host."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    samples = read_samples(folder)
    streams = [torch.frombuffer(bytearray(files[name]), dtype=torch.uint8) for files in samples
               for name in ("small.jpg", "frames.jpg") if name in files]  # fmt: skip
    products = len(samples)
    best = math.inf
    for _ in range(3):
        start = time.process_time()
        for stream in streams:
            decode_jpeg(stream, mode=ImageReadMode.RGB)
        best = min(best, time.process_time() - start)
    return 1e3 * best / products


def measure_workers(shards: Path, base: dict, batch_size: int, repeats: int,
                    counts: tuple[int, ...] = WORKER_COUNTS) -> dict[int, dict[str, float]]:  # fmt: skip
    """All five through the exact training stream with 0, 1, 2 data workers: samples per CPU-second
    of the training process and its workers together (CPU of the reaped workers included), best of
    `repeats` interleaved rounds, and the wall-clock rate of that pass.

    The shuffle buffer holds one batch: the steady state of a long epoch, where each sample read
    lands in memory a decoded one freed. (Each pass forks fresh workers, and with the default
    2,000 samples every sample of a 240-product pass would land in fresh pages, a cost a worker
    pays once per epoch: docs/performance.md, section 6.)"""
    from scale.config import ModelConfig

    config = ModelConfig.from_dict({**base, "modalities": list(MODALITIES)})
    best: dict[int, dict[str, float]] = {}
    for _ in range(repeats):
        for count in counts:
            run = timed(lambda: pipeline_pass("train", shards, config, batch_size, list(MODALITIES), count,
                                              shuffle_buffer=batch_size))  # fmt: skip
            if run["rate"] > best.get(count, {}).get("rate", 0.0):
                best[count] = {"rate": run["rate"], "wall_rate": run["samples"] / run["wall_s"], "samples": run["samples"]}
    return best


# ---- cores per GPU --------------------------------------------------------------------------------
def count_flops(base: dict, backward: bool, batch: int = 2) -> dict[str, float]:
    """Forward (+ loss) FLOPs per sample of the training forward (masked modeling on) of the model
    of `base`, counted by torch's FlopCounterMode on CPU; with `backward`, the backward's too."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from scale.config import ModelConfig
    from scale.model import SCALE

    config = ModelConfig.from_dict(base)
    torch.manual_seed(0)
    model = SCALE(config).train()
    from tests.test_model import random_batch  # valid random inputs of the pipeline's shapes

    inputs = random_batch(config, torch.ones(batch, 5, dtype=torch.bool))
    inputs = {name: inputs[name] for name in config.modalities}
    with FlopCounterMode(display=False) as counter:
        loss = model.losses(model(inputs, masked_modeling=True))["loss"]
    result = {"forward_flops_per_sample": counter.get_total_flops() / batch,
              "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip
    if backward:
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        result["backward_flops_per_sample"] = counter.get_total_flops() / batch
    return result


# ---- report ---------------------------------------------------------------------------------------
def config_size(decode: dict) -> str:
    """The frame size of the `decode` summary's video entry ("12 frames at 112x112" -> "112")."""
    return decode["video"].rsplit(" ", 1)[-1].split("x")[0]


def report(results: dict) -> str:
    s, r, m, d = results["settings"], results["throughput"], results["media"], results["decode"]
    lines = [
        f"\ndata-pipeline throughput, samples/s per CPU core (best of {results['repeats']} rounds, "
        f"{s['samples']} samples, batch {results['batch_size']}; one process, torch threads 1)",
        f"media: JPEG {s['image_size']}x{s['image_size']} q{s['jpeg_quality']} ({m['jpg_kb']} KB), "
        f"MP4 H.264 {s['video_width']}x{s['video_height']} {s['fps']} fps {s['video_seconds']:g} s "
        f"GOP {s['gop_seconds']:g} s + AAC ({m['mp4_kb']} KB), WAV {s['sample_rate']} Hz {s['audio_seconds']:g} s "
        f"({m['wav_kb']} KB)",
        f"decoded to: image {d['image']}, video {d['video']}, audio {d['audio']}, text {d['text']}, table {d['table']}",
        "",
        f"{'modality':<10} {'pipeline path':<14} {'pipeline/s/core':>15} {'direct/s/core':>14} {'ratio':>7} "
        f"{'overhead ms/sample':>19}",
    ]  # fmt: skip
    for row in r["rows"]:
        direct = f"{row['direct']:.2f}" + ("*" if row["reference"] == "sum-of-parts" else "")
        flag = f"  < {TARGET_RATIO:.2f}" if row["below_target"] else ""
        lines.append(f"{row['modality']:<10} {row['path']:<14} {row['pipeline']:>15.2f} {direct:>14} "
                     f"{row['ratio']:>7.3f} {row['overhead_ms']:>19.2f}{flag}")  # fmt: skip
    share = ", ".join(f"{name} {100 * value:.1f} %" for name, value in r["direct_seconds_share"].items())
    lines += [
        "* all five: the sum-of-parts limit, 1 / (sum over modalities of direct seconds per sample);",
        "  overhead = pipeline - direct seconds per sample; ratios below the target are flagged",
        f"shard reading alone (webdataset tar reader, every member read, no decode): {r['read_rate']:.1f} "
        f"samples/s/core = {1e3 / r['read_rate']:.2f} ms/sample",
        f"share of the sum-of-parts time: {share}",
        f"image decoded at full size (no PIL draft, i.e. no JPEG DCT-domain downscale): "
        f"{r['image_full_size_rate']:.1f}/s/core; the direct image decode with the draft (as decode.py) "
        f"vs without: x{r['image_draft_speedup']:.2f}",
    ]  # fmt: skip
    v = results["video"]
    lines.append(f"\nvideo, {d['video']} from the same {v['videos']} MP4s, CPU s per video (cost vs decord seek):")
    for name, value in v["methods"].items():
        lines.append(f"  {name:<34} {value['cpu_s_per_video']:.3f} s  x{value['cost_vs_decord_seek']:.2f}")
    st = results["strips"]
    lines.append(f"\nframes extracted at conversion (scale shards --extract-frames {d['video'].split()[0]}x"
                 f"{config_size(d)}): {st['strip_kb']:.1f} KB per strip, {st['extract_cpu_s_per_video']:.3f} CPU s "
                 f"per video to extract (once)")  # fmt: skip
    for key, rate in st["rates"].items():
        name, path = key.split("/")
        mp4 = next(row["pipeline"] for row in r["rows"] if row["path"] == path and row["modality"] == ("all five" if name == "all" else name))
        lines.append(f"  {('all five' if name == 'all' else name):<10} {path:<6} {rate:.2f} samples/s/core from the strip, "
                     f"{mp4:.2f} from the MP4: x{rate / mp4:.1f}")  # fmt: skip
    sm = results["small_images"]
    lines.append(f"\nand images downscaled at conversion (scale shards --shrink-images {sm['side']}):")
    for key, rate in sm["rates"].items():
        name, path = key.split("/")
        lines.append(f"  {('all five' if name == 'all' else name):<10} {path:<6} {rate:.2f} samples/s/core")
    w = results["workers"]
    lines.append(f"\nthrough data workers (exact training stream, all five from the strip and small-image shards, "
                 f"{w['products']} products, shuffle buffer of one batch; CPU of the training process and its "
                 "workers together):")  # fmt: skip
    for count, value in w["rates"].items():
        lines.append(f"  {count} workers: {value['rate']:.2f} samples/s/core ({value['wall_rate']:.2f} samples/s wall), "
                     f"x{value['rate'] / w['rates'][0]['rate']:.2f} the in-process rate")  # fmt: skip
    dd = results["device_decode"]
    lines.append("  and with the small JPEGs shipped as bitstreams, decoded after the transfer (decode_on: device; "
                 f"on this CPU torchvision decodes them in {dd['cpu_ms_per_product']:.2f} ms per product):")  # fmt: skip
    for count, value in dd["rates"].items():
        lines.append(f"  {count} workers: {value['rate']:.2f} samples/s/core, x{value['rate'] / w['rates'][count]['rate']:.2f} "
                     f"the rate decoding them in the workers")  # fmt: skip
    g = results["gpu"]
    counted = g.get("measured_train_gflops_per_sample")
    lines += [
        f"\ncores per GPU at the training rate of configs/base.yaml (batch {g['batch_per_gpu']} per GPU):",
        f"  model: {g['parameters'] / 1e6:.0f} M parameters, forward + loss {g['forward_gflops_per_sample']:.1f} "
        f"GFLOP/sample (FlopCounterMode, masked modeling on)",
        f"  training = 3 x forward = {g['train_gflops_per_sample']:.1f} GFLOP/sample"
        + (f" (counted forward + backward: {counted:.1f})" if counted else ""),
        f"  GPU rate: {g['gpu_samples_per_s']:.0f} samples/s per GPU, "
        + ("given (--gpu-samples-per-s)" if g["measured_gpu_rate"] else
           f"assumed: {g['gpu_tflops']:g} TFLOP/s ({g['gpu_name']}) x MFU {g['mfu']:g} "
           f"/ {g['train_gflops_per_sample']:.1f} GFLOP/sample"),
        f"  {g['note']}",
    ]  # fmt: skip
    for path, value in g["cores_per_gpu"].items():
        lines.append(f"  cores per GPU ({path} pipeline, {g['pipeline_rate'][path]:.2f} samples/s/core): {value:.0f}; "
                     f"with frames extracted at conversion: {g['cores_per_gpu_with_strips'][path]:.0f}; and images "
                     f"shrunk to {results['small_images']['side']}: {g['cores_per_gpu_with_strips_and_small_images'][path]:.0f}")
    lines += [
        "  cores per GPU through data workers (strips and small images): " + ", ".join(
            f"{count} workers {value:.0f}" for count, value in g["cores_per_gpu_through_workers"].items()),
        "  host cores per GPU with the small JPEGs decoded on the GPU (image.decode_on / video.decode_on device): "
        + ", ".join(f"{count} workers {value:.0f}" for count, value in g["host_cores_per_gpu_decoding_on_device"].items())
        + "; the GPU's decode time is not in it (nvJPEG: measure it on a GPU, bench/gpu_check.sh)",
        f"  cores per GPU at the sum-of-parts limit ({g['limit_rate']:.2f} samples/s/core): "
        f"{g['cores_per_gpu_at_limit']:.0f}",
        f"  cores per GPU at the sum-of-parts limit without the MP4 decode, e.g. video.stem=features "
        f"({g['limit_rate_without_video']:.1f} samples/s/core): {g['cores_per_gpu_at_limit_without_video']:.0f}",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench-data", help="media cache and results.json")
    parser.add_argument("--config", default=str(ROOT / "configs" / "base.yaml"),
                        help="the config whose model (decode sizes, FLOPs) and batch size are used")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny media, one round, forward FLOPs only (the test)")
    parser.add_argument("--samples", type=int, help="benchmark samples (default 64; quick 6)")
    parser.add_argument("--video-seconds", type=float, help="video length (default 15)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, help="interleaved rounds, best kept (default 3; quick 1)")
    parser.add_argument("--video-compare", type=int, default=16, help="videos for the seek vs every-frame comparison")
    parser.add_argument("--paths", default="auto", help="pipeline paths: eval, train (exact-mode training stream), "
                        "or auto (both when the training stream offers mode='exact')")  # fmt: skip
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="GPU dense bf16 TFLOP/s (H100 SXM: 989)")
    parser.add_argument("--gpu-name", default="H100 SXM bf16 dense")
    parser.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation")
    parser.add_argument("--gpu-samples-per-s", type=float,
                        help="a measured training rate per GPU (instead of the FLOP estimate)")  # fmt: skip
    parser.add_argument("--worker-products", type=int, help="products in the workers row (default 240; quick 12)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="media generation processes")
    args = parser.parse_args(argv)

    start = time.time()
    settings = QUICK if args.quick else MediaSettings()
    if args.samples:
        settings = replace(settings, samples=args.samples)
    if args.video_seconds:
        settings = replace(settings, video_seconds=args.video_seconds)
    repeats = args.repeats or (1 if args.quick else 3)
    worker_products = args.worker_products or (12 if args.quick else 240)
    out = Path(args.out)
    shards = build_shards(out, settings, args.workers)

    import torch
    import yaml

    torch.set_num_threads(1)
    from scale.config import ModelConfig

    full = yaml.safe_load(Path(args.config).read_text())
    base = full["model"]["config"]
    config = ModelConfig.from_dict(base)
    if args.paths == "auto":
        paths = ["eval", "train"] if train_datamodule_available() else ["eval"]
    else:
        paths = args.paths.split(",")
    samples = read_samples(shards)
    measure_start = time.time()
    measured = measure_throughput(shards, samples, base, paths, args.batch_size, repeats)
    rows = throughput_rows(measured, paths)
    direct_seconds = {m: 1.0 / measured[f"{m}/direct"]["best_rate"] for m in MODALITIES}
    limit = 1.0 / sum(direct_seconds.values())
    limit_without_video = 1.0 / sum(v for m, v in direct_seconds.items() if m != "video")
    image_full_size = measured["image/direct-full-size"]["best_rate"]
    video = compare_video(samples, config.video.frames, config.video.size, args.video_compare)
    strips, extract_s, strip_kb = build_strip_shards(shards, samples, config.video.frames, config.video.size)
    strip_rates = measure_strips(strips, base, paths, args.batch_size, repeats)
    # The downscaled copy at the training size, as the README recommends: the loader's resize is then a no-op.
    small, _, _ = build_strip_shards(shards, samples, config.video.frames, config.video.size, shrink=config.image.size)
    small_rates = measure_strips(small, base, paths, args.batch_size, repeats, alone="image")
    replicated = replicate_shards(small, worker_products)
    workers = measure_workers(replicated, base, args.batch_size, repeats)
    # The small JPEGs' bitstreams shipped undecoded (decode_on: device): what the host still pays.
    device_workers = measure_workers(replicated, on_device(base), args.batch_size, repeats)
    bitstream_ms = bitstream_decode_ms(small)
    measure_seconds = time.time() - measure_start

    flops = count_flops(base, backward=not args.quick)
    train_flops = 3 * flops["forward_flops_per_sample"]
    if args.gpu_samples_per_s:
        gpu_rate = args.gpu_samples_per_s
    else:
        gpu_rate = args.gpu_tflops * 1e12 * args.mfu / train_flops
    pipeline_rate = {path: next(r["pipeline"] for r in rows if r["path"] == path and r["modality"] == "all five")
                     for path in paths}  # fmt: skip
    if args.gpu_samples_per_s:
        gpu_note = "the GPU rate was given on the command line"
    elif torch.cuda.is_available():
        gpu_note = f"a GPU is visible ({torch.cuda.get_device_name(0)}), but its rate above is assumed, not measured"
    else:
        gpu_note = "no GPU in this session: the GPU rate is an assumption, not a measurement"
    results = {
        "settings": asdict(settings),
        "shards": str(shards),
        "media": media_summary(samples),
        "decode": {"image": f"{config.image.size}x{config.image.size}",
                   "video": f"{config.video.frames} frames at {config.video.size}x{config.video.size}",
                   "audio": f"{config.audio.seconds:g} s, {config.audio.mel_bins} mel bins",
                   "text": f"{config.text.max_tokens} tokens", "table": f"{config.table.max_tokens} tokens",
                   "tokenizer": config.tokenizer},  # fmt: skip
        "batch_size": args.batch_size,
        "repeats": repeats,
        "paths": paths,
        "throughput": {
            "rows": rows,
            "measured": measured,
            "sum_of_parts_limit": limit,
            "direct_seconds_share": {m: s * limit for m, s in direct_seconds.items()},
            "image_full_size_rate": image_full_size,
            "read_rate": measured["read/tar"]["best_rate"],
            "image_draft_speedup": measured["image/direct"]["best_rate"] / image_full_size,
            "target_ratio": TARGET_RATIO,
        },
        "video": {"videos": min(args.video_compare, len(samples)), "methods": video},
        "strips": {"extract_cpu_s_per_video": extract_s, "strip_kb": strip_kb, "rates": strip_rates},
        "small_images": {"side": config.image.size, "rates": small_rates},
        "workers": {"products": workers[0]["samples"], "rates": workers},
        "device_decode": {"rates": device_workers, "cpu_ms_per_product": bitstream_ms},
        "gpu": {
            "parameters": flops["parameters"],
            "forward_gflops_per_sample": flops["forward_flops_per_sample"] / 1e9,
            "train_gflops_per_sample": train_flops / 1e9,
            "measured_train_gflops_per_sample": (
                (flops["forward_flops_per_sample"] + flops["backward_flops_per_sample"]) / 1e9
                if "backward_flops_per_sample" in flops else None),
            "gpu_tflops": args.gpu_tflops, "gpu_name": args.gpu_name, "mfu": args.mfu,
            "measured_gpu_rate": bool(args.gpu_samples_per_s),
            "gpu_samples_per_s": gpu_rate,
            "batch_per_gpu": full.get("data", {}).get("batch_size"),
            "pipeline_rate": pipeline_rate,
            "cores_per_gpu": {path: gpu_rate / rate for path, rate in pipeline_rate.items()},
            "cores_per_gpu_with_strips": {path: gpu_rate / strip_rates[f"all/{path}"] for path in paths},
            "cores_per_gpu_with_strips_and_small_images": {path: gpu_rate / small_rates[f"all/{path}"] for path in paths},
            "cores_per_gpu_through_workers": {count: gpu_rate / value["rate"] for count, value in workers.items()},
            "host_cores_per_gpu_decoding_on_device": {count: gpu_rate / value["rate"]
                                                      for count, value in device_workers.items()},  # fmt: skip
            "limit_rate": limit,
            "cores_per_gpu_at_limit": gpu_rate / limit,
            "limit_rate_without_video": limit_without_video,
            "cores_per_gpu_at_limit_without_video": gpu_rate / limit_without_video,
            "note": gpu_note,
        },  # fmt: skip
        "environment": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "load_average": os.getloadavg()},  # fmt: skip
        "seconds": {"measure": round(measure_seconds, 1), "total": None},
    }
    results["seconds"]["total"] = round(time.time() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(report(results))
    total = results["seconds"]["total"]
    print(f"\n{total:.0f} s in all ({measure_seconds:.0f} s measuring); wrote {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
