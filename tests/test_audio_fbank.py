"""The hand-written Kaldi fbank (`scale.media.audio.KaldiFbank`) against torchaudio's, which it
replaces in the loader for speed: same frames, same values within float rounding."""

import math

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from scale.config import ModelConfig
from scale.media.audio import kaldi_fbank
from scale.modalities.audio import AudioConfig
from scale.modalities.audio.stems import WaveformStem


def torchaudio_fbank(wave: torch.Tensor, rate: int, bins: int) -> torch.Tensor:
    """The call the loader made before (AST's settings)."""
    return torchaudio.compliance.kaldi.fbank(
        wave[None], sample_frequency=rate, num_mel_bins=bins, htk_compat=True, window_type="hanning",
        use_energy=False, dither=0.0, frame_shift=10.0,
    )  # fmt: skip


def waves(rate: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(rate)
    window = int(0.025 * rate)
    seconds = torch.arange(3 * rate) / rate
    return {
        "one window": torch.randn(window, generator=generator),
        "one window and a sample": torch.randn(window + 1, generator=generator),
        "a shift short of two windows": torch.randn(window + int(0.010 * rate) - 1, generator=generator),
        "quiet noise": 1e-3 * torch.randn(3 * rate, generator=generator),
        "loud noise": 10 * torch.randn(3 * rate, generator=generator),
        # Low tones: after the DC removal and pre-emphasis the low bins are differences of
        # near-equal values, where a reordered sum shows first.
        "chord": torch.sin(2 * math.pi * 110 * seconds) + 0.3 * torch.sin(2 * math.pi * 3000 * seconds),
        "silence": torch.zeros(rate),
        "a constant": torch.full((rate,), 0.25),  # the DC removal zeroes it: every bin at the floor
        "12 s": 0.1 * torch.randn(12 * rate, generator=generator),
    }


@pytest.mark.parametrize("rate,bins", [(16000, 128), (16000, 80), (22050, 64), (8000, 40)])
def test_equals_torchaudio(rate, bins):
    for name, wave in waves(rate).items():
        expected = torchaudio_fbank(wave, rate, bins)
        got = kaldi_fbank(rate, bins)(wave)
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=name)


def test_the_stem_decodes_what_torchaudio_gives(tmp_path):
    """The loader's waveform stem, from WAV bytes: torchaudio's fbank, normalised and padded."""
    config = ModelConfig().audio
    assert isinstance(config, AudioConfig)
    rate = config.sample_rate
    wave = (0.2 * np.random.default_rng(0).standard_normal(int(config.seconds * rate) - 3000)).astype("float32")
    path = tmp_path / "a.wav"
    soundfile.write(path, wave, rate, subtype="FLOAT")

    class Sample:
        def read(self, field):
            return path.read_bytes()

    class Context:
        class limits:
            max_audio_seconds = None

    decoded = WaveformStem.decode(Sample(), config, Context())  # in a data worker: the wave
    assert decoded["samples"] == len(wave) and not decoded["wave"][len(wave):].any()
    prepared = WaveformStem.fbank(decoded["wave"][None], decoded["samples"][None], config)  # on the device
    reference = WaveformStem.normalised(torchaudio_fbank(torch.from_numpy(wave), rate, config.mel_bins), config)
    assert prepared["length"][0] == reference["length"] < WaveformStem.frames(config)
    torch.testing.assert_close(prepared["fbank"][0], reference["fbank"], rtol=0, atol=1e-5)


def test_a_batch_of_clips_gives_each_clips_own_fbank():
    """The device computes the fbank of a whole batch of zero-padded waves at once: each clip's is
    the one it has alone, zero past its own frames (a full, a short, a one-window clip, an absent one)."""
    config = ModelConfig().audio
    full = WaveformStem.samples(config)
    lengths = [full, full - 3000, 400, 0]
    rng = np.random.default_rng(1)
    waves = torch.zeros(len(lengths), full)
    for row, n in enumerate(lengths):
        waves[row, :n] = torch.from_numpy((0.2 * rng.standard_normal(n)).astype("float32"))
    batch = WaveformStem.fbank(waves, torch.tensor(lengths), config)
    assert batch["fbank"].shape == (len(lengths), WaveformStem.frames(config), config.mel_bins)
    for row, n in enumerate(lengths[:-1]):
        alone = WaveformStem.normalised(kaldi_fbank(config.sample_rate, config.mel_bins)(waves[row, :n]), config)
        assert batch["length"][row] == alone["length"]
        torch.testing.assert_close(batch["fbank"][row], alone["fbank"], rtol=0, atol=1e-5)
    assert batch["length"][-1] == 0 and not batch["fbank"][-1].any()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed training: the fbank stays float32
        assert WaveformStem.fbank(waves, torch.tensor(lengths), config)["fbank"].dtype == torch.float32
