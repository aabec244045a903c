"""Title text: WordPiece ids -> BERT -> tokens; masked language modeling (15 %, 80/10/10)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from scale.config import TextConfig
from scale.modalities.base import Encoded, Masked, Modality, bernoulli_positions, weighted_mean
from scale.modalities.bert import BertTower, token_masking
from scale.modalities.transformer import mean_token


class BertModality(Modality):
    """What text and table share: ids + attention mask through a BertTower, MLM-style scoring."""

    input_keys = ("input_ids", "attention_mask")
    token_type = 0

    def __init__(self, tower: BertTower, special_ids: dict[str, int], vocab_size: int):
        super().__init__()
        self.tower = tower
        self.special_ids = special_ids
        self.vocab_size = vocab_size

    @property
    def num_tokens(self) -> int:
        return self.config.max_tokens

    def sanitize(self, inputs: dict[str, Tensor], present: Tensor) -> dict[str, Tensor]:
        clean = super().sanitize(inputs, present)
        # An absent row keeps one attended position so BERT's attention never sees an all-masked
        # row (which is NaN under some SDPA kernels); its tokens are dropped from fusion anyway.
        attention = clean["attention_mask"].clone()
        attention[:, 0] = attention[:, 0] | (~present).to(attention.dtype)
        clean["attention_mask"] = attention
        return clean

    def encode(self, inputs: dict[str, Tensor]) -> Encoded:
        tokens = self.tower.encode(inputs["input_ids"], inputs["attention_mask"], self.token_type)
        token_mask = inputs["attention_mask"].bool()
        if self.config.pooling == "mean":
            # The [CLS] slot carries the masked mean instead (it is never an MLM target).
            tokens = torch.cat([mean_token(tokens, token_mask), tokens[:, 1:]], dim=1)
        return Encoded(tokens=tokens, token_mask=token_mask)

    def maskable(self, inputs: dict[str, Tensor], present: Tensor) -> Tensor:
        """Positions that hold a real, non-special token of a present sample."""
        ids = inputs["input_ids"]
        special = (ids == self.special_ids["cls"]) | (ids == self.special_ids["sep"]) | (ids == self.special_ids["pad"])
        return inputs["attention_mask"].bool() & ~special & present[:, None]

    def masked_loss(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> Tensor:
        logits = self.tower.lm_logits(fused_tokens[masked.positions])
        per_token = F.cross_entropy(logits.float(), masked.targets, reduction="none")
        return weighted_mean(per_token, masked.positions, sample_weight)


class TextModality(BertModality):
    name = "text"

    def __init__(self, config: TextConfig, tower: BertTower, special_ids: dict[str, int], vocab_size: int):
        super().__init__(tower, special_ids, vocab_size)
        self.config = config

    def mask(self, inputs: dict[str, Tensor], present: Tensor) -> Masked | None:
        if not self.config.masked_modeling:
            return None
        chosen = bernoulli_positions(self.maskable(inputs, present), self.config.mask_prob)
        ids = inputs["input_ids"]
        corrupted = token_masking(ids, chosen, self.special_ids["mask"], self.vocab_size)
        return Masked(inputs={**inputs, "input_ids": corrupted}, positions=chosen, targets=ids[chosen])


def special_token_ids(tokenizer) -> dict[str, int]:
    """The ids the masking code needs, read from the tokenizer (never hard-coded)."""
    return {
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "pad": tokenizer.pad_token_id,
        "mask": tokenizer.mask_token_id,
    }
