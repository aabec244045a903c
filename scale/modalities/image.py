"""Main product image, two stems:

- `pixels` (`PixelStem`): the decoded JPEG / PNG / WebP through a timm Vision Transformer, the
  modern equivalent of the official model. Masked patch modeling is the raw-pixel counterpart of
  the official masked region modeling: 15 % of patches are chosen, 90 % of those have their pixels
  zeroed (zero = the dataset mean after normalisation), and the normalised pixels of every chosen
  patch are regressed with MSE. Zeroing in pixel space (rather than inside the ViT) keeps timm's
  model untouched.
- `regions` (`RegionStem`): M5Product's released features, per image up to 36 Faster R-CNN regions
  (bottom-up attention, 2048-d each) with a 5-d box (x1/W, y1/H, x2/W, y2/H, area), embedded as the
  official model does (UNITER): one Linear for the feature, one for the box, summed and
  layer-normalised; a mean token (the masked mean over the real regions) first, so the sequence is
  1 + `max_regions` long, padding regions masked out. The trunk's learned positions index the
  detector's output order (regions come sorted by detection confidence, so the index is a
  confidence rank; where a region *is* comes from its box). Masked region modeling: 15 % of the real
  regions of a present sample (at least one), 90 % of those zeroed (the box is kept, as in UNITER),
  the original feature of every chosen region regressed with MSE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.data import create_transform
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from scale.media import MediaError
from scale.media.arrays import check_npy, load_npy, pad_rows
from scale.media.image import check_image, decode_image
from scale.modalities.base import (
    DecodeContext, Encoded, FileField, Masked, Modality, ModalitySpec, RawSample, TensorSpec, first_slots_real,
)  # fmt: skip
from scale.modalities.masking import MaskedRegression, after_pooled_token, mask_slots
from scale.modalities.transformer import MeanTokenTrunk, TrunkConfig

MB = 2**20


@dataclass
class ImageConfig(TrunkConfig):
    """Main product image: a timm Vision Transformer over pixels, or pre-extracted region features;
    masked patch / region regression."""

    stem: Literal["pixels", "regions"] = "pixels"
    """`pixels`: the image file through a ViT. `regions`: M5Product's pre-extracted Faster R-CNN regions
    (`<key>.regions.npy`, up to `max_regions` x `region_dim`, with `<key>.boxes.npy` 5-d boxes)."""
    max_regions: int = 36
    """Regions kept per image (official: 36); fewer are padded and masked."""
    region_dim: int = 2048
    """Region feature width (official: 2048)."""
    size: int = 224
    """Square input resolution in pixels."""
    patch: int = 16
    """ViT patch size."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel normalisation mean (timm / ImageNet default)."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel normalisation std."""
    zero_prob: float = 0.9
    """Of the chosen patches, the share whose pixels are zeroed (the rest are left intact)."""


@dataclass
class ImageLimits:
    max_image_bytes: int = 32 * MB
    """Largest image file (encoded bytes) decoded."""
    max_image_pixels: int = 40_000_000
    """Largest width x height of an image, read from its header before decoding (decompression bombs)."""


IMAGE = FileField("image", {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}, "max_image_bytes", check_image)
REGIONS = FileField("image_regions", {".npy": "regions.npy"}, "max_npy_bytes", check_npy)
BOXES = FileField("image_boxes", {".npy": "boxes.npy"}, "max_npy_bytes", check_npy)
BOX_DIM = 5


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


def pair_regions_and_boxes(parsed: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The converter's check across a product's feature files: region features are unusable without
    their boxes (and the reverse), and must have as many rows. Returns the files to drop."""
    regions, boxes = parsed.get(REGIONS.name), parsed.get(BOXES.name)
    if boxes is not None and boxes.shape[1] != BOX_DIM:
        problem = ("bad_shape", f"boxes shape {boxes.shape}, expected (R, {BOX_DIM})")
    elif regions is not None and boxes is not None and len(regions) != len(boxes):
        problem = ("bad_shape", f"{len(regions)} regions but {len(boxes)} boxes")
    elif (regions is None) != (boxes is None):
        problem = ("unpaired", "region features and boxes come together; the other one is missing or unusable")
    else:
        return []
    return [(source.name, *problem) for source in (REGIONS, BOXES) if source.name in parsed]


MODALITY = ModalitySpec(name="image", config=ImageConfig, limits=ImageLimits,
                        stems={"pixels": PixelStem, "regions": RegionStem}, check_members=pair_regions_and_boxes)  # fmt: skip
