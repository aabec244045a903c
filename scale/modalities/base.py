"""What a modality is: one `ModalitySpec` (the registry entry) and its stems (input variants).

A modality is declared once, in one file of `scale/modalities/`: its config dataclass, its limits,
the fields it comes in (JSON record fields and media / feature files, with the converter's check
of each), and its stems. A **stem** is one input variant (image: `pixels` or `regions`; video:
`frames` or `features`), picked by name with `<modality>.stem`, and a subclass of `Modality`:

- its *data half* is class-level, so data workers and the converter use it without building any
  weights: `tensors` declares the per-sample tensor keys, shapes and dtypes (the batch layout),
  `decode` turns a shard sample's bytes into those tensors, `absent` is the placeholder of a
  sample without the modality, `example` gives valid random inputs (tests, benchmarks);
- its *model half* is the encoder module: `encode` (tokens in the fusion width), `mask` (corrupt
  its own inputs for masked modeling) and `masked_loss` (score them from the fused tokens).

Everything else (the model builder, the decoder, the collate, the converter's field table, the
test fixtures) loops over the registry (`scale.modalities`), so a new modality is one new file.

Conventions every stem keeps:
- The first token of every sequence is the modality's pooled token ([CLS] or mean token).
- `present` is a (B,) bool mask; absent samples still flow through the encoder (the batch stays
  rectangular, and every parameter receives a gradient on every rank, which DDP requires), but
  their inputs are replaced by the placeholder first (`sanitize`), so a garbage or NaN input can
  never leak into a loss or a gradient, and their tokens are masked out of fusion.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from scale.media import MediaError, MediaTooLarge, check_size


# ---- declarations: tensors and fields --------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One per-sample tensor of a stem's inputs."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: int | float | bool = 0
    """Its value for an absent sample (and, by convention, for padding): 0, or -1 for "none"."""

    def placeholder(self) -> Tensor:
        return torch.full(self.shape, self.fill, dtype=self.dtype)


Note = tuple[str, str, str]
"""What the converter did to a field: (reason code, detail, action: cut / dropped / kept / added)."""


@dataclass(frozen=True, eq=False)  # hashed by identity: each is declared once
class RecordField:
    """A field of the product's JSON record (the title, the table), kept in the shard's `json`."""

    name: str
    """Its key in meta.jsonl and in the shard record."""
    official: str
    """Its key in the official M5Product JSON (`pv` for the table)."""
    clean: Callable[[Any, Any], tuple[Any, list[Note]]]
    """The converter's check: (value, limits) -> (the value to keep, or None to drop it; notes)."""
    max_chars: str | None = None
    """For a string: the DataLimits field that bounds it (it is cut to that many characters)."""
    noise: Callable[[list[str]], Any] | None = None
    """A noise value of this field made of random words (`scale corrupt --kind noise`)."""


@dataclass(frozen=True, eq=False)  # hashed by identity: each is declared once
class Derived:
    """A member the converter makes from another field's file when the product has no file of its
    own (audio from a video's sound track)."""

    member: str
    """The shard member it becomes (`flac`)."""
    source: str
    """The file field it is made from (`video`)."""
    probe: Callable[[str, Any], float | None]
    """At planning: (source path, limits) -> the budget to reserve (seconds), None if there is nothing."""
    bound: Callable[[float], int]
    """Bytes to reserve in the plan for that budget (so the shard byte bound holds)."""
    make: Callable[[bytes, float], bytes | None]
    """At writing: (source bytes, budget) -> the member's bytes (None: nothing to make); raises MediaError."""
    reason: str
    """The report's code for a derived member (`from_video`)."""


@dataclass(frozen=True, eq=False)  # hashed by identity: each is declared once
class FileField:
    """A media or feature file of the product; it becomes one shard member."""

    name: str
    """Its key in meta.jsonl (a path) and its folder in the official layout (`image/<id>.jpg`)."""
    extensions: dict[str, str]
    """File suffix -> shard member (`.jpeg` -> `jpg`)."""
    max_bytes: str
    """The DataLimits field bounding the file's bytes (checked from `stat` before it is read)."""
    check: Callable[[bytes, Any], Any]
    """The converter's check: (bytes, limits) -> anything `ModalitySpec.check_members` needs; raises
    MediaError (its reason is what the report counts)."""
    derive: Derived | None = None

    @property
    def members(self) -> tuple[str, ...]:
        """The shard members it may be stored as, in order of preference."""
        names = list(dict.fromkeys(self.extensions.values()))
        if self.derive is not None and self.derive.member not in names:
            names.append(self.derive.member)
        return tuple(names)


Field = RecordField | FileField


def clean_string(value: Any, limits: Any, source: RecordField,
                 cut: Callable[[str, int], str] | None = None) -> tuple[str | None, list[Note]]:  # fmt: skip
    """The converter's check of a string record field: not a string -> dropped; over its
    `max_chars` -> cut (by `cut(value, cap)`, default: the first `cap` characters)."""
    if not isinstance(value, str):
        return None, [("not_string", f"a JSON {type(value).__name__}, not a string", "dropped")]
    cap = getattr(limits, source.max_chars)
    if len(value) <= cap:
        return value, []
    kept = cut(value, cap) if cut is not None else value[:cap]
    return kept, [("cut", f"{len(value)} characters cut to {len(kept)} ({source.max_chars}={cap})", "cut")]


class Missing(KeyError):
    """The product lacks this modality: it is absent, and that is not an error."""


# ---- the data half at run time: one sample's bytes, and what a worker's decoders share ------------
class RawSample:
    """One shard sample as a stem decodes it: the parsed record and the members, each member read
    against its byte limit before anything decodes it."""

    def __init__(self, key: str, record: dict[str, Any], members: dict[str, bytes], limits: Any):
        self.key, self.record, self.members, self.limits = key, record, members, limits

    def has(self, source: FileField) -> bool:
        return any(member in self.members for member in source.members)

    def member(self, source: FileField) -> str:
        """The first of the field's members the sample has (Missing if none)."""
        for member in source.members:
            if member in self.members:
                return member
        raise Missing(source.name)

    def read(self, source: FileField) -> bytes:
        """The bytes of the field's member (the first present), MediaTooLarge over its byte limit."""
        member = self.member(source)
        return check_size(self.members[member], member, getattr(self.limits, source.max_bytes))

    def string(self, source: RecordField) -> str:
        """A record string, cut to its limit and stripped; Missing when absent or empty."""
        value = self.record.get(source.name)
        if value is None:
            raise Missing(source.name)
        if not isinstance(value, str):
            raise MediaError(f"{source.name} is a JSON {type(value).__name__}, not a string", "not_string")
        # Cut before tokenising / parsing: their cost grows with the input, however little is kept.
        value = value[: getattr(self.limits, source.max_chars)].strip()
        if not value:
            raise Missing(source.name)
        return value

    @staticmethod
    def parse_record(data: bytes) -> dict[str, Any]:
        record = json.loads(data)
        if not isinstance(record, dict):
            raise ValueError(f"the record is a JSON {type(record).__name__}, not an object")
        return record


class DecodeContext:
    """What one data worker's stems share: the model config, the limits, and objects built once on
    first use (the tokenizer, the image transform), each in its own worker."""

    def __init__(self, config: Any, limits: Any):
        self.config, self.limits = config, limits
        self._cache: dict[str, Any] = {}

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def tokenizer(self):
        from scale.pretrained_paths import load_tokenizer

        return self.cached("tokenizer", lambda: load_tokenizer(self.config.tokenizer))


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


# ---- a stem ----------------------------------------------------------------------------------------
class Modality(nn.Module):
    """One stem of one modality: the data half (classmethods) and the encoder (module doc)."""

    modality: ClassVar[str] = ""
    """The registry key (`image`)."""
    stem: ClassVar[str] = ""
    """The input variant's name (`pixels`), what `<modality>.stem` picks."""
    reads: ClassVar[tuple[Field, ...]] = ()
    """The fields this stem decodes from."""
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
        floats standard normal, flags true, integers their placeholder. Stems whose inputs have
        structure (token ids, masks of real slots) override it."""
        out = {}
        for key, spec in cls.tensors(config).items():
            shape = (batch, *spec.shape)
            if spec.dtype.is_floating_point:
                out[key] = torch.randn(shape, dtype=spec.dtype)
            elif spec.dtype == torch.bool:
                out[key] = torch.ones(shape, dtype=torch.bool)
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

    def sanitize(self, inputs: dict[str, Tensor], present: Tensor) -> dict[str, Tensor]:
        """Every input of an absent sample set to its placeholder (torch.where: NaN cannot survive)."""
        clean = dict(inputs)
        for key, spec in self.tensors(self.config).items():
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


@dataclass(frozen=True)
class ModalitySpec:
    """The registry entry of one modality: everything generic code needs, declared in its file."""

    name: str
    """The key (`image`): batch entry, config section, fusion segment."""
    config: type
    """Its config dataclass (a section of `model.config`); a `stem` field names one of `stems`
    (optional when there is only one)."""
    stems: dict[str, type[Modality]]
    """Its input variants by name."""
    limits: type | None = None
    """A dataclass of its own limits (`data.limits` gathers every modality's)."""
    check_members: Callable[[dict[str, Any], Callable[..., None]], None] | None = None
    """The converter's check across the files of one product ({field: `check` result}, note(field,
    reason, detail)): e.g. region features are unusable without their boxes. The note drops the file."""
    resolve_assets: Callable[[Any, Any], None] | None = None
    """Loading an export: (model config, export folder) -> the paths `Modality.export_assets`
    made relative, made absolute again."""

    def __post_init__(self) -> None:
        for name, stem in self.stems.items():
            if stem.modality != self.name or stem.stem != name:
                raise ValueError(f"modality {self.name}: stem {name!r} is {stem.__name__} "
                                 f"({stem.modality!r}/{stem.stem!r})")  # fmt: skip

    @property
    def fields(self) -> tuple[Field, ...]:
        """Every field any stem reads, once each, in order: what the converter writes."""
        return tuple(dict.fromkeys(source for stem in self.stems.values() for source in stem.reads))

    def stem_class(self, config: Any) -> type[Modality]:
        """The stem `config.stem` names (a modality with one stem needs no `stem` field)."""
        name = getattr(config, "stem", None)
        if name is None and len(self.stems) == 1:
            return next(iter(self.stems.values()))
        try:
            return self.stems[name]
        except KeyError:
            raise ValueError(f"model.config.{self.name}.stem {name!r}: expected one of {list(self.stems)}") from None
