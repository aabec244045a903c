"""Audio: normalised log-mel frames, grouped `frames_per_token` at a time, into a transformer.

Two stems with the same encoder; they differ in where the frames come from:
- `waveform` (`WaveformStem`): the audio file (WAV, FLAC or MP3, or the video's sound track, which
  the converter keeps as FLAC) decoded here and turned into Kaldi fbank frames (torchaudio);
- `features` (`MelStem`): M5Product's released mel spectrogram (80 x 751, transposed).
Both arrive as (num_frames, mel_bins) frames plus a valid frame count `length`; tokens past
`length` are padding, masked out of attention. A mean token is prepended, as in the official model.
Masked audio modeling zeroes 15 % of the real tokens (at least one) and regresses their original
frame values (the official model's target is its mel frames, too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torchaudio
from torch import Tensor, nn

from scale.media.arrays import check_npy, load_npy, pad_rows
from scale.media.audio import check_audio, flac_bound, probe_track, read_wave, track_to_flac
from scale.modalities.base import (
    DecodeContext, Derived, Encoded, FileField, Masked, Modality, ModalitySpec, RawSample, TensorSpec,
)  # fmt: skip
from scale.modalities.masking import MaskedRegression, after_pooled_token, bernoulli_positions
from scale.modalities.transformer import MeanTokenTrunk, TrunkConfig

MB = 2**20


@dataclass
class AudioConfig(TrunkConfig):
    """Audio: log-mel filterbank (Kaldi fbank) frames, grouped into tokens, into a transformer;
    masked audio-token regression of the original fbank values."""

    stem: Literal["waveform", "features"] = "waveform"
    """`waveform`: WAV decoded and turned into Kaldi fbank here. `features`: M5Product's
    pre-extracted mel spectrogram (`<key>.mel.npy`, `mel_bins` x `feature_frames`: 80 x 751 for the
    first 12 s at 16 kHz, n_fft 1024, hop 256)."""
    feature_frames: int = 751
    """Mel frames per clip in the `features` stem (official: 751)."""
    sample_rate: int = 16000
    """Rate audio is resampled to before features (official: 16 kHz)."""
    seconds: float = 12.0
    """Seconds of audio kept from the start (official: 12 s); shorter audio is zero-padded."""
    mel_bins: int = 80
    """Mel filterbank channels (official: 80)."""
    frames_per_token: int = 16
    """10-ms fbank frames grouped into one token."""
    norm_mean: float = -4.27
    """fbank normalisation mean (AudioSet statistics, as in AST)."""
    norm_std: float = 4.57
    """fbank normalisation std."""

    @property
    def num_frames(self) -> int:
        """Frames per clip, as the stem produces them (`WaveformStem` / `MelStem`.frames)."""
        return MODALITY.stem_class(self).frames(self)

    @property
    def num_tokens(self) -> int:
        """Audio tokens after grouping (trailing frames that do not fill a token are dropped)."""
        return self.num_frames // self.frames_per_token


@dataclass
class AudioLimits:
    max_audio_bytes: int = 128 * MB
    """Largest audio file decoded."""
    max_audio_seconds: float = 3600.0
    """Longest audio accepted (from its header)."""


def _track_budget(video_path: str, limits: Any) -> float | None:
    seconds = probe_track(video_path)  # reserve room for the FLAC, so the shard byte bound holds
    return None if seconds is None else min(seconds + 1.0, limits.max_audio_seconds)


AUDIO = FileField(
    "audio", {".wav": "wav", ".flac": "flac", ".mp3": "mp3"}, "max_audio_bytes", check_audio,
    # A product without an audio file takes the sound track of its MP4, as 16 kHz mono FLAC.
    derive=Derived(member="flac", source="video", probe=_track_budget, bound=flac_bound, make=track_to_flac,
                   reason="from_video"),
)  # fmt: skip
MEL = FileField("audio_mel", {".npy": "mel.npy"}, "max_npy_bytes", check_npy)


class AudioStem(Modality):
    """The encoder both stems share; a stem says where its frames come from (`decode`, `frames`)."""

    modality = "audio"

    def __init__(self, config: AudioConfig, width: int):
        super().__init__()
        self.config = config
        self.token_dim = config.frames_per_token * config.mel_bins
        self.embed = nn.Linear(self.token_dim, config.hidden)
        self.trunk = MeanTokenTrunk(config, config.num_tokens, width)
        self.head = MaskedRegression(width, self.token_dim)

    @classmethod
    def frames(cls, config: AudioConfig) -> int:
        """Frames per clip."""
        raise NotImplementedError

    @classmethod
    def tensors(cls, config: AudioConfig) -> dict[str, TensorSpec]:
        return {"fbank": TensorSpec((cls.frames(config), config.mel_bins), torch.float32),
                "length": TensorSpec((), torch.long)}  # fmt: skip

    @classmethod
    def example(cls, config: AudioConfig, batch: int) -> dict[str, Tensor]:
        frames = cls.frames(config)
        return {"fbank": torch.randn(batch, frames, config.mel_bins), "length": torch.full((batch,), frames)}

    @staticmethod
    def normalised(frames: Tensor, config: AudioConfig) -> dict[str, Tensor]:
        """(T, mel_bins) log-mel frames -> normalised, cut or zero-padded to the clip's frames, and
        the valid count."""
        padded, real = pad_rows(((frames - config.norm_mean) / config.norm_std).numpy(), config.num_frames)
        return {"fbank": padded, "length": real.sum()}

    @property
    def num_tokens(self) -> int:
        return 1 + self.config.num_tokens

    def tokenize(self, fbank: Tensor) -> Tensor:
        """(B, frames, mel) -> (B, tokens, frames_per_token*mel); trailing partial token dropped."""
        tokens = self.config.num_tokens
        return fbank[:, : tokens * self.config.frames_per_token].reshape(fbank.shape[0], tokens, self.token_dim)

    def real_tokens(self, length: Tensor) -> Tensor:
        """(B,) valid frame counts -> (B, tokens) bool: tokens that start inside the clip."""
        starts = torch.arange(self.config.num_tokens, device=length.device) * self.config.frames_per_token
        return starts[None, :] < length[:, None]

    def encode(self, inputs: dict[str, Tensor]) -> Encoded:
        return self.trunk(self.embed(self.tokenize(inputs["fbank"])), self.real_tokens(inputs["length"]))

    def mask(self, inputs: dict[str, Tensor], present: Tensor) -> Masked | None:
        if not self.config.masked_modeling:
            return None
        chunks = self.tokenize(inputs["fbank"])
        chosen = bernoulli_positions(self.real_tokens(inputs["length"]) & present[:, None], self.config.mask_prob)
        corrupted = chunks.masked_fill(chosen[..., None], 0.0)
        fbank = inputs["fbank"].clone()
        fbank[:, : corrupted.shape[1] * self.config.frames_per_token] = corrupted.reshape(fbank.shape[0], -1, self.config.mel_bins)
        return Masked(inputs={**inputs, "fbank": fbank}, positions=after_pooled_token(chosen), targets=chunks[chosen])

    def masked_loss(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> Tensor:
        return self.head(fused_tokens, masked, sample_weight)


class WaveformStem(AudioStem):
    stem = "waveform"
    reads = (AUDIO,)

    @classmethod
    def frames(cls, config: AudioConfig) -> int:
        """The fbank frames of `seconds` of audio (25-ms window, 10-ms shift, Kaldi snip-edges)."""
        samples = int(round(config.seconds * config.sample_rate))
        window, shift = int(0.025 * config.sample_rate), int(0.010 * config.sample_rate)
        return 1 + (samples - window) // shift

    @classmethod
    def decode(cls, sample: RawSample, config: AudioConfig, context: DecodeContext) -> dict[str, Tensor]:
        """WAV / FLAC / MP3 bytes -> Kaldi fbank of the first `seconds`; sub-window audio is unusable."""
        wave = read_wave(sample.read(AUDIO), config.seconds, config.sample_rate, context.limits.max_audio_seconds)
        if wave.numel() < int(0.025 * config.sample_rate):
            raise ValueError(f"audio of {wave.numel()} samples is shorter than one 25-ms window")
        fbank = torchaudio.compliance.kaldi.fbank(
            wave[None], sample_frequency=config.sample_rate, num_mel_bins=config.mel_bins,
            htk_compat=True, window_type="hanning", use_energy=False, dither=0.0, frame_shift=10.0,
        )  # fmt: skip
        return cls.normalised(fbank, config)


class MelStem(AudioStem):
    stem = "features"
    reads = (MEL,)

    @classmethod
    def frames(cls, config: AudioConfig) -> int:
        return config.feature_frames

    @classmethod
    def decode(cls, sample: RawSample, config: AudioConfig, context: DecodeContext) -> dict[str, Tensor]:
        """Log-mel spectrogram (mel_bins, T) -> its frames, normalised."""
        mel = load_npy(sample.read(MEL), "mel.npy", (config.mel_bins, None)).T
        return cls.normalised(torch.from_numpy(mel), config)


MODALITY = ModalitySpec(name="audio", config=AudioConfig, limits=AudioLimits,
                        stems={"waveform": WaveformStem, "features": MelStem})  # fmt: skip
