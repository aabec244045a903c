"""K3M's knowledge modality on the table (the K3M paper): the property-value pairs read as triples.

K3M treats a product's pairs as a small knowledge graph, triples <item, property, value>, and adds two
pieces to a plain table encoder. Both are switchable on `TableConfig` and build no parameter when off.

Structure aggregation (`structure_pooling`): the table's pooled token c attends over the product's
triple embeddings t_j and becomes c* = c + W sum_j a_j t_j. A triple's embedding is the mean of the
encoder outputs over its tokens, key and value together (the tokenised table holds no separate
entity for the triple). The attention runs over the triples that exist: a pair slot with no token
(padding, or the whole row of an absent sample) gets exactly zero weight, and a product with no pair
gets c* = c + W(0), never NaN (`masked_softmax`).

Link prediction (`link_prediction`, LPM): one triple per product has all of its *value* tokens
replaced by [MASK] (its key stays visible: hiding the property as well would leave nothing to link).
A query built from the item (the table segment's fused token 0, which has attended to every present
modality of the product) and the property (the mean of the fused tokens of the triple's key) is
scored against every product's masked value in the global batch: InfoNCE, in-batch negatives.
Values are embedded without a second BERT pass: the mean of the tower's word embeddings over the
*original* value ids, then a Linear, so a value is a point of a space shared by all products, like
an entity embedding of a knowledge-graph model. K3M also scores the value from a TransE-style
h + r; here h and r are concatenated into an MLP, which can represent h + r and more.
A candidate whose value is the same string as the positive's is the same answer, not a negative:
it is removed from the softmax (the positive itself stays).

`link_prediction_loss` is exact under data parallelism the way `scale.losses.contrastive_loss` is:
candidates are gathered with gradient, and each rank divides by the global number of queries over
the world size, so DDP's gradient average equals the mean over the concatenated global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scale.losses import gather_no_grad, gather_sizes, gather_with_grad, global_sum, world_info
from scale.modalities.base import Masked

LINK_TEMPERATURE = 0.07
"""InfoNCE temperature of link prediction (the contrastive loss's official value)."""


@dataclass
class TableMasked(Masked):
    """MEM's corrupted inputs and targets, plus what link prediction needs to score its triple."""

    original_ids: Tensor
    """(B, L) the table ids before any masking: the values LPM must predict."""
    link_pair: Tensor
    """(B,) long: the pair whose value LPM masked, -1 for samples without a query (absent, no pair)."""


def pair_membership(entity_index: Tensor, max_pairs: int) -> Tensor:
    """(B, L) pair number per token (-1: none) -> (B, L, max_pairs) bool, token belongs to pair j."""
    return entity_index[..., None] == torch.arange(max_pairs, device=entity_index.device)


def span_mean(tokens: Tensor, span: Tensor) -> Tensor:
    """Mean of (B, L, D) tokens over a (B, L) or (B, L, P) bool span -> (B, D) or (B, P, D); 0 if empty."""
    weights = span.to(tokens.dtype)
    if span.dim() == 2:
        return (tokens * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
    return torch.einsum("blp,bld->bpd", weights, tokens) / weights.sum(1)[..., None].clamp_min(1.0)


def masked_softmax(scores: Tensor, valid: Tensor) -> Tensor:
    """Softmax over the valid entries of the last dim; exactly 0 elsewhere, 0 for rows with none.

    A plain -inf fill would give NaN on rows without a valid entry (an absent table, an empty one);
    a finite fill plus a multiplication by `valid` keeps those rows at zero and every score in the
    graph (so the attention parameters get a gradient, zero or not, on every step: DDP needs it).
    """
    scores = scores.float().masked_fill(~valid, torch.finfo(torch.float32).min)
    return torch.softmax(scores, dim=-1) * valid


class StructureAggregation(nn.Module):
    """c* = c + W sum_j a_j t_j with a = softmax_j(<Q c, K t_j> / sqrt(D)) over the existing triples."""

    def __init__(self, width: int):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.out = nn.Linear(width, width)  # W
        self.scale = 1.0 / math.sqrt(width)

    def forward(self, pooled: Tensor, triples: Tensor, exists: Tensor) -> tuple[Tensor, Tensor]:
        """pooled (B, D), triples (B, P, D), exists (B, P) bool -> (c* (B, D), a (B, P))."""
        # Non-existing slots are zeroed, not only down-weighted: 0 * NaN would still be NaN.
        triples = torch.where(exists[..., None], triples, torch.zeros((), dtype=triples.dtype, device=triples.device))
        scores = torch.einsum("bd,bpd->bp", self.query(pooled), self.key(triples)) * self.scale
        alpha = masked_softmax(scores, exists)
        aggregated = torch.einsum("bp,bpd->bd", alpha.to(triples.dtype), triples)
        return pooled + self.out(aggregated), alpha


def packed_spans(ids: Tensor, span: Tensor) -> Tensor:
    """The ids inside each row's span moved to the front in order, -1 after: (B, L) -> (B, L).

    Two rows are equal exactly when their spans hold the same token sequence, wherever the spans sit
    in the table, which is how duplicate values are recognised across products.
    """
    order = torch.sort((~span).to(torch.uint8), dim=1, stable=True).indices
    packed = ids.gather(1, order)
    return torch.where(span.gather(1, order), packed, torch.full_like(packed, -1))


def link_prediction_loss(
    queries: Tensor,
    candidates: Tensor,
    value_ids: Tensor,
    valid: Tensor,
    sample_weight: Tensor,
    temperature: float = LINK_TEMPERATURE,
) -> Tensor:
    """InfoNCE of each local query against every rank's candidate values; exact under DDP.

    queries, candidates: (B, D) L2-normalised, local (B may differ across ranks). value_ids: (B, L)
    `packed_spans` of the original value ids. valid: (B,) bool, a sample has a query and a candidate.
    sample_weight: (B,) multiplies each query's term. Returns the weighted mean over the global
    queries (per rank: the local sum over global count / world), or a graph-connected zero if none.
    """
    rank, world = world_info()
    batch = queries.shape[0]
    # Collectives first and unconditionally: every rank must take part even with no local query.
    sizes = gather_sizes(batch, queries.device)
    keys = gather_with_grad(candidates, sizes)
    key_valid = gather_no_grad(valid, sizes)
    key_ids = gather_no_grad(value_ids, sizes)
    count = global_sum(valid.sum().to(torch.float32))
    anchor = (queries.sum() + keys.sum()) * 0.0
    if count.item() == 0:  # the same decision on every rank: count is global
        return anchor
    labels = torch.arange(batch, device=queries.device) + sum(sizes[:rank])
    same_value = (value_ids[:, None, :] == key_ids[None, :, :]).all(dim=-1)
    false_negative = same_value & (torch.arange(keys.shape[0], device=queries.device)[None, :] != labels[:, None])
    logits = (queries @ keys.T).float() / temperature
    logits = logits.masked_fill(~key_valid[None, :] | false_negative, float("-inf"))
    per_query = F.cross_entropy(logits[valid], labels[valid], reduction="none")
    return (per_query * sample_weight[valid].float()).sum() / (count / world) + anchor


class LinkPrediction(nn.Module):
    """LPM head: query MLP over [item; property] and the value projection of word embeddings."""

    def __init__(self, width: int, embedding_dim: int, temperature: float = LINK_TEMPERATURE):
        super().__init__()
        self.query = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, width))
        self.value = nn.Linear(embedding_dim, width)
        self.temperature = temperature

    def forward(
        self, fused_tokens: Tensor, masked: TableMasked, sample_weight: Tensor, word_embeddings: nn.Embedding
    ) -> Tensor:
        """fused_tokens (B, L, width) of the table segment -> the LPM loss (a scalar)."""
        entity, role = masked.inputs["entity_index"], masked.inputs["entity_role"]
        real = masked.inputs["attention_mask"].bool()
        link = masked.link_pair
        in_triple = (entity == link[:, None]) & (link[:, None] >= 0) & real
        key_span, value_span = in_triple & (role == 0), in_triple & (role == 1)
        valid = key_span.any(1) & value_span.any(1)

        item = fused_tokens[:, 0]
        prop = span_mean(fused_tokens, key_span)
        queries = F.normalize(self.query(torch.cat([item, prop], dim=-1)).float(), dim=-1)
        value = span_mean(word_embeddings(masked.original_ids), value_span)
        candidates = F.normalize(self.value(value).float(), dim=-1)
        value_ids = packed_spans(masked.original_ids, value_span)
        loss = link_prediction_loss(queries, candidates, value_ids, valid, sample_weight, self.temperature)
        # Every LPM weight in the graph on every step (DDP without find_unused_parameters), even
        # when no product in the whole batch has a table.
        return loss + sum(p.sum() for p in self.parameters()) * 0.0

