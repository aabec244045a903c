"""Decoded samples -> a batch: per modality, its stem's tensors stacked, plus a (B,) `present` mask.

    batch = {"key": [str], "label": [str | None], "category": LongTensor (B,) (-1: unlabeled),
             "instance": [str | None],
             <modality>: {<each key its stem's `tensors` declares>: (B, *shape), "present": (B,) bool}, ...}

The per-modality layout is declared once, by each stem (`scale/modalities/<name>.py`, `tensors`);
`scale.modalities.batch_layout(config)` lists it for a config. Every decoded sample carries every
configured modality with those fixed shapes (the placeholder when absent), so any pattern of
missing modalities collates to the same shapes.

Each tensor list is stacked by `torch.utils.data.default_collate`, not `torch.stack`: inside a
data worker it allocates the batch in shared memory and stacks into it, so handing the batch to the
training process costs nothing more. A batch stacked in ordinary memory is copied into fresh
shared memory when the worker's queue pickles it: an extra pass over every byte and a page fault
per fresh page, which cost about 3 ms per all-five product through one worker against 0.3 ms to
stack it (docs/performance.md, "the data workers' hand-over").
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate


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
            batch[name] = {key: default_collate([s[name][key] for s in samples]) for key in first}
    return batch
