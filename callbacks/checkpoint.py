"""Checkpoints a preempted or crashed run can always continue from.

Lightning's defaults fall short in three ways, each fixed here:

- **Atomic writes** (`AtomicCheckpointIO`). Lightning serialises into memory and then copies the
  bytes through fsspec, whose local "transaction" writes a temporary file in the system temp folder
  and *copies* it over the target: a full disk or a kill during that copy leaves a truncated
  `last.ckpt` that cannot be loaded, and the previous good one is already gone. Here the bytes go to a
  temporary file next to the target, are fsynced, and replace the target with one `os.replace` (atomic
  on POSIX within a folder); the folder is fsynced so the rename survives a power loss. A failure
  leaves the previous checkpoint untouched and no temporary file behind.
- **Nothing is unpickled** on load: `weights_only=True` always, local or remote. (Lightning loads
  remote files, e.g. `--ckpt_path http://...`, with `weights_only=False`: a crafted pickle would run.)
- **The end of the run is always saved** (`SCALECheckpoint`): a 26-step run checkpointing every 4
  steps ends with `last` at step 26, not 24; `every_n_minutes` saves by wall time as well.

The random-number state that a bitwise resume also needs is saved by the LightningModule
(`scale/module.py`), the data stream's position by the data module (`datamodules/m5product.py`).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from scale.export import refused_to_unpickle


def _is_local(path: str | Path) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` into a temporary file beside `path`, fsync, then one atomic rename onto `path`."""
    path = Path(str(path).removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    # The leading dot and the suffix keep the partial file out of Lightning's `last*.ckpt` search.
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local writes and no unpickling on load (module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(f"{path}: checkpoints are loaded with weights_only=True only (no code is unpickled)")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(refused_to_unpickle(path, error)) from None


class SCALECheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint that keeps `last` and always saves the run's final step.

    Periodic saves by steps (`every_n_train_steps`) and by wall time (`every_n_minutes`, or
    Lightning's `train_time_interval`) as in Lightning; on top of that, the state at the end of
    training is written to `last` whatever the period, so `--ckpt_path last` and `scale export`
    always see the final weights.
    """

    def __init__(self, *args: Any, every_n_minutes: float | None = None, save_last: bool | str = True, **kwargs: Any):
        """
        Args:
            every_n_minutes: also save every this many minutes of training (wall clock), measured
                on rank 0 and broadcast, so every rank saves at the same step. None: by steps only.
            save_last: keep `last.ckpt` (default True; `link` makes it a symlink to the newest).
            *args, **kwargs: Lightning's ModelCheckpoint arguments (`every_n_train_steps`, `dirpath`, ...).
        """
        if every_n_minutes is not None:
            if every_n_minutes <= 0:
                raise ValueError(f"every_n_minutes must be > 0, got {every_n_minutes}")
            if kwargs.get("train_time_interval") is not None:
                raise ValueError("give every_n_minutes or train_time_interval, not both")
            kwargs["train_time_interval"] = timedelta(minutes=every_n_minutes)
        super().__init__(*args, save_last=save_last, **kwargs)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        finish_epoch_of_last_batch(checkpoint)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.fast_dev_run or trainer.sanity_checking or self._last_global_step_saved == trainer.global_step:
            return
        if trainer.global_step == 0:  # nothing trained: nothing worth a checkpoint
            return
        monitor_candidates = self._monitor_candidates(trainer)
        if self.monitor is None:
            self._save_topk_checkpoint(trainer, monitor_candidates)
        self._save_last_checkpoint(trainer, monitor_candidates)


def finish_epoch_of_last_batch(checkpoint: dict[str, Any]) -> None:
    """A checkpoint saved on the last batch of an epoch, before the epoch's end (a periodic save
    that falls there; a preemption or a crash right after it), holds Lightning's mid-epoch loop
    state with every batch done. Resumed as it is, Lightning miscounts the epochs: it trains the
    next epoch but records it as the finished one, so that a second resume reruns an epoch or
    trains one from an empty iterator. Its loop state is made that of the finished epoch instead
    (the counters Lightning's own end-of-epoch save has): the batch counted as completed, the epoch
    as processed. The data module then starts the next epoch from its first batch."""
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop:
        return
    batches, epochs = loop["epoch_loop.batch_progress"], loop["epoch_progress"]
    current = batches["current"]
    mid_epoch = epochs["current"]["processed"] < epochs["current"]["started"]
    on_last_batch = batches.get("is_last_batch") and current["processed"] == current["ready"] == current["completed"] + 1
    if not (mid_epoch and on_last_batch):
        return
    for progress in (batches["current"], batches["total"]):
        progress["completed"] = progress["processed"]
    for progress in (epochs["current"], epochs["total"]):
        progress["processed"] = progress["started"]
    state = loop.get("epoch_loop.state_dict", {})
    if "_batches_that_stepped" in state:
        state["_batches_that_stepped"] += 1


__all__ = ["AtomicCheckpointIO", "SCALECheckpoint", "atomic_torch_save", "finish_epoch_of_last_batch", "refused_to_unpickle"]
