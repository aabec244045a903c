"""Property-value table: `[CLS] k1 v1 k2 v2 ... [SEP]` through a BERT; masked entity modeling.

MEM (SPEC section 3): each property-value pair is picked with probability `mask_prob`; for a picked
pair, either every token of its key or every token of its value is replaced by [MASK] and
predicted through the LM head. Whole-entity masking is what makes the task about product knowledge
rather than word completion (the paper reports +1.45 accuracy over word-level masking).

The data pipeline provides, per token, `entity_index` (which pair it belongs to, -1 for special and
padding tokens) and `entity_role` (0 key, 1 value).
"""

from __future__ import annotations

import torch
from torch import Tensor

from scale.config import TableConfig
from scale.modalities.base import Masked, bernoulli_positions
from scale.modalities.bert import BertTower
from scale.modalities.text import BertModality


class TableModality(BertModality):
    name = "table"
    input_keys = ("input_ids", "attention_mask", "entity_index", "entity_role")
    token_type = 1  # segment B of the shared BERT, so text and table stay distinguishable inside it

    def __init__(self, config: TableConfig, tower: BertTower, special_ids: dict[str, int], vocab_size: int):
        super().__init__(tower, special_ids, vocab_size)
        self.config = config

    def sanitize(self, inputs: dict[str, Tensor], present: Tensor) -> dict[str, Tensor]:
        clean = super().sanitize(inputs, present)
        # Absent rows must not look like rows whose pair 0 is a key: -1 means "no entity".
        for key in ("entity_index", "entity_role"):
            clean[key] = torch.where(present[:, None], clean[key], torch.full_like(clean[key], -1))
        return clean

    def mask(self, inputs: dict[str, Tensor], present: Tensor) -> Masked | None:
        if not self.config.masked_modeling:
            return None
        entity, role = inputs["entity_index"], inputs["entity_role"]
        pairs = self.config.max_pairs
        has_pair = torch.zeros(entity.shape[0], pairs + 1, dtype=torch.bool, device=entity.device)
        has_pair.scatter_(1, (entity + 1).clamp_min(0), True)  # slot 0 collects the -1 tokens
        has_pair = has_pair[:, 1:] & present[:, None]
        picked = bernoulli_positions(has_pair, self.config.mask_prob)  # (B, pairs)
        picked_role = torch.randint(0, 2, picked.shape, device=entity.device)
        safe_entity = entity.clamp_min(0)
        chosen = (
            (entity >= 0)
            & picked.gather(1, safe_entity)
            & (picked_role.gather(1, safe_entity) == role)
            & self.maskable(inputs, present)
        )
        ids = inputs["input_ids"]
        corrupted = ids.masked_fill(chosen, self.special_ids["mask"])
        return Masked(inputs={**inputs, "input_ids": corrupted}, positions=chosen, targets=ids[chosen])
