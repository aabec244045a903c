"""The table's stem, `pairs`: `[CLS] k1 v1 k2 v2 ... [SEP]` through a BERT; masked entity modeling, and
optionally K3M's knowledge pieces (link prediction, structure aggregation; `knowledge.py`).

MEM (the SCALE paper's masked entity modeling): each property-value pair is picked with probability
`mask_prob`; for a picked pair, either every token of its key or every token of its value is
replaced by [MASK] and predicted through the LM head. Whole-entity masking is what makes the task
about product knowledge rather than word completion (the paper reports +1.45 accuracy over
word-level masking).

LPM (`link_prediction`, K3M's link prediction): on top of MEM, one pair per product with a pair has
its whole value masked; `extra_losses` predicts it from the fused product and the pair's key. MEM may
pick the same pair, but then always its value: the key of the LPM triple is never hidden.

The data pipeline provides, per token, `entity_index` (which pair it belongs to, -1 for special and
padding tokens) and `entity_role` (0 key, 1 value).
"""

from __future__ import annotations

import torch
from torch import Tensor

from scale.modalities.base import BuildContext, Encoded, Masked, TensorSpec
from scale.modalities.bert import BertTower
from scale.modalities.masking import bernoulli_positions
from scale.modalities.spec import DecodeContext, RawSample
from scale.modalities.table import TABLE, TableConfig
from scale.modalities.table.knowledge import LinkPrediction, StructureAggregation, TableMasked, pair_membership, span_mean
from scale.modalities.text.stems import BertModality, special_token_ids, text_tower
from scale.pretrained_paths import load_tokenizer
from scale.shard_format import parse_table


def tokenize_table(tokenizer, pairs: list[tuple[str, str]], max_tokens: int) -> dict[str, torch.Tensor]:
    """[(key, value)] -> `[CLS] key value key value ... [SEP]` token ids, padded to `max_tokens`,
    with each token's pair index (`entity_index`) and whether it is a key or a value
    (`entity_role` 0 / 1); -1 on special and padding tokens."""
    pieces = tokenizer([text for pair in pairs for text in pair], add_special_tokens=False)["input_ids"]
    ids, entity, role = [tokenizer.cls_token_id], [-1], [-1]
    for index, piece in enumerate(pieces):
        ids += piece
        entity += [index // 2] * len(piece)
        role += [index % 2] * len(piece)
    limit = max_tokens - 1
    ids, entity, role = ids[:limit] + [tokenizer.sep_token_id], entity[:limit] + [-1], role[:limit] + [-1]
    pad = max_tokens - len(ids)
    return {
        "input_ids": torch.tensor(ids + [tokenizer.pad_token_id] * pad),
        "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
        "entity_index": torch.tensor(entity + [-1] * pad),
        "entity_role": torch.tensor(role + [-1] * pad),
    }


class TableModality(BertModality):
    modality = "table"
    stem = "pairs"
    reads = (TABLE,)
    token_type = 1  # segment B of the shared BERT, so text and table stay distinguishable inside it

    def __init__(self, config: TableConfig, tower: BertTower, special_ids: dict[str, int], vocab_size: int):
        super().__init__(tower, special_ids, vocab_size)
        self.config = config
        width = tower.width
        # Built only when asked: with both options off the module is exactly the plain table encoder.
        self.structure = StructureAggregation(width) if config.structure_pooling else None
        embedding_dim = tower.bert.embeddings.word_embeddings.embedding_dim
        self.link = LinkPrediction(width, embedding_dim) if config.link_prediction else None

    @classmethod
    def build(cls, context: BuildContext) -> "TableModality":
        config = context.config
        tokenizer = load_tokenizer(config.tokenizer)
        if config.table.share_text_encoder:
            tower = text_tower(context)
        else:
            tower = BertTower(
                pretrained=None, hidden=config.table.hidden, layers=config.table.layers, heads=config.table.heads,
                mlp=config.table.mlp, max_tokens=config.table.max_tokens, vocab_size=len(tokenizer), width=context.width,
                packed=config.pack_tokens,
            )  # fmt: skip
        return cls(config.table, tower, special_token_ids(tokenizer), len(tokenizer))

    @classmethod
    def tensors(cls, config: TableConfig) -> dict[str, TensorSpec]:
        # -1 means "no entity": absent rows must not look like rows whose pair 0 is a key.
        n = config.max_tokens
        return {**super().tensors(config), "entity_index": TensorSpec((n,), torch.long, fill=-1),
                "entity_role": TensorSpec((n,), torch.long, fill=-1)}  # fmt: skip

    @classmethod
    def example(cls, config: TableConfig, batch: int) -> dict[str, Tensor]:
        """Pairs of 4 tokens (2 key, 2 value) over the whole budget, the last pair running to the end."""
        n = config.max_tokens
        entity = torch.arange(n).div(4, rounding_mode="floor").clamp(max=config.max_pairs - 1)
        return {**super().example(config, batch), "entity_index": entity.expand(batch, -1).clone(),
                "entity_role": (torch.arange(n) % 4 >= 2).long().expand(batch, -1).clone()}  # fmt: skip

    @classmethod
    def decode(cls, sample: RawSample, config: TableConfig, context: DecodeContext) -> dict[str, Tensor]:
        pairs = parse_table(sample.string(TABLE))[: config.max_pairs]
        if not pairs:  # a non-empty table string without one key#:#value pair is malformed
            raise ValueError("no well-formed property-value pair in the table")
        return tokenize_table(context.tokenizer, pairs, config.max_tokens)

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


STEMS = {"pairs": TableModality}
