"""Product video: T uniformly sampled frames -> one token per frame -> temporal transformer.

Each frame is cut into patches by a strided convolution and the patch embeddings are averaged into
one frame token (cheap enough for 12 frames on a CPU; the official model instead consumes one
pre-extracted S3D feature per second). A mean token is prepended, as in the official model, and
learned temporal positions are added.

Masked frame modeling: 15 % of frames (at least one) are zeroed and the model regresses a *fixed*
target of each, its colour layout (the frame average-pooled to `target_grid` x `target_grid`). A
fixed target matters: regressing the model's own frame embedding would be solved by collapse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scale.config import VideoConfig
from scale.modalities.base import Encoded, Masked, Modality, bernoulli_positions, weighted_mean
from scale.modalities.transformer import TokenTransformer, mean_token


class VideoModality(Modality):
    name = "video"
    input_keys = ("frames",)

    def __init__(self, config: VideoConfig, width: int):
        super().__init__()
        if config.size % config.patch:
            raise ValueError(f"video.size {config.size} is not a multiple of video.patch {config.patch}")
        self.config = config
        self.frame_embed = nn.Conv2d(3, config.hidden, kernel_size=config.patch, stride=config.patch)
        self.trunk = TokenTransformer(config.hidden, config.layers, config.heads, config.mlp_ratio, config.frames + 1)
        self.project = nn.Linear(config.hidden, width) if config.hidden != width else nn.Identity()
        self.target_dim = 3 * config.target_grid**2
        self.predict = nn.Linear(width, self.target_dim)

    @property
    def num_tokens(self) -> int:
        return 1 + self.config.frames

    def encode(self, inputs: dict[str, Tensor]) -> Encoded:
        frames = inputs["frames"]  # (B, T, 3, S, S)
        batch, time = frames.shape[:2]
        per_frame = self.frame_embed(frames.flatten(0, 1)).mean(dim=(-1, -2)).view(batch, time, -1)
        frame_mask = torch.ones(batch, time, dtype=torch.bool, device=frames.device)
        tokens = torch.cat([mean_token(per_frame, frame_mask), per_frame], dim=1)
        token_mask = F.pad(frame_mask, (1, 0), value=True)
        return Encoded(tokens=self.project(self.trunk(tokens, token_mask)), token_mask=token_mask)

    def frame_targets(self, frames: Tensor) -> Tensor:
        """(B, T, 3, S, S) -> (B, T, 3*g*g) colour layout of each frame."""
        grid = self.config.target_grid
        pooled = F.adaptive_avg_pool2d(frames.flatten(0, 1), grid)
        return pooled.flatten(1).view(*frames.shape[:2], -1)

    def mask(self, inputs: dict[str, Tensor], present: Tensor) -> Masked | None:
        if not self.config.masked_modeling:
            return None
        frames = inputs["frames"]
        eligible = present[:, None].expand(-1, frames.shape[1])
        chosen = bernoulli_positions(eligible, self.config.mask_prob)
        corrupted = frames.masked_fill(chosen[:, :, None, None, None], 0.0)
        targets = self.frame_targets(frames)[chosen]
        positions = F.pad(chosen, (1, 0), value=False)  # output position 0 is the mean token
        return Masked(inputs={**inputs, "frames": corrupted}, positions=positions, targets=targets)

    def masked_loss(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> Tensor:
        prediction = self.predict(fused_tokens[masked.positions]).float()
        per_frame = F.mse_loss(prediction, masked.targets.float(), reduction="none").mean(-1)
        return weighted_mean(per_frame, masked.positions, sample_weight)
