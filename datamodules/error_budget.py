"""The error budget: what the data path has read, what was wrong with it, and when that is too much.

Every failure is counted by kind (`image`, `video: timeout`, `tar`, `json`, ...) and logged at a
limited rate (the first of each kind, then every `warn_every`-th). A sample counts as bad once,
however many of its fields failed; an error outside any sample (a truncated shard) counts as a
sample of its own, and a bad one. Past `max_error_rate` of bad samples, after
`error_rate_min_samples`, the run stops with `DataErrorRateExceeded` and the counts per kind.

One budget for the whole job. Each data worker counts into its own `ErrorBudget` and hands what it
counted since its last batch to the training process inside that batch (`COUNTS_KEY`, a
`DataCounts`); `DataErrorStop`, a callback the command line always adds, sums them, across ranks
at every logging interval (`trainer.log_every_n_steps`, once `error_rate_min_samples` have been read)
and at the end of each epoch and of the run (whatever the count), and raises on every rank at the
same step with the same one-line message. Its totals are part of every
checkpoint, so the budget runs across epochs (exact mode starts new workers each epoch) and
resumes. A decoder used on its own (`eval_dataloader`, a test) enforces its own budget instead.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)

COUNTS_KEY = "data_counts"
"""The batch entry holding the `DataCounts` a worker counted since its previous batch."""


class DataErrorRateExceeded(RuntimeError):
    """Too large a share of the data is unusable: the run stops with the counts per kind."""


class NoUsableSample(DataErrorRateExceeded):
    """An exact epoch's worker found no usable sample for its first batch: its rank cannot take a step."""


class DataCounts:
    """What some part of the data path read: samples, bad samples, dropped samples, errors per kind.
    (A plain object, not a dict or a dataclass: batch transfers pass it through untouched.)"""

    def __init__(self, samples: int = 0, bad_samples: int = 0, dropped: int = 0, errors: dict[str, int] | None = None):
        self.samples, self.bad_samples, self.dropped = samples, bad_samples, dropped
        self.errors: Counter[str] = Counter(errors or {})

    def add(self, other: DataCounts) -> None:
        self.samples += other.samples
        self.bad_samples += other.bad_samples
        self.dropped += other.dropped
        self.errors.update(other.errors)

    def since(self, earlier: DataCounts) -> DataCounts:
        return DataCounts(self.samples - earlier.samples, self.bad_samples - earlier.bad_samples,
                          self.dropped - earlier.dropped, dict(self.errors - earlier.errors))  # fmt: skip

    def copy(self) -> DataCounts:
        return DataCounts(self.samples, self.bad_samples, self.dropped, dict(self.errors))

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "bad_samples": self.bad_samples, "dropped": self.dropped,
                "errors": dict(self.errors)}  # fmt: skip

    def over(self, max_error_rate: float, min_samples: int) -> bool:
        return self.samples >= min_samples and self.bad_samples > max_error_rate * self.samples

    def stop_message(self, max_error_rate: float, whose: str) -> str:
        kinds = ", ".join(f"{kind}={count}" for kind, count in sorted(self.errors.items()))
        return (f"{self.bad_samples} of {self.samples} samples ({self.bad_samples / self.samples:.1%}) read by "
                f"{whose} had errors, over data.limits.max_error_rate={max_error_rate:g} (errors: {kinds}); "
                f"fix or remove the bad shards, or raise data.limits.max_error_rate (1.0 never stops)")  # fmt: skip


class ErrorBudget:
    """One process's counts (a data worker's, or a decoder used on its own). `enforce`: raise
    past the rate here; off in training, where `DataErrorStop` enforces the job's budget."""

    def __init__(self, max_error_rate: float, min_samples: int, warn_every: int = 100, enforce: bool = True):
        self.max_error_rate, self.min_samples, self.warn_every, self.enforce = max_error_rate, min_samples, warn_every, enforce
        self.counts = DataCounts()
        self._taken = DataCounts()
        self._in_sample = False
        self._sample_is_bad = False

    @contextmanager
    def sample(self) -> Iterator[None]:
        """Count one sample; errors counted inside make it (once) a bad one."""
        self.counts.samples += 1
        self._in_sample, self._sample_is_bad = True, False
        try:
            yield
        finally:
            self._in_sample = False

    def count(self, kind: str, key: str, error: BaseException | str) -> None:
        """Count one error of `kind` for sample or shard `key`, warn at a limited rate, then enforce
        the error rate. A sub-kind `"<kind>: <detail>"` also counts under `<kind>`, so
        `errors[modality]` counts every failure of that modality."""
        base = kind.partition(": ")[0]
        self.counts.errors[base] += 1
        if kind != base:
            self.counts.errors[kind] += 1
        if not self._in_sample:
            self.counts.samples += 1
            self.counts.bad_samples += 1
        elif not self._sample_is_bad:
            self._sample_is_bad = True
            self.counts.bad_samples += 1
        count = self.counts.errors[kind]
        if count == 1 or count % self.warn_every == 0:
            detail = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
            log.warning("%s: %s unusable (%.300s); %d %s errors so far", key, kind, detail, count, kind)
        self.check()

    def check(self) -> None:
        """Raise DataErrorRateExceeded when enforcing and, after `min_samples` samples, more than
        `max_error_rate` of them had an error."""
        if self.enforce and self.counts.over(self.max_error_rate, self.min_samples):
            raise DataErrorRateExceeded(self.counts.stop_message(self.max_error_rate, "this data worker"))

    def take(self) -> DataCounts:
        """What was counted since the previous `take` (handed on with each batch)."""
        delta = self.counts.since(self._taken)
        self._taken = self.counts.copy()
        return delta


class DataErrorStop(L.Callback):
    """The job's error budget (module doc): sums every worker's and rank's counts and stops the run
    on every rank at once past `data.limits.max_error_rate`."""

    def __init__(self) -> None:
        self.counts = DataCounts()  # this rank's share of the job's counts
        self._restored: DataCounts | None = None
        self._checked_step = -1

    def _limits(self, trainer: L.Trainer):
        return getattr(trainer.datamodule, "limits", None)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored is not None:  # the job's totals, once: on rank 0, so the ranks' sum stays right
            self.counts = self._restored if trainer.global_rank == 0 else DataCounts()
            self._restored = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        counts = batch.pop(COUNTS_KEY, None) if isinstance(batch, dict) else None
        if counts is not None:
            self.counts.add(counts)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = trainer.global_step  # the same on every rank: every rank checks at the same batch
        if step != self._checked_step and step % max(trainer.log_every_n_steps, 1) == 0:
            self._checked_step = step
            self._check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, whole=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, whole=True)  # a run that ends before its epoch does (max_steps, resampled)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:  # fmt: skip
        if isinstance(batch, dict):  # held-out data: its errors are logged by the workers, not budgeted
            batch.pop(COUNTS_KEY, None)

    def job_counts(self, trainer: L.Trainer) -> DataCounts:
        """Every rank's counts summed (a collective under DDP: every rank must call it)."""
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return self.counts.copy()
        parts: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(parts, self.counts.to_dict())
        total = DataCounts()
        for part in parts:
            total.add(DataCounts(**part))
        return total

    def _check(self, trainer: L.Trainer, whole: bool = False) -> None:
        """Stop past the rate. `whole`: at the end of an epoch or of the run, the minimum no longer
        applies (it delays the verdict over a bad first shard; it does not cancel it)."""
        limits = self._limits(trainer)
        if limits is None:
            return
        total = self.job_counts(trainer)
        if total.over(limits.max_error_rate, 1 if whole else limits.error_rate_min_samples):
            raise DataErrorRateExceeded(total.stop_message(limits.max_error_rate, "this run (all ranks and workers)"))

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank when a checkpoint is saved (rank 0 writes it): the job's totals.
        trainer = getattr(self, "_trainer", None)
        return {"counts": (self.job_counts(trainer) if trainer is not None else self.counts).to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = DataCounts(**state["counts"])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
