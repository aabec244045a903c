"""Which products each training step saw: one JSON line per batch and rank.

For tracing a loss spike to its samples, and for checking data order: the resume test reads it to
prove that a resumed exact epoch repeats and skips nothing. Lines are flushed as written, so a
killed run leaves every completed step on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


class SampleKeyLog(L.Callback):
    def __init__(self, path: str):
        """
        Args:
            path: JSONL file; `{rank}` in it is replaced by the global rank (one file per rank).
        """
        self.path = path
        self._file = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = Path(self.path.format(rank=trainer.global_rank))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "batch": batch_idx, "keys": list(batch["key"])}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
