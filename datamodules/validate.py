"""Check every file of a product once, when its shard is written, so training never meets it broken.

Each check reads the header first and refuses on the limits of `DataLimits` *before* decoding, then
decodes the least that proves the file usable:

- JPEG (PIL): width x height from the header against `max_image_pixels` (a decompression bomb is
  a small file with a huge header), then a 1/8-scale decode (`Image.draft`) that still reads every
  entropy-coded byte, so truncation is caught at a fraction of the cost of a full decode.
- MP4 (PyAV): a video stream exists, its frame size and the duration are within limits, and the
  first frame decodes.
- Audio (soundfile: wav, flac, mp3): at least one frame (zero-length audio is unusable) and the
  duration within limits.
- `.npy`: the header alone says dtype and shape; object arrays (which need pickle) and non-numeric
  dtypes are refused, the data must be as long as the header says, and it is loaded with
  `allow_pickle=False` and must be finite and two-dimensional.
- Title and table: strings. A title over `max_title_chars` is cut; a table over `max_table_chars`
  is cut at a pair boundary; a table with no `key#:#value` pair is dropped (one with some malformed
  pairs is kept: the decoder skips those pairs).

A failed check drops that file (one `item` naming the product, modality, field, reason code and a
human detail). A product keeps every modality that still has a usable file; a product with none
left is skipped. The reason codes are the report's counting keys.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.limits import DataLimits
from datamodules.video_reader import read_frames
from datamodules.sources import AUDIO_FROM_VIDEO, FIELD_TABLE, FILE_FIELDS, TABLE_PAIR_SEPARATOR, parse_table

AUDIO_RATE = 16000
MEMBER_MODALITY = {e: FIELD_TABLE[f].modality for f in FILE_FIELDS for e in FIELD_TABLE[f].extensions.values()}
MEMBER_MODALITY[AUDIO_FROM_VIDEO] = "audio"
"""Shard member extension -> the modality it carries."""
"""Audio taken from a video's sound track is resampled to this rate, mono (M5Product's audio rate)."""


class Unusable(Exception):
    """A file or field that must not go into a shard: `reason` is a short code, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def size_limit(field_name: str, limits: DataLimits) -> int:
    """Largest file accepted for a file field (checked from `stat`, before the file is read)."""
    if field_name in ("image", "video", "audio"):
        return getattr(limits, f"max_{field_name}_bytes")
    return limits.max_npy_bytes


def check_image(data: bytes, limits: DataLimits) -> None:
    from PIL import Image

    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # ours replaces PIL's own bomb check
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format != "JPEG":
                    raise Unusable("not_jpeg", f"a {image.format} image, not a JPEG")
                width, height = image.size
                if width * height > limits.max_image_pixels:
                    raise Unusable("too_many_pixels", f"{width}x{height} pixels, over max_image_pixels={limits.max_image_pixels}")
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
    except Unusable:
        raise
    except Exception as error:  # PIL raises many types for bad bytes; each means "not usable"
        raise Unusable("truncated" if "truncated" in str(error) else "corrupt", f"JPEG: {error}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def check_video(data: bytes, limits: DataLimits) -> None:
    import av

    try:
        with av.open(io.BytesIO(data), metadata_errors="ignore") as container:
            if not container.streams.video:
                raise Unusable("no_video_stream", "no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > limits.max_video_pixels:
                raise Unusable("too_many_pixels", f"{width}x{height} video, over max_video_pixels={limits.max_video_pixels}")
            seconds = _seconds(container, stream)
            if seconds is not None and seconds > limits.max_video_seconds:
                raise Unusable("too_long", f"{seconds:.0f} s, over max_video_seconds={limits.max_video_seconds:g}")
        # A frame must decode, and under the time limit: the decode runs in video_reader's helper
        # process, killed past `video_timeout_s`, so a file that hangs the decoder cannot stall a
        # conversion worker (the header read above does not decode).
        read_frames(data, 1, 16, backend="pyav", timeout_s=limits.video_timeout_s)
    except Unusable:
        raise
    except TimeoutError as error:
        raise Unusable("timeout", f"MP4: {error}") from None
    except Exception as error:  # av.FFmpegError and friends
        raise Unusable("corrupt", f"MP4: {error}") from None


def _seconds(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration is not None else None


def check_audio(data: bytes, limits: DataLimits) -> None:
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception as error:  # soundfile.LibsndfileError, RuntimeError on unknown formats
        raise Unusable("corrupt", f"audio: {error}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise Unusable("empty", "zero-length audio")
    seconds = info.frames / info.samplerate
    if seconds > limits.max_audio_seconds:
        raise Unusable("too_long", f"{seconds:.0f} s, over max_audio_seconds={limits.max_audio_seconds:g}")


def check_npy(data: bytes, limits: DataLimits) -> np.ndarray:
    """The array, loaded without pickle, once its header has been found acceptable."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    except Exception as error:  # not a .npy (a zip, a pickle stream, text)
        raise Unusable("corrupt", f"not a .npy array ({error})") from None
    if dtype.hasobject:
        raise Unusable("object_dtype", f"dtype {dtype} holds Python objects (loading needs pickle)")
    if dtype.kind not in "iuf":
        raise Unusable("not_numeric", f"dtype {dtype} is not numeric")
    if len(shape) != 2 or 0 in shape:
        raise Unusable("bad_shape", f"shape {shape}, expected a non-empty 2-D array")
    if len(data) - stream.tell() < math.prod(shape) * dtype.itemsize:
        raise Unusable("truncated", f"{len(data) - stream.tell()} data bytes, the header says {shape} {dtype}")
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if not np.isfinite(array).all():
        raise Unusable("not_finite", "NaN or infinite values")
    return array


def probe_audio_track(path: str) -> float | None:
    """Seconds of the first audio stream of a video (None: no audio stream, or unreadable)."""
    import av

    try:
        with av.open(path, metadata_errors="ignore") as container:
            if not container.streams.audio:
                return None
            return _seconds(container, container.streams.audio[0]) or 0.0
    except Exception:  # an unreadable video is reported when it is checked, not here
        return None


def flac_bound(seconds: float) -> int:
    """Upper bound on the FLAC bytes of `seconds` of 16-bit mono audio (verbatim worst case + headers)."""
    return int(seconds * AUDIO_RATE * 2 * 1.05) + 8192


def audio_from_video(data: bytes, max_seconds: float) -> bytes | None:
    """The video's first audio track as 16 kHz mono FLAC, at most `max_seconds` long (None: no track)."""
    import av
    import soundfile

    chunks, total, limit = [], 0, int(max_seconds * AUDIO_RATE)
    try:
        with av.open(io.BytesIO(data), metadata_errors="ignore") as container:
            if not container.streams.audio:
                return None
            resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += len(chunks[-1])
                if total >= limit:
                    break
            else:
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except Exception as error:
        raise Unusable("corrupt", f"audio track of the MP4: {error}") from None
    wave = np.concatenate(chunks)[:limit] if chunks else np.zeros(0, np.int16)
    if len(wave) == 0:
        raise Unusable("empty", "the MP4's audio track has no samples")
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, AUDIO_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def table_pairs(table: str) -> tuple[int, int]:
    """(valid, malformed) `key#:#value` pairs of an M5Product table string."""
    valid = len(parse_table(table))
    return valid, sum(1 for item in table.split(TABLE_PAIR_SEPARATOR) if item.strip()) - valid


def check_text(meta: dict[str, Any], limits: DataLimits, note) -> set[str]:
    """Fix title and table in `meta` in place (cut, or removed when unusable); returns the usable
    modalities among text and table. `note(modality, field, reason, detail, action)` records what was done."""
    usable = set()
    for name, modality, cap in (("title", "text", limits.max_title_chars), ("table", "table", limits.max_table_chars)):
        value = meta.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            note(modality, name, "not_string", f"a JSON {type(value).__name__}, not a string", "dropped")
            del meta[name]  # removed, not blanked: the record only shrinks (the plan's byte bound)
            continue
        if len(value) > cap:
            cut = value[:cap]
            if name == "table" and TABLE_PAIR_SEPARATOR in cut:
                cut = cut[: cut.rindex(TABLE_PAIR_SEPARATOR)]  # never half a pair
            note(modality, name, "cut", f"{len(value)} characters cut to {len(cut)} (max_{name}_chars={cap})", "cut")
            meta[name] = value = cut
        if name == "table":
            valid, malformed = table_pairs(value)
            if not valid:
                note(modality, name, "malformed", f"no key#:#value pair in {value[:60]!r}", "dropped")
                del meta[name]
                continue
            if malformed:
                note(modality, name, "malformed_pairs", f"{malformed} malformed pair(s) skipped, {valid} kept", "kept")
        if value.strip():
            usable.add(modality)
    return usable


def check_product(entry: dict[str, Any], limits: DataLimits) -> tuple[dict[str, bytes] | None, list[dict]]:
    """A planned product -> its shard members (`{"json": ..., "jpg": ..., ...}`, None when nothing
    is usable) and the items to report. `entry` is a plan line: id, meta, files {field: [path,
    extension]}, audio_seconds (reserved for audio from the video track), notes (from planning)."""
    items = list(entry.get("notes", []))

    def note(modality: str, field_name: str, reason: str, detail: str, action: str = "dropped") -> None:
        items.append({"id": entry["id"], "modality": modality, "field": field_name, "reason": reason,
                      "detail": detail, "action": action})

    meta = dict(entry["meta"])
    present = check_text(meta, limits, note)
    members: dict[str, bytes] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, (path, extension) in entry["files"].items():
        modality = FIELD_TABLE[name].modality
        try:
            data = Path(path).read_bytes()
            if len(data) > size_limit(name, limits):  # the plan checked stat(); the file may have grown
                raise Unusable("too_large", f"{len(data)} bytes, over the {name} limit {size_limit(name, limits)}")
            if name == "image":
                check_image(data, limits)
            elif name == "video":
                check_video(data, limits)
            elif name == "audio":
                check_audio(data, limits)
            else:
                arrays[name] = check_npy(data, limits)
            members[extension] = data
        except OSError as error:
            note(modality, name, "unreadable", f"{path}: {error.strerror or error}")
        except Unusable as error:
            note(modality, name, error.reason, f"{Path(path).name}: {error.detail}")
    _pair_regions_and_boxes(entry, members, arrays, note)
    if entry.get("audio_seconds") is not None and "mp4" in members and not any(
            e in members for e in FIELD_TABLE["audio"].extensions.values()):
        try:
            flac = audio_from_video(members["mp4"], entry["audio_seconds"])
            if flac is not None:
                members[AUDIO_FROM_VIDEO] = flac
                note("audio", "audio", "from_video", f"{len(flac)} bytes of FLAC from the MP4's audio track", "added")
        except Unusable as error:
            note("audio", "audio", error.reason, error.detail)
    present |= {MEMBER_MODALITY[e] for e in members}
    if not present:
        note("*", "*", "no_usable_modality", "no usable modality left: product skipped", "skipped")
        return None, items
    ordered = {"json": json.dumps(meta).encode()}
    for f in FILE_FIELDS:  # shard member order: media, then features (FIELD_TABLE order)
        for e in FIELD_TABLE[f].extensions.values():
            if e in members:
                ordered[e] = members.pop(e)
    ordered.update(members)  # the FLAC taken from the video
    return ordered, items


def _pair_regions_and_boxes(entry: dict, members: dict[str, bytes], arrays: dict[str, np.ndarray], note) -> None:
    """Region features are unusable without their boxes (and the reverse), and must have as many rows."""
    regions, boxes = arrays.get("image_regions"), arrays.get("image_boxes")
    problem = None
    if boxes is not None and boxes.shape[1] != 5:
        problem = ("bad_shape", f"boxes shape {boxes.shape}, expected (R, 5)")
    elif regions is not None and boxes is not None and len(regions) != len(boxes):
        problem = ("bad_shape", f"{len(regions)} regions but {len(boxes)} boxes")
    elif (regions is None) != (boxes is None) and ("regions.npy" in members or "boxes.npy" in members):
        problem = ("unpaired", "region features and boxes come together; the other one is missing or unusable")
    if problem:
        for name, extension in (("image_regions", "regions.npy"), ("image_boxes", "boxes.npy")):
            if members.pop(extension, None) is not None:
                note("image", name, *problem)
