"""Shard sample -> tensors: `SampleDecoder` runs each configured modality's stem on a raw sample.

What each modality reads and how its bytes become tensors is its stem's (`scale/modalities/`:
`tensors` declares the per-sample keys, shapes and dtypes, `decode` fills them); this loop is the
same for every modality. Every tensor has a fixed shape (set by the model config), so collation is
a stack and the model sees static shapes. A modality that is missing from the sample, or whose
bytes fail to decode, becomes *absent*: its placeholder plus `present=False`. A failure is counted
per kind in the error budget (`datamodules/error_budget.py`) and does not stop training, unless too
large a share of the samples had errors. A sample with no usable modality, or whose JSON record is
unusable, is dropped.

Limits (`datamodules/limits.py`) are checked again here, before decoding, because shards may come
from elsewhere than our converter: every member's bytes, then each stem's own (pixels and seconds
from headers, title and table lengths), through the same checks as the converter's
(`scale/media/`). A limit exceeded counts under the modality and under `<modality>: too large`;
a video decode past `video_timeout_s` under `video: timeout`.

Shards never execute code: only JSON and the members the configured stems name are read, with
explicit decoders (no webdataset auto-decoding, whose defaults include pickle); any other member of
a sample (`.pyd`, `.pickle`, `.pth`, ...) is ignored, never looked at. `.npy` files are loaded with
`allow_pickle=False`.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import torch

from datamodules.error_budget import ErrorBudget
from datamodules.limits import DataLimits
from datamodules.tar_reader import DROPPING_ERRORS, MEMBER_ERRORS
from scale.media import MediaTooLarge, check_size
from scale.modalities import REGISTRY, stem_class
from scale.modalities.spec import DecodeContext, FileField, Missing, RawSample, RecordField
from scale.shard_format import RECORD_MEMBER, canonical_label, is_number


def category_id(label: str | None, vocabulary: dict[str, int] | None) -> int:
    """The class id of a canonical label (`scale.shard_format.canonical_label`): its index in the
    shard set's label vocabulary; without one (shards converted before the vocabulary existed),
    a number is its own id. -1: no label, or one the vocabulary does not hold."""
    if label is None:
        return -1
    if vocabulary is not None:
        return vocabulary.get(label, -1)
    return int(label) if is_number(label) and int(label) >= 0 else -1


class SampleDecoder:
    """Turns one raw shard sample (`{"__key__", "json", "jpg", "mp4", "regions.npy", ...}` of bytes)
    into `{"key", "label", "category", "instance", <modality>: {<tensors>, "present"}}`: `label` is
    the product's category as the release names it (None when it has none), `category` its class
    id in `labels` (the shard set's vocabulary, `scale.shard_format.read_labels`; -1 when unknown),
    `instance` its product id (None when the record has none: fine retrieval needs them).

    Counts, per data worker (each worker holds its own copy), in `budget`: samples, errors per
    kind, bad samples (an unusable JSON record drops its sample and counts as "json") and
    `dropped` samples (without any usable modality). `enforce_error_rate`: stop past
    `limits.max_error_rate` here (a decoder used on its own); training enforces the job's budget
    instead (`datamodules/error_budget.py`)."""

    def __init__(self, config, limits: DataLimits | None = None, warn_every: int = 100, enforce_error_rate: bool = True,
                 labels: list[str] | None = None):
        self.config = config
        self.vocabulary = None if labels is None else {label: index for index, label in enumerate(labels)}
        self.limits = limits or DataLimits()
        self.stems = {name: stem_class(config, name) for name in config.modalities}
        self.record_fields = [source for name in self.stems for source in REGISTRY[name].fields
                              if isinstance(source, RecordField)]  # fmt: skip
        self.context = DecodeContext(config, self.limits)
        self.budget = ErrorBudget(self.limits.max_error_rate, self.limits.error_rate_min_samples, warn_every,
                                  enforce=enforce_error_rate)  # fmt: skip
        self.count_error = self.budget.count

    @property
    def errors(self) -> Counter[str]:
        return self.budget.counts.errors

    @property
    def samples(self) -> int:
        return self.budget.counts.samples

    @property
    def bad_samples(self) -> int:
        return self.budget.counts.bad_samples

    @property
    def dropped(self) -> int:
        return self.budget.counts.dropped

    def member_limits(self) -> dict[str, int]:
        """Each member's byte limit: the reader leaves a longer member unread (too large here)."""
        limits = {RECORD_MEMBER: self.limits.max_json_member_bytes}
        for name in self.stems:
            for source in REGISTRY[name].fields:
                if isinstance(source, FileField):
                    limits.update((member, getattr(self.limits, source.max_bytes)) for member in source.members)
        return limits

    def shard_fields(self) -> set[str]:
        """Every shard member this decoder may read: the stream does not read the others' bytes
        (a text-only model need not read 2 MB of video per sample)."""
        return {RECORD_MEMBER}.union(*(stem.members() for stem in self.stems.values()))

    def deferred_members(self) -> dict[str, frozenset[str]]:
        """Members the reader may leave in the shard, each with the members whose presence in a
        sample makes it so: a stem's fallback file (the MP4) beside its preferred one (the frames
        extracted from it), unless another stem reads the fallback whatever the sample holds."""
        deferred: dict[str, frozenset[str]] = {}
        for stem in self.stems.values():
            for fallback, preferred in stem.fallbacks.items():
                deferred.update(dict.fromkeys(fallback.members, frozenset(preferred.members)))
        for stem in self.stems.values():
            fallbacks = {member for source in stem.fallbacks for member in source.members}
            for member in set(stem.members()) - fallbacks:
                deferred.pop(member, None)
        return deferred

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        with self.budget.sample():
            return self._decode(sample)

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = str(sample.get("__key__", "?"))
        refused = sample.get(MEMBER_ERRORS, ())
        for kind, detail in refused:  # what the tar reader refused (a link, a `..` name, a repeated key)
            self.count_error(kind, key, detail)
        if any(kind in DROPPING_ERRORS for kind, _ in refused):
            return None
        try:
            record = self._record(sample[RECORD_MEMBER], key)
        except Exception as error:  # no record, too large, not JSON, not an object: nothing to label it by
            self.count_error(self._kind("json", error), key, error)  # counted as json, not in `dropped`
            return None
        raw = RawSample(key, record, sample, self.limits)
        label, instance = canonical_label(record.get("category")), record.get("instance")
        decoded: dict[str, Any] = {"key": key, "label": label, "category": category_id(label, self.vocabulary),
                                   "instance": None if instance in (None, "") else str(instance)}  # fmt: skip
        any_present = False
        for name, stem in self.stems.items():
            config, value = getattr(self.config, name), None
            if stem.may_have(raw):
                try:
                    value = stem.decode(raw, config, self.context)
                except Missing:
                    value = None  # the product simply lacks this modality: not an error
                except Exception as error:
                    self.count_error(self._kind(name, error), key, error)
            present = value is not None
            any_present |= present
            decoded[name] = {**(value if present else stem.absent(config)), "present": torch.tensor(present)}
        if not any_present:
            self.budget.counts.dropped += 1
            return None
        return decoded

    def _record(self, data: bytes, key: str) -> dict[str, Any]:
        """The sample's record as used: each record field of the configured modalities cut to its
        limit first, then `max_json_bytes` checked on what is left, so that a long title is cut,
        not its product dropped. Bytes that are not UTF-8 become U+FFFD (counted, kept)."""
        data = check_size(data, RECORD_MEMBER, self.limits.max_json_member_bytes)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            self.count_error("json: not utf-8", key, error)
            text = data.decode("utf-8", errors="replace")
        record = RawSample.parse_record(text)
        used = {name: record[name] for name in ("category", "instance") if name in record}
        for source in self.record_fields:
            if source.name in record:
                value = record[source.name]
                if isinstance(value, str) and source.max_chars is not None:
                    value = value[: getattr(self.limits, source.max_chars)]
                used[source.name] = value
        check_size(json.dumps(used).encode(), f"{RECORD_MEMBER} (its fields as used)", self.limits.max_json_bytes)
        return used

    @staticmethod
    def _kind(modality: str, error: Exception) -> str:
        """`<modality>: too large` / `<modality>: timeout` for limits, else the modality."""
        if isinstance(error, MediaTooLarge):
            return f"{modality}: too large"
        if isinstance(error, TimeoutError):
            return f"{modality}: timeout"
        return modality
