"""Decoded samples -> a batch: per modality, its stem's tensors stacked, plus a (B,) `present` mask.

    batch = {"key": [str], "label": [str | None], "category": LongTensor (B,) (-1: unlabeled),
             "instance": [str | None],
             <modality>: {<each key its stem's `tensors` declares>: (B, *shape), "present": (B,) bool}, ...}

The per-modality layout is declared once, by each stem (`scale/modalities/<name>.py`, `tensors`);
`scale.modalities.batch_layout(config)` lists it for a config. Every decoded sample carries every
configured modality with those fixed shapes (the placeholder when absent), so any pattern of
missing modalities collates to the same shapes.
"""

from __future__ import annotations

from typing import Any

import torch


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    if not samples:
        raise ValueError("collate: empty batch")
    batch: dict[str, Any] = {
        "key": [s["key"] for s in samples],
        "label": [s["label"] for s in samples],
        "instance": [s["instance"] for s in samples],
        "category": torch.tensor([s["category"] for s in samples], dtype=torch.long),
    }
    for name, first in samples[0].items():
        if isinstance(first, dict):  # a modality: its tensors and `present`
            batch[name] = {key: torch.stack([s[name][key] for s in samples]) for key in first}
    return batch
