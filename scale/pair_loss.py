"""One direction of one modality pair's contrastive loss, computed in blocks of queries.

Each local query row r (a sample that has both modalities) is scored against every key c of the
global batch: x[r, c] = scale[r] * <q_r, k_c> + bias. Two objectives:

- `infonce`: loss_r = logsumexp_c x[r, c] - x[r, t_r] over the present keys (t_r: r's own key);
- `siglip`: loss_r = -sum_c log sigmoid(z[r, c] * x[r, c]) over the present keys, with z = +1 on
  r's own key and -1 elsewhere (SigLIP's pairwise sigmoid; `bias` is its learned offset).

Why a hand-written autograd function: autograd over a Python loop of blocks would still keep every
block's (chunk x N) logits for the backward pass, so memory would stay O(B x N). This one keeps only
its inputs, and the backward pass recomputes each block's logits (one extra matmul per block),
so memory is O(chunk x N) whatever the batch. The gradient is the analytic one of the formula
above, d loss_r / d x[r, c] = softmax_c(x[r]) - [c = t_r] (infonce) or sigmoid(x[r, c]) - [c = t_r]
(siglip), so it is exact, not approximate; `tests/test_losses.py` checks it against autograd on
the unchunked formula, for queries, keys, per-row scales (harmonization weights and a learned
temperature) and the SigLIP bias.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

OBJECTIVES = ("infonce", "siglip")


def _block(queries: Tensor, keys: Tensor, scale: Tensor, bias: Tensor, key_present: Tensor,
           targets: Tensor, objective: str) -> tuple[Tensor, Tensor, Tensor]:
    """(similarity, logits, positives) of one block of query rows, in float32 at least (bf16 inputs
    are scored in float32, as the softmax needs)."""
    dtype = torch.promote_types(queries.dtype, torch.float32)
    similarity = (queries @ keys.T).to(dtype)
    logits = similarity * scale.to(dtype)[:, None] + bias.to(dtype)
    positives = targets[:, None] == torch.arange(keys.shape[0], device=keys.device)[None, :]
    if objective == "infonce":
        logits = logits.masked_fill(~key_present[None, :], float("-inf"))
    return similarity, logits, positives


def _block_loss(logits: Tensor, positives: Tensor, targets: Tensor, key_present: Tensor, objective: str) -> Tensor:
    if objective == "infonce":
        return torch.logsumexp(logits, dim=1) - logits.gather(1, targets[:, None]).squeeze(1)
    signs = positives.to(logits.dtype) * 2 - 1
    return -(F.logsigmoid(signs * logits) * key_present[None, :]).sum(dim=1)


class _ChunkedPairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, queries: Tensor, keys: Tensor, scale: Tensor, bias: Tensor, key_present: Tensor,
                targets: Tensor, valid: Tensor, objective: str, chunk: int) -> Tensor:
        losses = []
        for start in range(0, queries.shape[0], chunk):
            rows = slice(start, start + chunk)
            _, logits, positives = _block(queries[rows], keys, scale[rows], bias, key_present, targets[rows], objective)
            # torch.where, not a product: an invalid row's loss may be inf (its own key absent).
            losses.append(torch.where(valid[rows], _block_loss(logits, positives, targets[rows], key_present, objective), 0.0))
        ctx.save_for_backward(queries, keys, scale, bias, key_present, targets, valid)
        ctx.objective, ctx.chunk = objective, chunk
        return torch.cat(losses) if losses else queries.new_zeros(0, dtype=torch.promote_types(queries.dtype, torch.float32))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        queries, keys, scale, bias, key_present, targets, valid = ctx.saved_tensors
        dtype = torch.promote_types(queries.dtype, torch.float32)
        grad_queries = torch.zeros_like(queries, dtype=dtype)
        grad_keys = torch.zeros_like(keys, dtype=dtype)
        grad_scale = torch.zeros_like(scale, dtype=dtype)
        grad_bias = torch.zeros((), dtype=dtype, device=queries.device)
        for start in range(0, queries.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            similarity, logits, positives = _block(
                queries[rows], keys, scale[rows], bias, key_present, targets[rows], ctx.objective
            )
            if ctx.objective == "infonce":
                d_logits = torch.softmax(logits, dim=1) - positives.to(dtype)
            else:
                d_logits = (torch.sigmoid(logits) - positives.to(dtype)) * key_present[None, :]
            d_logits = torch.where(valid[rows, None], d_logits * grad[rows, None].to(dtype), 0.0)
            grad_bias += d_logits.sum()
            grad_scale[rows] = (d_logits * similarity).sum(dim=1)
            d_similarity = d_logits * scale[rows].to(dtype)[:, None]
            grad_queries[rows] = d_similarity @ keys.to(dtype)
            grad_keys += d_similarity.T @ queries[rows].to(dtype)
        return (grad_queries.to(queries.dtype), grad_keys.to(keys.dtype), grad_scale.to(scale.dtype),
                grad_bias.to(bias.dtype) if ctx.needs_input_grad[3] else None, None, None, None, None, None)


def pair_loss(queries: Tensor, keys: Tensor, scale: Tensor, key_present: Tensor, targets: Tensor,
              objective: str = "infonce", bias: Tensor | None = None, chunk: int | None = None,
              valid: Tensor | None = None) -> Tensor:  # fmt: skip
    """Per-query losses (R,) of R query rows against N keys (see the module docstring).

    queries (R, P), keys (N, P) (the global batch, gathered with gradient), scale (R,) logit
    multipliers, key_present (N,) bool, targets (R,) each query's own key. `bias`: SigLIP's offset (a
    scalar tensor; ignored by infonce, which is shift-invariant). `chunk`: query rows per block
    (None: all at once); the result does not depend on it. `valid` (R,) bool: the rows that count
    (their own key present); the others give 0 and no gradient, whatever their inputs hold, so the
    caller need not select rows (a boolean selection reads the mask on the host: a GPU sync).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"contrastive objective {objective!r}: expected one of {OBJECTIVES}")
    if bias is None or objective == "infonce":
        bias = torch.zeros((), device=queries.device)
    if valid is None:
        valid = torch.ones(queries.shape[0], dtype=torch.bool, device=queries.device)
    chunk = max(1, chunk or queries.shape[0] or 1)
    return _ChunkedPairLoss.apply(queries, keys, scale, bias, key_present, targets, valid, objective, chunk)
