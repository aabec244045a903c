"""Pay only for present tokens: samples grouped into length buckets, each run at its own length.

A batch of the fusion (or of any `TokenTransformer`) is padded to one length L: an absent modality's
segment and the padding of a short title are real work for the attention and the MLPs, though the
key mask gives them zero weight. Here each sample's real tokens are moved to the front (a stable
sort of its mask, so their order is kept), the samples are sorted by their number of real tokens,
and consecutive ones form a bucket while each is padded by at most `max_padding` of the bucket's
length; every bucket runs at the length of its longest sample. The outputs go back to their
original positions; every position that is not a real token gets zeros.

The bound is per sample, not per bucket: with a bound on the bucket's total padding, a few samples
missing a large modality joined a big bucket of complete ones and paid for that modality in full
(2 of 8 products without video and audio: 28 % of their cost still paid, in counted FLOPs). Per
sample, a missing segment longer than `max_padding` of the sequence is never computed, and any
padding is at most that share of a sample's work.

Exact: a token attends to the same keys (its sample's real tokens) as in the padded batch, with the
same positional embeddings (added before the tokens move), and every other layer acts per token;
`tests/test_packing.py` checks outputs and gradients against the padded run.

Why buckets rather than one variable-length kernel: it needs nothing but the timm blocks and
`scaled_dot_product_attention` that run on every device, so CPU and GPU share one exact path.
Finding the buckets reads the lengths on the host (one sync per call).

`length_buckets` / `buckets` group rows and `scatter_rows` writes their outputs back; the fusion
and the feature trunks use them through `run_bucketed`, the BERT towers directly (they cut each
bucket to its longest row instead of gathering positions).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def length_buckets(lengths: list[int], max_padding: float = 0.1, one_bucket: bool = False) -> list[list[int]]:
    """Sample indices grouped so that no sample is padded by more than `max_padding` of its group's
    longest length (so a group's padded size is at most `1 / (1 - max_padding)` times its real
    tokens); longest samples first. `one_bucket`: all in one, for strategies that shard the
    parameters (FSDP, ZeRO-3): they gather a module's weights on every call, so every rank must call
    each module equally often (`SCALE.use_one_bucket`)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if one_bucket:
        return [order] if order else []
    buckets: list[list[int]] = []
    for index in order:
        if buckets and lengths[buckets[-1][0]] - lengths[index] <= max_padding * lengths[buckets[-1][0]]:
            buckets[-1].append(index)
        else:
            buckets.append([index])
    return buckets


def buckets(lengths: list[int], device: torch.device, max_padding: float = 0.1,
            one_bucket: bool = False) -> list[tuple[Tensor, int, int]]:  # fmt: skip
    """`length_buckets` as (row indices on `device`, the bucket's longest length, its shortest)."""
    return [(torch.tensor(bucket, device=device), lengths[bucket[0]], lengths[bucket[-1]])
            for bucket in length_buckets(lengths, max_padding, one_bucket)]  # fmt: skip


def scatter_rows(batch: int, length: int, parts: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """(batch, length, D) zeros with each part's values written back: parts of (rows (k,),
    positions (k,), values (k, D)), the real tokens each bucket computed."""
    values = torch.cat([part[2] for part in parts])
    out = values.new_zeros(batch, length, values.shape[-1])
    return out.index_put((torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])), values)


def run_bucketed(layers: Callable[[Tensor, Tensor | None], Tensor], tokens: Tensor, token_mask: Tensor,
                 max_padding: float = 0.1, one_bucket: bool = False) -> Tensor:
    """`layers(x, attn_mask)` over each length bucket of (B, L, D) `tokens` (B, L) `token_mask`;
    returns (B, L, D') with zeros wherever `token_mask` is False. `attn_mask` is (b, 1, 1, l) bool,
    or None when the bucket has no padding."""
    batch, length = token_mask.shape
    lengths = token_mask.sum(dim=1)
    # Real positions first, in their order (a stable sort puts True before False).
    positions = torch.sort(token_mask.to(torch.int8), dim=1, descending=True, stable=True).indices
    counts = lengths.tolist()
    parts = []
    for rows, longest, shortest in buckets(counts, tokens.device, max_padding, one_bucket):
        where = positions[rows, :longest]
        real = torch.arange(longest, device=tokens.device)[None, :] < lengths[rows, None]
        out = layers(tokens[rows[:, None], where], real[:, None, None, :] if shortest < longest else None)
        parts.append((rows[:, None].expand_as(where)[real], where[real], out[real]))
    return scatter_rows(batch, length, parts)
