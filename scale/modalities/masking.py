"""What the masked tasks share: picking positions, the weighted mean over them, and the one
masked-regression head of every modality whose targets are vectors (patches, regions, frames,
clip features, audio tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scale.modalities.base import Masked


def bernoulli_positions(eligible: Tensor, prob: float) -> Tensor:
    """Pick each eligible position with probability `prob`, and at least one per row that has any.

    The "at least one" matters on short sequences: at 15 % a 5-frame video would otherwise often get
    no masked frame at all, and the task would silently vanish for that modality.
    """
    chosen = (torch.rand(eligible.shape, device=eligible.device) < prob) & eligible
    needs_one = eligible.any(dim=1) & ~chosen.any(dim=1)
    if needs_one.any():
        # Random eligible position per row: argmax of random scores restricted to eligible slots.
        scores = torch.rand(eligible.shape, device=eligible.device).masked_fill(~eligible, -1.0)
        pick = torch.zeros_like(chosen).scatter_(1, scores.argmax(dim=1, keepdim=True), True)
        chosen = chosen | (pick & needs_one[:, None])
    return chosen


def weighted_mean(per_position: Tensor, positions: Tensor, sample_weight: Tensor) -> Tensor:
    """Mean over masked positions of `per_position` (N,), each scaled by its sample's weight."""
    if per_position.numel() == 0:
        # No masked position in this batch: a zero that still depends on the graph (DDP-safe).
        return per_position.sum() * 0.0
    rows = positions.nonzero(as_tuple=True)[0]
    return (per_position * sample_weight[rows]).sum() / per_position.numel()


def mask_slots(values: Tensor, eligible: Tensor, prob: float, zero_prob: float = 1.0) -> tuple[Tensor, Tensor]:
    """Choose slots (dim 1) of `values` (B, T, ...) among `eligible` (B, T) with `bernoulli_positions`
    and zero `zero_prob` of the chosen ones; returns (corrupted values, chosen (B, T))."""
    chosen = bernoulli_positions(eligible, prob)
    zeroed = chosen if zero_prob >= 1.0 else chosen & (torch.rand(chosen.shape, device=chosen.device) < zero_prob)
    corrupted = values.masked_fill(zeroed.view(*zeroed.shape, *([1] * (values.dim() - 2))), 0.0)
    return corrupted, chosen


def after_pooled_token(chosen: Tensor) -> Tensor:
    """(B, T) chosen input slots -> (B, 1 + T) output positions: the encoder's position 0 is the
    pooled token, never a prediction."""
    return F.pad(chosen, (1, 0), value=False)


class MaskedRegression(nn.Module):
    """Predict each masked position's target vector from its fused token (one Linear); the MSE is
    averaged over the target's dimensions, then over the masked positions, each scaled by its
    sample's harmonization weight (the official regression losses are averaged over positions and dims)."""

    def __init__(self, width: int, target_dim: int):
        super().__init__()
        self.predict = nn.Linear(width, target_dim)

    def forward(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> Tensor:
        prediction = self.predict(fused_tokens[masked.positions]).float()
        per_position = F.mse_loss(prediction, masked.targets.float(), reduction="none").mean(-1)
        return weighted_mean(per_position, masked.positions, sample_weight)
