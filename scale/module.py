"""The LightningModule: one training step = SCALE forward with masking + its losses."""

from __future__ import annotations

import math

from dataclasses import asdict
from typing import Any

import lightning as L
import torch

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

        # A resampled stream is infinite: the schedule's length is max_steps. Exact epochs have a
        # length, so max_epochs alone also works (Lightning multiplies it out).
        steps = self.trainer.max_steps
        if steps <= 0 and math.isfinite(self.trainer.estimated_stepping_batches):
            steps = int(self.trainer.estimated_stepping_batches)
        optimizer, scheduler = build_optimizer(self.model, self.optimizer_config, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
