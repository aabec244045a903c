"""Distributed strategies for `trainer.strategy` (configs/strategy/*.yaml), and the hardware checks
that turn an impossible request into one line instead of a traceback.

- DDP (Lightning's `ddp`): every rank holds the whole model; the default.
- FSDP (`SCALEFSDPStrategy`): parameters, gradients and optimizer state sharded across ranks, with
  the model's transformer blocks as the units (`scale.model.TRANSFORMER_BLOCKS`: YAML cannot name a
  set of classes, and the model knows its own blocks), activation checkpointing of the same blocks
  by option, and sharded checkpoints (a folder with one file per rank) by default.
- DeepSpeed ZeRO-2 / ZeRO-3: Lightning's `DeepSpeedStrategy` (`configs/strategy/deepspeed_zero*.yaml`);
  CUDA only.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn


class SCALEFSDPStrategy(ModelParallelStrategy):
    """FSDP over all ranks, built on torch's FSDP2 (`fully_shard`) through Lightning's
    ModelParallelStrategy: FSDP2 also runs on CPUs (gloo), where the FSDP1 wrapper behind Lightning's
    `FSDPStrategy` refuses ("FSDP needs a non-CPU accelerator device"). The model is sharded in
    `SCALEModule.configure_model`, which calls `shard_model` below."""

    def __init__(self, activation_checkpointing: bool = False, reshard_after_forward: bool = True,
                 sharded_checkpoint: bool = True, **kwargs: Any):  # fmt: skip
        """
        Args:
            activation_checkpointing: recompute each transformer block's activations in the
                backward pass instead of keeping them (about a third more compute; activation memory
                of one block per trunk instead of all).
            reshard_after_forward: free the gathered parameters of a block after its forward
                (ZeRO-3-like, least memory); False keeps them until the backward (ZeRO-2-like,
                less communication).
            sharded_checkpoint: each rank writes its shard into a checkpoint folder (no rank gathers
                the whole model); False: one file. `scale export` reads both.
            **kwargs: Lightning's ModelParallelStrategy arguments (`process_group_backend`, `timeout`).
        """
        super().__init__(save_distributed_checkpoint=sharded_checkpoint, **kwargs)
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # Every rank is a data-parallel shard (no tensor parallelism).
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def shard_model(self, model: nn.Module) -> None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
        from torch.distributed.fsdp import fully_shard

        from scale.model import TRANSFORMER_BLOCKS

        if self.activation_checkpointing:
            apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, TRANSFORMER_BLOCKS))
        mesh = self.device_mesh["data_parallel"]
        for module in model.modules():  # each shared block once (modules() deduplicates)
            if isinstance(module, TRANSFORMER_BLOCKS):
                fully_shard(module, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward)


def check_hardware(accelerator: Any, strategy: Any) -> None:
    """One-line errors (ValueError) for requests this machine cannot run."""
    name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", type(strategy).__name__)
    gpu = torch.cuda.is_available()
    if str(accelerator) in ("gpu", "cuda") and not gpu:
        raise ValueError(f"trainer.accelerator={accelerator}, but this machine has no CUDA GPU "
                         "(use trainer.accelerator=cpu or auto)")  # fmt: skip
    if "deepspeed" in str(name).lower() and not gpu and not _declares_cpu_support(name):
        raise ValueError(f"trainer.strategy {name}: DeepSpeed runs on CUDA GPUs only and this machine has none "
                         "(on CPU use configs/strategy/ddp.yaml or fsdp.yaml)")  # fmt: skip


def _declares_cpu_support(class_path: str) -> bool:
    """A strategy class that sets `runs_on_cpu = True` (the test suite's `tests/cpu_deepspeed.py`,
    Lightning's DeepSpeedStrategy with its CUDA checks lifted) is let through."""
    module, _, name = str(class_path).rpartition(".")
    try:
        return bool(getattr(getattr(importlib.import_module(module), name), "runs_on_cpu", False))
    except (ImportError, AttributeError, ValueError):
        return False
