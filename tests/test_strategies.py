"""Strategies (configs/strategy/*.yaml): each parses; FSDP trains on 2 CPU processes (gloo) and its
sharded checkpoint exports to the same weights as a one-file checkpoint of the same run; what this
machine cannot run is one line. DeepSpeed ZeRO-2/3 through `scale fit` on CPU processes and their
checkpoint folders' export: tests/test_deepspeed_cpu.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale.export import load_checkpoint_model
from tests.conftest import ROOT, TINY_YAML

STRATEGIES = sorted((ROOT / "configs" / "strategy").glob("*.yaml"))


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scale.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})  # fmt: skip


@pytest.mark.parametrize("path", STRATEGIES, ids=[p.name for p in STRATEGIES])
def test_strategy_yaml_parses(path):
    result = cli("fit", "--config", "configs/base.yaml", "--config", str(path), "--data.train_shards", "unused", "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "strategy" in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["--config", "configs/strategy/deepspeed_zero2.yaml"], "DeepSpeed runs on CUDA GPUs only"),
    (["--config", "configs/strategy/deepspeed_zero3.yaml"], "DeepSpeed runs on CUDA GPUs only"),
    (["--trainer.strategy", "deepspeed_stage_2"], "DeepSpeed runs on CUDA GPUs only"),
    (["--trainer.accelerator", "gpu"], "has no CUDA GPU"),
], ids=["zero2", "zero3", "registry_name", "gpu"])  # fmt: skip
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_what_this_machine_cannot_run_is_one_line(demo_shards, args, expected):
    result = cli("fit", "--config", str(TINY_YAML), "--data.train_shards", str(demo_shards["train"]), *args)
    assert result.returncode != 0
    assert expected in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_exports_the_same_from_sharded_and_full_checkpoints(demo_shards, tmp_path):
    exports = {}
    for kind, sharded in (("sharded", "true"), ("full", "false")):
        root = tmp_path / kind
        result = cli("fit", "--config", str(TINY_YAML), "--config", "configs/strategy/fsdp.yaml",
                     "--trainer.strategy.init_args.sharded_checkpoint", sharded, "--model.config.pack_tokens", "false",
                     "--trainer.strategy.init_args.activation_checkpointing", "true",
                     "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--data.num_workers", "0",
                     "--data.train_shards", str(demo_shards["train"]), "--trainer.default_root_dir", str(root))  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        last = root / "checkpoints" / "last.ckpt"
        assert last.is_dir() == (kind == "sharded")
        exports[kind] = weights(load_checkpoint_model(last))
    assert exports["sharded"].keys() == exports["full"].keys()
    assert all(torch.equal(exports["sharded"][k], exports["full"][k]) for k in exports["full"])

    # The same run under DDP trains the same model (up to the order of floating-point sums). All
    # three runs padded (pack_tokens false): packing runs length buckets under DDP but one bucket
    # per call under FSDP (scale/packing.py), and dropout draws its masks per tensor shape, so
    # packed runs of the two strategies train equally well but not bitwise alike.
    root = tmp_path / "ddp"
    result = cli("fit", "--config", str(TINY_YAML), "--config", "configs/strategy/ddp.yaml", "--trainer.accelerator", "cpu",
                 "--trainer.devices", "2", "--data.num_workers", "0", "--data.train_shards", str(demo_shards["train"]),
                 "--trainer.default_root_dir", str(root), "--model.config.pack_tokens", "false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = weights(load_checkpoint_model(root / "checkpoints" / "last.ckpt"))
    for name, value in ddp.items():
        sharded = exports["sharded"][name]
        if name.endswith("attn.qkv.bias"):
            # An attention key bias gets a zero gradient in exact arithmetic (it shifts all of a
            # query's logits alike), so its gradient is float noise that AdamW turns into steps of
            # up to lr: the two strategies' summation orders then differ by up to lr x steps there.
            width = value.numel() // 3
            keys = slice(width, 2 * width)
            torch.testing.assert_close(sharded[keys], value[keys], rtol=0, atol=4 * 1e-3, msg=name)
            sharded, value = torch.cat([sharded[:width], sharded[2 * width:]]), torch.cat([value[:width], value[2 * width:]])
        elif name.endswith("attention.self.key.bias"):  # BERT's, the same
            torch.testing.assert_close(sharded, value, rtol=0, atol=4 * 1e-3, msg=name)
            continue
        torch.testing.assert_close(sharded, value, rtol=1e-3, atol=1e-5, msg=name)


def test_export_refuses_a_folder_of_no_known_format(tmp_path):
    (tmp_path / "ckpt").mkdir()
    result = cli("export", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "neither an FSDP sharded checkpoint" in result.stderr.strip().splitlines()[-1]
