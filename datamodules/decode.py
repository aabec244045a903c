"""Bytes -> tensors: one function per modality, and `SampleDecoder` that applies them to a shard sample.

Every modality tensor has a fixed shape (set by the model config), so collation is a stack and the
model sees static shapes. A modality that is missing from the sample, or whose bytes fail to
decode, becomes *absent*: zeros plus `present=False`. A failure is counted per kind and warned about
at a limited rate; it never stops training. A sample with no usable modality is dropped.

Each of image, video and audio has two input stems (`<modality>.stem` in the model config): the
media file (JPEG, MP4, WAV) or M5Product's pre-extracted features as `.npy` arrays:

    stem                 shard fields               decoded tensors (fixed shapes)
    image.regions        regions.npy (R, region_dim) regions (max_regions, region_dim) float32,
                         boxes.npy (R, 5)            boxes (max_regions, 5), region_mask (max_regions,) bool
    video.features       video.npy (T, feature_dim)  features (frames, feature_dim), frame_mask (frames,) bool
    audio.features       mel.npy (mel_bins, T)       fbank (feature_frames, mel_bins) normalised, length

Longer arrays are cut (first regions / clips / frames), shorter ones zero-padded and masked.

Shards never execute code: only JSON, JPEG, MP4, WAV and `.npy` are read, with explicit decoders
(no webdataset auto-decoding, whose defaults include pickle). `.npy` files are loaded with
`allow_pickle=False` and must hold a finite numeric array of the expected shape: an object array
(which would need unpickling), a wrong shape or a NaN makes the modality absent, counted like
corrupt media.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from typing import Any

import numpy as np
import soundfile
import torch
import torchaudio
from PIL import Image
from timm.data import create_transform

from scale.config import AudioConfig, ImageConfig, ModelConfig, TableConfig, VideoConfig
from scale.pretrained_paths import load_tokenizer
from datamodules.video_reader import read_frames

log = logging.getLogger(__name__)

TABLE_PAIR_SEPARATOR = "#;#"
TABLE_KEY_VALUE_SEPARATOR = "#:#"


def parse_table(table: str) -> list[tuple[str, str]]:
    """M5Product's `key#:#value#;#key#:#value` -> [(key, value)]; malformed pairs are skipped."""
    pairs = []
    for item in table.split(TABLE_PAIR_SEPARATOR):
        key, sep, value = item.partition(TABLE_KEY_VALUE_SEPARATOR)
        if sep and key.strip() and value.strip():
            pairs.append((key.strip(), value.strip()))
    return pairs


NPY_MAGIC = b"\x93NUMPY"


def load_npy(data: bytes, name: str, dims: int, shape: tuple[int | None, ...]) -> np.ndarray:
    """`.npy` bytes -> a finite float32 array of `dims` dimensions whose sizes match `shape`
    (None: any size >= 1). Never unpickles: object arrays are refused by `allow_pickle=False`."""
    if not data.startswith(NPY_MAGIC):  # np.load would also accept a zip (.npz) or a pickle stream
        raise ValueError(f"{name}: not a .npy array")
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{name}: dtype {array.dtype} is not numeric")
    if array.ndim != dims or any(want is not None and got != want for got, want in zip(array.shape, shape)):
        expected = " x ".join("N" if want is None else str(want) for want in shape)
        raise ValueError(f"{name}: shape {array.shape}, expected {expected}")
    if 0 in array.shape:
        raise ValueError(f"{name}: empty array {array.shape}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: non-finite values")
    return array


def _pad(array: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First `length` rows of `array`, zero-padded; and the (length,) mask of real rows."""
    rows = min(len(array), length)
    padded = torch.zeros(length, *array.shape[1:])
    padded[:rows] = torch.from_numpy(array[:rows])
    return padded, torch.arange(length) < rows


def decode_regions(regions: bytes, boxes: bytes, config: ImageConfig) -> dict[str, torch.Tensor]:
    """Region features (R, region_dim) and boxes (R, 5) -> fixed `max_regions` slots with a mask."""
    features = load_npy(regions, "regions.npy", 2, (None, config.region_dim))
    box = load_npy(boxes, "boxes.npy", 2, (len(features), 5))
    features, mask = _pad(features, config.max_regions)
    return {"regions": features, "boxes": _pad(box, config.max_regions)[0], "region_mask": mask}


def decode_video_features(data: bytes, config: VideoConfig) -> dict[str, torch.Tensor]:
    """Per-second clip features (T, feature_dim) -> the first `frames` clips with a mask."""
    features, mask = _pad(load_npy(data, "video.npy", 2, (None, config.feature_dim)), config.frames)
    return {"features": features, "frame_mask": mask}


def decode_mel(data: bytes, config: AudioConfig) -> tuple[torch.Tensor, int]:
    """Log-mel spectrogram (mel_bins, T) -> (normalised frames (feature_frames, mel_bins), valid count)."""
    mel = load_npy(data, "mel.npy", 2, (config.mel_bins, None)).T
    frames, mask = _pad((mel - config.norm_mean) / config.norm_std, config.feature_frames)
    return frames, int(mask.sum())


def decode_image(data: bytes, transform) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        return transform(image.convert("RGB"))


def decode_video(data: bytes, config: VideoConfig, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    frames = torch.from_numpy(read_frames(data, config.frames, config.size))  # (T, S, S, 3) uint8
    return (frames.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def decode_audio(data: bytes, config: AudioConfig) -> tuple[torch.Tensor, int]:
    """WAV/FLAC/OGG bytes -> (normalised fbank (num_frames, mel_bins), valid frame count)."""
    wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    wave = torch.from_numpy(wave.mean(axis=1))  # mono
    if rate != config.sample_rate:
        wave = torchaudio.functional.resample(wave, rate, config.sample_rate)
    wave = wave[: int(round(config.seconds * config.sample_rate))]
    if wave.numel() < int(0.025 * config.sample_rate):
        raise ValueError("audio shorter than one 25-ms window")
    fbank = torchaudio.compliance.kaldi.fbank(
        wave[None], sample_frequency=config.sample_rate, num_mel_bins=config.mel_bins,
        htk_compat=True, window_type="hanning", use_energy=False, dither=0.0, frame_shift=10.0,
    )  # fmt: skip
    fbank = (fbank - config.norm_mean) / config.norm_std
    length = fbank.shape[0]
    padded = torch.zeros(config.num_frames, config.mel_bins)
    padded[:length] = fbank[: config.num_frames]
    return padded, min(length, config.num_frames)


class SampleDecoder:
    """Turns one raw shard sample (`{"__key__", "json", "jpg", "mp4", "wav", "regions.npy", ...}` of
    bytes) into tensors, reading for each modality the field of its configured stem."""

    def __init__(self, config: ModelConfig, warn_every: int = 100):
        self.config = config
        self.modalities = list(config.modalities)
        self.errors: Counter[str] = Counter()
        self.dropped = 0
        self.warn_every = warn_every
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

    # ---- per-modality decoders: return the modality's tensors (present) or raise ----------------
    def text(self, meta: dict[str, Any], sample: dict[str, bytes]) -> dict[str, torch.Tensor]:
        title = str(meta.get("title") or "").strip()
        if not title:
            raise KeyError("empty title")
        encoded = self.tokenizer(title, max_length=self.config.text.max_tokens, truncation=True,
                                 padding="max_length", return_tensors="pt")  # fmt: skip
        return {"input_ids": encoded["input_ids"][0], "attention_mask": encoded["attention_mask"][0]}

    def table(self, meta: dict[str, Any], sample: dict[str, bytes]) -> dict[str, torch.Tensor]:
        config: TableConfig = self.config.table
        pairs = parse_table(str(meta.get("table") or ""))[: config.max_pairs]
        if not pairs:
            raise KeyError("no property-value pair")
        pieces = self.tokenizer([text for pair in pairs for text in pair], add_special_tokens=False)["input_ids"]
        tok = self.tokenizer
        ids, entity, role = [tok.cls_token_id], [-1], [-1]
        for index, piece in enumerate(pieces):
            ids += piece
            entity += [index // 2] * len(piece)
            role += [index % 2] * len(piece)
        limit = config.max_tokens - 1
        ids, entity, role = ids[:limit] + [tok.sep_token_id], entity[:limit] + [-1], role[:limit] + [-1]
        pad = config.max_tokens - len(ids)
        return {
            "input_ids": torch.tensor(ids + [tok.pad_token_id] * pad),
            "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
            "entity_index": torch.tensor(entity + [-1] * pad),
            "entity_role": torch.tensor(role + [-1] * pad),
        }

    def image(self, meta: dict[str, Any], sample: dict[str, bytes]) -> dict[str, torch.Tensor]:
        if self.config.image.stem == "regions":
            if "boxes.npy" not in sample:
                raise ValueError("regions.npy without boxes.npy")
            return decode_regions(sample["regions.npy"], sample["boxes.npy"], self.config.image)
        return {"pixels": decode_image(sample["jpg"], self.image_transform)}

    def video(self, meta: dict[str, Any], sample: dict[str, bytes]) -> dict[str, torch.Tensor]:
        if self.config.video.stem == "features":
            return decode_video_features(sample["video.npy"], self.config.video)
        return {"frames": decode_video(sample["mp4"], self.config.video, self.mean, self.std)}

    def audio(self, meta: dict[str, Any], sample: dict[str, bytes]) -> dict[str, torch.Tensor]:
        if self.config.audio.stem == "features":
            fbank, length = decode_mel(sample["mel.npy"], self.config.audio)
        else:
            fbank, length = decode_audio(sample["wav"], self.config.audio)
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

    MEDIA_FIELD = {"image": "jpg", "video": "mp4", "audio": "wav"}
    FEATURE_FIELD = {"image": "regions.npy", "video": "video.npy", "audio": "mel.npy"}
    FEATURE_STEMS = {"image": "regions", "video": "features", "audio": "features"}

    def field(self, modality: str) -> str | None:
        """The shard field a modality is read from under its configured stem (None: the JSON)."""
        if modality in self.FEATURE_STEMS and self.config.modality(modality).stem == self.FEATURE_STEMS[modality]:
            return self.FEATURE_FIELD[modality]
        return self.MEDIA_FIELD.get(modality)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = sample.get("__key__", "?")
        try:
            meta = json.loads(sample["json"])
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except Exception as error:
            self._count("json", key, error)
            return None
        decoded: dict[str, Any] = {
            "key": key,
            "category": int(meta.get("category", -1)),
            "instance": str(meta.get("instance", key)),
        }
        any_present = False
        for modality in self.modalities:
            media = self.field(modality)
            value = None
            if media is None or media in sample:
                try:
                    value = getattr(self, modality)(meta, sample)
                except KeyError:
                    value = None  # the product simply lacks this modality: not an error
                except Exception as error:
                    self._count(modality, key, error)
            present = value is not None
            any_present |= present
            decoded[modality] = {**(value if present else self.absent(modality)), "present": torch.tensor(present)}
        if not any_present:
            self.dropped += 1
            return None
        return decoded

    def _count(self, kind: str, key: str, error: Exception) -> None:
        self.errors[kind] += 1
        if self.errors[kind] == 1 or self.errors[kind] % self.warn_every == 0:
            log.warning("sample %s: %s unusable (%s: %s); %d %s errors so far", key, kind,
                        type(error).__name__, error, self.errors[kind], kind)  # fmt: skip
