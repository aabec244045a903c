"""A test-only callback: the training process stops making progress at a given step, so a test can
kill it (`kill -9`) at a known point, as a node failure would."""

from __future__ import annotations

import time

import lightning as L


class StallAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step >= self.step:
            time.sleep(3600)
