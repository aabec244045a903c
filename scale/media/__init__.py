"""Untrusted media bytes, checked one way: the converter (`scale shards`) and the loader (data
workers) call the same functions, so they accept the same formats and refuse on the same limits.

Every function reads the header first and refuses *before* decoding what is over a limit (a
30000 x 30000 PNG header on a 50-KB file must not allocate 2.7 GB); anything unreadable raises a
`MediaError` whose `reason` is the short code the converter's report counts (`truncated`,
`corrupt`, `too_many_pixels`, ...) and whose message says why. `MediaTooLarge` is the subclass for
limits, which the loader counts apart (`image: too large`). A decode that overruns its time limit
raises `TimeoutError` (`scale.media.video`).

    image.py   JPEG / PNG / WebP through PIL
    video.py   MP4 through PyAV (decord as the fallback), in a killable helper process
    audio.py   WAV / FLAC / MP3 through soundfile; the sound track of an MP4
    arrays.py  `.npy` feature arrays, never unpickled
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


class MediaError(ValueError):
    """A file or field that must not be used. `reason` is a short code (the converter's report
    counts by it); the message is the human detail."""

    reason = "corrupt"

    def __init__(self, detail: str, reason: str | None = None):
        super().__init__(detail)
        if reason is not None:
            self.reason = reason

    def __reduce__(self):  # raised inside the video helper process and sent back: keep the reason
        return type(self), (str(self), self.reason)


class MediaTooLarge(MediaError):
    """Over a size limit (bytes, pixels, seconds), refused before decoding."""

    reason = "too_large"


def check_size(data: bytes, name: str, limit: int) -> bytes:
    """`data`, or MediaTooLarge when it has more than `limit` bytes (checked before any decoding)."""
    if len(data) > limit:
        raise MediaTooLarge(f"{name}: {len(data)} bytes, over the {limit}-byte limit")
    return data


@contextmanager
def native_stderr() -> Iterator[list[str]]:
    """What native code (decord's bundled FFmpeg) writes to file descriptor 2 inside the block,
    captured instead of printed: the list holds the text afterwards. A bad file then says why in
    its error, which goes through the error budget's rate-limited log, not straight to the
    terminal two lines per file. (Process-wide while it lasts: meant for the video helper process,
    which does nothing else.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read(4096).decode("utf-8", errors="replace"))


def with_native_detail(error: Exception, captured: list[str]) -> Exception:
    """`error` with what native code printed while it happened (timestamps and source paths cut)."""
    lines = [re.sub(r"^\[[\d:]+\] \S+: |^\[\S+ @ 0x[0-9a-f]+\] ", "", line.strip())
             for line in "".join(captured).splitlines() if line.strip()]  # fmt: skip
    if not lines:
        return error
    message = f"{error} (decoder: {'; '.join(lines)[:200]})"
    try:
        return type(error)(message)
    except Exception:  # an exception class with another signature
        return RuntimeError(message)
