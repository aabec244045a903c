"""The image's two stems: `pixels` (a timm ViT) and `regions` (M5Product's Faster R-CNN features);
what each reads and how is in the package docstring (`__init__.py`)."""
from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from timm.data import create_transform
from timm.models import load_state_dict
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision import transforms

from scale.media import MediaError
from scale.media.arrays import load_npy, pad_rows
from scale.media.image import decode_image, plain_jpeg_size, shorter_side
from scale.media.pixels import centre_crop, normalise_pixels
from scale.modalities.base import (BuildContext, Encoded, Masked, Modality, TensorSpec, encoded_jpeg, encoded_pixels,
                                   encoded_tensors, first_slots_real, unpack_on_device)
from scale.modalities.image import BOX_DIM, BOXES, IMAGE, REGIONS, SMALL_IMAGE, TIMM_FOLDER, ImageConfig
from scale.modalities.masking import MaskedRegression, after_pooled_token, mask_slots
from scale.modalities.spec import DecodeContext, RawSample
from scale.modalities.transformer import MeanTokenTrunk

TIMM_ARCHITECTURE = "vit_base_patch16_224"
"""The timm registry name the `pixels` ViT is recreated under (`timm_image/config.json`): every
size of that entry is replaced by `vit_arguments`, so the name only picks timm's plain
VisionTransformer class and its checkpoint filter."""

CLASSIFIER_PREFIXES = ("head.", "head_dist.")
"""Keys of a timm checkpoint's classifier, dropped on load: the tower has no head (`num_classes=0`)."""

CHECKPOINT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")
"""The weights file `image.pretrained` reads in a folder, first found first (timm's own preference)."""


def vit_arguments(config: ImageConfig) -> dict[str, Any]:
    """The VisionTransformer arguments of the `pixels` tower: what PixelStem builds and what the
    export's `timm_image/config.json` records, so timm rebuilds the very same module."""
    return {"img_size": config.size, "patch_size": config.patch, "embed_dim": config.hidden, "depth": config.layers,
            "num_heads": config.heads, "mlp_ratio": config.mlp_ratio, "num_classes": 0, "global_pool": "token"}  # fmt: skip


def timm_checkpoint_file(source: str | Path) -> Path:
    """The weights file `image.pretrained` names: the file itself, or the one a folder holds."""
    path = Path(source)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"image.pretrained {source!r}: no such file or folder")
    found = [path / name for name in CHECKPOINT_FILES if (path / name).is_file()]
    if not found:
        raise FileNotFoundError(f"image.pretrained {source!r}: the folder holds none of {', '.join(CHECKPOINT_FILES)}; "
                                "name the weights file itself")  # fmt: skip
    return found[0]


def load_timm_checkpoint(vit: nn.Module, source: str | Path) -> None:
    """Load a timm ViT checkpoint into `vit`, strictly: the key set and every shape must match (bar
    the classifier), or a one-line ValueError names the file and the first key that differs; a
    pickle that would run code is refused (weights_only). A timm training checkpoint gives its EMA
    weights when it has them, as timm's own `checkpoint_path` does."""
    file = timm_checkpoint_file(source)
    try:
        weights = load_state_dict(str(file), use_ema=True, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = next((line for line in str(error).splitlines() if "Unsupported global" in line), "not plain weights")
        raise ValueError(f"image.pretrained {file}: refused to unpickle it ({reason.strip()})") from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, AttributeError) as error:  # truncated, not weights
        raise ValueError(f"image.pretrained {file}: not a readable checkpoint ({str(error).splitlines()[0][:160]})") from None
    weights = {key: value for key, value in weights.items() if not key.startswith(CLASSIFIER_PREFIXES)}
    problem = next(_mismatches(vit.state_dict(), weights), None)
    if problem is not None:
        raise ValueError(f"image.pretrained {file}: {problem} (the image.size, patch, hidden, layers, heads and "
                         "mlp_ratio fields must match the checkpoint's architecture)")  # fmt: skip
    vit.load_state_dict(weights, strict=True)


def _mismatches(expected: dict[str, Tensor], found: dict[str, Any]) -> Iterator[str]:
    """What differs between the tower's state dict and a checkpoint's, in the tower's key order."""
    for key, value in expected.items():
        if key not in found:
            yield f"no {key!r} in the checkpoint"
        elif not isinstance(found[key], Tensor) or tuple(found[key].shape) != tuple(value.shape):
            shape = tuple(found[key].shape) if isinstance(found[key], Tensor) else type(found[key]).__name__
            yield f"{key} is {shape} in the checkpoint, {tuple(value.shape)} in this config"
    for key in found:
        if key not in expected:
            yield f"the checkpoint holds {key!r}, which this config's ViT does not have"


def _capacity(config: ImageConfig) -> int:
    """Bytes of a sample's (3, size, size) pixels: the `decode_on: device` buffer."""
    return 3 * config.size**2


class PixelStem(Modality):
    modality = "image"
    stem = "pixels"
    reads = (SMALL_IMAGE, IMAGE)
    fallbacks = {IMAGE: SMALL_IMAGE}

    def __init__(self, config: ImageConfig, width: int, load_weights: bool = True):
        super().__init__()
        self.config = config
        if config.size % config.patch:
            raise ValueError(f"image.size {config.size} is not a multiple of image.patch {config.patch}")
        self.vit = VisionTransformer(**vit_arguments(config))
        if config.pretrained is not None and load_weights:  # else a checkpoint's weights follow
            load_timm_checkpoint(self.vit, config.pretrained)
        self.is_pretrained = config.pretrained is not None
        self.project = nn.Linear(config.hidden, width) if config.hidden != width else nn.Identity()
        self.grid = config.size // config.patch
        self.head = MaskedRegression(width, 3 * config.patch**2)

    @classmethod
    def build(cls, context: BuildContext) -> "PixelStem":
        return cls(getattr(context.config, cls.modality), context.width, load_weights=context.load_weights)

    def pretrained_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters loaded from `image.pretrained` (`optimizer.pretrained_lr` applies)."""
        return self.vit.parameters()

    def export_assets(self, out: Path, config: Any) -> None:
        # The export's timm folder (written by scale/towers.py) stands in for the original
        # checkpoint: the tower stays "pretrained" for the learning-rate rule of a finetuning run.
        if self.config.pretrained is not None:
            config.image.pretrained = TIMM_FOLDER

    @classmethod
    def tensors(cls, config: ImageConfig) -> dict[str, TensorSpec]:
        # Bytes: normalised on the device (`prepare`), a quarter of float pixels' collate and copy.
        if config.decode_on == "device":  # a bitstream or the worker's pixels (scale/media/pixels.py)
            return encoded_tensors(_capacity(config))
        return {"pixels": TensorSpec((3, config.size, config.size), torch.uint8)}

    @classmethod
    def prepared_tensors(cls, config: ImageConfig) -> dict[str, TensorSpec]:
        return {"pixels": TensorSpec((3, config.size, config.size), torch.float32)}

    @staticmethod
    def transform(config: ImageConfig):
        """timm's eval transform of the image tower: resize, centre crop, tensor, normalise (what a
        user feeds the exported timm tower; the loader stops before the tensor, `byte_transform`)."""
        return create_transform(input_size=(3, config.size, config.size), mean=config.mean, std=config.std,
                                interpolation="bicubic", crop_pct=1.0, is_training=False)  # fmt: skip

    @classmethod
    def byte_transform(cls, config: ImageConfig):
        """`transform`'s resize and crop, then the uint8 (3, size, size) tensor: the float steps it
        drops (`ToTensor`, `Normalize`) are `prepare`'s, on the device."""
        steps = cls.transform(config).transforms
        if [type(step).__name__ for step in steps[-2:]] != ["MaybeToTensor", "Normalize"]:
            raise RuntimeError(f"timm's eval transform changed: {steps}")  # a timm upgrade: look again
        return transforms.Compose([*steps[:-2], transforms.PILToTensor()])

    def prepare(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if "encoded" in inputs:
            inputs = unpack_on_device(inputs, (3, self.config.size, self.config.size),
                                      lambda image: centre_crop(image, self.config.size), "image")  # fmt: skip
        pixels = normalise_pixels(inputs["pixels"], self.config.mean, self.config.std, self.input_dtype)
        return {**inputs, "pixels": pixels}

    @classmethod
    def decode(cls, sample: RawSample, config: ImageConfig, context: DecodeContext) -> dict[str, Tensor]:
        """The downscaled copy made at conversion (`small.jpg`) when its shorter side is at least
        `size`, else the image file -> (3, size, size) uint8 (with `decode_on: device`, the copy's
        bitstream when it can go undecoded, `_bitstream`)."""
        if config.decode_on == "device":
            bitstream = cls._bitstream(sample, config, context.limits.max_image_pixels)
            if bitstream is not None:
                return encoded_jpeg(bitstream, _capacity(config))
            return encoded_pixels(cls._pixels(sample, config, context)["pixels"])
        return cls._pixels(sample, config, context)

    @staticmethod
    def _bitstream(sample: RawSample, config: ImageConfig, max_pixels: int) -> bytes | None:
        """`decode_on: device`: the small copy's bytes when the device can decode them to what the
        workers would give (a plain JPEG, shorter side `size`: only cropped); else None."""
        if not sample.has(SMALL_IMAGE):
            return None
        small = sample.read(SMALL_IMAGE)
        size = plain_jpeg_size(small, max_pixels)
        fits = size is not None and min(size) == config.size and len(small) <= _capacity(config)
        return small if fits else None

    @classmethod
    def _pixels(cls, sample: RawSample, config: ImageConfig, context: DecodeContext) -> dict[str, Tensor]:
        """Decoded in the data worker (`decode`'s first case)."""
        transform = context.cached("image_bytes_transform", lambda: cls.byte_transform(config))
        max_pixels = context.limits.max_image_pixels
        if sample.has(SMALL_IMAGE):
            small = sample.read(SMALL_IMAGE)
            pixels = decode_image(small, transform, max_pixels, config.size, min_side=config.size)
            if pixels is not None:
                return {"pixels": pixels}
            side = shorter_side(small, max_pixels)
            if not sample.has(IMAGE):
                raise MediaError(f"small.jpg is {side} px on its shorter side, image.size {config.size} needs the "
                                 f"original image, which this product lacks", "small_mismatch")  # fmt: skip
            warnings.warn(f"small.jpg is {side} px on its shorter side, under image.size {config.size}: decoding the "
                          f"original images instead (slower); convert with `scale shards --shrink-images "
                          f"{config.size}` or more", stacklevel=2)  # fmt: skip
        return {"pixels": decode_image(sample.read(IMAGE), transform, max_pixels, config.size)}

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


def image_trunk(context: BuildContext) -> MeanTokenTrunk:
    """The image regions' trunk, built once per model. With `video.share_image_trunk` the video's
    clip tokens run through the same layers (the official model runs video through the image
    encoder), so its positions cover the longer of the two sequences; each modality keeps its own
    input embedding and masked-modeling head."""
    config = context.config
    sharing = "video" in config.modalities and config.video.share_image_trunk
    if sharing:
        if "image" not in config.modalities or config.image.stem != "regions":
            raise ValueError("model.config.video.share_image_trunk: needs the image modality with image.stem regions")
        trunk_fields = ("hidden", "layers", "heads", "mlp_ratio")
        differing = [f for f in trunk_fields if getattr(config.image, f) != getattr(config.video, f)]
        if differing:
            raise ValueError(f"model.config.video.share_image_trunk: video.{differing[0]} must equal image.{differing[0]} (one trunk)")
    slots = max(config.image.max_regions, config.video.frames if sharing else 0)
    return context.share("image_trunk", lambda: MeanTokenTrunk(config.image, slots, context.width))


class RegionStem(Modality):
    modality = "image"
    stem = "regions"
    reads = (REGIONS, BOXES)

    def __init__(self, config: ImageConfig, width: int, trunk: MeanTokenTrunk | None = None):
        super().__init__()
        self.config = config
        if config.pretrained is not None:
            raise ValueError("image.pretrained is a timm ViT checkpoint: it needs image.stem pixels, not regions")
        self.region_embed = nn.Linear(config.region_dim, config.hidden)
        self.box_embed = nn.Linear(BOX_DIM, config.hidden)
        self.norm = nn.LayerNorm(config.hidden)
        self.trunk = trunk or MeanTokenTrunk(config, config.max_regions, width)
        self.head = MaskedRegression(width, config.region_dim)

    @classmethod
    def build(cls, context: BuildContext) -> "RegionStem":
        return cls(context.config.image, context.width, image_trunk(context))

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
