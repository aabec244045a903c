"""Test-only callbacks: stall a run at a step (so a test can `kill -9` it at a known point, as a node
failure would), slow every step (time to signal a run mid-epoch), save each rank's final weights."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch


class StallAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.step:
            time.sleep(3600)


class SlowSteps(L.Callback):
    """Every training step takes at least `seconds`: time for a test to signal a run mid-epoch."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        time.sleep(self.seconds)


class SaveRankWeights(L.Callback):
    """Each rank writes its model's state_dict to `path` (`{rank}` replaced) when training ends."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.path.format(rank=trainer.global_rank))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(pl_module.state_dict(), path)


class StallAtEpochEnd(L.Callback):
    """Stall when epoch `epoch` ends, before the checkpoint callbacks' end-of-epoch hooks (Lightning
    runs those last): a kill then leaves the last periodic checkpoint of that epoch as it was."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.current_epoch >= self.epoch:
            time.sleep(3600)
