"""Product video: one token per frame (or per clip feature) -> temporal transformer. Two stems
(`stems.py`):

- `frames` (`FrameStem`): T uniformly sampled decoded frames. Per-pixel colour features (1x1
  convolution + GELU) are cut into patches by a strided convolution and averaged (the frame's
  layout), and each colour feature's peak over the frame is added (a small object's colour, which
  any average loses to the background): one token per frame, cheap enough for 12 frames on a CPU.
- `features` (`ClipFeatureStem`): M5Product's released per-second S3D clip features (the official
  model's input), one Linear per clip. Videos shorter than `frames` seconds are padded, and
  `frame_mask` keeps the padding out of attention, out of the mean token and out of masked modeling.

Either way a mean token is prepended, as in the official model, and learned temporal positions are
added (`MeanTokenTrunk`).

Masked frame modeling: 15 % of the real frames (at least one) are zeroed and regressed. The target
must be *fixed*, never the model's own embedding (that would be solved by collapse): for decoded
frames it is each frame's colour layout (the frame average-pooled to `target_grid` x `target_grid`),
for clip features it is the original clip feature (the official target).

The declaration the converter and the config read (no torch): the config section, the limits, the
fields (the MP4, checked by decoding a frame under the time limit; the clip features).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from scale.bounds import AT_LEAST_0, AT_LEAST_1, POSITIVE
from scale.media.arrays import check_npy
from scale.media.image import jpeg_bound
from scale.media.video import check_strip, check_video, extract_strip
from scale.modalities.spec import Derived, FileField, ModalitySpec, TrunkConfig

MB = 2**20


@dataclass
class VideoConfig(TrunkConfig):
    """Product video: frames sampled uniformly (or per-second clip features), one token per frame,
    a temporal transformer; masked frame regression."""

    stem: Literal["frames", "features"] = "frames"
    """`frames`: decoded MP4 frames. `features`: M5Product's per-second S3D clip features
    (`<key>.video.npy`, T x `feature_dim`, the first `frames` used)."""
    feature_dim: int = 1024
    """Clip feature width (official S3D: 1024)."""
    share_image_trunk: bool = False
    """Run the video tokens through the image's transformer trunk instead of a trunk of their own,
    as the official model runs video through the image encoder's layers (`image.stem regions`
    only, with the same hidden, layers, heads and mlp_ratio; each keeps its own input embedding
    and masked-modeling head)."""
    frames: int = 12
    """Frames sampled per video (official: 12 one-per-second clip features)."""
    size: int = 112
    """Square frame resolution in pixels."""
    patch: int = 16
    """Patch size of the per-frame embedding (patches are averaged into one token per frame)."""
    target_grid: int = 4
    """Masked-frame target: the frame average-pooled to `target_grid` x `target_grid` x 3 values.
    A fixed target (not the learned frame embedding) so the task cannot be solved by collapse."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel normalisation mean of decoded frames (as the image's)."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel normalisation std of decoded frames."""
    decode_on: Literal["workers", "device"] = "workers"
    """`frames` stem: where a frame strip (`--extract-frames`) becomes pixels, as
    `image.decode_on`: `device` ships the strip's JPEG bitstream and decodes it after the
    transfer; MP4s are always decoded in the workers."""

    BOUNDS = {**{"feature_dim": AT_LEAST_1, "frames": AT_LEAST_1, "size": AT_LEAST_1, "patch": AT_LEAST_1, "target_grid": AT_LEAST_1}, "std": POSITIVE}


@dataclass
class VideoLimits:
    max_video_bytes: int = 512 * MB
    """Largest video file decoded."""
    max_video_pixels: int = 4096 * 2160
    """Largest width x height of a video stream (4K)."""
    max_video_seconds: float = 3600.0
    """Longest video accepted (from its container header)."""
    video_timeout_s: float = 20.0
    """Wall-clock limit on decoding one video; past it the decoding process is killed and the video
    counted as `video: timeout` (decord is known to hang on some files)."""
    extract_frames: int = 0
    """Converter only (`scale shards --extract-frames TxS`): frames sampled from each MP4 once, at
    conversion, and stored beside it as one JPEG strip (`frames.jpg`); 0: none. The `frames` stem
    decodes the strip instead of the MP4 when its frame count and size are `video.frames` and
    `video.size` (docs/performance.md: what it saves)."""
    extract_size: int = 112
    """Converter only: the size (square, pixels) of the extracted frames."""

    BOUNDS = {**{"max_video_bytes": AT_LEAST_1, "max_video_pixels": AT_LEAST_1}, "max_video_seconds": POSITIVE, "video_timeout_s": POSITIVE,
              "extract_frames": AT_LEAST_0, "extract_size": AT_LEAST_1}  # fmt: skip


def _strip_budget(video_path: str, limits: Any) -> list[int] | None:
    return [limits.extract_frames, limits.extract_size] if limits.extract_frames > 0 else None


def _strip_bound(budget: list[int]) -> int:
    frames, size = budget
    return jpeg_bound(frames * size * size)


def _extract_strip(video: bytes, budget: list[int], limits: Any) -> bytes:
    return extract_strip(video, *budget, limits)


VIDEO = FileField("video", {".mp4": "mp4"}, "max_video_bytes", check_video)
FRAME_STRIP = FileField(
    "video_frames", {".jpg": "frames.jpg"}, "max_video_bytes", check_strip,
    # With `--extract-frames`, every product's MP4 is sampled once at conversion.
    derive=Derived(member="frames.jpg", source="video", probe=_strip_budget, bound=_strip_bound,
                   make=_extract_strip, reason="frames_extracted"),
)  # fmt: skip
CLIP_FEATURES = FileField("video_features", {".npy": "video.npy"}, "max_npy_bytes", check_npy)


MODALITY = ModalitySpec(name="video", config=VideoConfig, fields=(VIDEO, FRAME_STRIP, CLIP_FEATURES), stems="scale.modalities.video.stems",
                        limits=VideoLimits)  # fmt: skip
