"""Property-value table: `[CLS] k1 v1 k2 v2 ... [SEP]` through a BERT; masked entity modeling, and
optionally K3M's knowledge pieces (link prediction, structure aggregation; `knowledge.py`).

MEM (SPEC section 3): each property-value pair is picked with probability `mask_prob`; for a picked
pair, either every token of its key or every token of its value is replaced by [MASK] and
predicted through the LM head. Whole-entity masking is what makes the task about product knowledge
rather than word completion (the paper reports +1.45 accuracy over word-level masking).

LPM (`link_prediction`, SPEC section 5): on top of MEM, one pair per product with a pair has its
whole value masked; `extra_losses` predicts it from the fused product and the pair's key. MEM may
pick the same pair, but then always its value: the key of the LPM triple is never hidden.

The data pipeline provides, per token, `entity_index` (which pair it belongs to, -1 for special and
padding tokens) and `entity_role` (0 key, 1 value).
"""

from __future__ import annotations

import torch
from torch import Tensor

from scale.config import TableConfig
from scale.modalities.base import Encoded, Masked, bernoulli_positions
from scale.modalities.bert import BertTower
from scale.modalities.knowledge import (
    LinkPrediction,
    StructureAggregation,
    TableMasked,
    pair_membership,
    span_mean,
)
from scale.modalities.text import BertModality


class TableModality(BertModality):
    name = "table"
    input_keys = ("input_ids", "attention_mask", "entity_index", "entity_role")
    token_type = 1  # segment B of the shared BERT, so text and table stay distinguishable inside it

    def __init__(self, config: TableConfig, tower: BertTower, special_ids: dict[str, int], vocab_size: int):
        super().__init__(tower, special_ids, vocab_size)
        self.config = config
        width = tower.width
        # Built only when asked: with both options off the module is exactly the plain table encoder.
        self.structure = StructureAggregation(width) if config.structure_pooling else None
        embedding_dim = tower.bert.embeddings.word_embeddings.embedding_dim
        self.link = LinkPrediction(width, embedding_dim) if config.link_prediction else None

    def sanitize(self, inputs: dict[str, Tensor], present: Tensor) -> dict[str, Tensor]:
        clean = super().sanitize(inputs, present)
        # Absent rows must not look like rows whose pair 0 is a key: -1 means "no entity".
        for key in ("entity_index", "entity_role"):
            clean[key] = torch.where(present[:, None], clean[key], torch.full_like(clean[key], -1))
        return clean

    def encode(self, inputs: dict[str, Tensor]) -> Encoded:
        encoded = super().encode(inputs)
        if self.structure is None:
            return encoded
        pooled = self.structure_pool(encoded.tokens, inputs)[0]
        return Encoded(tokens=torch.cat([pooled[:, None], encoded.tokens[:, 1:]], dim=1), token_mask=encoded.token_mask)

    def structure_pool(self, tokens: Tensor, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(c*, a): the structure-aggregated pooled token (B, D) and its attention over pairs (B, P)."""
        # The pooled slot (position 0) summarises the whole table: it is no triple's token.
        not_pooled = torch.arange(tokens.shape[1], device=tokens.device) > 0
        real = inputs["attention_mask"].bool() & not_pooled
        members = pair_membership(inputs["entity_index"], self.config.max_pairs) & real[..., None]
        triples = span_mean(tokens, members)
        return self.structure(tokens[:, 0], triples, members.any(dim=1))

    def mask(self, inputs: dict[str, Tensor], present: Tensor) -> Masked | None:
        if not (self.config.masked_modeling or self.config.link_prediction):
            return None
        entity, role, ids = inputs["entity_index"], inputs["entity_role"], inputs["input_ids"]
        maskable = self.maskable(inputs, present)
        chosen = torch.zeros_like(maskable)  # MEM's scored positions
        picked = picked_role = link = None
        if self.config.masked_modeling:
            has_pair = torch.zeros(entity.shape[0], self.config.max_pairs + 1, dtype=torch.bool, device=entity.device)
            has_pair.scatter_(1, (entity + 1).clamp_min(0), True)  # slot 0 collects the -1 tokens
            picked = bernoulli_positions(has_pair[:, 1:] & present[:, None], self.config.mask_prob)  # (B, pairs)
            picked_role = torch.randint(0, 2, picked.shape, device=entity.device)
        if self.config.link_prediction:
            link = self._pick_link_pair(entity, role, maskable)
            if picked_role is not None:
                # MEM on the LPM triple masks its value (hidden anyway), never the key LPM needs.
                rows = (link >= 0).nonzero(as_tuple=True)[0]
                picked_role[rows, link[rows]] = 1
        if picked is not None:
            safe_entity = entity.clamp_min(0)
            chosen = (
                (entity >= 0)
                & picked.gather(1, safe_entity)
                & (picked_role.gather(1, safe_entity) == role)
                & maskable
            )
        if link is None:
            corrupted = ids.masked_fill(chosen, self.special_ids["mask"])
            return Masked(inputs={**inputs, "input_ids": corrupted}, positions=chosen, targets=ids[chosen])
        link_value = (entity == link[:, None]) & (link[:, None] >= 0) & (role == 1) & maskable
        corrupted = ids.masked_fill(chosen | link_value, self.special_ids["mask"])
        return TableMasked(
            inputs={**inputs, "input_ids": corrupted}, positions=chosen, targets=ids[chosen],
            original_ids=ids, link_pair=link,
        )  # fmt: skip

    def _pick_link_pair(self, entity: Tensor, role: Tensor, maskable: Tensor) -> Tensor:
        """(B,) one pair per sample among those with a maskable key and value token, -1 if none."""
        members = pair_membership(entity, self.config.max_pairs) & maskable[..., None]
        eligible = (members & (role == 0)[..., None]).any(1) & (members & (role == 1)[..., None]).any(1)
        scores = torch.rand(eligible.shape, device=entity.device).masked_fill(~eligible, -1.0)
        return torch.where(eligible.any(1), scores.argmax(1), torch.full_like(scores[:, 0], -1, dtype=torch.long))

    def extra_losses(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> dict[str, Tensor]:
        if self.link is None:
            return {}
        word_embeddings = self.tower.bert.embeddings.word_embeddings
        return {"link_prediction": self.link(fused_tokens, masked, sample_weight, word_embeddings)}
