"""M5Product's pre-extracted features (`.npy` bytes) -> fixed-shape tensors with masks.

`.npy` files are loaded with `allow_pickle=False` and must hold a finite numeric array of the
expected shape: an object array (which would need unpickling), a wrong shape or a NaN raises, and
the decoder makes the modality absent, counted like corrupt media.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from scale.config import AudioConfig, ImageConfig, VideoConfig

NPY_MAGIC = b"\x93NUMPY"


def load_npy(data: bytes, name: str, dims: int, shape: tuple[int | None, ...]) -> np.ndarray:
    """`.npy` bytes -> a finite float32 array of `dims` dimensions whose sizes match `shape`
    (None: any size >= 1). Never unpickles: object arrays are refused by `allow_pickle=False`."""
    if not data.startswith(NPY_MAGIC):  # np.load would also accept a zip (.npz) or a pickle stream
        raise ValueError(f"{name}: not a .npy array")
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{name}: dtype {array.dtype} is not numeric")
    if array.ndim != dims or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        expected = " x ".join("N" if want is None else str(want) for want in shape)
        raise ValueError(f"{name}: shape {array.shape}, expected {expected}")
    if 0 in array.shape:
        raise ValueError(f"{name}: empty array {array.shape}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: non-finite values")
    return array


def _pad(array: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First `length` rows of `array`, zero-padded; and the (length,) mask of real rows."""
    rows = min(len(array), length)
    padded = torch.zeros(length, *array.shape[1:])
    padded[:rows] = torch.from_numpy(array[:rows])
    return padded, torch.arange(length) < rows


def decode_regions(regions: bytes, boxes: bytes, config: ImageConfig) -> dict[str, torch.Tensor]:
    """Region features (R, region_dim) and boxes (R, 5) -> fixed `max_regions` slots with a mask."""
    features = load_npy(regions, "regions.npy", 2, (None, config.region_dim))
    box = load_npy(boxes, "boxes.npy", 2, (len(features), 5))
    features, mask = _pad(features, config.max_regions)
    return {"regions": features, "boxes": _pad(box, config.max_regions)[0], "region_mask": mask}


def decode_video_features(data: bytes, config: VideoConfig) -> dict[str, torch.Tensor]:
    """Per-second clip features (T, feature_dim) -> the first `frames` clips with a mask."""
    features, mask = _pad(load_npy(data, "video.npy", 2, (None, config.feature_dim)), config.frames)
    return {"features": features, "frame_mask": mask}


def decode_mel(data: bytes, config: AudioConfig) -> tuple[torch.Tensor, int]:
    """Log-mel spectrogram (mel_bins, T) -> (normalised frames (feature_frames, mel_bins), valid count)."""
    mel = load_npy(data, "mel.npy", 2, (config.mel_bins, None)).T
    frames, mask = _pad((mel - config.norm_mean) / config.norm_std, config.feature_frames)
    return frames, int(mask.sum())
