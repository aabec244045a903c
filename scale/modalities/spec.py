"""What a modality declares, and what reading it needs: nothing here imports torch.

A modality is one folder of `scale/modalities/` (or one plugin module). Its `__init__.py` declares
it: `MODALITY = ModalitySpec(...)` with its config dataclass, its limits, the fields it comes in
(JSON record fields and media / feature files, each with the converter's check) and the name of
its stems module. That declaration is what the converter, the config and the data limits read, so
it imports no torch, and neither does this module; the stems (`stems.py`: `scale/modalities/base.py`
is their interface) are imported when a model or a decoder first needs them.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scale.bounds import AT_LEAST_1, POSITIVE, SHARE
from scale.media import MediaError, check_size

if TYPE_CHECKING:
    from scale.modalities.base import Modality


# ---- fields: where a modality comes from, in a release and in a shard -----------------------------
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
    own (audio from a video's sound track, the sampled frames of a video)."""

    member: str
    """The shard member it becomes (`flac`)."""
    source: str
    """The file field it is made from (`video`)."""
    probe: Callable[[str, Any], Any]
    """At planning: (source path, limits) -> the budget to reserve (JSON: seconds, frames and size),
    None if there is nothing to make."""
    bound: Callable[[Any], int]
    """Bytes to reserve in the plan for that budget (so the shard byte bound holds)."""
    make: Callable[[bytes, Any, Any], bytes | None]
    """At writing: (source bytes, budget, limits) -> the member's bytes (None: nothing to make);
    raises MediaError."""
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
        # `bytes()` reads a member the tar reader left in the shard (the sample had the file this
        # one is the fallback of) and is the member itself when it was read.
        return bytes(check_size(self.members[member], member, getattr(self.limits, source.max_bytes)))

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
    def parse_record(data: str | bytes) -> dict[str, Any]:
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
class TrunkConfig:
    """What the image, video and audio encoders share: a transformer trunk and one masked task."""

    hidden: int = 768
    """Trunk width."""
    layers: int = 6
    """Trunk depth."""
    heads: int = 12
    """Attention heads."""
    mlp_ratio: float = 4.0
    """Feed-forward expansion."""
    masked_modeling: bool = True
    """The modality's masked-feature regression (patches, frames or audio tokens)."""
    mask_prob: float = 0.15
    """Share of the modality's tokens chosen for masked modeling."""

    BOUNDS = {"hidden": AT_LEAST_1, "layers": AT_LEAST_1, "heads": AT_LEAST_1, "mlp_ratio": POSITIVE, "mask_prob": SHARE}
    DIVISIBLE = (("hidden", "heads"),)


# ---- the registry entry ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ModalitySpec:
    """The registry entry of one modality: everything generic code needs, declared in its folder."""

    name: str
    """The key (`image`): batch entry, config section, fusion segment."""
    config: type
    """Its config dataclass (a section of `model.config`); a `stem` field names one of the stems
    (optional when there is only one)."""
    fields: tuple[Field, ...]
    """Every field its stems read, in the order the converter writes them."""
    stems: dict[str, type[Modality]] | str
    """Its input variants by name, or the module that defines them as `STEMS = {name: class}`
    (imported on first use, so that reading the declaration imports no torch)."""
    limits: type | None = None
    """A dataclass of its own limits (`data.limits` gathers every modality's)."""
    check_members: Callable[[dict[str, Any]], list[tuple[str, str, str]]] | None = None
    """The converter's check across the files of one product: ({field: its `check` result}) ->
    [(field, reason, detail)] to drop (e.g. region features are unusable without their boxes)."""
    resolve_assets: Callable[[Any, Any], None] | None = None
    """Loading an export: (model config, export folder) -> the paths `Modality.export_assets`
    made relative, made absolute again."""
    _stems: dict[str, type[Modality]] = field(default_factory=dict, repr=False, compare=False)

    def stem_classes(self) -> dict[str, type[Modality]]:
        """The stems by name (importing their module the first time), each checked to read only
        the declared fields."""
        if not self._stems:
            stems = self.stems if isinstance(self.stems, dict) else importlib.import_module(self.stems).STEMS
            for name, stem in stems.items():
                if stem.modality != self.name or stem.stem != name:
                    raise ValueError(f"modality {self.name}: stem {name!r} is {stem.__name__} "
                                     f"({stem.modality!r}/{stem.stem!r})")  # fmt: skip
                undeclared = [source.name for source in stem.reads if source not in self.fields]
                if undeclared:
                    raise ValueError(f"modality {self.name}: stem {name!r} reads undeclared fields {undeclared}")
            self._stems.update(stems)
        return self._stems

    def stem_class(self, config: Any) -> type[Modality]:
        """The stem `config.stem` names (a modality with one stem needs no `stem` field)."""
        stems = self.stem_classes()
        name = getattr(config, "stem", None)
        if name is None and len(stems) == 1:
            return next(iter(stems.values()))
        try:
            return stems[name]
        except KeyError:
            raise ValueError(f"model.config.{self.name}.stem {name!r}: expected one of {list(stems)}") from None
