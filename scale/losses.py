"""Inter-modality contrastive loss (InfoNCE or SigLIP, in blocks of queries), exact under data
parallelism.

For every pair of modalities (i, j) and both directions, each local query of modality i is scored
against the keys of modality j from *every* rank (gathered with gradient, open_clip's "local loss":
memory linear in the global batch). A query counts only if its sample has both modalities; keys of
samples that lack modality j are excluded from the softmax.

Normalisation is global: each rank divides its summed loss by (global number of valid queries /
world size). DDP then averages the gradients over ranks, which gives exactly the gradient of the
mean over the concatenated global batch, even when ranks hold different numbers of valid queries.
`tests/test_losses.py` checks this against a one-process reference.
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor

from scale.pair_loss import pair_loss


def world_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_sizes(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's local batch size (they differ at the end of an exact epoch, see
    `datamodules/streams.py`)."""
    _, world = world_info()
    if world == 1:
        return [n]
    size = torch.tensor([n], device=device)
    parts = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(parts, size)
    return [int(p.item()) for p in parts]


def _padded(x: Tensor, length: int) -> Tensor:
    # all_gather needs one shape on every rank: pad rows, cut them off again after the gather.
    return x if x.shape[0] == length else torch.cat([x, x.new_zeros((length - x.shape[0], *x.shape[1:]))])


def gather_with_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """All ranks' `x` concatenated along dim 0; gradients flow back to the rank that owns each row.
    `sizes`: every rank's row count (`gather_sizes`), when they may differ; None: all equal."""
    _, world = world_info()
    if world == 1:
        return x
    if sizes is None or len(set(sizes)) == 1:
        return torch.cat(dist_fn.all_gather(x), dim=0)
    parts = dist_fn.all_gather(_padded(x, max(sizes)))
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def gather_no_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    _, world = world_info()
    if world == 1:
        return x
    longest = x.shape[0] if sizes is None else max(sizes)
    parts = [torch.empty((longest, *x.shape[1:]), dtype=x.dtype, device=x.device) for _ in range(world)]
    dist.all_gather(parts, _padded(x, longest).contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes or [longest] * world)], dim=0)


def global_sum(x: Tensor) -> Tensor:
    _, world = world_info()
    if world == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def contrastive_loss(
    features: dict[str, Tensor],
    present: dict[str, Tensor],
    pair_weights: Tensor | None,
    temperature: float | Tensor,
    pair_weighting: str = "logit_scale",
    objective: str = "infonce",
    bias: Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """The contrastive loss over every modality pair, both directions (`scale/pair_loss.py`).

    features: modality -> (B, P) L2-normalised projections (local batch; B may differ across ranks).
    present: modality -> (B,) bool.
    pair_weights: (B, M, M) harmonization weights in `features` order, or None for 1. Entry [b, i, j]
        applies to sample b's modality-i query against modality-j keys.
    pair_weighting: `logit_scale` multiplies that query's logits (a per-sample temperature
        tau / G[i, j], the official code); `loss_weight` multiplies its loss term (the paper).
    objective: `infonce` (softmax over the keys, the paper's) or `siglip` (a sigmoid per query-key
        pair, with the learned offset `bias`).
    chunk_size: query rows per block of logits: memory O(chunk_size x global batch) per pair instead
        of O(B x global batch); the loss and its gradient do not depend on it. None: one block.
    Returns the mean over pairs with at least one valid query anywhere, each pair's loss (0 for a
    pair without one) and each pair's global number of valid queries. Nothing is read on the host:
    rows are masked, not selected, and pairs without a valid query are left out of the mean by
    their count, so on a GPU the loss adds no sync (beyond the local batch sizes under DDP).
    """
    names = list(features)
    rank, world = world_info()
    batch = next(iter(features.values())).shape[0]
    device = features[names[0]].device
    sizes = gather_sizes(batch, device)
    key_present = {m: gather_no_grad(present[m], sizes) for m in names}
    # Absent rows hold whatever their modality computed for nothing (NaN even): zeroed, so no
    # product with their features can reach a gradient.
    keys = {m: torch.where(key_present[m][:, None], gather_with_grad(features[m], sizes), 0.0) for m in names}
    labels = torch.arange(batch, device=device) + sum(sizes[:rank])
    inverse_temperature = 1.0 / torch.as_tensor(temperature, device=device)

    per_pair: dict[str, Tensor] = {}
    queries: dict[str, Tensor] = {}
    for (i, query), (j, key) in combinations(enumerate(names), 2):
        valid = present[query] & present[key]
        count = global_sum(valid.sum().to(torch.float32))
        directions = []
        for (a, q), (b, k) in (((i, query), (j, key)), ((j, key), (i, query))):
            # Invalid rows' weights may be anything (an absent modality's): 1 there, by selection.
            weight = None if pair_weights is None else torch.where(valid, pair_weights[:, a, b], 1.0)
            scale = inverse_temperature.expand(batch)
            if weight is not None and pair_weighting == "logit_scale":
                scale = scale * weight
            queries_q = torch.where(valid[:, None], features[q], 0.0)
            per_query = pair_loss(queries_q, keys[k], scale, key_present[k], labels, objective, bias, chunk_size, valid)
            if weight is not None and pair_weighting == "loss_weight":
                per_query = per_query * weight
            directions.append(per_query.sum())
        pair = f"{query}-{key}"
        per_pair[pair] = (directions[0] + directions[1]) / 2 / (count.clamp_min(1.0) / world)
        queries[pair] = count
    # Every projection stays in the graph even when its modality is absent from the whole global
    # batch: DDP without find_unused_parameters requires a gradient for every parameter on every rank.
    # A zero through torch.where, not x * 0: that is NaN where x is.
    never = torch.zeros((), dtype=torch.bool, device=device)
    anchor = sum(torch.where(never, f, 0.0).sum() for f in features.values())
    if bias is not None:
        anchor = anchor + torch.where(never, bias, 0.0).sum()
    if not per_pair:
        return anchor, per_pair, queries
    active = torch.stack([count > 0 for count in queries.values()]).sum().clamp_min(1)
    return torch.stack(list(per_pair.values())).sum() / active + anchor, per_pair, queries
