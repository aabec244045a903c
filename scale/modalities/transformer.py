"""The trunk that image regions, video, audio and fusion share: a small pre-norm transformer over a
token sequence, built from timm's `Block` (fused scaled-dot-product attention with a boolean mask)
so every trunk in the project uses the same, well-tested attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from scale.modalities.base import Encoded
from scale.modalities.spec import TrunkConfig
from scale.packing import run_bucketed


class TokenTransformer(nn.Module):
    """Learned positions + `layers` timm blocks + final LayerNorm, with a key-padding mask."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, max_tokens: int, dropout: float = 0.0):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(1, max_tokens, width))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.one_bucket = False  # `scale.packing.length_buckets`; set by `SCALE.use_one_bucket`

    def forward(self, tokens: Tensor, token_mask: Tensor, packed: bool = False) -> Tensor:
        """tokens (B, L, width); token_mask (B, L) bool, True = real token (every row needs one).
        `packed`: run in length buckets (`scale/packing.py`), padding costs nothing and its outputs
        are zeros; otherwise padded (its outputs are finite but meaningless)."""
        x = tokens + self.position[:, : tokens.shape[1]]
        if packed:
            return run_bucketed(self._layers, x, token_mask, one_bucket=self.one_bucket)
        # (B, 1, 1, L): every query may attend to every real key; padding keys get zero weight.
        return self._layers(x, token_mask[:, None, None, :])

    def _layers(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return self.norm(x)


def mean_token(tokens: Tensor, token_mask: Tensor) -> Tensor:
    """Masked mean of (B, L, D) tokens -> (B, 1, D): the official 'global token' of a feature sequence."""
    weights = token_mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1.0)


class MeanTokenTrunk(nn.Module):
    """The official model's encoder for a sequence of feature tokens (regions, clips, audio frames):
    the masked mean token first, then a `TokenTransformer`, then a projection to the fusion width."""

    def __init__(self, config: TrunkConfig, slots: int, width: int):
        super().__init__()
        self.transformer = TokenTransformer(config.hidden, config.layers, config.heads, config.mlp_ratio, 1 + slots)
        self.project = nn.Linear(config.hidden, width) if config.hidden != width else nn.Identity()

    def forward(self, embedded: Tensor, real: Tensor) -> Encoded:
        """embedded (B, T, hidden) slot tokens, real (B, T) bool -> 1 + T tokens (the mean first,
        always attended; padding slots masked out of attention and out of the mean)."""
        tokens = torch.cat([mean_token(embedded, real), embedded], dim=1)
        token_mask = F.pad(real, (1, 0), value=True)
        return Encoded(tokens=self.project(self.transformer(tokens, token_mask)), token_mask=token_mask)
