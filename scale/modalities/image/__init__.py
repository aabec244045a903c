"""Main product image, two stems (`stems.py`):

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

The declaration the converter and the config read (no torch): the config section, the limits, the
fields (the image file: JPEG, PNG or WebP; the region features and boxes) with their checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from scale.bounds import AT_LEAST_0, AT_LEAST_1, POSITIVE, SHARE
from scale.media.arrays import check_npy
from scale.media.image import check_image, jpeg_bound, probe_shrink, shrink_image
from scale.modalities.spec import Derived, FileField, ModalitySpec, TrunkConfig

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
    pretrained: str | None = None
    """A local timm checkpoint the `pixels` ViT starts from: a file (.safetensors, .pth, .bin) or a
    folder holding one (a `timm_image/` folder written by `scale export`, any timm `local-dir`
    folder). Its architecture must match `size`, `patch`, `hidden`, `layers`, `heads` and
    `mlp_ratio` (a timm VisionTransformer with a class token; a classifier head is dropped); its
    weights train at `optimizer.pretrained_lr`. `None`: random initialisation."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel normalisation mean (timm / ImageNet default)."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel normalisation std."""
    zero_prob: float = 0.9
    """Of the chosen patches, the share whose pixels are zeroed (the rest are left intact)."""
    decode_on: Literal["workers", "device"] = "workers"
    """`pixels` stem: where JPEGs become pixels. `workers`: in the data workers (PIL). `device`:
    a baseline JPEG that needs no resize (a `--shrink-images` copy at `size`) travels as its
    bitstream and is decoded after the transfer (`torchvision.io.decode_jpeg`: nvJPEG on a GPU,
    so the host's cores are left the rest of the feed); any other image is still decoded in the
    workers. The same pixels on a CPU (bit for bit); nvJPEG's may differ by a level or two. A
    bitstream the device cannot decode makes that sample's image absent, with a warning. For
    GPUs: on a CPU it only moves the work into the training process."""

    BOUNDS = {**{"max_regions": AT_LEAST_1, "region_dim": AT_LEAST_1, "size": AT_LEAST_1, "patch": AT_LEAST_1}, "std": POSITIVE, "zero_prob": SHARE}


@dataclass
class ImageLimits:
    max_image_bytes: int = 32 * MB
    """Largest image file (encoded bytes) decoded."""
    max_image_pixels: int = 40_000_000
    """Largest width x height of an image, read from its header before decoding (decompression bombs)."""
    shrink_images: int = 0
    """Converter only (`scale shards --shrink-images S`): each image whose shorter side is over S
    is also stored downscaled to that side (`small.jpg`, JPEG quality 90); 0: none. The `pixels`
    stem decodes it instead of the original when its shorter side is at least `image.size`
    (docs/performance.md: what it saves)."""

    BOUNDS = {"max_image_bytes": AT_LEAST_1, "max_image_pixels": AT_LEAST_1, "shrink_images": AT_LEAST_0}


def _small_budget(image_path: str, limits: Any) -> list[int] | None:
    return probe_shrink(image_path, limits.shrink_images) if limits.shrink_images > 0 else None


def _small_bound(size: list[int]) -> int:
    return jpeg_bound(size[0] * size[1])


def _shrink(image: bytes, size: list[int], limits: Any) -> bytes:
    return shrink_image(image, size, limits.max_image_pixels)


IMAGE = FileField("image", {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}, "max_image_bytes", check_image)
SMALL_IMAGE = FileField(
    "image_small", {".jpg": "small.jpg"}, "max_image_bytes", check_image,
    # With `--shrink-images`, every large product image is downscaled once at conversion.
    derive=Derived(member="small.jpg", source="image", probe=_small_budget, bound=_small_bound, make=_shrink,
                   reason="images_shrunk"),
)  # fmt: skip
REGIONS = FileField("image_regions", {".npy": "regions.npy"}, "max_npy_bytes", check_npy)
BOXES = FileField("image_boxes", {".npy": "boxes.npy"}, "max_npy_bytes", check_npy)
BOX_DIM = 5


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


TIMM_FOLDER = "timm_image"
"""The export's timm folder (`scale/towers.py` writes it): an exported `image.pretrained` names it."""


def _resolve_timm_folder(config: Any, directory: Path) -> None:
    if config.image.pretrained == TIMM_FOLDER:
        config.image.pretrained = str(directory / TIMM_FOLDER)


MODALITY = ModalitySpec(name="image", config=ImageConfig, fields=(IMAGE, SMALL_IMAGE, REGIONS, BOXES), stems="scale.modalities.image.stems",
                        limits=ImageLimits, check_members=pair_regions_and_boxes, resolve_assets=_resolve_timm_folder)  # fmt: skip
