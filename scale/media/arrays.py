"""`.npy` feature arrays (M5Product's pre-extracted features), read header first and never unpickled.

The header alone says dtype and shape, so an object array (which would need pickle), a
non-numeric dtype, a wrong shape or an array shorter than its header claims is refused before the
data is read; the data is then loaded with `allow_pickle=False` and must be finite.
"""

from __future__ import annotations

import io
import math

import numpy as np

from scale.media import MediaError

NPY_MAGIC = b"\x93NUMPY"


def _header(stream: io.BytesIO) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(stream)
    return shape, dtype


def load_npy(data: bytes, name: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """`.npy` bytes -> a finite float32 array with `len(shape)` dimensions, each of the size given
    (None: any size >= 1). Raises MediaError with the converter's reason codes; messages start
    with `name`."""
    prefix = f"{name}: " if name else ""
    if not data.startswith(NPY_MAGIC):  # np.load would also accept a zip (.npz) or a pickle stream
        raise MediaError(f"{prefix}not a .npy array", "corrupt")
    stream = io.BytesIO(data)
    try:
        found, dtype = _header(stream)
    except Exception as error:  # a damaged header
        raise MediaError(f"{prefix}not a .npy array ({error})", "corrupt") from None
    if dtype.hasobject:
        raise MediaError(f"{prefix}dtype {dtype} holds Python objects (loading needs pickle)", "object_dtype")
    if dtype.kind not in "iuf":
        raise MediaError(f"{prefix}dtype {dtype} is not numeric", "not_numeric")
    if len(found) != len(shape) or any(want is not None and got != want for got, want in zip(found, shape)):
        expected = " x ".join("N" if want is None else str(want) for want in shape)
        raise MediaError(f"{prefix}shape {found}, expected {expected}", "bad_shape")
    if 0 in found:
        raise MediaError(f"{prefix}empty array {found}", "bad_shape")
    if len(data) - stream.tell() < math.prod(found) * dtype.itemsize:
        raise MediaError(f"{prefix}{len(data) - stream.tell()} data bytes, the header says {found} {dtype}", "truncated")
    array = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)
    if not np.isfinite(array).all():
        raise MediaError(f"{prefix}NaN or infinite values", "not_finite")
    return array


def check_npy(data: bytes, limits=None) -> np.ndarray:
    """The converter's check of a feature file: any finite, non-empty 2-D numeric array."""
    return load_npy(data, "", (None, None))


def pad_rows(array: np.ndarray, length: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The first `length` rows of `array`, zero-padded to `length`; and the (length,) mask of real rows."""
    import torch

    rows = min(len(array), length)
    padded = torch.zeros(length, *array.shape[1:])
    padded[:rows] = torch.from_numpy(array[:rows])
    return padded, torch.arange(length) < rows
