"""Property-value table, `[CLS] k1 v1 k2 v2 ... [SEP]` through a BERT (`stems.py`), with masked
entity modeling and, by option, K3M's knowledge pieces (`knowledge.py`).

The declaration the converter and the config read (no torch): the config section, the limit, the
`table` record field (`pv` in the official release) and its check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from scale.bounds import AT_LEAST_1, SHARE, Bound
from scale.modalities.spec import ModalitySpec, Note, RecordField, clean_string
from scale.shard_format import TABLE_PAIR_SEPARATOR, format_table, parse_table


@dataclass
class TableConfig:
    """Property-value table, tokenised as `[CLS] k1 v1 k2 v2 ... [SEP]`."""

    max_tokens: int = 64
    """Token budget including [CLS] and [SEP] (official: 64)."""
    share_text_encoder: bool = True
    """Run the table through the text BERT (official code) instead of a BERT of its own."""
    hidden: int = 768
    """Width of the table's own BERT (only when `share_text_encoder` is false)."""
    layers: int = 6
    """Layers of the table's own BERT (only when `share_text_encoder` is false)."""
    heads: int = 12
    """Heads of the table's own BERT (only when `share_text_encoder` is false)."""
    mlp: int = 3072
    """Feed-forward width of the table's own BERT (only when `share_text_encoder` is false)."""
    max_pairs: int = 16
    """Property-value pairs kept per product (the rest are dropped before tokenisation)."""
    pooling: Literal["mean", "cls"] = "mean"
    """The pooled (first) token, as `text.pooling`."""
    masked_modeling: bool = True
    """Masked entity modeling (MEM): whole keys or whole values are masked and predicted."""
    mask_prob: float = 0.15
    """Probability that a property-value pair is picked for MEM."""
    link_prediction: bool = False
    """K3M link prediction (LPM): each product's pairs are triples <item, property, value>; one
    triple per product has its whole value masked (its key always stays visible) and is predicted
    from the fused product (table token 0) and its property (mean of the key's fused tokens), by
    InfoNCE (temperature 0.07) against the other products' values in the global batch, embedded as
    the mean of their word embeddings; candidates with the same value string are excluded.
    Logged as `table/link_prediction`, weighted by the table's harmonization weight."""
    structure_pooling: bool = False
    """K3M structure aggregation: the table's pooled token becomes c + W * sum_j a_j t_j, attention
    of the pooled token c over the product's triples t_j (mean of the pair's key and value token
    outputs), existing pairs only. It also changes the table's contrastive / retrieval vector."""

    BOUNDS = {"max_tokens": Bound(3), **{k: AT_LEAST_1 for k in ("hidden", "layers", "heads", "mlp", "max_pairs")},
              "mask_prob": SHARE}  # fmt: skip
    DIVISIBLE = (("hidden", "heads"),)


@dataclass
class TableLimits:
    max_table_chars: int = 20000
    """Table strings are cut to this many characters (at a pair boundary) before parsing."""

    BOUNDS = {"max_table_chars": AT_LEAST_1}


def clean_table(value: Any, limits: Any) -> tuple[str | None, list[Note]]:
    """The converter's check of a table string: cut at a pair boundary (never half a pair), dropped
    without one `key#:#value` pair, kept with a note when some pairs are malformed (the decoder
    skips those)."""

    def at_pair_boundary(text: str, cap: int) -> str:
        cut = text[:cap]
        return cut[: cut.rindex(TABLE_PAIR_SEPARATOR)] if TABLE_PAIR_SEPARATOR in cut else cut

    table, notes = clean_string(value, limits, TABLE, cut=at_pair_boundary)
    if table is None:
        return None, notes
    valid = len(parse_table(table))
    malformed = sum(1 for item in table.split(TABLE_PAIR_SEPARATOR) if item.strip()) - valid
    if not valid:
        return None, [*notes, ("malformed", f"no key#:#value pair in {table[:60]!r}", "dropped")]
    if malformed:
        notes.append(("malformed_pairs", f"{malformed} malformed pair(s) skipped, {valid} kept", "kept"))
    return table, notes


TABLE = RecordField("table", official="pv", max_chars="max_table_chars", clean=clean_table,
                    noise=lambda words: format_table(zip(words[::2], words[1::2])))  # fmt: skip


MODALITY = ModalitySpec(name="table", config=TableConfig, fields=(TABLE,), stems="scale.modalities.table.stems",
                        limits=TableLimits)  # fmt: skip
