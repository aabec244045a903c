"""The stem interface: what every input variant of a modality implements.

A **stem** is one input variant (image: `pixels` or `regions`; video: `frames` or `features`),
picked by name with `<modality>.stem`, and a subclass of `Modality`:

- its *data half* is class-level, so data workers use it without building any weights: `tensors`
  declares the per-sample tensor keys, shapes and dtypes (the batch layout), `decode` turns a
  shard sample's bytes into those tensors, `absent` is the placeholder of a sample without the
  modality, `example` gives valid random inputs (tests, benchmarks);
- its *model half* is the encoder module: `prepare` (the device half of decoding, e.g. uint8
  pixels to normalised floats), `encode` (tokens in the fusion width), `mask` (corrupt its own
  inputs for masked modeling) and `masked_loss` (score them from the fused tokens).

What a modality declares besides its stems (config, limits, fields) is in `spec.py`; everything
else (the model builder, the decoder, the collate, the converter's field table, the test fixtures)
loops over the registry (`scale.modalities`), so a new modality is one new folder (or file).

Conventions every stem keeps:
- The first token of every sequence is the modality's pooled token ([CLS] or mean token).
- `present` is a (B,) bool mask; absent samples still flow through the encoder (the batch stays
  rectangular, and every parameter receives a gradient on every rank, which DDP requires), but
  their inputs are replaced by the placeholder first (`sanitize`), so a garbage or NaN input can
  never leak into a loss or a gradient, and their tokens are masked out of fusion.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from scale.media.pixels import pack_jpeg, pack_pixels, unpack_pixels
from scale.modalities.spec import DecodeContext, Field, FileField, RawSample


# ---- what a stem declares and exchanges ----------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One per-sample tensor of a stem's inputs."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: int | float | bool = 0
    """Its value for an absent sample (and, by convention, for padding): 0, or -1 for "none"."""
    host: bool = False
    """Kept in host memory when the batch moves to the accelerator (`scale.modalities.batch_to_device`):
    bytes that a decoder reading host memory turns into device tensors (JPEG bitstreams for
    `torchvision.io.decode_jpeg`), consumed by the stem's `prepare`."""

    def placeholder(self) -> Tensor:
        return torch.full(self.shape, self.fill, dtype=self.dtype)



@dataclass
class BuildContext:
    """What the model builder hands each modality: the whole config, and modules several
    modalities share (the text BERT, which the table runs through by default)."""

    config: Any
    load_weights: bool = True
    """False: pretrained towers get their architecture only (a checkpoint's weights follow)."""
    shared: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return self.config.fusion.width

    def share(self, key: str, build: Callable[[], nn.Module]) -> nn.Module:
        if key not in self.shared:
            self.shared[key] = build()
        return self.shared[key]


# ---- the model half's data types -------------------------------------------------------------------
@dataclass
class Encoded:
    """A modality's token sequence."""

    tokens: Tensor
    """(B, L, width) tokens; position 0 is the pooled token."""
    token_mask: Tensor
    """(B, L) bool, True where a token is real (not padding). Absent samples are handled by the caller."""


@dataclass
class Masked:
    """Inputs corrupted for masked modeling, and what must be predicted."""

    inputs: dict[str, Tensor]
    """The corrupted inputs, to be encoded instead of the clean ones."""
    positions: Tensor
    """(B, L) bool over the modality's *output* token sequence: where a prediction is scored."""
    targets: Tensor
    """Targets at `positions`, in row-major order: (N,) token ids or (N, F) regression features."""


def first_slots_real(batch: int, slots: int) -> Tensor:
    """(batch, slots) bool masks of real slots in which every count from 1 to `slots` occurs
    (cycling): example inputs for stems with padded slots (regions, clips)."""
    return torch.arange(slots)[None, :] < (torch.arange(batch) % slots + 1)[:, None]


# ---- pixels decoded on the device (`decode_on: device`; the layout is scale/media/pixels.py's) ------
def encoded_tensors(capacity: int) -> dict[str, TensorSpec]:
    """A stem's batch layout with `decode_on: device`: a bitstream or the worker's pixels in a
    (capacity,) buffer (the pixels' size), and its length (0: pixels), both kept on the host."""
    return {"encoded": TensorSpec((capacity,), torch.uint8, host=True),
            "encoded_length": TensorSpec((), torch.int64, host=True)}  # fmt: skip


def encoded_jpeg(bitstream: bytes, capacity: int) -> dict[str, Tensor]:
    """A sample's JPEG bitstream, to be decoded by `unpack_on_device`."""
    return {"encoded": pack_jpeg(bitstream, capacity), "encoded_length": torch.tensor(len(bitstream))}


def encoded_pixels(pixels: Tensor) -> dict[str, Tensor]:
    """A sample's pixels, decoded in the data worker, in the same layout."""
    return {"encoded": pack_pixels(pixels), "encoded_length": torch.tensor(0)}


def unpack_on_device(inputs: dict[str, Tensor], shape: tuple[int, ...], fit: Callable[[Tensor], Tensor | None],
                     modality: str, values: str = "pixels") -> dict[str, Tensor]:  # fmt: skip
    """`prepare`'s first step: the batch's `encoded` buffers -> `values` ((B, *shape) uint8, on
    the device of `present`), with `present` narrowed to the samples whose bitstream decoded
    (the others become absent, with a warning: a shard from elsewhere than our converter, whose
    check reads every byte, may hold a corrupt one)."""
    present = inputs["present"].bool()
    pixels, decoded = unpack_pixels(inputs["encoded"], inputs["encoded_length"], shape, present.device, fit)
    failed = int((~decoded).sum())  # host memory: no sync (a row that failed held a bitstream, so was present)
    if failed:
        warnings.warn(f"{modality}: {failed} of {len(decoded)} JPEG bitstreams in the batch failed to decode on "
                      f"{present.device}; those samples' {modality} is taken as absent", stacklevel=3)  # fmt: skip
    rest = {key: value for key, value in inputs.items() if key not in encoded_tensors(0)}
    return {**rest, values: pixels, "present": present & decoded.to(present.device, non_blocking=True)}


# ---- a stem ----------------------------------------------------------------------------------------
class Modality(nn.Module):
    """One stem of one modality: the data half (classmethods) and the encoder (module doc)."""

    modality: ClassVar[str] = ""
    """The registry key (`image`)."""
    stem: ClassVar[str] = ""
    """The input variant's name (`pixels`), what `<modality>.stem` picks."""
    reads: ClassVar[tuple[Field, ...]] = ()
    """The fields this stem decodes from."""
    fallbacks: ClassVar[dict[FileField, FileField]] = {}
    """Fields of `reads` read only when another is absent or does not fit the config, as
    {fallback: preferred} (the MP4 beside the frames extracted from it): where the sample has the
    preferred file, the tar reader leaves the fallback's bytes in the shard until `decode` reads
    them, so a shuffle buffer does not hold them for nothing."""
    uses_tokenizer: ClassVar[bool] = False
    """Whether it tokenizes with `model.config.tokenizer` (the export then carries that tokenizer)."""

    # -- data half: runs in data workers, builds no weights --
    @classmethod
    def tensors(cls, config: Any) -> dict[str, TensorSpec]:
        """The per-sample inputs this stem decodes to, for `config` (the modality's config)."""
        raise NotImplementedError

    @classmethod
    def decode(cls, sample: RawSample, config: Any, context: DecodeContext) -> dict[str, Tensor]:
        """The sample's tensors (shapes as `tensors` declares), or Missing, or an error (counted)."""
        raise NotImplementedError

    @classmethod
    def absent(cls, config: Any) -> dict[str, Tensor]:
        """The placeholder of a sample without this modality (what collation stacks)."""
        return {key: spec.placeholder() for key, spec in cls.tensors(config).items()}

    @classmethod
    def example(cls, config: Any, batch: int) -> dict[str, Tensor]:
        """Valid random inputs for `batch` samples (tests and benchmarks; torch's global generator):
        floats standard normal, flags true, bytes (pixels) uniform, other integers their placeholder. Stems whose inputs have
        structure (token ids, masks of real slots) override it."""
        out = {}
        for key, spec in cls.tensors(config).items():
            shape = (batch, *spec.shape)
            if spec.dtype.is_floating_point:
                out[key] = torch.randn(shape, dtype=spec.dtype)
            elif spec.dtype == torch.bool:
                out[key] = torch.ones(shape, dtype=torch.bool)
            elif spec.dtype == torch.uint8:  # pixels
                out[key] = torch.randint(0, 256, shape, dtype=torch.uint8)
            else:
                out[key] = torch.full(shape, spec.fill, dtype=spec.dtype)
        return out

    @classmethod
    def members(cls) -> tuple[str, ...]:
        """The shard members this stem may read (none: it reads the record only)."""
        return tuple(m for source in cls.reads if isinstance(source, FileField) for m in source.members)

    @classmethod
    def may_have(cls, sample: RawSample) -> bool:
        """Whether decoding is worth trying: a file-based stem needs one of its members."""
        files = [source for source in cls.reads if isinstance(source, FileField)]
        return not files or any(sample.has(source) for source in files)

    # -- model half --
    @classmethod
    def build(cls, context: BuildContext) -> "Modality":
        """The encoder for `context.config` (override to use shared modules)."""
        return cls(getattr(context.config, cls.modality), context.width)

    config: Any
    """The modality's config (set by every stem's __init__)."""

    @property
    def input_keys(self) -> tuple[str, ...]:
        return tuple(self.tensors(self.config))

    @property
    def num_tokens(self) -> int:
        """Length of the token sequence `encode` returns (pooled token included)."""
        raise NotImplementedError

    def prepare(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The device half of decoding, run on the batch before everything else (default: none):
        what is cheaper on the accelerator than in the data workers, such as turning uint8 pixels
        into normalised floats or waves into filterbanks. It hands on `prepared_tensors` and
        `present` (narrowed where bytes fail to decode here: those samples become absent), drops
        the `host` inputs it consumed, and leaves inputs it has already prepared as they are
        (calling it twice changes nothing)."""
        return inputs

    @classmethod
    def prepared_tensors(cls, config: Any) -> dict[str, TensorSpec]:
        """What `prepare` hands to the encoder (default: the batch's `tensors`); floats it makes
        are declared float32, their dtype at run time being the stem's `input_dtype`."""
        return cls.tensors(config)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype `prepare` makes floats in: the stem's parameters' (float32 under autocast,
        bfloat16 under `precision: bf16-true`)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def sanitize(self, inputs: dict[str, Tensor], present: Tensor) -> dict[str, Tensor]:
        """Every prepared input of an absent sample set to its placeholder (torch.where: NaN cannot
        survive)."""
        clean = dict(inputs)
        for key, spec in self.prepared_tensors(self.config).items():
            value = inputs[key]
            keep = present.view(-1, *([1] * (value.dim() - 1)))
            clean[key] = torch.where(keep, value, torch.full((), spec.fill, dtype=value.dtype, device=value.device))
        return clean

    def encode(self, inputs: dict[str, Tensor]) -> Encoded:
        raise NotImplementedError

    def mask(self, inputs: dict[str, Tensor], present: Tensor) -> Masked | None:
        """Corrupt the inputs for masked modeling; None when the task is disabled."""
        return None

    def masked_loss(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> Tensor:
        """Weighted loss over `masked.positions` from this modality's fused tokens (B, L, width)."""
        raise NotImplementedError

    def extra_losses(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> dict[str, Tensor]:
        """Further losses of this modality scored on the same masked inputs (e.g. the table's K3M
        link prediction); each is added to the total and logged as `<modality>/<name>`."""
        return {}

    def export_assets(self, out: Any, config: Any) -> None:
        """Write what rebuilding this encoder needs besides its weights and the tokenizer (e.g. a
        pretrained tower's architecture) into the export folder `out`, and point the fields of
        `config` (the export's copy of the model config) at them, relative to the folder."""


