"""Pre-extracted features for the demo products, laid out as M5Product released them.

The official SCALE never sees pixels or waveforms: it reads per image up to 36 Faster R-CNN region
features (2048-d) with 5-d boxes, per video one S3D feature (1024-d) per second, per audio an
80-bin log-mel spectrogram. `datamodules/demo.py --features` writes such arrays next to the media,
so the feature stems of the model can be trained and tested on the same planted truth:

    OUT/features/<id>.regions.npy   float16 (R, region_dim), R drawn in 10..36
    OUT/features/<id>.boxes.npy     float32 (R, 5): x1/W, y1/H, x2/W, y2/H, area (of the unit square)
    OUT/features/<id>.video.npy     float16 (T, video_feature_dim), T = ceil(video seconds) (may be < 12)
    OUT/features/<id>.mel.npy       float32 (mel_bins, T) natural-log mel power, T <= mel_frames

How each carries the planted signal, with the same per-modality confusion as that product's media
(the category whose cues the image / video / audio shows):
- regions and clips: the detectors are learned networks we cannot run, so they are stood in for by
  a fixed random projection (per world, per feature width) of a 16-d latent: the shown category's
  latent plus the instance's latent plus noise, through a ReLU (real detector features are
  non-negative). "Object" regions sit on the instance's shape and lean on the instance latent,
  "background" regions lean on the category; a clip also moves along the category's motion latent
  over time, as the video's blob moves in the category's direction.
- mel: the real log-mel spectrogram of the product's own waveform (n_fft 1024, hop 256, HTK mel
  filters from 0 Hz to Nyquist; 12 s at 16 kHz gives the official 751 frames), so it carries the
  category tone and the instance harmonic exactly as the WAV does.

Category latents and projections depend only on (world_seed, categories, widths), instance latents
on the split's seed: folders made with different seeds share categories. Feature noise has its own
RNG stream, so turning features on never changes the media bytes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

LATENT = 16
"""Width of the planted category / instance latents behind the region and clip features."""
_WORLD, _INSTANCES, _NOISE, _PROJECTION = 7006, 7007, 7008, 7009
FILES: dict[str, tuple[str, str]] = {
    "image_regions": ("image", "features/{}.regions.npy"),
    "image_boxes": ("image", "features/{}.boxes.npy"),
    "video_features": ("video", "features/{}.video.npy"),
    "audio_mel": ("audio", "features/{}.mel.npy"),
}
"""meta.jsonl field -> (modality, path pattern under OUT)."""
N_FFT, HOP = 1024, 256


def world_latents(categories: int, world_seed: int) -> dict[str, np.ndarray]:
    """Per category: an appearance latent and a motion latent, (categories, LATENT) each."""
    rng = np.random.default_rng([world_seed, categories, _WORLD])
    return {"category": rng.standard_normal((categories, LATENT)), "motion": rng.standard_normal((categories, LATENT))}


def instance_latents(instances: int, seed: int) -> np.ndarray:
    """(instances, LATENT): one latent per product instance of the split `seed`."""
    return np.random.default_rng([seed, _INSTANCES]).standard_normal((instances, LATENT))


@lru_cache(maxsize=8)
def _projection(world_seed: int, kind: int, dim: int) -> np.ndarray:
    """A fixed (LATENT, dim) projection, the stand-in for a detector's learned weights."""
    return np.random.default_rng([world_seed, _PROJECTION, kind, dim]).standard_normal((LATENT, dim)) / np.sqrt(LATENT)


def _features(latents: np.ndarray, world_seed: int, kind: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """(N, LATENT) latents -> (N, dim) non-negative float16 features."""
    projected = latents @ _projection(world_seed, kind, dim) + 0.2 * rng.standard_normal((len(latents), dim))
    return np.maximum(projected, 0.0).astype(np.float16)


def region_features(job: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(regions (R, region_dim) float16, boxes (R, 5) float32) of one product image."""
    spec, inst = job["features"], job["inst"]
    count = int(rng.integers(10, 37))
    objects = rng.random(count) < 0.4  # regions on the instance's shape; the rest: background
    on_object = objects[:, None]
    centre = np.where(on_object, inst["pos"] + rng.normal(0, 0.05, (count, 2)), rng.uniform(0.1, 0.9, (count, 2)))
    size = np.where(on_object, 2 * inst["radius"] * rng.uniform(0.5, 1.2, (count, 2)), rng.uniform(0.1, 0.6, (count, 2)))
    corners = np.clip(np.concatenate([centre - size / 2, centre + size / 2], axis=1), 0.0, 1.0)
    area = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
    boxes = np.concatenate([corners, area[:, None]], axis=1).astype(np.float32)
    weight_category = np.where(objects, rng.uniform(0.4, 0.8, count), rng.uniform(0.8, 1.2, count))
    weight_instance = np.where(objects, rng.uniform(0.8, 1.2, count), rng.uniform(0.1, 0.4, count))
    latent = (weight_category[:, None] * spec["image"] + weight_instance[:, None] * spec["instance"]
              + 0.5 * rng.standard_normal((count, LATENT)))  # fmt: skip
    return _features(latent, spec["world_seed"], 0, spec["region_dim"], rng), boxes


def video_features(job: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """(T, video_feature_dim) float16: one clip feature per started second of the video."""
    spec = job["features"]
    clips = max(1, int(np.ceil(job["video_seconds"] - 1e-6)))
    phase = (np.arange(clips) + 0.5) / clips - 0.5  # where the blob is along its path
    latent = (0.9 * spec["video"] + 0.6 * spec["instance"] + phase[:, None] * spec["motion"]
              + 0.5 * rng.standard_normal((clips, LATENT)))  # fmt: skip
    return _features(latent, spec["world_seed"], 1, spec["video_feature_dim"], rng)


@lru_cache(maxsize=8)
def mel_filters(sample_rate: int, mel_bins: int, n_fft: int = N_FFT) -> np.ndarray:
    """(mel_bins, n_fft // 2 + 1) triangular HTK-mel filters from 0 Hz to Nyquist (no area norm)."""
    hz = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    top = 2595 * np.log10(1 + sample_rate / 2 / 700)
    edges = 700 * (10 ** (np.linspace(0, top, mel_bins + 2) / 2595) - 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return np.maximum(0.0, np.minimum((hz - lower) / (centre - lower), (upper - hz) / (upper - centre)))


def log_mel(wave: np.ndarray, sample_rate: int, mel_bins: int, max_frames: int) -> np.ndarray:
    """(mel_bins, T) float32 natural-log mel power of `wave` (centred frames, T <= max_frames)."""
    frames = min(max_frames, 1 + len(wave) // HOP)
    pad = N_FFT // 2
    padded = np.pad(wave.astype(np.float64), pad, mode="reflect" if len(wave) > pad else "constant")
    padded = np.pad(padded, (0, max(0, (frames - 1) * HOP + N_FFT - len(padded))))
    windows = padded[np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]]
    power = np.abs(np.fft.rfft(windows * np.hanning(N_FFT + 1)[:-1], axis=1)) ** 2  # periodic Hann
    return np.log(np.maximum(power @ mel_filters(sample_rate, mel_bins).T, 1e-6)).T.astype(np.float32)


def write_features(job: dict[str, Any], wave: np.ndarray | None) -> None:
    """Write the product's feature files (and remove stale ones of its absent modalities)."""
    root, pid, present, spec = Path(job["out"]), job["id"], job["present"], job["features"]
    paths = {name: root / pattern.format(pid) for name, (_, pattern) in FILES.items()}
    for name, (modality, _) in FILES.items():
        if not present[modality]:
            paths[name].unlink(missing_ok=True)
    rng = np.random.default_rng([job["seed"], _NOISE, job["index"]])
    if present["image"]:
        regions, boxes = region_features(job, rng)
        np.save(paths["image_regions"], regions)
        np.save(paths["image_boxes"], boxes)
    if present["video"]:
        np.save(paths["video_features"], video_features(job, rng))
    if present["audio"] and wave is not None:
        np.save(paths["audio_mel"], log_mel(wave, job["sample_rate"], spec["mel_bins"], spec["mel_frames"]))
