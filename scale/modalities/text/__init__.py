"""Title text: WordPiece tokens into a BERT (`stems.py`), with masked language modeling.

The declaration the converter and the config read (no torch): the config section, the limit, the
`title` record field and its check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from scale.bounds import AT_LEAST_1, SHARE, Bound
from scale.modalities.spec import ModalitySpec, RecordField, clean_string


@dataclass
class TextConfig:
    """Title text: WordPiece tokens into a BERT encoder."""

    max_tokens: int = 36
    """Token budget including [CLS] and [SEP] (official: 36)."""
    pretrained: str | None = None
    """A directory holding a Hugging Face BERT (`config.json` + weights) or `minilm` for the bundled
    MiniLM-L6; `None` builds a randomly initialised BERT from the size fields below."""
    hidden: int = 768
    """BERT width (ignored when `pretrained` is set)."""
    layers: int = 6
    """BERT layers (ignored when `pretrained` is set)."""
    heads: int = 12
    """Attention heads (ignored when `pretrained` is set)."""
    mlp: int = 3072
    """Feed-forward width (ignored when `pretrained` is set)."""
    pooling: Literal["mean", "cls"] = "mean"
    """The pooled (first) token: `mean` of the attended token outputs, or BERT's `cls` output (the
    official code). A randomly initialised post-LN BERT's [CLS] output barely varies across samples,
    which stalls the contrastive loss: measured on the demo data, text-table InfoNCE stayed at 3.42
    over 150 steps with `cls` and fell to 1.07 with `mean`."""
    masked_modeling: bool = True
    """Masked language modeling (MLM) on the title: 15 % of tokens, 80/10/10 replacement."""
    mask_prob: float = 0.15
    """Share of non-special title tokens chosen for MLM."""

    BOUNDS = {"max_tokens": Bound(3), **{k: AT_LEAST_1 for k in ("hidden", "layers", "heads", "mlp")}, "mask_prob": SHARE}
    DIVISIBLE = (("hidden", "heads"),)


@dataclass
class TextLimits:
    max_title_chars: int = 2000
    """Titles are cut to this many characters before tokenising (the tokenizer's cost grows with
    the input, however few tokens are kept)."""

    BOUNDS = {"max_title_chars": AT_LEAST_1}


TITLE = RecordField("title", official="title", max_chars="max_title_chars", noise=" ".join,
                    clean=lambda value, limits: clean_string(value, limits, TITLE))  # fmt: skip


def _resolve_text_encoder(config: Any, directory: Path) -> None:
    if config.text.pretrained == "text_encoder":
        config.text.pretrained = str(directory / "text_encoder")


MODALITY = ModalitySpec(name="text", config=TextConfig, fields=(TITLE,), stems="scale.modalities.text.stems",
                        limits=TextLimits, resolve_assets=_resolve_text_encoder)  # fmt: skip
