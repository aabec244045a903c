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
