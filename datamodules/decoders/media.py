"""Media bytes (JPEG, MP4, WAV/FLAC/MP3) -> fixed-shape tensors, refusing what is over a limit.

Each function reads the header first and raises `MediaTooLarge` over a limit before decoding (a
30000 x 30000 JPEG header on a 50-KB file must not allocate 2.7 GB); anything unreadable raises
another exception. The caller (`SampleDecoder`) turns either into an absent modality, counted.
"""

from __future__ import annotations

import io
import math

import soundfile
import torch
import torchaudio
from PIL import Image

from datamodules.limits import DataLimits
from datamodules.video_reader import MediaTooLarge, read_frames
from scale.config import AudioConfig, VideoConfig

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
"""Image formats PIL may open: product photos, not every format PIL has a (less-tested) decoder for."""


def check_size(data: bytes, name: str, limit: int) -> bytes:
    """`data`, or MediaTooLarge when it has more than `limit` bytes (checked before any decoding)."""
    if len(data) > limit:
        raise MediaTooLarge(f"{name}: {len(data)} bytes, over the {limit}-byte limit")
    return data


def decode_image(data: bytes, transform, max_pixels: int | None = None, size: int | None = None) -> torch.Tensor:
    """Image bytes -> the transformed tensor. `Image.open` reads the header only, so `max_pixels` is
    checked before a pixel is decoded; `size` lets a JPEG decode at 1/2, 1/4 or 1/8 scale (DCT
    scaling, much faster) while staying at least size x size for the transform's resize."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:  # PIL's own check, at 2x Image.MAX_IMAGE_PIXELS
        raise MediaTooLarge(str(error)) from None
    with image:
        width, height = image.size
        # Our own check: PIL only warns between MAX_IMAGE_PIXELS and twice that.
        if max_pixels is not None and width * height > max_pixels:
            raise MediaTooLarge(f"image {width}x{height} is over max_image_pixels={max_pixels}")
        if size is not None:
            image.draft("RGB", (size, size))  # no-op for formats other than JPEG
        return transform(image.convert("RGB"))  # a truncated or corrupt file raises here


def decode_video(
    data: bytes, config: VideoConfig, mean: torch.Tensor, std: torch.Tensor, limits: DataLimits | None = None
) -> torch.Tensor:
    """MP4 bytes -> (frames, 3, size, size) normalised; under `limits`' time and header limits."""
    header = {}
    if limits is not None:
        header = dict(timeout_s=limits.video_timeout_s, max_pixels=limits.max_video_pixels,
                      max_seconds=limits.max_video_seconds)  # fmt: skip
    frames = torch.from_numpy(read_frames(data, config.frames, config.size, **header))  # (T, S, S, 3) uint8
    return (frames.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


# Sanity bounds on audio headers (decoded size is seconds x rate x channels): beyond any product audio.
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 16


def decode_audio(data: bytes, config: AudioConfig, max_seconds: float | None = None) -> tuple[torch.Tensor, int]:
    """WAV/FLAC/MP3/OGG bytes -> (normalised fbank (num_frames, mel_bins), valid frame count).
    Only the first `config.seconds` are decoded; empty or sub-window audio raises ValueError."""
    with soundfile.SoundFile(io.BytesIO(data)) as sound:
        rate, channels = sound.samplerate, sound.channels
        if not 0 < rate <= MAX_SAMPLE_RATE or not 0 < channels <= MAX_CHANNELS:
            raise ValueError(f"audio header: {rate} Hz, {channels} channels")
        if max_seconds is not None and sound.frames / rate > max_seconds:
            raise MediaTooLarge(f"audio of {sound.frames / rate:.0f} s is over max_audio_seconds={max_seconds:g}")
        wave = sound.read(frames=math.ceil(config.seconds * rate), dtype="float32", always_2d=True)
    wave = torch.from_numpy(wave.mean(axis=1))  # mono
    if rate != config.sample_rate and wave.numel():
        wave = torchaudio.functional.resample(wave, rate, config.sample_rate)
    wave = wave[: int(round(config.seconds * config.sample_rate))]
    if wave.numel() < int(0.025 * config.sample_rate):
        raise ValueError(f"audio of {wave.numel()} samples is shorter than one 25-ms window")
    fbank = torchaudio.compliance.kaldi.fbank(
        wave[None], sample_frequency=config.sample_rate, num_mel_bins=config.mel_bins,
        htk_compat=True, window_type="hanning", use_energy=False, dither=0.0, frame_shift=10.0,
    )  # fmt: skip
    fbank = (fbank - config.norm_mean) / config.norm_std
    length = fbank.shape[0]
    padded = torch.zeros(config.num_frames, config.mel_bins)
    padded[:length] = fbank[: config.num_frames]
    return padded, min(length, config.num_frames)
