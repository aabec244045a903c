"""The title's stem: WordPiece ids -> BERT -> tokens; masked language modeling (15 %, 80/10/10).

`BertModality` is what text and table share: ids and an attention mask through a `BertTower`
(`../bert.py`), scored MLM-style through its tied LM head. The text tower is built once per model
(`text_tower`) and the table runs through it too by default (`TableConfig.share_text_encoder`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from scale.modalities.base import BuildContext, Encoded, Masked, Modality, TensorSpec
from scale.modalities.bert import BertTower, token_masking
from scale.modalities.masking import bernoulli_positions, weighted_mean
from scale.modalities.spec import DecodeContext, RawSample
from scale.modalities.text import TITLE, TextConfig
from scale.modalities.transformer import mean_token
from scale.pretrained_paths import load_tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """The ids the masking code needs, read from the tokenizer (never hard-coded)."""
    return {
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "pad": tokenizer.pad_token_id,
        "mask": tokenizer.mask_token_id,
    }


def text_tower(context: BuildContext) -> BertTower:
    """The text BERT, built once per model: text and (by default) table run through it, so it has
    position embeddings for the longer of the two."""
    config = context.config

    def build() -> BertTower:
        tokenizer = load_tokenizer(config.tokenizer)
        return BertTower(
            pretrained=config.text.pretrained, hidden=config.text.hidden, layers=config.text.layers,
            heads=config.text.heads, mlp=config.text.mlp, vocab_size=len(tokenizer), width=context.width,
            max_tokens=max(config.text.max_tokens, config.table.max_tokens), load_weights=context.load_weights,
            packed=config.pack_tokens,
        )  # fmt: skip

    return context.share("text_tower", build)


class BertModality(Modality):
    """What text and table share: ids + attention mask through a BertTower, MLM-style scoring."""

    token_type = 0
    uses_tokenizer = True

    def __init__(self, tower: BertTower, special_ids: dict[str, int], vocab_size: int):
        super().__init__()
        self.tower = tower
        self.special_ids = special_ids
        self.vocab_size = vocab_size

    @classmethod
    def tensors(cls, config: Any) -> dict[str, TensorSpec]:
        n = config.max_tokens
        return {"input_ids": TensorSpec((n,), torch.long), "attention_mask": TensorSpec((n,), torch.long)}

    @classmethod
    def example(cls, config: Any, batch: int) -> dict[str, Tensor]:
        n = config.max_tokens
        return {"input_ids": torch.randint(1000, 5000, (batch, n)), "attention_mask": torch.ones(batch, n, dtype=torch.long)}

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

    def export_assets(self, out: Path, config: Any) -> None:
        # The pretrained text tower's architecture (its weights are in model.safetensors).
        if self.tower.is_pretrained and config.text.pretrained != "text_encoder":
            self.tower.bert.config.save_pretrained(str(out / "text_encoder"))
            config.text.pretrained = "text_encoder"


class TextModality(BertModality):
    modality = "text"
    stem = "wordpiece"
    reads = (TITLE,)

    def __init__(self, config: TextConfig, tower: BertTower, special_ids: dict[str, int], vocab_size: int):
        super().__init__(tower, special_ids, vocab_size)
        self.config = config

    @classmethod
    def build(cls, context: BuildContext) -> "TextModality":
        tokenizer = load_tokenizer(context.config.tokenizer)
        return cls(context.config.text, text_tower(context), special_token_ids(tokenizer), len(tokenizer))

    @classmethod
    def decode(cls, sample: RawSample, config: TextConfig, context: DecodeContext) -> dict[str, Tensor]:
        encoded = context.tokenizer(sample.string(TITLE), max_length=config.max_tokens, truncation=True,
                                    padding="max_length", return_tensors="pt")  # fmt: skip
        return {"input_ids": encoded["input_ids"][0], "attention_mask": encoded["attention_mask"][0]}

    def mask(self, inputs: dict[str, Tensor], present: Tensor) -> Masked | None:
        if not self.config.masked_modeling:
            return None
        chosen = bernoulli_positions(self.maskable(inputs, present), self.config.mask_prob)
        ids = inputs["input_ids"]
        corrupted = token_masking(ids, chosen, self.special_ids["mask"], self.vocab_size)
        return Masked(inputs={**inputs, "input_ids": corrupted}, positions=chosen, targets=ids[chosen])


STEMS = {"wordpiece": TextModality}
