"""The audio's two stems: `waveform` (an audio file -> Kaldi fbank) and `features` (M5Product's
mel spectrogram), one encoder (package docstring: `__init__.py`)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from scale.media.arrays import load_npy, pad_rows
from scale.media.audio import fbank_frames, from_pcm16, kaldi_fbank, read_pcm16, to_pcm16
from scale.modalities.audio import AUDIO, MEL, AudioConfig
from scale.modalities.base import Encoded, Masked, Modality, TensorSpec
from scale.modalities.masking import MaskedRegression, after_pooled_token, bernoulli_positions
from scale.modalities.spec import DecodeContext, RawSample
from scale.modalities.transformer import MeanTokenTrunk

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
    def prepared_tensors(cls, config: AudioConfig) -> dict[str, TensorSpec]:
        """What the encoder reads: normalised fbank frames and their valid count."""
        return {"fbank": TensorSpec((cls.frames(config), config.mel_bins), torch.float32),
                "length": TensorSpec((), torch.long)}  # fmt: skip

    @classmethod
    def tensors(cls, config: AudioConfig) -> dict[str, TensorSpec]:
        return cls.prepared_tensors(config)  # the features stem's batch is already that

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
    """The data workers decode the first `seconds` of the file to a wave; the Kaldi fbank is
    computed from it on the device, for the whole batch at once (`prepare`): it was the largest
    part of a product's decode in the workers (docs/performance.md, section 6) and costs next to
    nothing on a GPU.

    The wave travels as 16-bit samples (`read_pcm16`): what product audio stores, so lossless for
    it, half a float32 wave's bytes to collate and hand over, and an integer tensor that a
    `bf16-true` run does not cast (a bf16 wave would keep 8 bits of each sample)."""

    stem = "waveform"
    reads = (AUDIO,)

    @classmethod
    def samples(cls, config: AudioConfig) -> int:
        """Wave samples per clip: `seconds` at `sample_rate`."""
        return int(round(config.seconds * config.sample_rate))

    @classmethod
    def frames(cls, config: AudioConfig) -> int:
        """The fbank frames of `seconds` of audio (25-ms window, 10-ms shift, Kaldi snip-edges)."""
        return fbank_frames(cls.samples(config), config.sample_rate)

    @classmethod
    def tensors(cls, config: AudioConfig) -> dict[str, TensorSpec]:
        return {"wave": TensorSpec((cls.samples(config),), torch.int16), "samples": TensorSpec((), torch.long)}

    @classmethod
    def example(cls, config: AudioConfig, batch: int) -> dict[str, Tensor]:
        samples = cls.samples(config)
        return {"wave": to_pcm16(0.1 * torch.randn(batch, samples)), "samples": torch.full((batch,), samples)}

    @classmethod
    def decode(cls, sample: RawSample, config: AudioConfig, context: DecodeContext) -> dict[str, Tensor]:
        """WAV / FLAC / MP3 bytes -> the first `seconds` as mono 16-bit samples at `sample_rate`,
        zero-padded, and their count; sub-window audio is unusable."""
        wave = read_pcm16(sample.read(AUDIO), config.seconds, config.sample_rate, context.limits.max_audio_seconds)
        if fbank_frames(wave.numel(), config.sample_rate) == 0:
            raise ValueError(f"audio of {wave.numel()} samples is shorter than one 25-ms window")
        padded = torch.zeros(cls.samples(config), dtype=torch.int16)
        padded[: wave.numel()] = wave
        return {"wave": padded, "samples": torch.tensor(wave.numel())}

    @classmethod
    def fbank(cls, wave: Tensor, samples: Tensor, config: AudioConfig) -> dict[str, Tensor]:
        """(B, samples) zero-padded int16 waves and their sample counts -> the normalised fbank
        frames, zero past each clip's frames, and the frame counts: `normalised` of each clip's own
        fbank (of the float wave in [-1, 1), the scale `norm_mean` and `norm_std` are for)."""
        # The filterbank in float32 whatever the training precision (autocast would run its matmul
        # in bf16): it makes the model's input.
        with torch.autocast(wave.device.type, enabled=False):
            frames = kaldi_fbank(config.sample_rate, config.mel_bins)(from_pcm16(wave))
        length = fbank_frames(samples, config.sample_rate)
        real = torch.arange(frames.shape[-2], device=wave.device) < length[..., None]
        normalised = torch.where(real[..., None], (frames - config.norm_mean) / config.norm_std, 0.0)
        return {"fbank": normalised, "length": length}

    def prepare(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if "fbank" in inputs:  # prepared already
            return inputs
        out = self.fbank(inputs["wave"], inputs["samples"], self.config)
        kept = {key: value for key, value in inputs.items() if key not in self.tensors(self.config)}  # e.g. present
        return {**kept, "fbank": out["fbank"].to(self.input_dtype), "length": out["length"]}


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


STEMS = {"waveform": WaveformStem, "features": MelStem}
