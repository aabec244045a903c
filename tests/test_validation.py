"""Validation: in `fit` every N steps (data workers, exact epochs, past an epoch boundary), without
changing training by a bit; `scale validate` on a checkpoint; the in-loop retrieval mAP@10 equals
`scale.metrics` on the embeddings `scale evaluate` extracts, and is the same on 2 DDP processes."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.m5product import _first_samples
from scale import metrics
from scale.evaluate import compute_embeddings
from scale.export import load_checkpoint_model
from tests.conftest import ROOT, TINY_YAML


def write_config(path: Path, demo_shards: dict, root: Path, validate_every: int | None) -> Path:
    config = yaml.safe_load(TINY_YAML.read_text())
    config["trainer"].update(max_steps=-1, max_epochs=2, default_root_dir=str(root))
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(root), "name": "csv"}}  # fmt: skip
    config["trainer"]["callbacks"] = [{"class_path": "callbacks.checkpoint.SCALECheckpoint", "init_args": {"every_n_train_steps": 100}}]
    config["data"].update(train_shards=str(demo_shards["train"]), mode="exact", batch_size=4, num_workers=2, shuffle_buffer=6)
    if validate_every:
        config["trainer"].update(val_check_interval=validate_every, check_val_every_n_epoch=None)
        config["data"].update(val_shards=str(demo_shards["eval"]), val_batch_size=5)
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "scale.cli", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def logged(root: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted((root / "csv").glob("version_*/metrics.csv")):
        with open(path) as file:
            rows += list(csv.DictReader(file))
    return rows


def values(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name)]


@pytest.fixture(scope="module")
def runs(demo_shards, tmp_path_factory) -> dict[str, Path]:
    """Two epochs of 10 steps, with validation every 4 steps and without."""
    root = tmp_path_factory.mktemp("validation")
    paths = {}
    for name, every in (("validated", 4), ("plain", None)):
        paths[name] = root / name
        cli("fit", "--config", str(write_config(root / f"{name}.yaml", demo_shards, paths[name], every)))
    return paths


@pytest.mark.slow
def test_fit_validates_every_n_steps_across_the_epoch_boundary(runs):
    rows = logged(runs["validated"])
    validated_at = [int(r["step"]) for r in rows if r.get("val/coarse_map@10")]
    # After steps 4, 8, 12, 16 and 20 (steps are logged zero-based), epoch 0 ending at 10.
    assert validated_at == [3, 7, 11, 15, 19]
    for name in ("val/loss", "val/contrastive", "val/masked/text", "val/masked/image", "val/fine_map@10"):
        assert len(values(rows, name)) == 5 and all(math.isfinite(v) for v in values(rows, name)), name
    assert all(0 < v <= 1 for v in values(rows, "val/coarse_map@10"))


@pytest.mark.slow
def test_validation_does_not_change_training_by_a_bit(runs):
    with_validation, without = (
        torch.load(runs[name] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        for name in ("validated", "plain")
    )
    assert with_validation.keys() == without.keys()
    assert all(torch.equal(with_validation[k], without[k]) for k in without), "validation changed the training RNG"


def validate(checkpoint: Path, shards: Path, root: Path, *extra: str) -> dict[str, float]:
    cli("validate", "--config", str(TINY_YAML), "--data.val_shards", str(shards), "--data.val_batch_size", "5",
        "--data.num_workers", "2", "--ckpt_path", str(checkpoint), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(root), "--trainer.logger.name", "csv", *extra)  # fmt: skip
    (row,) = [r for r in logged(root) if r.get("val/coarse_map@10")]
    return {k: float(v) for k, v in row.items() if k.startswith("val/") and v}


@pytest.mark.slow
def test_scale_validate_matches_scale_evaluate_and_is_the_same_on_two_ddp_processes(runs, demo_shards, tmp_path):
    checkpoint = runs["validated"] / "checkpoints" / "last.ckpt"
    one = validate(checkpoint, demo_shards["eval"], tmp_path / "one")
    # The in-loop number of the last validation (same weights, same held-out set) is the same.
    assert one["val/coarse_map@10"] == pytest.approx(values(logged(runs["validated"]), "val/coarse_map@10")[-1], abs=1e-6)

    # Independently: embeddings as `scale evaluate` extracts them, scored by scale.metrics.
    extracted = compute_embeddings(load_checkpoint_model(checkpoint), str(demo_shards["eval"]), batch_size=7)
    for kind, labels in (("coarse", extracted["category"]), ("fine", extracted["instance"])):
        expected = metrics.retrieval_metrics(extracted["contrastive"], labels, ks=(10,))["map@10"]
        assert one[f"val/{kind}_map@10"] == pytest.approx(expected, abs=1e-5), kind

    two = validate(checkpoint, demo_shards["eval"], tmp_path / "two", "--trainer.accelerator", "cpu",
                   "--trainer.devices", "2", "--trainer.strategy", "ddp")  # fmt: skip
    for kind in ("coarse", "fine"):
        assert two[f"val/{kind}_map@10"] == pytest.approx(one[f"val/{kind}_map@10"], abs=1e-5), kind


def test_scale_validate_without_held_out_shards_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scale.cli", "validate", "--config", str(TINY_YAML)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert "data.val_shards is not set" in result.stderr.strip().splitlines()[-1]


def test_val_max_samples_takes_the_first_samples_in_shard_order(demo_shards):
    urls, sizes = _first_samples(str(demo_shards["eval"]), 15)
    assert sum(sizes) == 15 and sizes[:-1] == [10] * (len(sizes) - 1)
    assert _first_samples(str(demo_shards["eval"]), None)[1] == [10, 10, 4]
