"""A BERT tower shared by the text and table modalities, with its tied masked-LM head.

The official code runs the table through the text BERT; `TableConfig.share_text_encoder` keeps that
as the default and makes a separate tower an explicit option (instead of building a second stack
that never receives a gradient, as the official code does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, BertModel

from scale.packing import buckets, scatter_rows
from scale.pretrained_paths import resolve


class BertTower(nn.Module):
    """BertModel (pretrained or from config) + projection to the fusion width + tied LM head."""

    def __init__(
        self,
        *,
        pretrained: str | None,
        hidden: int,
        layers: int,
        heads: int,
        mlp: int,
        max_tokens: int,
        vocab_size: int,
        width: int,
        load_weights: bool = True,
        packed: bool = False,
    ):
        super().__init__()
        self.packed = packed
        self.one_bucket = False  # `scale.packing.length_buckets`; set by `SCALE.use_one_bucket`
        if pretrained is not None:
            path = resolve(pretrained)
            if load_weights:
                self.bert = BertModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True)
            else:  # weights come from a checkpoint right after; only the architecture is needed
                self.bert = BertModel(BertConfig.from_pretrained(str(path), local_files_only=True), add_pooling_layer=False)
            if self.bert.config.vocab_size != vocab_size:
                raise ValueError(f"text.pretrained {pretrained!r}: vocab {self.bert.config.vocab_size} != tokenizer vocab {vocab_size}")
        else:
            config = BertConfig(
                vocab_size=vocab_size,
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                intermediate_size=mlp,
                max_position_embeddings=max_tokens,
                type_vocab_size=2,
            )
            self.bert = BertModel(config, add_pooling_layer=False)
        self.is_pretrained = pretrained is not None
        self.width = width
        bert_hidden = self.bert.config.hidden_size
        if self.bert.config.max_position_embeddings < max_tokens:
            raise ValueError(f"BERT has {self.bert.config.max_position_embeddings} positions, {max_tokens} tokens requested")
        self.project = nn.Linear(bert_hidden, width) if bert_hidden != width else nn.Identity()
        # Masked-LM head: fused tokens (fusion width) -> BERT width -> vocabulary through the tied
        # word-embedding matrix, as BERT's own head does.
        self.lm_transform = nn.Sequential(nn.Linear(width, bert_hidden), nn.GELU(), nn.LayerNorm(bert_hidden))
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))

    def pretrained_parameters(self):
        """The parameters loaded from the pretrained checkpoint (`optimizer.pretrained_lr` applies)."""
        return self.bert.parameters()

    def encode(self, input_ids: Tensor, attention_mask: Tensor, token_type: int) -> Tensor:
        """(B, L) ids -> (B, L, width) tokens. `packed`: rows in length buckets, each cut to its
        longest real sequence (positions count from 0, so the cut changes nothing for real tokens);
        outputs past a row's last real token are zeros."""
        if not self.packed:
            return self.project(self._bert(input_ids, attention_mask, token_type))
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)
        ends = ((positions + 1) * attention_mask.bool()).amax(dim=1)  # last real token + 1
        parts = []
        for rows, end, _ in buckets(ends.tolist(), input_ids.device, one_bucket=self.one_bucket):
            hidden = self.project(self._bert(input_ids[rows, :end], attention_mask[rows, :end], token_type))
            keep = positions[None, :end] < ends[rows, None]
            parts.append((rows[:, None].expand_as(keep)[keep], positions[None, :end].expand_as(keep)[keep], hidden[keep]))
        return scatter_rows(batch, length, parts)

    def _bert(self, input_ids: Tensor, attention_mask: Tensor, token_type: int) -> Tensor:
        token_type_ids = torch.full_like(input_ids, token_type)
        return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    def lm_logits(self, fused: Tensor) -> Tensor:
        """(N, width) fused tokens at masked positions only -> (N, vocab) logits.

        Scoring only the masked positions (not every position, as the official code does) removes
        most of the head's compute: the vocabulary projection is the largest matmul of the step.
        """
        return F.linear(self.lm_transform(fused), self.bert.embeddings.word_embeddings.weight, self.lm_bias)


def token_masking(
    input_ids: Tensor, chosen: Tensor, mask_id: int, vocab_size: int, mask_share: float = 0.8, random_share: float = 0.1
) -> Tensor:
    """BERT's 80/10/10 corruption of the chosen positions: [MASK], a random token, or unchanged."""
    roll = torch.rand(input_ids.shape, device=input_ids.device)
    to_mask = chosen & (roll < mask_share)
    to_random = chosen & (roll >= mask_share) & (roll < mask_share + random_share)
    corrupted = input_ids.masked_fill(to_mask, mask_id)
    random_ids = torch.randint_like(input_ids, vocab_size)
    return torch.where(to_random, random_ids, corrupted)
