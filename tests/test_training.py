"""End to end: fit (1 process and 2-process CPU DDP) -> checkpoint -> export -> load -> evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
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
def test_two_process_cpu_ddp_fit_in_exact_epochs(demo_shards, tmp_path):
    """Real DDP through Lightning: in exact mode the two ranks together train on every product once
    in epoch 0, with unequal local batches at the tail (20 per rank in steps of 6, 6, 6, 2), and
    go on into epoch 1. Each rank runs its encoders in two micro-batches (checkpointed pieces under
    the DDP wrapper; a tail batch of 2 in pieces of 1)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "keys-{rank}.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "scale.cli", "fit", "--config", str(TINY_YAML),
         "--data.train_shards", str(demo_shards["train"]), "--trainer.default_root_dir", str(tmp_path),
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "6",
         "--data.mode", "exact", "--data.batch_size", "6", "--data.num_workers", "1",
         "--model.config.micro_batches", "2",
         "--trainer.callbacks+=callbacks.sample_log.SampleKeyLog", f"--trainer.callbacks.path={log}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    records = [json.loads(line) for rank in (0, 1) for line in Path(str(log).format(rank=rank)).read_text().splitlines()]
    epoch0 = [k for r in records if r["epoch"] == 0 for k in r["keys"]]
    assert Counter(epoch0) == Counter(json.loads(line)["id"] for line in (demo_shards["raw_train"] / "meta.jsonl").open())
    assert sorted(len(r["keys"]) for r in records if r["epoch"] == 0) == [2, 2, 6, 6, 6, 6, 6, 6]
    assert {r["epoch"] for r in records} == {0, 1}


@pytest.mark.slow
def test_training_beats_random_initialisation_on_coarse_retrieval(tmp_path):
    """Every modality learns its planted category cue: each modality's own embedding, the fused and
    the contrastive one, beat the same architecture at random initialisation on coarse mAP@10."""
    shards = {}
    # 1,200 products: 150 steps of 32 are 4 epochs of them; 320 products (15 epochs) are memorised
    # by their instance cues, and table and image then stay at their random features.
    for split, count, seed in (("train", 1200, 0), ("eval", 160, 1)):
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
    scores = {state: evaluate(model, str(shards["eval"]), tasks=("coarse", "fine"))[0]["embeddings"]
              for state, model in (("trained", trained), ("random", random_init))}  # fmt: skip

    def gain(kind: str, task: str) -> float:
        return scores["trained"][kind][task]["map@10"] - scores["random"][kind][task]["map@10"]

    # Measured gains on this run (docs/measured.md, "Does every modality learn?"): coarse fused
    # .086, contrastive .404, text .102, table .066, image .027, video .166, audio .060; fine
    # contrastive .045 (fused fine is below random here, .073 vs .144: no loss trains it).
    for kind in trained.config.modalities:
        assert gain(kind, "coarse") > 0.0, (kind, scores)
    assert gain("fused", "coarse") > 0.05, scores
    assert gain("contrastive", "coarse") > 0.2, scores
    assert gain("contrastive", "fine") > 0.0, scores
