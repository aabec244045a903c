"""Size and time limits on untrusted product data, shared by the converter and the decoder.

Real product data holds files no pipeline should try to decode whole: a 30000 x 30000 JPEG header on
a 50-KB file (a decompression bomb), an hour-long video, a megabyte "title". The converter
(`datamodules/shards.py`) checks every media file against these limits once, when it writes shards;
the decoder (`datamodules/decode.py`) checks again, because shards may come from elsewhere. A value
over a limit makes that modality absent for the product; it is counted, never fatal.

`max_error_rate` is the one limit that stops a run: when more than that share of the samples a data
worker has read had any error (after `error_rate_min_samples` samples, so that one bad shard at the
start does not stop a run), the worker raises `DataErrorRateExceeded` with the counts per kind: a run
fed mostly broken data is a broken run, and should say so rather than train on the remainder.
"""

from __future__ import annotations

from dataclasses import dataclass

MB = 2**20


@dataclass
class DataLimits:
    max_image_bytes: int = 32 * MB
    """Largest image file (encoded bytes) decoded."""
    max_image_pixels: int = 40_000_000
    """Largest width x height of an image, read from its header before decoding (decompression bombs)."""
    max_video_bytes: int = 512 * MB
    """Largest video file decoded."""
    max_video_pixels: int = 4096 * 2160
    """Largest width x height of a video stream (4K)."""
    max_video_seconds: float = 3600.0
    """Longest video accepted (from its container header)."""
    video_timeout_s: float = 20.0
    """Wall-clock limit on decoding one video; past it the decoding process is killed and the video
    counted as `video: timeout` (decord is known to hang on some files)."""
    max_audio_bytes: int = 128 * MB
    """Largest audio file decoded."""
    max_audio_seconds: float = 3600.0
    """Longest audio accepted (from its header)."""
    max_npy_bytes: int = 64 * MB
    """Largest pre-extracted feature array (`.npy`)."""
    max_json_bytes: int = 1 * MB
    """Largest product record (title, table, label as JSON)."""
    max_title_chars: int = 2000
    """Titles are cut to this many characters before tokenising (the tokenizer's cost grows with
    the input, however few tokens are kept)."""
    max_table_chars: int = 20000
    """Table strings are cut to this many characters before parsing."""
    max_error_rate: float = 0.1
    """Share of samples with any error past which a data worker stops the run (1.0: never)."""
    error_rate_min_samples: int = 1000
    """Samples a worker reads before `max_error_rate` is enforced."""


class DataErrorRateExceeded(RuntimeError):
    """Too large a share of the data is unusable: the run stops with the counts per kind."""
