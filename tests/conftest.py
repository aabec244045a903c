"""Shared fixtures: the tiny test config, and a small demo product set converted to shards once
per session (real JPEG/MP4/WAV files and real tar shards)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from datamodules import demo
from datamodules.shards import write_shards
from scale.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs" / "test_tiny.yaml"

# Tests use tiny tensors: one thread avoids oversubscription when pytest, data workers and DDP
# processes share the 2 cores of CI (measured: a tiny training loop ran 10x slower with 2 threads
# on a loaded machine).
torch.set_num_threads(1)


def tiny_config(**overrides) -> ModelConfig:
    """The model section of configs/test_tiny.yaml as a ModelConfig."""
    data = yaml.safe_load(TINY_YAML.read_text())["model"]["config"]
    data.update(overrides)
    return ModelConfig.from_dict(data)


def helper_endings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """How each video-decoder helper this process kills ends ("signal 9": killed while still
    running), recorded from now on: a timeout shown by what happened, not by a wall clock."""
    from scale.media import video as video_reader

    endings, kill = [], video_reader._Helper.kill
    monkeypatch.setattr(video_reader._Helper, "kill", lambda self: endings.append(kill(self)) or endings[-1])
    return endings


def one_batch_and_warnings(shards: Path, config: ModelConfig) -> tuple[dict, list[str]]:
    """The whole (small) shard set as one evaluation batch, and the warnings its decoding raised."""
    from datamodules.m5product import eval_dataloader

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(eval_dataloader(str(shards), config, batch_size=64))
    assert len(batches) == 1
    return batches[0], [str(w.message) for w in caught]


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> dict[str, Path]:
    """40 training and 24 evaluation products, some modalities missing, as raw folders and shards."""
    root = tmp_path_factory.mktemp("demo")
    paths = {}
    for split, count, seed in (("train", 40, 0), ("eval", 24, 1)):
        raw = root / "raw" / split
        demo.generate(raw, products=count, seed=seed, missing={"video": 0.3, "audio": 0.3, "table": 0.2},
                      image_size=48, video_size=32, video_seconds=1.0, fps=6, audio_seconds=1.0)  # fmt: skip
        write_shards(raw, root / "shards" / split, max_count=10)
        paths[f"raw_{split}"] = raw
        paths[split] = root / "shards" / split
    return paths
