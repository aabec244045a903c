"""Throughput logging: Lightning's ThroughputMonitor, told how to count samples and tokens of a SCALE batch."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def batch_size(batch: dict[str, Any]) -> int:
    return len(batch["key"])


def batch_tokens(batch: dict[str, Any]) -> int:
    """Real tokens of the modalities with an `attention_mask` (text and table: the one length that
    varies per sample)."""
    return sum(int(inputs["attention_mask"].sum()) for inputs in batch.values()
               if isinstance(inputs, dict) and "attention_mask" in inputs)  # fmt: skip


class SCALEThroughput(ThroughputMonitor):
    """Logs samples/s and text+table tokens/s (per device and in total) every `window_size` steps."""

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size)
