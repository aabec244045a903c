"""The joint transformer ("joint co-transformer") over the concatenated modality sequences.

Segments are concatenated in the canonical order (text | table | image | video | audio), a learned
modality-type embedding and learned positions are added, and one transformer runs over the whole.
A key is attended only if it is a real token of a *present* modality: absent modalities and padding
get exactly zero attention weight (the official code zero-fills absent video/audio and lets those
zeros be attended). The output is split back into per-modality segments.

With `packed` (the model's `pack_tokens`), absent segments and padding are not computed at all
(`scale/packing.py`): their outputs are zeros instead of finite garbage; real tokens are the same.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scale.config import FusionConfig
from scale.modalities.base import Encoded
from scale.modalities.transformer import TokenTransformer


class Fusion(nn.Module):
    def __init__(self, config: FusionConfig, segment_lengths: dict[str, int], packed: bool = False):
        super().__init__()
        self.packed = packed
        self.modalities = list(segment_lengths)
        self.segment_lengths = dict(segment_lengths)
        self.type_embedding = nn.Embedding(len(self.modalities), config.width)
        self.transformer = TokenTransformer(
            config.width, config.layers, config.heads, config.mlp / config.width,
            max_tokens=sum(segment_lengths.values()), dropout=config.dropout,
        )  # fmt: skip

    def forward(self, encoded: dict[str, Encoded], present: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fuse; returns the fused tokens of each modality, (B, L_m, width)."""
        tokens, masks = [], []
        for index, name in enumerate(self.modalities):
            segment = encoded[name]
            tokens.append(segment.tokens + self.type_embedding.weight[index])
            masks.append(segment.token_mask & present[name][:, None])
        key_mask = torch.cat(masks, dim=1)
        empty = ~key_mask.any(dim=1)
        if empty.any():
            rows = empty.nonzero().flatten().tolist()[:5]
            raise ValueError(f"fusion: samples {rows} have no present modality; the data pipeline must drop them")
        fused = self.transformer(torch.cat(tokens, dim=1), key_mask, packed=self.packed)
        return dict(zip(self.modalities, fused.split([self.segment_lengths[m] for m in self.modalities], dim=1)))
