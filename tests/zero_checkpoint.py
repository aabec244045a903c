"""Writes a real DeepSpeed ZeRO checkpoint of the tiny SCALE module, as Lightning's DeepSpeedStrategy
lays it out, on the CPU (DeepSpeed's CPU accelerator, one process, gloo): Lightning refuses to run
DeepSpeed without CUDA, DeepSpeed itself does not.

    DS_ACCELERATOR=cpu python -m tests.zero_checkpoint OUT_FOLDER STAGE

OUT_FOLDER/last.ckpt/ gets `latest` and `checkpoint/` (model states + optimizer shard), and
OUT_FOLDER/weights.pt the engine's fp32 weights after two optimizer steps (named as in a Lightning
checkpoint) to compare an export with.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn


class _Wrapper(nn.Module):
    """Lightning hands DeepSpeed its module under `_forward_module` (parameter names follow)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._forward_module = module

    def forward(self, batch):
        return self._forward_module.model(batch, masked_modeling=True, returns="losses")["loss"]


def main(out: Path, stage: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29611"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
    import deepspeed

    from scale.module import SCALEModule
    from tests.conftest import tiny_config
    from tests.test_model import random_batch

    torch.manual_seed(0)
    module = SCALEModule(tiny_config())
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=_Wrapper(module), model_parameters=module.parameters(), config=config)
    for _ in range(2):
        engine.backward(engine(random_batch(module.config, torch.rand(4, 5) > 0.3)))
        engine.step()
    client_state = {"hyper_parameters": {"config": asdict(module.config), "optimizer": asdict(module.optimizer_config)},
                    "global_step": 2}  # fmt: skip
    engine.save_checkpoint(str(out / "last.ckpt"), client_state=client_state, tag="checkpoint")
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    else:
        weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    torch.save(weights, out / "weights.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
