"""Audio bytes (WAV, FLAC, MP3) through soundfile, and the sound track of an MP4 through PyAV.

`read_header` is the one gate the converter (`check_audio`) and the loader (`read_pcm16`) share: a
sane sample rate and channel count, at least one frame, and a duration within `max_audio_seconds`,
all from the header, before a sample is decoded.
"""

from __future__ import annotations

import functools
import io
import math
from typing import TYPE_CHECKING

import numpy as np
import soundfile

from scale.media import MediaError, MediaTooLarge

if TYPE_CHECKING:
    import torch

MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 16
"""Sanity bounds on audio headers (decoded size is seconds x rate x channels): beyond any product audio."""
TRACK_RATE = 16_000
"""Audio taken from a video's sound track is resampled to this rate, mono (M5Product's audio rate)."""


def read_header(sound: soundfile.SoundFile, max_seconds: float | None) -> float:
    """Seconds of an open file whose header is usable and within `max_seconds`."""
    rate, channels = sound.samplerate, sound.channels
    if not 0 < rate <= MAX_SAMPLE_RATE or not 0 < channels <= MAX_CHANNELS:
        raise MediaError(f"audio header: {rate} Hz, {channels} channels", "corrupt")
    if sound.frames <= 0:
        raise MediaError("zero-length audio", "empty")
    seconds = sound.frames / rate
    if max_seconds is not None and seconds > max_seconds:
        raise MediaTooLarge(f"audio of {seconds:.0f} s is over max_audio_seconds={max_seconds:g}", "too_long")
    return seconds


def _open(data: bytes) -> soundfile.SoundFile:
    try:
        return soundfile.SoundFile(io.BytesIO(data))
    except Exception as error:  # soundfile.LibsndfileError, RuntimeError on unknown formats
        raise MediaError(f"audio: {error}", "corrupt") from None


def check_audio(data: bytes, limits) -> None:
    """The converter's check: the header (`read_header`) under `limits.max_audio_seconds`."""
    with _open(data) as sound:
        read_header(sound, limits.max_audio_seconds)


PCM16_SCALE = 32768
"""Full scale of a 16-bit sample: a float wave in [-1, 1) is the 16-bit one over this (exactly:
a power of two)."""
PCM16_SUBTYPES = frozenset({"PCM_16"})
"""libsndfile subtypes stored as 16-bit integers (WAV and FLAC at 16 bits; M5Product's clips and the
converter's sound tracks)."""


def read_pcm16(data: bytes, seconds: float, rate: int, max_seconds: float | None = None) -> "torch.Tensor":
    """The first `seconds` of the audio (only those are decoded) as mono 16-bit samples (int16) at
    `rate`: half the bytes of a float32 wave for the data workers to hand over.

    A 16-bit mono file at `rate` (the usual product clip, and the converter's sound tracks) is read
    as it is stored: losslessly, and without a float pass (a 12-s WAV in 0.19 ms against 0.8).
    Anything else (MP3, 24-bit or float files, stereo, another rate) is decoded to float, mixed to
    mono, resampled, and rounded to 16 bits, clipped at full scale: within 2**-16 of its float
    wave, far under the resolution of a log-mel bin.
    """
    import torch  # the loader's; the converter's checks need neither torch nor torchaudio
    import torchaudio

    with _open(data) as sound:
        read_header(sound, max_seconds)
        native = sound.samplerate
        as_stored = sound.subtype in PCM16_SUBTYPES and sound.channels == 1 and native == rate
        wave = sound.read(frames=math.ceil(seconds * native), dtype="int16" if as_stored else "float32", always_2d=True)
    keep = int(round(seconds * rate))
    if as_stored:
        return torch.from_numpy(wave[:keep, 0])
    # A mono file is its one column: averaging it would cost a pass.
    wave = torch.from_numpy(wave[:, 0] if wave.shape[1] == 1 else wave.mean(axis=1))
    if native != rate and wave.numel():
        wave = torchaudio.functional.resample(wave, native, rate)
    return to_pcm16(wave[:keep])


def to_pcm16(wave: "torch.Tensor") -> "torch.Tensor":
    """A float wave in [-1, 1) -> int16 samples, rounded, clipped at full scale."""
    import torch

    return wave.mul(PCM16_SCALE).round_().clamp_(-PCM16_SCALE, PCM16_SCALE - 1).to(torch.int16)


def from_pcm16(samples: "torch.Tensor") -> "torch.Tensor":
    """int16 samples -> the float32 wave in [-1, 1) (exact: `to_pcm16`'s inverse on 16-bit waves)."""
    import torch

    return samples.to(torch.float32).div_(PCM16_SCALE)


def fbank_window(sample_rate: int) -> tuple[int, int]:
    """`KaldiFbank`'s window and shift in samples: 25 ms and 10 ms."""
    return int(0.025 * sample_rate), int(0.010 * sample_rate)


def fbank_frames(samples: "torch.Tensor | int", sample_rate: int) -> "torch.Tensor | int":
    """`KaldiFbank` frames of `samples` samples (snip edges: none under one window); an int or a
    tensor of counts."""
    window, shift = fbank_window(sample_rate)
    if isinstance(samples, int):
        return 1 + (samples - window) // shift if samples >= window else 0
    import torch

    return torch.where(samples >= window, 1 + (samples - window) // shift, 0)


class KaldiFbank:
    """`torchaudio.compliance.kaldi.fbank` at the settings AST and SCALE use (25-ms Hann window,
    10-ms shift, snip edges, DC offset removed, pre-emphasis 0.97, power spectrum over a
    power-of-two FFT, log mel energies, no energy column, no dither), equal to it within float
    rounding (tests/test_audio_fbank.py).

    Hand-written because torchaudio's function rebuilds the window and the mel filterbank on every
    call, computes a log energy it then drops, and squares the complex magnitude (`abs().pow(2)`);
    together about two thirds of its time on a 12-s clip, and the fbank was the largest part of a
    product's decode. The filterbank itself is still torchaudio's (`get_mel_banks`), built once.
    """

    PREEMPHASIS = 0.97

    def __init__(self, sample_rate: int, mel_bins: int) -> None:
        import torch
        from torchaudio.compliance import kaldi

        self.window_size, self.shift = fbank_window(sample_rate)
        self.fft_size = 1 << (self.window_size - 1).bit_length()
        self.window = torch.hann_window(self.window_size, periodic=False)
        banks, _ = kaldi.get_mel_banks(mel_bins, self.fft_size, float(sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0)
        # The Nyquist bin gets no weight, as in torchaudio (its banks are padded by one zero column).
        self.banks = torch.nn.functional.pad(banks, (0, 1)).T.contiguous()
        self.floor = torch.finfo(torch.float32).eps
        self._on_device: dict = {}

    def _constants(self, device) -> tuple["torch.Tensor", "torch.Tensor"]:
        if device not in self._on_device:
            self._on_device[device] = (self.window.to(device), self.banks.to(device))
        return self._on_device[device]

    def __call__(self, wave: "torch.Tensor") -> "torch.Tensor":
        """Mono float32 waves (..., samples) of at least one window -> (..., frames, mel_bins) log
        mel energies, on the waves' device (one clip in a data worker, or a batch on the GPU)."""
        import torch

        window, banks = self._constants(wave.device)
        # In-place where it can be: with fresh buffers each step costs page faults, which on a
        # 12-s clip took as long as the arithmetic. The pre-emphasis keeps torchaudio's order of
        # operations (x - 0.97 * previous, unfused), since the low bins are a difference of
        # near-equal values and a fused multiply-add moves their log by 3e-4.
        frames = wave.unfold(-1, self.window_size, self.shift)
        centred = frames - frames.mean(dim=-1, keepdim=True)
        emphasised = torch.empty_like(centred)
        torch.mul(centred[..., :-1], -self.PREEMPHASIS, out=emphasised[..., 1:])
        torch.mul(centred[..., :1], -self.PREEMPHASIS, out=emphasised[..., :1])  # Kaldi repeats the first sample
        emphasised += centred
        emphasised *= window
        spectrum = torch.fft.rfft(emphasised, n=self.fft_size)
        power = spectrum.real.square()
        power.addcmul_(spectrum.imag, spectrum.imag)
        return torch.matmul(power, banks).clamp_min_(self.floor).log_()


@functools.lru_cache(maxsize=8)
def kaldi_fbank(sample_rate: int, mel_bins: int) -> KaldiFbank:
    """The fbank for these settings, built once per process (the loader's workers each build one)."""
    return KaldiFbank(sample_rate, mel_bins)


def _seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return container.duration / 1e6 if container.duration is not None else None


def probe_track(path: str) -> float | None:
    """Seconds of the first audio stream of a video file (None: no audio stream, or unreadable)."""
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
    return int(seconds * TRACK_RATE * 2 * 1.05) + 8192


def track_to_flac(data: bytes, max_seconds: float) -> bytes | None:
    """The video's first audio track as 16 kHz mono FLAC, at most `max_seconds` long (None: no track)."""
    import av

    chunks, total, limit = [], 0, int(max_seconds * TRACK_RATE)
    try:
        with av.open(io.BytesIO(data), metadata_errors="ignore") as container:
            if not container.streams.audio:
                return None
            resampler = av.AudioResampler(format="s16", layout="mono", rate=TRACK_RATE)
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += len(chunks[-1])
                if total >= limit:
                    break
            else:
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except Exception as error:
        raise MediaError(f"audio track of the MP4: {error}", "corrupt") from None
    wave = np.concatenate(chunks)[:limit] if chunks else np.zeros(0, np.int16)
    if len(wave) == 0:
        raise MediaError("the MP4's audio track has no samples", "empty")
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, TRACK_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()
