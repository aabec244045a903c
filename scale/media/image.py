"""Image bytes (JPEG, PNG, WebP) through PIL, header first.

`open_image` is the one gate: it accepts the three formats a product photo comes in, reads the
header (PIL's `Image.open` decodes no pixel) and refuses an image over `max_image_pixels` before
anything is decoded, for every format (a PNG decompression bomb is refused by its IHDR size, not
discovered by a failed decode). The converter's `check_image` and the loader's `decode_image` both
go through it, so a PNG saved as `.jpg` is kept by the one and decoded by the other.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from scale.media import MediaError, MediaTooLarge

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
"""Formats PIL may open: product photos, not every format PIL has a (less-tested) decoder for."""


@contextmanager
def open_image(data: bytes, max_pixels: int | None) -> Iterator[Image.Image]:
    """The open (not yet decoded) image, once its header is within `max_pixels` (width x height).

    With a limit, PIL's own bomb check is off for the `open`: it only warns between
    `Image.MAX_IMAGE_PIXELS` and twice that, raises above with a message that does not say which
    limit, and ours is the stricter one. `max_pixels=None` leaves PIL's check in place."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = None
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:
        raise MediaTooLarge(str(error), "too_many_pixels") from None
    except UnidentifiedImageError:
        raise MediaError(f"not a {', '.join(IMAGE_FORMATS)} image ({data[:8]!r}...)", "corrupt") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise MediaTooLarge(f"image {width}x{height} is over max_image_pixels={max_pixels}", "too_many_pixels")
        yield image


def check_image(data: bytes, limits) -> None:
    """The converter's check: the header within `limits.max_image_pixels`, then a decode that reads
    every byte (a JPEG at 1/8 scale through DCT scaling, which still entropy-decodes the whole scan,
    so truncation is caught at a fraction of the cost)."""
    with open_image(data, limits.max_image_pixels) as image:
        try:
            width, height = image.size
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # no-op for PNG / WebP
            image.load()
        except Exception as error:  # PIL raises many types for bad bytes; each means "not usable"
            reason = "truncated" if "truncated" in str(error) else "corrupt"
            raise MediaError(f"{image.format}: {error}", reason) from None


def shorter_side(data: bytes, max_pixels: int | None = None) -> int:
    """The shorter side in pixels of an image, from its header."""
    with open_image(data, max_pixels) as image:
        return min(image.size)


def decode_image(data: bytes, transform, max_pixels: int | None = None, size: int | None = None,
                 min_side: int | None = None):  # fmt: skip
    """Image bytes -> `transform(RGB image)`. `size` lets a JPEG decode at 1/2, 1/4 or 1/8 scale
    (DCT scaling, much faster) while staying at least size x size for the transform's resize.
    None, with nothing decoded, when the header's shorter side is under `min_side`."""
    with open_image(data, max_pixels) as image:
        if min_side is not None and min(image.size) < min_side:
            return None
        if size is not None:
            image.draft("RGB", (size, size))  # no-op for formats other than JPEG
        return transform(image.convert("RGB"))  # a truncated or corrupt file raises here


def plain_jpeg_size(data: bytes, max_pixels: int | None = None) -> tuple[int, int] | None:
    """(width, height) from the header when `data` is a JPEG any decoder turns into the same
    pixels as PIL: baseline (not progressive), three YCbCr components (no grayscale, CMYK or
    Adobe-transformed RGB). None otherwise, or when it is not a JPEG at all. What may be shipped
    to the device undecoded (`scale.media.pixels.unpack_pixels`); the header only, no pixel."""
    with open_image(data, max_pixels) as image:
        plain = (image.format == "JPEG" and image.mode == "RGB" and not image.info.get("progressive")
                 and "adobe" not in image.info)  # fmt: skip
        return image.size if plain else None


def jpeg_bound(pixels: int) -> int:
    """Bytes to reserve for a JPEG the converter makes of `pixels` RGB pixels: more than any JPEG
    of them at quality 90 takes (their raw bytes), plus headers."""
    return 3 * pixels + 65536


SMALL_QUALITY = 90
"""JPEG quality of a downscaled copy (`shrink_image`), 4:4:4 as the frame strips."""


def shrunk_size(width: int, height: int, side: int) -> tuple[int, int] | None:
    """(width, height) scaled so the shorter side is `side`; None when it is that small already."""
    shorter = min(width, height)
    if shorter <= side:
        return None
    return max(1, round(width * side / shorter)), max(1, round(height * side / shorter))


def probe_shrink(source: str | BinaryIO, side: int) -> list[int] | None:
    """At planning: the [width, height] a downscaled copy of the image (a path or an open file)
    will have, from its header (PIL reads no pixel); None when no copy is needed or the file is
    unusable (the image's own check reports that)."""
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as image:
            size = shrunk_size(*image.size, side)
    except Exception:  # unreadable: counted by check_image, not here
        return None
    return list(size) if size else None


def shrink_image(data: bytes, size: list[int], max_pixels: int | None) -> bytes:
    """The image resized to `size` ([width, height], from `probe_shrink`) as a JPEG (bicubic,
    antialiased; decoded at a DCT scale of at least that size first)."""
    width, height = size
    with open_image(data, max_pixels) as image:
        try:
            image.draft("RGB", (width, height))
            small = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        except Exception as error:
            raise MediaError(f"{image.format}: {error}", "corrupt") from None
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=SMALL_QUALITY, subsampling=0)
    return buffer.getvalue()
