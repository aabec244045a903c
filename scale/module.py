"""The LightningModule: one training step = SCALE forward with masking + its losses."""

from __future__ import annotations

import math

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from scale import rng_state
from scale.config import ModelConfig, OptimizerConfig, _from_dict
from scale.model import SCALE


class SCALEModule(L.LightningModule):
    def __init__(self, config: ModelConfig | None = None, optimizer: OptimizerConfig | None = None):
        """
        Args:
            config: the model (encoders, fusion, harmonization, losses).
            optimizer: AdamW, learning rates and schedule.
        """
        super().__init__()
        # Checkpoints keep plain dicts (loadable with torch.load(weights_only=True)); accept both.
        if isinstance(config, dict):
            config = ModelConfig.from_dict(config)
        if isinstance(optimizer, dict):
            optimizer = _from_dict(OptimizerConfig, optimizer)
        self.config = config or ModelConfig()
        self.optimizer_config = optimizer or OptimizerConfig()
        self.save_hyperparameters({"config": asdict(self.config), "optimizer": asdict(self.optimizer_config)})
        self.model = SCALE(self.config)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        output = self.model(batch, masked_modeling=True)
        losses = self.model.losses(output)
        size = len(batch["key"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=size)
        for modality in self.model.modalities:
            self.log(f"data/present_{modality}", batch[modality]["present"].float().mean(), batch_size=size)
        return losses["loss"]

    def configure_optimizers(self):
        from scale.optim import build_optimizer

        optimizer, scheduler = build_optimizer(self.model, self.optimizer_config, self._schedule_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule_steps(self) -> int:
        """The schedule's length: max_steps, or for exact epochs steps per epoch x max_epochs.

        Counted from the data module rather than with `trainer.estimated_stepping_batches`: that
        builds and starts the training loader before Lightning has restored a resumed run's loops,
        and Lightning keeps that first iterator, so a run resumed in epoch 1 replayed epoch 0."""
        trainer = self.trainer
        if trainer.max_steps > 0:
            return trainer.max_steps
        steps_per_epoch = getattr(trainer.datamodule, "steps_per_epoch", lambda: None)()
        if steps_per_epoch is None or trainer.max_epochs is None or trainer.max_epochs <= 0:
            return -1  # build_optimizer explains what is missing
        if isinstance(trainer.limit_train_batches, int):
            steps_per_epoch = min(steps_per_epoch, trainer.limit_train_batches)
        else:
            steps_per_epoch = int(steps_per_epoch * trainer.limit_train_batches)
        return math.ceil(steps_per_epoch / trainer.accumulate_grad_batches) * trainer.max_epochs

    # ---- random-number state: a resumed run draws the same masks and dropout -----------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_state.collect_all_ranks()  # every rank saves, rank 0 writes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_states_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # Restored here, after everything else of the resume, just before the first step: between a
        # save and the next step an uninterrupted run draws nothing from the global generators
        # (validation forks them, the loader has its own generator).
        states, self._rng_states_to_restore = getattr(self, "_rng_states_to_restore", None), None
        if states is None:
            return
        if len(states) != self.trainer.world_size:
            rank_zero_warn(f"the checkpoint holds the random state of {len(states)} ranks, this run has "
                           f"{self.trainer.world_size}: masks and dropout will differ from an uninterrupted run")  # fmt: skip
            return
        rng_state.restore(states[self.trainer.global_rank])
