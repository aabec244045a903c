"""The image's two stems: `pixels` (a timm ViT) and `regions` (M5Product's Faster R-CNN features);
what each reads and how is in the package docstring (`__init__.py`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import create_transform
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from scale.media import MediaError
from scale.media.arrays import load_npy, pad_rows
from scale.media.image import decode_image
from scale.modalities.base import Encoded, Masked, Modality, TensorSpec, first_slots_real
from scale.modalities.image import BOX_DIM, BOXES, IMAGE, REGIONS, ImageConfig
from scale.modalities.masking import MaskedRegression, after_pooled_token, mask_slots
from scale.modalities.spec import DecodeContext, RawSample
from scale.modalities.transformer import MeanTokenTrunk

class PixelStem(Modality):
    modality = "image"
    stem = "pixels"
    reads = (IMAGE,)

    def __init__(self, config: ImageConfig, width: int):
        super().__init__()
        self.config = config
        if config.size % config.patch:
            raise ValueError(f"image.size {config.size} is not a multiple of image.patch {config.patch}")
        self.vit = VisionTransformer(
            img_size=config.size, patch_size=config.patch, embed_dim=config.hidden, depth=config.layers,
            num_heads=config.heads, mlp_ratio=config.mlp_ratio, num_classes=0, global_pool="token",
        )  # fmt: skip
        self.project = nn.Linear(config.hidden, width) if config.hidden != width else nn.Identity()
        self.grid = config.size // config.patch
        self.head = MaskedRegression(width, 3 * config.patch**2)

    @classmethod
    def tensors(cls, config: ImageConfig) -> dict[str, TensorSpec]:
        return {"pixels": TensorSpec((3, config.size, config.size), torch.float32)}

    @staticmethod
    def transform(config: ImageConfig):
        """timm's eval transform of the image tower: resize, centre crop, tensor, normalise."""
        return create_transform(input_size=(3, config.size, config.size), mean=config.mean, std=config.std,
                                interpolation="bicubic", crop_pct=1.0, is_training=False)  # fmt: skip

    @classmethod
    def decode(cls, sample: RawSample, config: ImageConfig, context: DecodeContext) -> dict[str, Tensor]:
        transform = context.cached("image_transform", lambda: cls.transform(config))
        return {"pixels": decode_image(sample.read(IMAGE), transform, context.limits.max_image_pixels, config.size)}

    @property
    def num_tokens(self) -> int:
        return 1 + self.grid**2

    def encode(self, inputs: dict[str, Tensor]) -> Encoded:
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
        patches = self.patchify(inputs["pixels"])
        eligible = present[:, None].expand(-1, patches.shape[1])
        corrupted, chosen = mask_slots(patches, eligible, self.config.mask_prob, self.config.zero_prob)
        return Masked(inputs={**inputs, "pixels": self.unpatchify(corrupted)}, positions=after_pooled_token(chosen),
                      targets=patches[chosen])  # fmt: skip

    def masked_loss(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> Tensor:
        return self.head(fused_tokens, masked, sample_weight)


class RegionStem(Modality):
    modality = "image"
    stem = "regions"
    reads = (REGIONS, BOXES)

    def __init__(self, config: ImageConfig, width: int):
        super().__init__()
        self.config = config
        self.region_embed = nn.Linear(config.region_dim, config.hidden)
        self.box_embed = nn.Linear(BOX_DIM, config.hidden)
        self.norm = nn.LayerNorm(config.hidden)
        self.trunk = MeanTokenTrunk(config, config.max_regions, width)
        self.head = MaskedRegression(width, config.region_dim)

    @classmethod
    def tensors(cls, config: ImageConfig) -> dict[str, TensorSpec]:
        n = config.max_regions
        return {"regions": TensorSpec((n, config.region_dim), torch.float32),
                "boxes": TensorSpec((n, BOX_DIM), torch.float32), "region_mask": TensorSpec((n,), torch.bool)}  # fmt: skip

    @classmethod
    def example(cls, config: ImageConfig, batch: int) -> dict[str, Tensor]:
        """A varying number of real regions per image; boxes in [0, 1)."""
        n = config.max_regions
        return {"regions": torch.randn(batch, n, config.region_dim), "boxes": torch.rand(batch, n, BOX_DIM),
                "region_mask": first_slots_real(batch, n)}  # fmt: skip

    @classmethod
    def decode(cls, sample: RawSample, config: ImageConfig, context: DecodeContext) -> dict[str, Tensor]:
        """(R, region_dim) features and (R, 5) boxes -> `max_regions` slots (first R kept) with a mask."""
        if not sample.has(BOXES):
            raise MediaError("regions.npy without boxes.npy")
        features = load_npy(sample.read(REGIONS), "regions.npy", (None, config.region_dim))
        boxes = load_npy(sample.read(BOXES), "boxes.npy", (len(features), BOX_DIM))
        features, mask = pad_rows(features, config.max_regions)
        return {"regions": features, "boxes": pad_rows(boxes, config.max_regions)[0], "region_mask": mask}

    @property
    def num_tokens(self) -> int:
        return 1 + self.config.max_regions

    def encode(self, inputs: dict[str, Tensor]) -> Encoded:
        real = inputs["region_mask"].bool()
        # Padding slots may hold anything (a foreign loader, garbage, NaN): only real regions are read.
        regions, boxes = (torch.where(real[..., None], inputs[key], 0.0) for key in ("regions", "boxes"))
        return self.trunk(self.norm(self.region_embed(regions) + self.box_embed(boxes)), real)

    def mask(self, inputs: dict[str, Tensor], present: Tensor) -> Masked | None:
        if not self.config.masked_modeling:
            return None
        regions = inputs["regions"]
        eligible = inputs["region_mask"].bool() & present[:, None]
        corrupted, chosen = mask_slots(regions, eligible, self.config.mask_prob, self.config.zero_prob)
        return Masked(inputs={**inputs, "regions": corrupted}, positions=after_pooled_token(chosen), targets=regions[chosen])

    def masked_loss(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> Tensor:
        return self.head(fused_tokens, masked, sample_weight)


STEMS = {"pixels": PixelStem, "regions": RegionStem}
