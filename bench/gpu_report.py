"""A callback for bench/gpu_check.sh: one JSON line at the end of training with the steady-state
samples/s (steps after the first `skip`, which include compilation and allocator warm-up) and the
peak GPU memory of this rank."""

from __future__ import annotations

import json
import time

import lightning as L
import torch


class GPUReport(L.Callback):
    def __init__(self, label: str = "", skip: int = 5):
        self.label, self.skip = label, skip
        self._samples, self._start, self._step = 0, None, 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step += 1
        if self._step == self.skip + 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start, self._samples = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._start is not None:
            self._samples += len(batch["key"])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._start if self._start else float("nan")
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        report = {"label": self.label, "rank": trainer.global_rank, "steps_timed": self._step - self.skip,
                  "samples_per_s": self._samples * trainer.world_size / elapsed, "peak_gib": peak,
                  "precision": str(trainer.precision), "strategy": type(trainer.strategy).__name__}  # fmt: skip
        print("GPU_REPORT " + json.dumps(report), flush=True)
