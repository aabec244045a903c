"""The one interface every modality implements.

A modality turns its batch entry into a token sequence in the fusion width (`encode`), can corrupt
its own inputs for masked modeling (`mask`), and scores its masked predictions from the fused tokens
of its segment (`masked_loss`). The model never looks inside a modality beyond this interface, so
adding a modality is one new file plus one key in `scale.modalities.MODALITY_CLASSES`.

Conventions shared by all modalities:
- The first token of every sequence is the modality's pooled token ([CLS] or mean token).
- `present` is a (B,) bool mask; absent samples still flow through the encoder (the batch stays
  rectangular, and every parameter receives a gradient on every rank, which DDP requires), but their
  inputs are replaced by zeros first (`sanitize`), so a garbage or NaN input can never leak into a
  loss or a gradient, and their tokens are masked out of fusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Encoded:
    """A modality's token sequence."""

    tokens: Tensor
    """(B, L, width) tokens; position 0 is the pooled token."""
    token_mask: Tensor
    """(B, L) bool, True where a token is real (not padding). Absent samples are handled by the caller."""


@dataclass
class Masked:
    """Inputs corrupted for masked modeling, and what must be predicted."""

    inputs: dict[str, Tensor]
    """The corrupted inputs, to be encoded instead of the clean ones."""
    positions: Tensor
    """(B, L) bool over the modality's *output* token sequence: where a prediction is scored."""
    targets: Tensor
    """Targets at `positions`, in row-major order: (N,) token ids or (N, F) regression features."""


class Modality(nn.Module):
    """Base class: encoder trunk + masked-modeling head for one modality."""

    name: str = ""
    input_keys: tuple[str, ...] = ()
    """Keys of the batch entry that hold per-sample tensors (zeroed for absent samples)."""

    def encode(self, inputs: dict[str, Tensor]) -> Encoded:
        raise NotImplementedError

    def mask(self, inputs: dict[str, Tensor], present: Tensor) -> Masked | None:
        """Corrupt the inputs for masked modeling; None when the task is disabled."""
        return None

    def masked_loss(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> Tensor:
        """Weighted loss over `masked.positions` from this modality's fused tokens (B, L, width)."""
        raise NotImplementedError

    def extra_losses(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> dict[str, Tensor]:
        """Further losses of this modality scored on the same masked inputs (e.g. the table's K3M
        link prediction); each is added to the total and logged as `<modality>/<name>`."""
        return {}

    def sanitize(self, inputs: dict[str, Tensor], present: Tensor) -> dict[str, Tensor]:
        """Zero every per-sample input of absent samples (torch.where, so NaN cannot survive)."""
        clean = dict(inputs)
        for key in self.input_keys:
            value = inputs[key]
            keep = present.view(-1, *([1] * (value.dim() - 1)))
            clean[key] = torch.where(keep, value, torch.zeros((), dtype=value.dtype, device=value.device))
        return clean


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
