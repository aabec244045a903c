"""The video's two stems: `frames` (decoded MP4 frames) and `features` (M5Product's clip
features), sharing the mean-token trunk and the masked-frame head (package docstring: `__init__.py`)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scale.media import MediaError
from scale.media.arrays import load_npy, pad_rows
from scale.media.image import plain_jpeg_size
from scale.media.pixels import normalise_pixels, strip_frames
from scale.media.video import read_frames, strip_to_frames
from scale.modalities.base import (BuildContext, Encoded, Masked, Modality, TensorSpec, encoded_jpeg, encoded_pixels,
                                   encoded_tensors, first_slots_real, unpack_on_device)
from scale.modalities.image.stems import image_trunk
from scale.modalities.masking import MaskedRegression, after_pooled_token, mask_slots
from scale.modalities.spec import DecodeContext, RawSample
from scale.modalities.transformer import MeanTokenTrunk
from scale.modalities.video import CLIP_FEATURES, FRAME_STRIP, VIDEO, VideoConfig

class VideoStem(Modality):
    """What both stems share: a per-frame embedding (the stem's), the mean-token trunk and the
    masked-frame regression head."""

    modality = "video"

    def __init__(self, config: VideoConfig, width: int, embed: nn.Module, target_dim: int,
                 trunk: MeanTokenTrunk | None = None):
        super().__init__()
        self.config = config
        self.embed = embed
        self.trunk = trunk or MeanTokenTrunk(config, config.frames, width)
        self.head = MaskedRegression(width, target_dim)

    @classmethod
    def build(cls, context: BuildContext) -> "VideoStem":
        config = context.config.video
        # The image's trunk (built before video in the canonical order) instead of one of its own.
        return cls(config, context.width, image_trunk(context) if config.share_image_trunk else None)

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


class PixelPatches(nn.Module):
    """A frame -> one token: per-pixel colour features (1x1 conv + GELU), a patch convolution +
    GELU averaged over the patches (the frame's layout), plus a projection of each colour feature's
    peak over the frame (what stands out anywhere in it).

    The per-pixel nonlinearity is what lets the token say *which colours are where in the frame*,
    not just its mean colour: a patch convolution straight on the pixels followed by the average is
    linear, so the token was a function of the frame's mean patch, and a product's small coloured
    object (then the demo's category blob over an instance-coloured background; since 2026-12-03
    the demo puts the instance in the blob) could not be told from a different background tint.
    With the linear stem, the smoke run's video embedding scored the coarse mAP@10 of its random
    initialisation (0.187 vs 0.189; docs/measured.md). The peak branch is what makes the small
    object visible at all: on that demo's held-out products, the random-initialisation video
    embedding scored coarse mAP@10 0.204 without it and 0.422 with it (a perfect detector of the
    category each video shows: 0.470)."""

    colour_features = 16
    """Per-pixel features: cheap (the patch convolution reads 16 instead of 3 channels)."""

    def __init__(self, hidden: int, patch: int):
        super().__init__()
        self.colour = nn.Conv2d(3, self.colour_features, kernel_size=1)
        self.patches = nn.Conv2d(self.colour_features, hidden, kernel_size=patch, stride=patch)
        self.peaks = nn.Linear(self.colour_features, hidden)

    def forward(self, frames: Tensor) -> Tensor:
        """(N, 3, S, S) -> (N, hidden)."""
        colour = F.gelu(self.colour(frames))
        layout = F.gelu(self.patches(colour)).mean(dim=(-1, -2))
        # The strongest response of each colour feature anywhere in the frame: a small object is
        # a tenth of the pixels, so in any average its colour is outweighed by the background's.
        return layout + self.peaks(colour.amax(dim=(-1, -2)))


def _capacity(config: VideoConfig) -> int:
    """Bytes of a sample's (frames, 3, size, size) frames: the `decode_on: device` buffer."""
    return config.frames * 3 * config.size**2


class FrameStem(VideoStem):
    stem = "frames"
    reads = (FRAME_STRIP, VIDEO)
    fallbacks = {VIDEO: FRAME_STRIP}
    values = "frames"

    def __init__(self, config: VideoConfig, width: int, trunk: MeanTokenTrunk | None = None):
        if config.size % config.patch:
            raise ValueError(f"video.size {config.size} is not a multiple of video.patch {config.patch}")
        super().__init__(config, width, PixelPatches(config.hidden, config.patch), target_dim=3 * config.target_grid**2,
                         trunk=trunk)

    @classmethod
    def tensors(cls, config: VideoConfig) -> dict[str, TensorSpec]:
        # Bytes: normalised on the device (`prepare`), a quarter of float frames' collate and copy.
        if config.decode_on == "device":  # a strip's bitstream or the worker's frames (scale/media/pixels.py)
            return encoded_tensors(_capacity(config))
        return {"frames": TensorSpec((config.frames, 3, config.size, config.size), torch.uint8)}

    @classmethod
    def prepared_tensors(cls, config: VideoConfig) -> dict[str, TensorSpec]:
        return {"frames": TensorSpec((config.frames, 3, config.size, config.size), torch.float32)}

    def prepare(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if "encoded" in inputs:
            count, size = self.config.frames, self.config.size
            inputs = unpack_on_device(inputs, (count, 3, size, size), lambda strip: strip_frames(strip, count, size),
                                      "video", values="frames")  # fmt: skip
        frames = normalise_pixels(inputs["frames"], self.config.mean, self.config.std, self.input_dtype)
        return {**inputs, "frames": frames}

    @classmethod
    def decode(cls, sample: RawSample, config: VideoConfig, context: DecodeContext) -> dict[str, Tensor]:
        """The frames extracted at conversion (`frames.jpg`) when they are `frames` at `size`, else
        the MP4 decoded, under the limits' time and header limits -> (frames, 3, size, size)
        uint8 (with `decode_on: device`, the strip's bitstream when it is a plain JPEG of those
        frames)."""
        if config.decode_on == "device":
            if sample.has(FRAME_STRIP):
                strip = sample.read(FRAME_STRIP)
                fits = len(strip) <= _capacity(config)
                if fits and plain_jpeg_size(strip) == (config.size, config.frames * config.size):
                    return encoded_jpeg(strip, _capacity(config))
            return encoded_pixels(cls._frames(sample, config, context)["frames"])
        return cls._frames(sample, config, context)

    @classmethod
    def _frames(cls, sample: RawSample, config: VideoConfig, context: DecodeContext) -> dict[str, Tensor]:
        """Decoded in the data worker (`decode`'s first case)."""
        limits = context.limits
        frames = None
        if sample.has(FRAME_STRIP):
            frames = strip_to_frames(sample.read(FRAME_STRIP), limits.max_video_pixels)
            if frames.shape[:2] != (config.frames, config.size):
                if not sample.has(VIDEO):
                    raise MediaError(f"frames.jpg holds {frames.shape[0]} frames of {frames.shape[1]} px, video.frames "
                                     f"{config.frames} at video.size {config.size} need the MP4, which this product lacks",
                                     "strip_mismatch")  # fmt: skip
                warnings.warn(f"frames.jpg holds {frames.shape[0]} frames of {frames.shape[1]} px, the config asks for "
                              f"{config.frames} at {config.size}: decoding the MP4s instead (slower); convert with "
                              f"`scale shards --extract-frames {config.frames}x{config.size}`", stacklevel=2)  # fmt: skip
                frames = None
        if frames is None:
            frames = read_frames(sample.read(VIDEO), config.frames, config.size, timeout_s=limits.video_timeout_s,
                                 max_pixels=limits.max_video_pixels, max_seconds=limits.max_video_seconds)  # fmt: skip
        return {"frames": torch.from_numpy(frames).permute(0, 3, 1, 2)}

    def real_frames(self, inputs: dict[str, Tensor]) -> Tensor:
        frames = inputs["frames"]
        return torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)

    def embed_frames(self, inputs: dict[str, Tensor], real: Tensor) -> Tensor:
        frames = inputs["frames"]  # (B, T, 3, S, S)
        batch, time = frames.shape[:2]
        return self.embed(frames.flatten(0, 1)).view(batch, time, -1)

    def targets(self, values: Tensor) -> Tensor:
        """(B, T, 3, S, S) -> (B, T, 3*g*g) colour layout of each frame."""
        pooled = F.adaptive_avg_pool2d(values.flatten(0, 1), self.config.target_grid)
        return pooled.flatten(1).view(*values.shape[:2], -1)


class ClipFeatureStem(VideoStem):
    stem = "features"
    reads = (CLIP_FEATURES,)
    values = "features"

    def __init__(self, config: VideoConfig, width: int, trunk: MeanTokenTrunk | None = None):
        super().__init__(config, width, nn.Linear(config.feature_dim, config.hidden), target_dim=config.feature_dim,
                         trunk=trunk)

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


STEMS = {"frames": FrameStem, "features": ClipFeatureStem}
