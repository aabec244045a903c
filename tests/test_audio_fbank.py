"""The hand-written Kaldi fbank (`scale.media.audio.KaldiFbank`) against torchaudio's, which it
replaces in the loader for speed: same frames, same values within float rounding."""

import io
import math

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from scale.config import ModelConfig
from scale.media.audio import kaldi_fbank, to_pcm16
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


class Clip:
    """A product sample holding one audio file (what `WaveformStem.decode` reads)."""

    def __init__(self, data: bytes):
        self.data = data

    def read(self, field):
        return self.data


class Context:
    class limits:
        max_audio_seconds = None


def encoded(wave: np.ndarray, rate: int, **format) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, **format)
    return buffer.getvalue()


@pytest.mark.parametrize("format", [{"format": "WAV", "subtype": "PCM_16"}, {"format": "FLAC", "subtype": "PCM_16"}])
def test_the_stem_decodes_16_bit_audio_losslessly_to_what_torchaudio_gives(format):
    """The loader's waveform stem, from 16-bit bytes (product audio): the stored samples exactly
    (int16, zero-padded), and on the device torchaudio's fbank of the float wave, normalised."""
    config = ModelConfig().audio
    assert isinstance(config, AudioConfig)
    rate = config.sample_rate
    wave = (0.2 * np.random.default_rng(0).standard_normal(int(config.seconds * rate) - 3000)).clip(-1, 1)
    data = encoded(wave, rate, **format)
    stored = soundfile.read(io.BytesIO(data), dtype="int16")[0]
    decoded = WaveformStem.decode(Clip(data), config, Context())  # in a data worker: the samples
    assert decoded["wave"].dtype == torch.int16 and decoded["samples"] == len(wave)
    assert torch.equal(decoded["wave"][: len(wave)], torch.from_numpy(stored)) and not decoded["wave"][len(wave):].any()
    prepared = WaveformStem.fbank(decoded["wave"][None], decoded["samples"][None], config)  # on the device
    as_float = torch.from_numpy(soundfile.read(io.BytesIO(data), dtype="float32")[0])
    reference = WaveformStem.normalised(torchaudio_fbank(as_float, rate, config.mel_bins), config)
    assert prepared["length"][0] == reference["length"] < WaveformStem.frames(config)
    torch.testing.assert_close(prepared["fbank"][0], reference["fbank"], rtol=0, atol=1e-5)


def test_other_audio_is_rounded_to_16_bits():
    """A float WAV, a stereo one and one at another rate go through float (mixed to mono and
    resampled) and are rounded to 16 bits, clipped at full scale; their fbank stays torchaudio's
    of the float wave to well under a log-mel bin's noise."""
    config = ModelConfig().audio
    rate = config.sample_rate
    rng = np.random.default_rng(2)
    loud = 0.2 * rng.standard_normal(rate).astype("float32")
    loud[:10] = [1.5, -1.5, 1.0, -1.0, 0.99999, -0.99999, 2**-15, -(2**-15), 0.4 * 2**-15, 0.0]
    stereo = 0.2 * rng.standard_normal((rate, 2)).astype("float32")
    cases = {
        "float": (encoded(loud, rate, format="WAV", subtype="FLOAT"), torch.from_numpy(loud)),
        "stereo": (encoded(stereo, rate, format="WAV", subtype="FLOAT"), torch.from_numpy(stereo.mean(axis=1))),
        "another rate": (encoded(loud[:8000].clip(-1, 1), 8000, format="WAV", subtype="FLOAT"),
                         torchaudio.functional.resample(torch.from_numpy(loud[:8000].clip(-1, 1)), 8000, rate)),
    }  # fmt: skip
    for name, (data, float_wave) in cases.items():
        decoded = WaveformStem.decode(Clip(data), config, Context())
        got = decoded["wave"][: decoded["samples"]]
        assert got.dtype == torch.int16 and len(got) == len(float_wave), name
        expected = (float_wave * 32768).round().clamp(-32768, 32767)
        assert torch.equal(got.float(), expected), name
        if name == "float":
            assert got[:10].tolist() == [32767, -32768, 32767, -32768, 32767, -32768, 1, -1, 0, 0]
        prepared = WaveformStem.fbank(decoded["wave"][None], decoded["samples"][None], config)["fbank"][0]
        clipped = float_wave.clamp(-1, 32767 / 32768)
        reference = WaveformStem.normalised(torchaudio_fbank(clipped, rate, config.mel_bins), config)
        # Upsampled from 8 kHz the bins above 4 kHz hold next to nothing, where float's floor is
        # deeper than 16 bits' noise floor (they differ by ~0.03); the rest is 16-bit rounding.
        mel = lambda hz: math.log1p(hz / 700)  # noqa: E731
        heard = config.mel_bins if name != "another rate" else int(config.mel_bins * mel(4000) / mel(rate / 2)) - 1
        torch.testing.assert_close(prepared[:, :heard], reference["fbank"][:, :heard], rtol=0, atol=1e-3, msg=name)
        torch.testing.assert_close(prepared, reference["fbank"], rtol=0, atol=0.1, msg=name)


def test_a_batch_of_clips_gives_each_clips_own_fbank():
    """The device computes the fbank of a whole batch of zero-padded waves at once: each clip's is
    the one it has alone, zero past its own frames (a full, a short, a one-window clip, an absent one)."""
    config = ModelConfig().audio
    full = WaveformStem.samples(config)
    lengths = [full, full - 3000, 400, 0]
    rng = np.random.default_rng(1)
    waves = torch.zeros(len(lengths), full, dtype=torch.int16)
    for row, n in enumerate(lengths):
        waves[row, :n] = to_pcm16(torch.from_numpy((0.2 * rng.standard_normal(n)).astype("float32")))
    batch = WaveformStem.fbank(waves, torch.tensor(lengths), config)
    assert batch["fbank"].shape == (len(lengths), WaveformStem.frames(config), config.mel_bins)
    for row, n in enumerate(lengths[:-1]):
        alone = WaveformStem.normalised(kaldi_fbank(config.sample_rate, config.mel_bins)(waves[row, :n] / 32768), config)
        assert batch["length"][row] == alone["length"]
        torch.testing.assert_close(batch["fbank"][row], alone["fbank"], rtol=0, atol=1e-5)
    assert batch["length"][-1] == 0 and not batch["fbank"][-1].any()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed training: the fbank stays float32
        assert WaveformStem.fbank(waves, torch.tensor(lengths), config)["fbank"].dtype == torch.float32


def test_a_bf16_true_run_hands_the_fbank_every_bit_of_the_wave():
    """Lightning's `bf16-true` casts every float tensor of a batch to bf16 (8 bits of mantissa);
    the wave travels as int16, so the fbank on the device sees the samples the file holds."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    config = ModelConfig().audio
    torch.manual_seed(0)
    batch = WaveformStem.example(config, 2)
    converted = HalfPrecision("bf16-true").convert_input({"audio": batch})["audio"]
    assert converted["wave"].dtype == torch.int16 and torch.equal(converted["wave"], batch["wave"])
    fbank = WaveformStem.fbank(converted["wave"], converted["samples"], config)["fbank"]
    torch.testing.assert_close(fbank, WaveformStem.fbank(batch["wave"], batch["samples"], config)["fbank"], rtol=0, atol=0)
