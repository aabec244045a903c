"""Audio: normalised log-mel frames, grouped `frames_per_token` at a time, into a transformer.

Both input stems arrive here as the same (num_frames, mel_bins) frames plus a valid frame count
`length`: for `waveform` the data pipeline computes Kaldi fbank frames from the WAV (torchaudio);
for `features` it reads M5Product's released mel spectrogram (80 x 751, transposed), so the model
differs only in `num_frames` (`AudioConfig.num_frames`). Tokens past `length` are padding and are
masked out of attention. A mean token is prepended, as in the official model. Masked audio
modeling zeroes 15 % of the real tokens (at least one) and regresses their original frame values
(the official model's target is its mel frames, too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scale.config import AudioConfig
from scale.modalities.base import Encoded, Masked, Modality, bernoulli_positions, weighted_mean
from scale.modalities.transformer import TokenTransformer, mean_token


class AudioModality(Modality):
    name = "audio"
    input_keys = ("fbank", "length")

    def __init__(self, config: AudioConfig, width: int):
        super().__init__()
        self.config = config
        self.token_dim = config.frames_per_token * config.mel_bins
        self.embed = nn.Linear(self.token_dim, config.hidden)
        self.trunk = TokenTransformer(config.hidden, config.layers, config.heads, config.mlp_ratio, config.num_tokens + 1)
        self.project = nn.Linear(config.hidden, width) if config.hidden != width else nn.Identity()
        self.predict = nn.Linear(width, self.token_dim)

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
        chunks = self.tokenize(inputs["fbank"])
        real = self.real_tokens(inputs["length"])
        embedded = self.embed(chunks)
        tokens = torch.cat([mean_token(embedded, real), embedded], dim=1)
        token_mask = F.pad(real, (1, 0), value=True)  # the mean token always exists
        return Encoded(tokens=self.project(self.trunk(tokens, token_mask)), token_mask=token_mask)

    def mask(self, inputs: dict[str, Tensor], present: Tensor) -> Masked | None:
        if not self.config.masked_modeling:
            return None
        chunks = self.tokenize(inputs["fbank"])
        chosen = bernoulli_positions(self.real_tokens(inputs["length"]) & present[:, None], self.config.mask_prob)
        corrupted = chunks.masked_fill(chosen[..., None], 0.0)
        fbank = inputs["fbank"].clone()
        fbank[:, : corrupted.shape[1] * self.config.frames_per_token] = corrupted.reshape(fbank.shape[0], -1, self.config.mel_bins)
        positions = F.pad(chosen, (1, 0), value=False)
        return Masked(inputs={**inputs, "fbank": fbank}, positions=positions, targets=chunks[chosen])

    def masked_loss(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> Tensor:
        prediction = self.predict(fused_tokens[masked.positions]).float()
        per_token = F.mse_loss(prediction, masked.targets.float(), reduction="none").mean(-1)
        return weighted_mean(per_token, masked.positions, sample_weight)
