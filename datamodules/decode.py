"""Shard sample -> tensors: `SampleDecoder` applies one decoder per modality to a raw sample.

Every modality tensor has a fixed shape (set by the model config), so collation is a stack and the
model sees static shapes. A modality that is missing from the sample, or whose bytes fail to
decode, becomes *absent*: zeros plus `present=False`. A failure is counted per kind and warned about
at a limited rate; it does not stop training, unless more than `DataLimits.max_error_rate` of the
samples had errors (then `DataErrorRateExceeded`: a run fed mostly broken data is a broken run). A
sample with no usable modality, or whose JSON record is unusable, is dropped.

Limits (`datamodules/limits.py`) are checked again here, before decoding, because shards may come
from elsewhere than our converter: field sizes in bytes, image pixels and video pixels / seconds
from headers, audio seconds, title and table lengths; video decoding runs under a wall-clock limit
in a helper process (decord is known to hang). A limit exceeded counts under the modality and under
`<modality>: too large` (or `video: timeout`).

Each of image, video and audio has two input stems (`<modality>.stem` in the model config): the
media file (`datamodules/decoders/media.py`: JPEG; MP4; audio as WAV, FLAC or MP3, whichever field
the sample has) or M5Product's pre-extracted features as `.npy` arrays
(`datamodules/decoders/features.py`):

    stem                 shard fields               decoded tensors (fixed shapes)
    image.regions        regions.npy (R, region_dim) regions (max_regions, region_dim) float32,
                         boxes.npy (R, 5)            boxes (max_regions, 5), region_mask (max_regions,) bool
    video.features       video.npy (T, feature_dim)  features (frames, feature_dim), frame_mask (frames,) bool
    audio.features       mel.npy (mel_bins, T)       fbank (feature_frames, mel_bins) normalised, length

Longer arrays are cut (first regions / clips / frames), shorter ones zero-padded and masked.

Shards never execute code: only JSON, JPEG, MP4, WAV/FLAC/MP3 and `.npy` are read, with explicit
decoders (no webdataset auto-decoding, whose defaults include pickle); any other member of a sample
(`.pyd`, `.pickle`, `.pth`, ...) is ignored, never looked at. `.npy` files are loaded with
`allow_pickle=False`: an object array, a wrong shape or a NaN makes the modality absent, counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import torch
from timm.data import create_transform

from datamodules.decoders.features import NPY_MAGIC, decode_mel, decode_regions, decode_video_features, load_npy
from datamodules.decoders.media import IMAGE_FORMATS, check_size, decode_audio, decode_image, decode_video
from datamodules.limits import DataErrorRateExceeded, DataLimits
from datamodules.sources import parse_table
from datamodules.video_reader import MediaTooLarge
from scale.config import ImageConfig, ModelConfig, TableConfig
from scale.pretrained_paths import load_tokenizer

__all__ = [  # the byte decoders live in datamodules/decoders/; importable from here as before
    "SampleDecoder", "parse_table", "category_label", "load_npy", "decode_regions", "decode_video_features",
    "decode_mel", "decode_image", "decode_video", "decode_audio", "check_size", "NPY_MAGIC", "IMAGE_FORMATS",
]  # fmt: skip

log = logging.getLogger(__name__)

def category_label(value: Any) -> int:
    """The integer category of a record; -1 (unknown) for a missing or non-integer label. Not an
    error: labels only serve evaluation, and a release may label by name."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 20:
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return -1


def tokenize_table(tokenizer, pairs: list[tuple[str, str]], max_tokens: int) -> dict[str, torch.Tensor]:
    """[(key, value)] -> `[CLS] key value key value ... [SEP]` token ids, padded to `max_tokens`,
    with each token's pair index (`entity_index`) and whether it is a key or a value
    (`entity_role` 0 / 1); -1 on special and padding tokens."""
    pieces = tokenizer([text for pair in pairs for text in pair], add_special_tokens=False)["input_ids"]
    ids, entity, role = [tokenizer.cls_token_id], [-1], [-1]
    for index, piece in enumerate(pieces):
        ids += piece
        entity += [index // 2] * len(piece)
        role += [index % 2] * len(piece)
    limit = max_tokens - 1
    ids, entity, role = ids[:limit] + [tokenizer.sep_token_id], entity[:limit] + [-1], role[:limit] + [-1]
    pad = max_tokens - len(ids)
    return {
        "input_ids": torch.tensor(ids + [tokenizer.pad_token_id] * pad),
        "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
        "entity_index": torch.tensor(entity + [-1] * pad),
        "entity_role": torch.tensor(role + [-1] * pad),
    }


class SampleDecoder:
    """Turns one raw shard sample (`{"__key__", "json", "jpg", "mp4", "wav", "regions.npy", ...}` of
    bytes) into tensors, reading for each modality the field of its configured stem.

    Counts, per data worker (each worker holds its own copy): `samples` seen, `dropped` (samples
    without any usable modality), `errors` per kind (an unusable JSON record drops its sample and
    counts as "json"), and `bad_samples` (samples with any error), bounded by `limits.max_error_rate`."""

    def __init__(self, config: ModelConfig, limits: DataLimits | None = None, warn_every: int = 100):
        self.config = config
        self.limits = limits or DataLimits()
        self.modalities = list(config.modalities)
        self.errors: Counter[str] = Counter()
        self.samples = 0
        self.bad_samples = 0
        self.dropped = 0
        self.warn_every = warn_every
        self._sample_bad: bool | None = None  # inside __call__: whether this sample had an error yet
        image: ImageConfig = config.image
        # timm's eval transform of the image tower: resize, centre crop, tensor, normalise.
        self.image_transform = create_transform(
            input_size=(3, image.size, image.size), mean=image.mean, std=image.std,
            interpolation="bicubic", crop_pct=1.0, is_training=False,
        )  # fmt: skip
        self.mean = torch.tensor(image.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(image.std).view(1, 3, 1, 1)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # loaded lazily, inside each data worker
            self._tokenizer = load_tokenizer(self.config.tokenizer)
        return self._tokenizer

    def _bytes(self, sample: dict[str, bytes], field: str) -> bytes:
        """A media or feature field, refused (MediaTooLarge) over its byte limit before decoding."""
        limit = self.MAX_BYTES.get(field, "max_npy_bytes")
        return check_size(sample[field], field, getattr(self.limits, limit))

    MAX_BYTES = {"jpg": "max_image_bytes", "mp4": "max_video_bytes", "wav": "max_audio_bytes",
                 "flac": "max_audio_bytes", "mp3": "max_audio_bytes", "json": "max_json_bytes"}  # fmt: skip
    """Shard field -> its DataLimits byte limit (any other field: an `.npy`, `max_npy_bytes`)."""

    # ---- per-modality decoders: return the modality's tensors (present) or raise ----------------
    # KeyError means "the product lacks this modality" (absent, not counted); anything else is counted.
    @staticmethod
    def _string(meta: dict[str, Any], name: str, max_chars: int) -> str:
        value = meta.get(name)
        if value is None:
            raise KeyError(f"no {name}")
        if not isinstance(value, str):
            raise TypeError(f"{name} is a JSON {type(value).__name__}, not a string")
        # Cut before tokenising / parsing: their cost grows with the input, however little is kept.
        value = value[:max_chars].strip()
        if not value:
            raise KeyError(f"empty {name}")
        return value

    def text(self, meta: dict[str, Any], sample: dict[str, bytes]) -> dict[str, torch.Tensor]:
        title = self._string(meta, "title", self.limits.max_title_chars)
        encoded = self.tokenizer(title, max_length=self.config.text.max_tokens, truncation=True,
                                 padding="max_length", return_tensors="pt")  # fmt: skip
        return {"input_ids": encoded["input_ids"][0], "attention_mask": encoded["attention_mask"][0]}

    def table(self, meta: dict[str, Any], sample: dict[str, bytes]) -> dict[str, torch.Tensor]:
        config: TableConfig = self.config.table
        pairs = parse_table(self._string(meta, "table", self.limits.max_table_chars))[: config.max_pairs]
        if not pairs:  # a non-empty table string without one key#:#value pair is malformed
            raise ValueError("no well-formed property-value pair in the table")
        return tokenize_table(self.tokenizer, pairs, config.max_tokens)

    def image(self, meta: dict[str, Any], sample: dict[str, bytes]) -> dict[str, torch.Tensor]:
        if self.config.image.stem == "regions":
            if "boxes.npy" not in sample:
                raise ValueError("regions.npy without boxes.npy")
            regions, boxes = self._bytes(sample, "regions.npy"), self._bytes(sample, "boxes.npy")
            return decode_regions(regions, boxes, self.config.image)
        pixels = decode_image(self._bytes(sample, "jpg"), self.image_transform,
                              self.limits.max_image_pixels, self.config.image.size)  # fmt: skip
        return {"pixels": pixels}

    def video(self, meta: dict[str, Any], sample: dict[str, bytes]) -> dict[str, torch.Tensor]:
        if self.config.video.stem == "features":
            return decode_video_features(self._bytes(sample, "video.npy"), self.config.video)
        return {"frames": decode_video(self._bytes(sample, "mp4"), self.config.video, self.mean, self.std, self.limits)}

    def audio(self, meta: dict[str, Any], sample: dict[str, bytes]) -> dict[str, torch.Tensor]:
        if self.config.audio.stem == "features":
            fbank, length = decode_mel(self._bytes(sample, "mel.npy"), self.config.audio)
        else:
            field = self.field("audio", sample)
            fbank, length = decode_audio(self._bytes(sample, field), self.config.audio, self.limits.max_audio_seconds)
        return {"fbank": fbank, "length": torch.tensor(length)}

    def absent(self, modality: str) -> dict[str, torch.Tensor]:
        """Zeros of the modality's fixed shapes (what collation stacks for a missing modality)."""
        c = self.config
        if modality == "text":
            n = c.text.max_tokens
            return {"input_ids": torch.zeros(n, dtype=torch.long), "attention_mask": torch.zeros(n, dtype=torch.long)}
        if modality == "table":
            n = c.table.max_tokens
            zeros, minus = torch.zeros(n, dtype=torch.long), torch.full((n,), -1)
            return {"input_ids": zeros, "attention_mask": zeros.clone(), "entity_index": minus, "entity_role": minus.clone()}
        if modality == "image" and c.image.stem == "regions":
            n = c.image.max_regions
            return {"regions": torch.zeros(n, c.image.region_dim), "boxes": torch.zeros(n, 5),
                    "region_mask": torch.zeros(n, dtype=torch.bool)}  # fmt: skip
        if modality == "image":
            return {"pixels": torch.zeros(3, c.image.size, c.image.size)}
        if modality == "video" and c.video.stem == "features":
            n = c.video.frames
            return {"features": torch.zeros(n, c.video.feature_dim), "frame_mask": torch.zeros(n, dtype=torch.bool)}
        if modality == "video":
            return {"frames": torch.zeros(c.video.frames, 3, c.video.size, c.video.size)}
        if modality == "audio":
            return {"fbank": torch.zeros(c.audio.num_frames, c.audio.mel_bins), "length": torch.tensor(0)}
        raise KeyError(modality)

    MEDIA_FIELDS = {"image": ("jpg",), "video": ("mp4",), "audio": ("wav", "flac", "mp3")}
    """Media fields per modality; audio is whichever the sample has (the converter keeps a video's
    sound track as FLAC and MP3 files as they are), in this order of preference."""
    FEATURE_FIELD = {"image": "regions.npy", "video": "video.npy", "audio": "mel.npy"}
    FEATURE_STEMS = {"image": "regions", "video": "features", "audio": "features"}

    def fields(self, modality: str) -> tuple[str, ...]:
        """The shard fields a modality may be read from under its configured stem (empty: the JSON)."""
        if modality in self.FEATURE_STEMS and self.config.modality(modality).stem == self.FEATURE_STEMS[modality]:
            return (self.FEATURE_FIELD[modality],)
        return self.MEDIA_FIELDS.get(modality, ())

    def shard_fields(self) -> set[str]:
        """Every shard field this decoder may read: the stream does not read the others' bytes
        (a text-only model need not read 2 MB of video per sample)."""
        wanted = {"json"}.union(*(self.fields(m) for m in self.modalities))
        return wanted | {"boxes.npy"} if "regions.npy" in wanted else wanted

    def field(self, modality: str, sample: dict[str, Any] | None = None) -> str | None:
        """The shard field a modality is read from (None: the JSON). With `sample`: the first of
        `fields(modality)` the sample has (None if it has none: the modality is missing)."""
        fields = self.fields(modality)
        if sample is not None:
            return next((field for field in fields if field in sample), None)
        return fields[0] if fields else None

    def _present_in(self, modality: str, sample: dict[str, Any]) -> bool:
        fields = self.fields(modality)
        return not fields or any(field in sample for field in fields)

    def _meta(self, sample: dict[str, Any]) -> dict[str, Any]:
        meta = json.loads(self._bytes(sample, "json"))
        if not isinstance(meta, dict):
            raise ValueError(f"the record is a JSON {type(meta).__name__}, not an object")
        return meta

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        self.samples += 1
        self._sample_bad = False
        try:
            return self._decode(sample)
        finally:
            self._sample_bad = None

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = str(sample.get("__key__", "?"))
        try:
            meta = self._meta(sample)
        except Exception as error:  # no record, too large, not JSON, not an object: nothing to label it by
            self.count_error(self._kind("json", error), key, error)  # counted as json, not in `dropped`
            return None
        decoded: dict[str, Any] = {"key": key, "category": category_label(meta.get("category")),
                                   "instance": str(meta.get("instance", key))}  # fmt: skip
        any_present = False
        for modality in self.modalities:
            value = None
            if self._present_in(modality, sample):
                try:
                    value = getattr(self, modality)(meta, sample)
                except KeyError:
                    value = None  # the product simply lacks this modality: not an error
                except Exception as error:
                    self.count_error(self._kind(modality, error), key, error)
            present = value is not None
            any_present |= present
            decoded[modality] = {**(value if present else self.absent(modality)), "present": torch.tensor(present)}
        if not any_present:
            self.dropped += 1
            return None
        return decoded

    @staticmethod
    def _kind(modality: str, error: Exception) -> str:
        """`<modality>: too large` / `<modality>: timeout` for limits, else the modality."""
        if isinstance(error, MediaTooLarge):
            return f"{modality}: too large"
        if isinstance(error, TimeoutError):
            return f"{modality}: timeout"
        return modality

    # ---- error counting and the error-rate stop -------------------------------------------------
    def count_error(self, kind: str, key: str, error: Exception | str) -> None:
        """Count one error of `kind` (`"image"`, `"video: timeout"`, `"tar"`, ...) for sample or
        shard `key`, warn at a limited rate, then enforce `limits.max_error_rate`.

        A sub-kind `"<kind>: <detail>"` also counts under `<kind>`, so `errors[modality]` counts
        every failure of that modality. Called while a sample is decoded, it marks that sample bad
        (once, however many errors it has); called from outside (the stream, e.g. a truncated tar
        shard) it counts as one sample of its own, and a bad one."""
        base = kind.partition(": ")[0]
        self.errors[base] += 1
        if kind != base:
            self.errors[kind] += 1
        if self._sample_bad is None:
            self.samples += 1
            self.bad_samples += 1
        elif not self._sample_bad:
            self._sample_bad = True
            self.bad_samples += 1
        count = self.errors[kind]
        if count == 1 or count % self.warn_every == 0:
            detail = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
            log.warning("%s: %s unusable (%.300s); %d %s errors so far", key, kind, detail, count, kind)
        self.check_error_rate()

    def check_error_rate(self) -> None:
        """Raise DataErrorRateExceeded when, after `error_rate_min_samples` samples, more than
        `max_error_rate` of them had an error."""
        limits = self.limits
        if self.samples < limits.error_rate_min_samples or self.bad_samples <= limits.max_error_rate * self.samples:
            return
        kinds = ", ".join(f"{kind}={count}" for kind, count in sorted(self.errors.items()))
        raise DataErrorRateExceeded(
            f"{self.bad_samples} of {self.samples} samples ({self.bad_samples / self.samples:.1%}) read by this "
            f"data worker had errors, over data.limits.max_error_rate={limits.max_error_rate:g} (errors: {kinds}); "
            f"fix or remove the bad shards, or raise data.limits.max_error_rate (1.0 never stops)"
        )
