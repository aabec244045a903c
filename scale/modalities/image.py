"""Main image: a timm Vision Transformer over pixels, or pre-extracted regions; masked patch / region modeling.

Two input stems behind one `ImageModality` (chosen by `image.stem`):
- `pixels` (below): the decoded JPEG through a ViT, the modern equivalent of the official model;
- `regions` (`image_regions.py`): M5Product's released Faster R-CNN region features and boxes,
  embedded as the official SCALE does. The model sees the same interface either way.

Masked patch modeling is the raw-pixel counterpart of the official masked region modeling: 15 % of
patches are chosen, 90 % of those have their pixels zeroed (zero = the dataset mean after
normalisation), and the normalised pixels of every chosen patch are regressed with MSE. Zeroing in
pixel space (rather than inside the ViT) keeps timm's model untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from scale.config import ImageConfig
from scale.modalities.base import Encoded, Masked, Modality, bernoulli_positions, weighted_mean
from scale.modalities.image_regions import REGION_KEYS, RegionStem, mask_regions


class ImageModality(Modality):
    name = "image"
    input_keys = ("pixels",)

    def __init__(self, config: ImageConfig, width: int):
        super().__init__()
        self.config = config
        if config.stem == "regions":
            self.input_keys = REGION_KEYS
            self.regions = RegionStem(config)
            self.project = nn.Linear(config.hidden, width) if config.hidden != width else nn.Identity()
            self.predict = nn.Linear(width, config.region_dim)
            return
        if config.size % config.patch:
            raise ValueError(f"image.size {config.size} is not a multiple of image.patch {config.patch}")
        self.vit = VisionTransformer(
            img_size=config.size,
            patch_size=config.patch,
            embed_dim=config.hidden,
            depth=config.layers,
            num_heads=config.heads,
            mlp_ratio=config.mlp_ratio,
            num_classes=0,
            global_pool="token",
        )
        self.project = nn.Linear(config.hidden, width) if config.hidden != width else nn.Identity()
        self.grid = config.size // config.patch
        self.patch_dim = 3 * config.patch**2
        self.predict = nn.Linear(width, self.patch_dim)

    @property
    def uses_regions(self) -> bool:
        return self.config.stem == "regions"

    @property
    def num_tokens(self) -> int:
        return self.regions.num_tokens if self.uses_regions else 1 + self.grid**2

    def encode(self, inputs: dict[str, Tensor]) -> Encoded:
        if self.uses_regions:
            hidden, token_mask = self.regions(inputs)
            return Encoded(tokens=self.project(hidden), token_mask=token_mask)
        tokens = self.project(self.vit.forward_features(inputs["pixels"]))
        return Encoded(tokens=tokens, token_mask=torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))

    def patchify(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, grid*grid, 3*patch*patch), row-major patches."""
        p = self.config.patch
        return F.unfold(pixels, kernel_size=p, stride=p).transpose(1, 2)

    def unpatchify(self, patches: Tensor) -> Tensor:
        p, size = self.config.patch, self.config.size
        return F.fold(patches.transpose(1, 2), output_size=(size, size), kernel_size=p, stride=p)

    def mask(self, inputs: dict[str, Tensor], present: Tensor) -> Masked | None:
        if not self.config.masked_modeling:
            return None
        if self.uses_regions:
            return mask_regions(self.config, inputs, present)
        pixels = inputs["pixels"]
        patches = self.patchify(pixels)
        eligible = present[:, None].expand(-1, patches.shape[1])
        chosen = bernoulli_positions(eligible, self.config.mask_prob)
        zeroed = chosen & (torch.rand(chosen.shape, device=chosen.device) < self.config.zero_prob)
        corrupted = self.unpatchify(patches.masked_fill(zeroed[..., None], 0.0))
        positions = F.pad(chosen, (1, 0), value=False)  # output position 0 is the [CLS] token
        return Masked(inputs={**inputs, "pixels": corrupted}, positions=positions, targets=patches[chosen])

    def masked_loss(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> Tensor:
        prediction = self.predict(fused_tokens[masked.positions]).float()
        # Mean over dimensions, then over masked positions: patches (pixels) or regions (features).
        per_patch = F.mse_loss(prediction, masked.targets.float(), reduction="none").mean(-1)
        return weighted_mean(per_patch, masked.positions, sample_weight)
