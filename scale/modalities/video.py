"""Product video: one token per frame (or per clip feature) -> temporal transformer.

Two input stems behind one `VideoModality` (chosen by `video.stem`):
- `frames`: T uniformly sampled decoded frames. Each frame is cut into patches by a strided
  convolution and the patch embeddings are averaged into one frame token (cheap enough for 12
  frames on a CPU).
- `features`: M5Product's released per-second S3D clip features (the official model's input), one
  Linear per clip. Videos shorter than `frames` seconds are padded, and `frame_mask` keeps the
  padding out of attention, out of the mean token and out of masked modeling.

Either way a mean token is prepended, as in the official model, and learned temporal positions are
added.

Masked frame modeling: 15 % of the real frames (at least one) are zeroed and regressed. The target
must be *fixed*, never the model's own embedding (that would be solved by collapse): for decoded
frames it is each frame's colour layout (the frame average-pooled to `target_grid` x `target_grid`),
for clip features it is the original clip feature (the official target).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scale.config import VideoConfig
from scale.modalities.base import Encoded, Masked, Modality, bernoulli_positions, weighted_mean
from scale.modalities.transformer import TokenTransformer, mean_token

FEATURE_KEYS: tuple[str, ...] = ("features", "frame_mask")
"""Batch keys of the features stem: (B, frames, feature_dim) float and (B, frames) bool."""


class VideoModality(Modality):
    name = "video"
    input_keys = ("frames",)

    def __init__(self, config: VideoConfig, width: int):
        super().__init__()
        self.config = config
        if self.uses_features:
            self.input_keys = FEATURE_KEYS
            self.feature_embed = nn.Linear(config.feature_dim, config.hidden)
            self.target_dim = config.feature_dim
        else:
            if config.size % config.patch:
                raise ValueError(f"video.size {config.size} is not a multiple of video.patch {config.patch}")
            self.frame_embed = nn.Conv2d(3, config.hidden, kernel_size=config.patch, stride=config.patch)
            self.target_dim = 3 * config.target_grid**2
        self.trunk = TokenTransformer(config.hidden, config.layers, config.heads, config.mlp_ratio, config.frames + 1)
        self.project = nn.Linear(config.hidden, width) if config.hidden != width else nn.Identity()
        self.predict = nn.Linear(width, self.target_dim)

    @property
    def uses_features(self) -> bool:
        return self.config.stem == "features"

    @property
    def num_tokens(self) -> int:
        return 1 + self.config.frames

    def real_frames(self, inputs: dict[str, Tensor]) -> Tensor:
        """(B, T) bool: frames that exist (every decoded frame; clip features up to the video's length)."""
        if self.uses_features:
            return inputs["frame_mask"].bool()
        frames = inputs["frames"]
        return torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)

    def encode(self, inputs: dict[str, Tensor]) -> Encoded:
        frame_mask = self.real_frames(inputs)
        if self.uses_features:
            # Padding clips may hold anything: only real clips are read.
            features = inputs["features"]
            zero = torch.zeros((), dtype=features.dtype, device=features.device)
            per_frame = self.feature_embed(torch.where(frame_mask[..., None], features, zero))
        else:
            frames = inputs["frames"]  # (B, T, 3, S, S)
            batch, time = frames.shape[:2]
            per_frame = self.frame_embed(frames.flatten(0, 1)).mean(dim=(-1, -2)).view(batch, time, -1)
        tokens = torch.cat([mean_token(per_frame, frame_mask), per_frame], dim=1)
        token_mask = F.pad(frame_mask, (1, 0), value=True)  # the mean token always exists
        return Encoded(tokens=self.project(self.trunk(tokens, token_mask)), token_mask=token_mask)

    def frame_targets(self, frames: Tensor) -> Tensor:
        """(B, T, 3, S, S) -> (B, T, 3*g*g) colour layout of each frame."""
        grid = self.config.target_grid
        pooled = F.adaptive_avg_pool2d(frames.flatten(0, 1), grid)
        return pooled.flatten(1).view(*frames.shape[:2], -1)

    def mask(self, inputs: dict[str, Tensor], present: Tensor) -> Masked | None:
        if not self.config.masked_modeling:
            return None
        key = "features" if self.uses_features else "frames"
        values = inputs[key]
        chosen = bernoulli_positions(self.real_frames(inputs) & present[:, None], self.config.mask_prob)
        corrupted = values.masked_fill(chosen.view(*chosen.shape, *([1] * (values.dim() - 2))), 0.0)
        targets = (values if self.uses_features else self.frame_targets(values))[chosen]
        positions = F.pad(chosen, (1, 0), value=False)  # output position 0 is the mean token
        return Masked(inputs={**inputs, key: corrupted}, positions=positions, targets=targets)

    def masked_loss(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> Tensor:
        prediction = self.predict(fused_tokens[masked.positions]).float()
        per_frame = F.mse_loss(prediction, masked.targets.float(), reduction="none").mean(-1)
        return weighted_mean(per_frame, masked.positions, sample_weight)
