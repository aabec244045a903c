"""End to end: fit (1 process and 2-process CPU DDP) -> checkpoint -> export -> load -> evaluate."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datamodules import demo
from datamodules.m5product import eval_dataloader
from datamodules.shards import write_shards
from scale import load_pretrained
from scale.cli import main
from scale.evaluate import evaluate
from scale.export import export_model, load_checkpoint_model
from scale.model import SCALE
from scale.module import SCALEModule
from tests.conftest import ROOT, TINY_YAML


def fit(config: Path, shards: Path, root: Path, *overrides: str) -> Path:
    main(["fit", "--config", str(config), "--data.train_shards", str(shards),
          "--trainer.default_root_dir", str(root), *overrides])  # fmt: skip
    checkpoint = root / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    return checkpoint


def test_export_then_load_gives_the_trained_modules_embeddings(demo_shards, tmp_path):
    checkpoint = fit(TINY_YAML, demo_shards["train"], tmp_path / "run")
    module = SCALEModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    export = export_model(load_checkpoint_model(checkpoint), tmp_path / "export")
    assert {"model.safetensors", "config.json", "tokenizer"} <= {p.name for p in export.iterdir()}
    loaded = load_pretrained(export)
    batch = next(iter(eval_dataloader(str(demo_shards["eval"]), loaded.config, batch_size=8)))
    expected, actual = module.model.embed(batch), loaded.embed(batch)
    assert set(expected) == set(actual)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=name)
    # Training moved the weights away from a fresh initialisation.
    fresh = SCALE(loaded.config)
    assert not torch.allclose(fresh.fusion.type_embedding.weight, loaded.fusion.type_embedding.weight)


@pytest.mark.slow
def test_two_process_cpu_ddp_fit(demo_shards, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "scale.cli", "fit", "--config", str(TINY_YAML),
         "--data.train_shards", str(demo_shards["train"]), "--trainer.default_root_dir", str(tmp_path),
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 4


@pytest.mark.slow
def test_training_beats_random_initialisation_on_coarse_retrieval(tmp_path):
    """The planted category signal is learned: trained coarse mAP@10 clearly above random init."""
    shards = {}
    for split, count, seed in (("train", 320, 0), ("eval", 160, 1)):
        raw = tmp_path / "raw" / split
        demo.generate(raw, products=count, seed=seed, missing={"video": 0.2, "audio": 0.2})
        write_shards(raw, tmp_path / "shards" / split, max_count=80)
        shards[split] = tmp_path / "shards" / split
    checkpoint = fit(ROOT / "configs" / "smoke.yaml", shards["train"], tmp_path / "run",
                     "--trainer.max_steps", "150", "--trainer.logger.init_args.save_dir", str(tmp_path / "run"),
                     "--trainer.enable_progress_bar", "false",
                     "--data.num_workers", "1")  # fmt: skip
    trained = load_checkpoint_model(checkpoint)
    torch.manual_seed(0)
    random_init = SCALE(trained.config, load_weights=False)
    trained_map = evaluate(trained, str(shards["eval"]))["coarse"]["map@10"]
    random_map = evaluate(random_init, str(shards["eval"]))["coarse"]["map@10"]
    assert trained_map > random_map + 0.1, (trained_map, random_map)
