"""The image's second stem: M5Product's pre-extracted region features, as the official SCALE reads them.

The released image features are per image up to 36 Faster R-CNN regions (bottom-up attention,
2048-d each) with a 5-d box (x1/W, y1/H, x2/W, y2/H, area). The official model embeds them the
UNITER way: one Linear for the feature, one for the box, summed and layer-normalised; a mean token
(the masked mean over the real regions) is prepended, so the sequence is 1 + `max_regions` long.
Padding regions (images with fewer regions) are masked out of attention by `region_mask`.

The trunk is the project's `TokenTransformer`, whose learned positions here index the detector's
output order (regions come sorted by detection confidence, so the index is a confidence rank; where
a region *is* comes from its box).

Masked region modeling (MRM): 15 % of the real regions of a present sample (at least one) are
chosen, 90 % of those have their feature zeroed (the box is kept, as in UNITER), and the original
feature of every chosen region is regressed with MSE, averaged over positions and dimensions.

`ImageModality` (image.py) builds this stem when `image.stem == "regions"` and delegates to it, so
the model and `build_modalities` see one image modality whatever its input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scale.config import ImageConfig
from scale.modalities.base import Masked, bernoulli_positions
from scale.modalities.transformer import TokenTransformer, mean_token

REGION_KEYS: tuple[str, ...] = ("regions", "boxes", "region_mask")
"""Batch keys of the regions stem: (B, R, region_dim) float, (B, R, 5) float, (B, R) bool."""
BOX_DIM = 5


class RegionStem(nn.Module):
    """Region features + boxes -> (B, 1 + max_regions, hidden) trunk outputs and their token mask."""

    def __init__(self, config: ImageConfig):
        super().__init__()
        self.config = config
        self.region_embed = nn.Linear(config.region_dim, config.hidden)
        self.box_embed = nn.Linear(BOX_DIM, config.hidden)
        self.norm = nn.LayerNorm(config.hidden)
        self.trunk = TokenTransformer(config.hidden, config.layers, config.heads, config.mlp_ratio, 1 + config.max_regions)

    @property
    def num_tokens(self) -> int:
        return 1 + self.config.max_regions

    def forward(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        real = inputs["region_mask"].bool()
        # Padding slots may hold anything (a foreign loader, garbage, NaN): only real regions are read.
        regions, boxes = (torch.where(real[..., None], inputs[key], 0.0) for key in ("regions", "boxes"))
        embedded = self.norm(self.region_embed(regions) + self.box_embed(boxes))
        tokens = torch.cat([mean_token(embedded, real), embedded], dim=1)
        token_mask = F.pad(real, (1, 0), value=True)  # the mean token always exists
        return self.trunk(tokens, token_mask), token_mask


def mask_regions(config: ImageConfig, inputs: dict[str, Tensor], present: Tensor) -> Masked:
    """Masked region modeling inputs: chosen regions of present samples, 90 % of them zeroed."""
    regions = inputs["regions"]
    chosen = bernoulli_positions(inputs["region_mask"].bool() & present[:, None], config.mask_prob)
    zeroed = chosen & (torch.rand(chosen.shape, device=chosen.device) < config.zero_prob)
    corrupted = regions.masked_fill(zeroed[..., None], 0.0)
    positions = F.pad(chosen, (1, 0), value=False)  # output position 0 is the mean token
    return Masked(inputs={**inputs, "regions": corrupted}, positions=positions, targets=regions[chosen])
