"""Modalities as keys: each file defines one `Modality`; `build_modalities` assembles the ones a
config asks for into a `ModuleDict` in the canonical fusion order."""

from __future__ import annotations

from torch import nn

from scale.config import ModelConfig
from scale.modalities.audio import AudioModality
from scale.modalities.base import Encoded, Masked, Modality
from scale.modalities.bert import BertTower
from scale.modalities.image import ImageModality
from scale.modalities.table import TableModality
from scale.modalities.text import TextModality, special_token_ids
from scale.modalities.video import VideoModality
from scale.pretrained_paths import load_tokenizer

__all__ = ["Encoded", "Masked", "Modality", "build_modalities"]


def build_modalities(config: ModelConfig, load_weights: bool = True) -> nn.ModuleDict:
    """Build the encoders of `config.modalities`.

    `load_weights=False` builds pretrained towers from their architecture only (used when a
    checkpoint's weights are loaded right after).
    """
    width = config.fusion.width
    modules: dict[str, Modality] = {}
    needs_bert = "text" in config.modalities or "table" in config.modalities
    if needs_bert:
        tokenizer = load_tokenizer(config.tokenizer)
        special, vocab = special_token_ids(tokenizer), len(tokenizer)
        max_tokens = max(config.text.max_tokens, config.table.max_tokens)
        text_tower = BertTower(
            pretrained=config.text.pretrained, hidden=config.text.hidden, layers=config.text.layers,
            heads=config.text.heads, mlp=config.text.mlp, max_tokens=max_tokens, vocab_size=vocab,
            width=width, load_weights=load_weights,
        )  # fmt: skip
        if "text" in config.modalities:
            modules["text"] = TextModality(config.text, text_tower, special, vocab)
        if "table" in config.modalities:
            if config.table.share_text_encoder:
                table_tower = text_tower
            else:
                table_tower = BertTower(
                    pretrained=None, hidden=config.table.hidden, layers=config.table.layers,
                    heads=config.table.heads, mlp=config.table.mlp, max_tokens=config.table.max_tokens,
                    vocab_size=vocab, width=width,
                )  # fmt: skip
            modules["table"] = TableModality(config.table, table_tower, special, vocab)
    if "image" in config.modalities:
        modules["image"] = ImageModality(config.image, width)
    if "video" in config.modalities:
        modules["video"] = VideoModality(config.video, width)
    if "audio" in config.modalities:
        modules["audio"] = AudioModality(config.audio, width)
    return nn.ModuleDict({name: modules[name] for name in config.modalities})
