"""Decoded samples -> a batch: per modality, stacked tensors plus a (B,) `present` mask.

    batch = {
        "key": [str], "instance": [str], "category": LongTensor (B,),
        "text":  {"input_ids", "attention_mask", "present"},
        "table": {"input_ids", "attention_mask", "entity_index", "entity_role", "present"},
        "image": {"pixels" (B,3,S,S), "present"}
              or, with image.stem=regions, {"regions" (B,R,2048), "boxes" (B,R,5), "region_mask", "present"},
        "video": {"frames" (B,T,3,S,S), "present"}
              or, with video.stem=features, {"features" (B,T,1024), "frame_mask", "present"},
        "audio": {"fbank" (B,frames,mel), "length" (B,), "present"},   (both stems)
    }

Every decoded sample carries every configured modality with fixed shapes (zeros when absent), so
any pattern of missing modalities collates to the same shapes.
"""

from __future__ import annotations

from typing import Any

import torch

from scale.config import MODALITIES


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    if not samples:
        raise ValueError("collate: empty batch")
    batch: dict[str, Any] = {
        "key": [s["key"] for s in samples],
        "instance": [s["instance"] for s in samples],
        "category": torch.tensor([s["category"] for s in samples], dtype=torch.long),
    }
    for modality in MODALITIES:
        if modality in samples[0]:
            batch[modality] = {name: torch.stack([s[modality][name] for s in samples]) for name in samples[0][modality]}
    return batch
