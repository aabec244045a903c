"""Audio: normalised log-mel frames, grouped `frames_per_token` at a time, into a transformer.

Two stems with the same encoder (`stems.py`); they differ in where the frames come from:
- `waveform` (`WaveformStem`): the audio file (WAV, FLAC or MP3, or the video's sound track, which
  the converter keeps as FLAC) decoded to a wave in the data workers and turned into Kaldi fbank
  frames on the device, a batch at once (`scale.media.audio.KaldiFbank`, torchaudio's
  `kaldi.fbank` within float rounding, 3x faster);
- `features` (`MelStem`): M5Product's released mel spectrogram (80 x 751, transposed).
Both reach the encoder as (num_frames, mel_bins) frames plus a valid frame count `length`; tokens past
`length` are padding, masked out of attention. A mean token is prepended, as in the official model.
Masked audio modeling zeroes 15 % of the real tokens (at least one) and regresses their original
frame values (the official model's target is its mel frames, too).

The declaration the converter and the config read (no torch): the config section, the limits, the
fields (the audio file, which the converter may take from the video's sound track; the mel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from scale.bounds import AT_LEAST_1, POSITIVE
from scale.media.arrays import check_npy
from scale.media.audio import check_audio, flac_bound, probe_track, track_to_flac
from scale.modalities.spec import Derived, FileField, ModalitySpec, TrunkConfig

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

    BOUNDS = {**{k: AT_LEAST_1 for k in ("feature_frames", "sample_rate", "mel_bins", "frames_per_token")},
              "seconds": POSITIVE, "norm_std": POSITIVE}  # fmt: skip

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

    BOUNDS = {"max_audio_bytes": AT_LEAST_1, "max_audio_seconds": POSITIVE}


def _track_budget(video_path: str, limits: Any) -> float | None:
    seconds = probe_track(video_path)  # reserve room for the FLAC, so the shard byte bound holds
    return None if seconds is None else min(seconds + 1.0, limits.max_audio_seconds)


def _track_to_flac(video: bytes, seconds: float, limits: Any) -> bytes | None:
    return track_to_flac(video, seconds)


AUDIO = FileField(
    "audio", {".wav": "wav", ".flac": "flac", ".mp3": "mp3"}, "max_audio_bytes", check_audio,
    # A product without an audio file takes the sound track of its MP4, as 16 kHz mono FLAC.
    derive=Derived(member="flac", source="video", probe=_track_budget, bound=flac_bound, make=_track_to_flac,
                   reason="from_video"),
)  # fmt: skip
MEL = FileField("audio_mel", {".npy": "mel.npy"}, "max_npy_bytes", check_npy)


MODALITY = ModalitySpec(name="audio", config=AudioConfig, fields=(AUDIO, MEL), stems="scale.modalities.audio.stems",
                        limits=AudioLimits)  # fmt: skip
