"""Pixels on the device: the float half of image and frame decoding.

Its own module, apart from `image.py`, because the converter and the config read `image.py`
without importing torch (tests/test_architecture.py)."""

from __future__ import annotations

from collections.abc import Callable

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


# ---- JPEG bitstreams decoded on the device ---------------------------------------------------------
# With `decode_on: device` a stem ships each sample as one fixed-size uint8 buffer and a length, so
# collation stays a stack: length > 0, the buffer starts with a JPEG bitstream of that many bytes,
# decoded after the transfer (`torchvision.io.decode_jpeg`: nvJPEG on a GPU, libjpeg-turbo on the
# CPU, which gives PIL's pixels bit for bit); length 0, the buffer holds the uint8 pixels a data
# worker decoded itself (a file the device's decoder cannot take, or one that needs a resize). The
# buffer is as long as the pixels, so a batch costs what it costs today in collate, pin and copy.


def pack_jpeg(data: bytes, capacity: int) -> Tensor:
    """A JPEG bitstream (at most `capacity` bytes) at the start of a zeroed (capacity,) buffer."""
    if len(data) > capacity:
        raise ValueError(f"a JPEG of {len(data)} bytes does not fit a buffer of {capacity}")
    buffer = torch.zeros(capacity, dtype=torch.uint8)
    buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buffer


def pack_pixels(pixels: Tensor) -> Tensor:
    """Pixels a data worker decoded, flattened into the buffer (the buffer is their size)."""
    return pixels.reshape(-1).contiguous()


def _decode_jpegs(streams: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """Each bitstream decoded to (3, H, W) uint8 on `device`; None for one that fails. One batched
    call (nvJPEG decodes a list at once); a failure anywhere makes it fail as a whole, so the
    streams are then decoded one by one to find the bad ones."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(streams, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded: list[Tensor | None] = []
        for stream in streams:
            try:
                decoded.append(decode_jpeg(stream, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _decode_jpegs_on_a_side_stream(streams: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """`_decode_jpegs` on a CUDA device, from a stream of its own. torchvision's nvJPEG decoder
    allocates its outputs on the current stream but writes them from a private stream that does
    not wait for it, so it can overwrite memory that work still queued on the current stream
    reads (pytorch/vision#9606: reproduced on H100s, not fixed in torchvision, whose decoders are
    deprecated for TorchCodec's). Called with another stream current, the outputs come from that
    stream's pool, which only these decodes use (the repro's `--caller-stream side` control is
    clean); `record_stream` keeps the allocator from recycling them while the training stream
    still reads them."""
    caller = torch.cuda.current_stream(device)
    side = _side_streams.setdefault(device, torch.cuda.Stream(device))
    side.wait_stream(caller)
    with torch.cuda.stream(side):
        decoded = _decode_jpegs(streams, device)
    caller.wait_stream(side)
    for image in decoded:
        if image is not None:
            image.record_stream(caller)
    return decoded


def unpack_pixels(buffers: Tensor, lengths: Tensor, shape: tuple[int, ...], device: torch.device,
                  fit: Callable[[Tensor], Tensor | None]) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(B, capacity) buffers and (B,) lengths (see above) -> (B, *shape) uint8 pixels on `device`
    and a (B,) bool in host memory (read without a device sync), False where a bitstream failed
    to decode or `fit` (decoded (3, H, W) -> `shape`, or None when it cannot) refused it; those
    rows are zeros. The bitstreams must be in host memory (torchvision's decoders read them
    there): buffers found on an accelerator are copied back first, which is correct but slow
    (`TensorSpec.host` keeps them on the host)."""
    device, lengths = torch.device(device), lengths.cpu()
    pixels = torch.zeros((buffers.shape[0], *shape), dtype=torch.uint8, device=device)
    decodable = torch.ones(buffers.shape[0], dtype=torch.bool)
    raw = (lengths == 0).nonzero().flatten()
    if raw.numel():
        pixels[raw.to(device)] = buffers[raw.to(buffers.device)].view(-1, *shape).to(device, non_blocking=True)
    coded = (lengths > 0).nonzero().flatten().tolist()
    if coded:
        host = buffers.cpu()
        decode = _decode_jpegs_on_a_side_stream if device.type == "cuda" else _decode_jpegs
        decoded = decode([host[row, : int(lengths[row])] for row in coded], device)
        for row, image in zip(coded, decoded):
            fitted = None if image is None else fit(image)
            if fitted is None:
                decodable[row] = False
            else:
                pixels[row] = fitted
    return pixels, decodable


def centre_crop(image: Tensor, size: int) -> Tensor | None:
    """(3, H, W) with its shorter side `size` -> the (3, size, size) centre, at torchvision's
    `CenterCrop` offsets (what the loader's transform does to such an image); None for other
    sizes (they need a resize, which the data workers do)."""
    height, width = image.shape[-2:]
    if min(height, width) != size:
        return None
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image[:, top : top + size, left : left + size]


def strip_frames(strip: Tensor, count: int, size: int) -> Tensor | None:
    """A decoded frame strip (3, count * size, size), frames stacked top to bottom
    (`scale.media.video.frames_to_strip`) -> (count, 3, size, size); None for another shape."""
    if tuple(strip.shape) != (3, count * size, size):
        return None
    return strip.view(3, count, size, size).transpose(0, 1)
