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
from scale.module import validation_retrieval
from tests.conftest import ROOT, TINY_YAML


def write_config(path: Path, demo_shards: dict, root: Path, validate_every: int | None,
                 trainer: dict | None = None, data: dict | None = None) -> Path:  # fmt: skip
    """Two exact epochs of 10 steps with 2 data workers, unless `trainer` / `data` override it."""
    config = yaml.safe_load(TINY_YAML.read_text())
    config["trainer"].update({"max_steps": -1, "max_epochs": 2, "default_root_dir": str(root), **(trainer or {})})
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(root), "name": "csv"}}  # fmt: skip
    config["trainer"]["callbacks"] = [{"class_path": "callbacks.checkpoint.SCALECheckpoint", "init_args": {"every_n_train_steps": 100}}]
    config["data"].update(train_shards=str(demo_shards["train"]), mode="exact", batch_size=4, num_workers=2, shuffle_buffer=6)
    config["data"].update(data or {})
    if validate_every:
        config["trainer"].update(val_check_interval=validate_every, check_val_every_n_epoch=None)
        config["data"].update(val_shards=str(demo_shards["eval"]), val_batch_size=5)
    path.write_text(yaml.safe_dump(config))
    return path


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in b), "validation changed the training RNG"


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
    assert_bitwise_equal(final_weights(runs["validated"]), final_weights(runs["plain"]))


@pytest.mark.slow
def test_resampled_fit_validates_every_n_steps_without_changing_training(demo_shards, tmp_path):
    """The infinite stream, the held-out loader in the main process and no sanity check: the first
    validation builds the held-out loader in the middle of training (a DataLoader iterator draws its
    base seed from torch's global generator unless it has its own), and still nothing changes."""
    roots = {}
    for name, every in (("validated", 2), ("plain", None)):
        roots[name] = tmp_path / name
        cli("fit", "--config", str(write_config(tmp_path / f"{name}.yaml", demo_shards, roots[name], every,
                                                trainer={"max_steps": 6, "max_epochs": None, "num_sanity_val_steps": 0},
                                                data={"mode": "resampled", "num_workers": 0})))  # fmt: skip
    rows = logged(roots["validated"])
    assert [int(r["step"]) for r in rows if r.get("val/coarse_map@10")] == [1, 3, 5]
    for name in ("val/loss", "val/contrastive", "val/masked/text", "val/fine_map@10"):
        assert len(values(rows, name)) == 3 and all(math.isfinite(v) for v in values(rows, name)), name
    assert_bitwise_equal(final_weights(roots["validated"]), final_weights(roots["plain"]))


def validate(checkpoint: Path, shards: Path, root: Path, *extra: str) -> dict[str, float]:
    result = cli("validate", "--config", str(TINY_YAML), "--data.val_shards", str(shards), "--data.val_batch_size", "5",
                 "--data.num_workers", "2", "--ckpt_path", str(checkpoint), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                 "--trainer.logger.save_dir", str(root), "--trainer.logger.name", "csv", *extra)  # fmt: skip
    assert "val/coarse_map@10" in result.stdout  # Lightning's table of the validation metrics
    assert "sync_dist=True" not in result.stderr  # every logged value is synced (or the same on every rank)
    (row,) = [r for r in logged(root) if r.get("val/coarse_map@10")]
    return {k: float(v) for k, v in row.items() if k.startswith("val/") and v}


@pytest.mark.slow
def test_scale_validate_matches_scale_evaluate_and_is_the_same_on_two_ddp_processes(runs, demo_shards, tmp_path):
    checkpoint = runs["validated"] / "checkpoints" / "last.ckpt"
    one = validate(checkpoint, demo_shards["eval"], tmp_path / "one")
    # The in-loop numbers of the last validation (same weights, same held-out set, same masks) are the same.
    in_loop = logged(runs["validated"])
    for name in ("val/coarse_map@10", "val/fine_map@10", "val/loss", "val/contrastive", "val/masked/image"):
        assert one[name] == pytest.approx(values(in_loop, name)[-1], abs=1e-6), name

    # Independently: embeddings as `scale evaluate` extracts them, scored by scale.metrics.
    extracted = compute_embeddings(load_checkpoint_model(checkpoint), str(demo_shards["eval"]), batch_size=7)

    def expected(kind: str, samples: int) -> float:
        labels = extracted["label" if kind == "coarse" else "instance"][:samples].astype(str)
        return metrics.retrieval_metrics(extracted["query/contrastive"][:samples], labels, ks=(10,))["map@10"]

    for kind in ("coarse", "fine"):
        assert one[f"val/{kind}_map@10"] == pytest.approx(expected(kind, 24), abs=1e-5), kind

    # 2 DDP processes on the first 23 held-out samples (shard order): ranks hold 11 and 12, gathered
    # they score what one process scores on the same 23 embeddings.
    two = validate(checkpoint, demo_shards["eval"], tmp_path / "two", "--data.val_max_samples", "23",
                   "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")  # fmt: skip
    for kind in ("coarse", "fine"):
        assert two[f"val/{kind}_map@10"] == pytest.approx(expected(kind, 23), abs=1e-5), kind
    assert expected("coarse", 23) != expected("coarse", 24)  # the 24th sample is not silently included


def test_scale_validate_without_held_out_shards_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scale.cli", "validate", "--config", str(TINY_YAML)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert "data.val_shards is not set" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_test_and_predict_are_not_offered(subcommand):
    result = subprocess.run([sys.executable, "-m", "scale.cli", subcommand, "--config", str(TINY_YAML)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert "invalid choice" in result.stderr and "Traceback" not in result.stderr


def test_in_loop_retrieval_is_scale_metrics_and_leaves_unlabelled_categories_out():
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    categories = torch.tensor([i % 3 for i in range(20)] + [-1] * 10)  # the last 10 unlabelled
    instances = [str(i % 12) for i in range(30)]
    out = validation_retrieval(x, categories, instances)
    assert out == {
        "val/coarse_map@10": metrics.retrieval_metrics(x[:20], categories[:20], ks=(10,))["map@10"],
        "val/fine_map@10": metrics.retrieval_metrics(x, instances, ks=(10,))["map@10"],
    }
    # No labelled category, every instance distinct (no positive), too few for mAP@10: nothing.
    assert validation_retrieval(x, torch.full((30,), -1), [str(i) for i in range(30)]) == {}
    assert validation_retrieval(x[:10], torch.zeros(10, dtype=torch.long), ["a"] * 10) == {}


def test_val_max_samples_takes_the_first_samples_in_shard_order(demo_shards):
    urls, sizes = _first_samples(str(demo_shards["eval"]), 15)
    assert sum(sizes) == 15 and sizes[:-1] == [10] * (len(sizes) - 1)
    assert _first_samples(str(demo_shards["eval"]), None)[1] == [10, 10, 4]
