"""SLURM preemption: on SIGUSR1, save `last.ckpt` at the next step boundary and requeue the job.

Why not Lightning's own auto-requeue (`SLURMEnvironment(auto_requeue=True)`): its signal handler
saves the checkpoint *inside* the handler, i.e. wherever the signal lands: possibly between a batch's
optimizer step and the loop's progress counters (the resumed run then trains that batch twice), and,
under DDP, with a barrier that can interleave with the gradient all-reduce of the step in flight.
Here the handler only raises a flag. At the end of each training batch the ranks agree on it (a max
over ranks, so all stop at the same step even if the signal reached them at different times), all
save `last.ckpt` together with everything a bitwise resume needs, and rank 0 asks SLURM to requeue
the job. The requeued job runs the same sbatch script, whose `--ckpt_path last` continues the run.

The CLI (`scale/cli.py`) adds this callback, and turns Lightning's handler off, when it runs under
SLURM (SLURM_JOB_ID set); elsewhere it does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes (array jobs: `<array job>_<task>`), None outside SLURM."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


class SlurmRequeue(L.Callback):
    def __init__(self, signum: int = signal.SIGUSR1, requeue: bool = True):
        """
        Args:
            signum: the signal `#SBATCH --signal` sends (SIGUSR1 in configs/slurm/*.sbatch).
            requeue: call `scontrol requeue` after saving (False: save and stop only).
        """
        self.signum = signum
        self.requeue = requeue
        self._signalled = False
        self._previous_handler: Any = None

    def _handler(self, signum, frame) -> None:
        self._signalled = True  # nothing else here: the work happens at a step boundary

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and slurm_job_id() is not None:
            self._previous_handler = signal.signal(self.signum, self._handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(self.signum, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # Only at optimizer-step boundaries: a save inside a gradient-accumulation window would lose
        # the window's accumulated gradients (all ranks accumulate in step, so all skip alike).
        should_accumulate = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", None)
        if should_accumulate is not None and should_accumulate():
            return
        # Every rank takes part in the reduction at every step; a flag is one small all-reduce.
        flag = torch.tensor(float(self._signalled), device=trainer.strategy.root_device)
        if trainer.strategy.reduce(flag, reduce_op="max").item() == 0:
            return
        self._signalled = False
        rank_zero_info(f"SLURM preemption signal: saving last.ckpt at step {trainer.global_step} and requeueing")
        self._save_last(trainer)  # every rank: sharded strategies write their part
        if self.requeue and trainer.is_global_zero:
            job = slurm_job_id()
            try:
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
                error = result.stderr.strip() if result.returncode != 0 else None
            except (OSError, subprocess.TimeoutExpired) as exc:  # no scontrol on the node, controller down
                error = str(exc)
            if error is not None:
                rank_zero_warn(f"scontrol requeue {job} failed ({error}): resume by hand with --ckpt_path last")
        trainer.should_stop = True

    @staticmethod
    def _save_last(trainer: L.Trainer) -> None:
        """`last.ckpt` through the run's ModelCheckpoint (so it knows the step is saved and writes no
        second copy at the end), where `--ckpt_path last` looks."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last:
                # `save_last="link"` would point last.ckpt at the newest *earlier* checkpoint: this
                # step is saved as a real file (a link there is removed first, not written through).
                candidates = callback._monitor_candidates(trainer)
                path = callback.format_checkpoint_name(candidates, callback.CHECKPOINT_NAME_LAST)
                if trainer.is_global_zero and os.path.islink(path):
                    os.unlink(path)
                trainer.strategy.barrier("SlurmRequeue.save_last")
                mode, callback.save_last = callback.save_last, True
                try:
                    callback._save_last_checkpoint(trainer, candidates)
                finally:
                    callback.save_last = mode
                return
        trainer.save_checkpoint(str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"))
