"""Pixels on the device: the float half of image and frame decoding.

Its own module, apart from `image.py`, because the converter and the config read `image.py`
without importing torch (tests/test_architecture.py)."""

from __future__ import annotations

import torch
from torch import Tensor


def normalise_pixels(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                     dtype: torch.dtype = torch.float32) -> Tensor:  # fmt: skip
    """uint8 pixels (..., 3, H, W) -> `(pixels / 255 - mean) / std` in `dtype`, on their device: the
    data workers ship bytes (a quarter of what float pixels cost to collate, pin and copy) and the
    float work is done here, on the accelerator. The same operations, in the same order, as
    torchvision's `ToTensor` and `Normalize`, so the result is theirs bit for bit. Pixels that are
    already floating point are taken as normalised (a caller's own timm preprocessing) and only
    cast."""
    if pixels.is_floating_point():
        return pixels.to(dtype)
    centre, scale = (torch.tensor(v, dtype=torch.float32, device=pixels.device).view(3, 1, 1) for v in (mean, std))
    return pixels.float().div(255).sub(centre).div(scale).to(dtype)
