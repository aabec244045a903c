"""Self-harmonization: how much each modality and each modality pair counts, per sample.

Official variant (`per_sample`, no parameters), for one sample with pooled vectors v_1..v_M:
    S = cosine(v_i, v_j)            (M x M)
    R = S * softmax_row(S)          (elementwise)
    G = R / ||R||_2 (row-wise)
G[i, j] (i != j) scales the contrastive logits of pair (i, j); G[m, m], computed from the
post-fusion pooled vectors, scales the masked-modeling loss of modality m. Recomputed every step
and not detached, as in the official code.

A sample's absent modalities are removed *before* the softmax and the normalisation (their rows
and columns are zero), so the weights of the present modalities do not depend on the garbage the
encoders produce for absent inputs. With one present modality, G = [[1]]; with none, all zeros.
`uniform` sets every present entry to 1 (ablation).

Paper variant (`learned`): one M x M matrix shared by all samples, a parameter. The paper states
"S initialised at 0, updated as S <- S * softmax(S)", which read literally stays 0 forever; here the
parameter S (initialised at 0) is turned into weights by the softmax half of that rule, per row and
over the sample's present modalities only, scaled by the number of present entries of the row:
G[i, j] = n_i * softmax_j(S[i, :])  ->  at initialisation every present weight is 1 (= `uniform`),
and the losses' gradients move weight between pairs and tasks. Being learned from the loss itself,
the matrix drifts towards the pairs and tasks that are easiest to lower; `detach` does not apply to
it (it would never learn).

Two documented departures, both options (`HarmonizationConfig`):
- `detach` (default on): the official weights are not detached, so the optimiser can lower the
  contrastive loss by shrinking G, i.e. by making a product's modalities *less* similar.
- `rescale` (default on): the weights are divided by their mean over the present entries of the
  global batch (detached). The raw off-diagonal G is about 0.2-0.3, which silently multiplies the
  temperature by 3-5; rescaled, harmonization redistributes weight between samples and pairs while
  the temperature stays the configured one.
Measured on the demo data (150 steps, coarse mAP@10 of the contrastive embedding): official
0.21, detached 0.50, detached + rescaled 0.63, uniform 0.61.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from scale.losses import global_sum


def harmonization_weights(
    pooled: Tensor, present: Tensor, mode: str = "per_sample", learned: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """pooled (B, M, D), present (B, M) bool -> weights (B, M, M), zero wherever i or j is absent.
    `learned` is the (M, M) parameter of the `learned` mode."""
    pair_present = pair_mask(present)
    if mode == "uniform":
        return pair_present.to(pooled.dtype)
    if mode == "learned":
        if learned is None:
            raise ValueError("harmonization.mode 'learned' needs the learned matrix")
        logits = learned.float().expand(pair_present.shape).masked_fill(~pair_present, -1e4)
        row_size = pair_present.sum(dim=-1, keepdim=True).float()
        return torch.where(pair_present, row_size * torch.softmax(logits, dim=-1), torch.zeros_like(logits))
    if mode != "per_sample":
        raise ValueError(f"harmonization.mode {mode!r}: expected 'per_sample', 'learned' or 'uniform'")
    unit = F.normalize(pooled.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    # A large finite negative (not -inf) for excluded entries: softmax of a fully excluded row then
    # stays finite, so no NaN can reach the backward pass through the unused branch of `where`.
    attention = torch.softmax(similarity.masked_fill(~pair_present, -1e4), dim=-1)
    raw = torch.where(pair_present, similarity * attention, torch.zeros_like(similarity))
    return raw / raw.norm(dim=-1, keepdim=True).clamp_min(eps)


def pair_mask(present: Tensor, diagonal: bool = True) -> Tensor:
    """(B, M) presence -> (B, M, M) entries where both modalities are present (optionally i != j)."""
    mask = present[:, :, None] & present[:, None, :]
    if not diagonal:
        mask = mask & ~torch.eye(present.shape[1], dtype=torch.bool, device=present.device)
    return mask


def rescale_to_unit_mean(weights: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Divide by the (detached) mean of `weights[mask]` over every rank, so the mean is 1."""
    total = global_sum(torch.stack([weights.detach()[mask].sum(), mask.sum().to(weights.dtype)]))
    return weights / (total[0] / total[1].clamp_min(1.0)).clamp_min(eps)
