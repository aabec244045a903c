"""Lightning's own DeepSpeedStrategy on CPU processes, for the tests (tests/test_deepspeed_cpu.py).

Lightning refuses DeepSpeed without CUDA in three places, none of which DeepSpeed itself needs
(DeepSpeed 0.19 has a CPU accelerator, `DS_ACCELERATOR=cpu`, whose process group is gloo):

1. `setup_environment`: "The DeepSpeed strategy is only supported on CUDA GPUs";
2. `setup_distributed` checks that each rank's device index is its local rank (CPU devices have no
   index: "The selected device indices [None, None] don't match the local rank values");
3. `deepspeed.initialize(args=Namespace(device_rank=root_device.index))`: None >= 0 fails inside
   DeepSpeed (`TypeError`).

`CPUDeepSpeedStrategy` skips 1 and 2 and passes the local rank for 3; everything else is Lightning's
code: the same engine set-up, training step, gradient clipping and checkpoint folder
(`last.ckpt/latest`, `last.ckpt/checkpoint/*_model_states.pt`, one `*_optim_states.pt` per rank) as on
GPUs. `runs_on_cpu = True` lets it past `scale.strategies.check_hardware`. After each checkpoint it
also writes `<checkpoint>.weights.pt`: the engine's full fp32 weights at that moment (gathered from the
ranks under ZeRO-3), named as in a Lightning checkpoint, for the test to compare an export with.
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

import deepspeed
import deepspeed.ops

# DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce (used by its inference
# kernels only) at start-up: about a minute with a C++ compiler, a failure without one.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    runs_on_cpu = True

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # without DeepSpeedStrategy's CUDA check (1)

    def setup_distributed(self) -> None:
        reset_seed()  # as DeepSpeedStrategy.setup_distributed, without the device-index check (2)
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),  # (3)
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        super().save_checkpoint(checkpoint, filepath, storage_options)
        filepath = self.broadcast(filepath)
        module = self.lightning_module
        parameters = list(module.parameters())
        # Every rank takes part in the gather (ZeRO-3); rank 0 writes.
        with deepspeed.zero.GatheredParameters(parameters) if self.zero_stage_3 else nullcontext():
            weights = {name: value.detach().clone() for name, value in module.state_dict().items()}
        if self.is_global_zero:
            torch.save(weights, f"{filepath}.weights.pt")
        self.barrier()

