"""Product video: one token per frame (or per clip feature) -> temporal transformer. Two stems:

- `frames` (`FrameStem`): T uniformly sampled decoded frames. Each frame is cut into patches by a
  strided convolution and the patch embeddings are averaged into one frame token (cheap enough for
  12 frames on a CPU).
- `features` (`ClipFeatureStem`): M5Product's released per-second S3D clip features (the official
  model's input), one Linear per clip. Videos shorter than `frames` seconds are padded, and
  `frame_mask` keeps the padding out of attention, out of the mean token and out of masked modeling.

Either way a mean token is prepended, as in the official model, and learned temporal positions are
added (`MeanTokenTrunk`).

Masked frame modeling: 15 % of the real frames (at least one) are zeroed and regressed. The target
must be *fixed*, never the model's own embedding (that would be solved by collapse): for decoded
frames it is each frame's colour layout (the frame average-pooled to `target_grid` x `target_grid`),
for clip features it is the original clip feature (the official target).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scale.media.arrays import check_npy, load_npy, pad_rows
from scale.media.video import check_video, read_frames
from scale.modalities.base import (
    DecodeContext, Encoded, FileField, Masked, Modality, ModalitySpec, RawSample, TensorSpec, first_slots_real,
)  # fmt: skip
from scale.modalities.masking import MaskedRegression, after_pooled_token, mask_slots
from scale.modalities.transformer import MeanTokenTrunk, TrunkConfig

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


VIDEO = FileField("video", {".mp4": "mp4"}, "max_video_bytes", check_video)
CLIP_FEATURES = FileField("video_features", {".npy": "video.npy"}, "max_npy_bytes", check_npy)


class VideoStem(Modality):
    """What both stems share: a per-frame embedding (the stem's), the mean-token trunk and the
    masked-frame regression head."""

    modality = "video"

    def __init__(self, config: VideoConfig, width: int, embed: nn.Module, target_dim: int):
        super().__init__()
        self.config = config
        self.embed = embed
        self.trunk = MeanTokenTrunk(config, config.frames, width)
        self.head = MaskedRegression(width, target_dim)

    @property
    def num_tokens(self) -> int:
        return 1 + self.config.frames

    def real_frames(self, inputs: dict[str, Tensor]) -> Tensor:
        """(B, T) bool: the frames that exist."""
        raise NotImplementedError

    def embed_frames(self, inputs: dict[str, Tensor], real: Tensor) -> Tensor:
        """(B, T, hidden) frame tokens."""
        raise NotImplementedError

    def encode(self, inputs: dict[str, Tensor]) -> Encoded:
        real = self.real_frames(inputs)
        return self.trunk(self.embed_frames(inputs, real), real)

    values: str = ""
    """The input key masked frame modeling corrupts."""

    def targets(self, values: Tensor) -> Tensor:
        """(B, T, ...) clean values -> (B, T, target_dim) regression targets."""
        return values

    def mask(self, inputs: dict[str, Tensor], present: Tensor) -> Masked | None:
        if not self.config.masked_modeling:
            return None
        values = inputs[self.values]
        corrupted, chosen = mask_slots(values, self.real_frames(inputs) & present[:, None], self.config.mask_prob)
        return Masked(inputs={**inputs, self.values: corrupted}, positions=after_pooled_token(chosen),
                      targets=self.targets(values)[chosen])  # fmt: skip

    def masked_loss(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> Tensor:
        return self.head(fused_tokens, masked, sample_weight)


class FrameStem(VideoStem):
    stem = "frames"
    reads = (VIDEO,)
    values = "frames"

    def __init__(self, config: VideoConfig, width: int):
        if config.size % config.patch:
            raise ValueError(f"video.size {config.size} is not a multiple of video.patch {config.patch}")
        embed = nn.Conv2d(3, config.hidden, kernel_size=config.patch, stride=config.patch)
        super().__init__(config, width, embed, target_dim=3 * config.target_grid**2)

    @classmethod
    def tensors(cls, config: VideoConfig) -> dict[str, TensorSpec]:
        return {"frames": TensorSpec((config.frames, 3, config.size, config.size), torch.float32)}

    @classmethod
    def decode(cls, sample: RawSample, config: VideoConfig, context: DecodeContext) -> dict[str, Tensor]:
        """MP4 bytes -> (frames, 3, size, size) normalised, under the limits' time and header limits."""
        limits = context.limits
        frames = read_frames(sample.read(VIDEO), config.frames, config.size, timeout_s=limits.video_timeout_s,
                             max_pixels=limits.max_video_pixels, max_seconds=limits.max_video_seconds)  # fmt: skip
        mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (config.mean, config.std))
        return {"frames": (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0 - mean) / std}

    def real_frames(self, inputs: dict[str, Tensor]) -> Tensor:
        frames = inputs["frames"]
        return torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)

    def embed_frames(self, inputs: dict[str, Tensor], real: Tensor) -> Tensor:
        frames = inputs["frames"]  # (B, T, 3, S, S)
        batch, time = frames.shape[:2]
        return self.embed(frames.flatten(0, 1)).mean(dim=(-1, -2)).view(batch, time, -1)

    def targets(self, values: Tensor) -> Tensor:
        """(B, T, 3, S, S) -> (B, T, 3*g*g) colour layout of each frame."""
        pooled = F.adaptive_avg_pool2d(values.flatten(0, 1), self.config.target_grid)
        return pooled.flatten(1).view(*values.shape[:2], -1)


class ClipFeatureStem(VideoStem):
    stem = "features"
    reads = (CLIP_FEATURES,)
    values = "features"

    def __init__(self, config: VideoConfig, width: int):
        super().__init__(config, width, nn.Linear(config.feature_dim, config.hidden), target_dim=config.feature_dim)

    @classmethod
    def tensors(cls, config: VideoConfig) -> dict[str, TensorSpec]:
        return {"features": TensorSpec((config.frames, config.feature_dim), torch.float32),
                "frame_mask": TensorSpec((config.frames,), torch.bool)}  # fmt: skip

    @classmethod
    def example(cls, config: VideoConfig, batch: int) -> dict[str, Tensor]:
        """A varying number of real clips per video."""
        return {"features": torch.randn(batch, config.frames, config.feature_dim),
                "frame_mask": first_slots_real(batch, config.frames)}  # fmt: skip

    @classmethod
    def decode(cls, sample: RawSample, config: VideoConfig, context: DecodeContext) -> dict[str, Tensor]:
        """Per-second clip features (T, feature_dim) -> the first `frames` clips with a mask."""
        clips = load_npy(sample.read(CLIP_FEATURES), "video.npy", (None, config.feature_dim))
        features, mask = pad_rows(clips, config.frames)
        return {"features": features, "frame_mask": mask}

    def real_frames(self, inputs: dict[str, Tensor]) -> Tensor:
        return inputs["frame_mask"].bool()

    def embed_frames(self, inputs: dict[str, Tensor], real: Tensor) -> Tensor:
        # Padding clips may hold anything: only real clips are read.
        features = inputs["features"]
        return self.embed(torch.where(real[..., None], features, torch.zeros((), dtype=features.dtype, device=features.device)))


MODALITY = ModalitySpec(name="video", config=VideoConfig, limits=VideoLimits,
                        stems={"frames": FrameStem, "features": ClipFeatureStem})  # fmt: skip
