"""The LightningDataModule: shards -> decoded samples -> batches with presence masks.

`mode` picks how the training stream covers the shards (`datamodules/streams.py` has the details):

- `resampled` (default): infinite, with replacement, a different stream on every rank and worker;
  the run length is `trainer.max_steps`.
- `exact`: epochs in which every sample is seen exactly once across all ranks and workers, the
  same number of steps on every rank, shards shuffled per epoch; `trainer.max_epochs` or
  `max_steps` ends the run.

Lightning does not split iterable datasets across ranks, so the rank and world size are read from
the trainer and handed to the stream here (`get_worker_info().seed` would be equal across ranks
under `seed_everything`).

The stream's position is part of every checkpoint (`state_dict`: the epoch and the batches this rank
has trained on in it). A run resumed with `--ckpt_path` continues the epoch where it stopped: in
exact mode no sample is seen twice and none is skipped; a resampled stream restarts from a fresh
seed. Exact mode uses non-persistent workers so that each epoch's workers start with that epoch's
number and resume position.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from datamodules.decode import SampleDecoder
from datamodules.limits import DataLimits
from datamodules.streams import ExactEpochStream, ResampledStream, plan_epoch, shard_sizes
from scale.bounds import AT_LEAST_0, AT_LEAST_1, check_value
from scale.config import ModelConfig
from scale.modalities import batch_to_device
from scale.shard_format import list_shards, read_labels

MODES = ("resampled", "exact")


class EpochDataLoader(DataLoader):
    """A DataLoader that sets its stream's epoch and resume position each time an epoch starts.

    `position()` returns (epoch, batches to skip); the stream is pickled into fresh workers after
    that, so they see both. The loader draws its workers' base seed from its own generator, seeded
    by (seed, epoch), not from torch's global one: the training step's masking and dropout then
    draw the same numbers whether or not a loader was started in between (bitwise resume)."""

    def __init__(self, dataset, position, seed: int = 0, **kwargs):
        super().__init__(dataset, **kwargs)
        self.position = position
        self.seed = seed

    def __iter__(self):
        self.dataset.epoch, self.dataset.skip_batches = self.position()
        self.generator = torch.Generator().manual_seed(self.seed * 100_003 + self.dataset.epoch)
        return super().__iter__()


class M5ProductDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_shards: str | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        shuffle_buffer: int = 2000,
        seed: int = 0,
        mode: str = "resampled",
        limits: DataLimits | None = None,
        model_config: ModelConfig | None = None,
        val_shards: str | None = None,
        val_batch_size: int | None = None,
        val_max_samples: int | None = None,
    ):
        """
        Args:
            train_shards: a shard folder (with sizes.json), a brace pattern or a glob.
            batch_size: samples per batch per rank.
            num_workers: data-loading processes per rank.
            shuffle_buffer: encoded samples held for shuffling (per worker).
            seed: base seed of the shard and sample orders (combined with epoch, rank and worker).
            mode: `resampled` (infinite, with replacement) or `exact` (every sample once per epoch).
            limits: size, time and error-rate limits on bad data (`datamodules/limits.py`).
            model_config: input specification (sizes, token budgets); linked from the model by the CLI.
            val_shards: held-out shards for validation (`scale validate`, and in `fit` every
                `trainer.val_check_interval` steps); None: no validation.
            val_batch_size: samples per validation batch per rank (default: batch_size).
            val_max_samples: validate on the first this many held-out samples only (shards in
                order), to keep in-loop validation cheap; None: all of them.
        """
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"data.mode {mode!r}: expected one of {', '.join(MODES)}")
        # A batch of 0 would never fill (a hang in resampled mode), a negative count a traceback.
        for name, value, bound in (("batch_size", batch_size, AT_LEAST_1), ("num_workers", num_workers, AT_LEAST_0),
                                   ("shuffle_buffer", shuffle_buffer, AT_LEAST_0)):  # fmt: skip
            check_value(f"data.{name}", value, bound)
        check_value("data.val_batch_size", val_batch_size, AT_LEAST_1, optional=True)
        check_value("data.val_max_samples", val_max_samples, AT_LEAST_1, optional=True)
        # Recorded in the checkpoint (`datamodule_hyper_parameters`): the export's model card names
        # the shards and batch size a model was trained on. The model config is the model's own,
        # and the limits are settings of the run, not of the data.
        self.save_hyperparameters(ignore=["model_config", "limits"])
        self.train_shards = train_shards
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.mode = mode
        self.limits = limits or DataLimits()
        self.model_config = model_config or ModelConfig()
        self.val_shards = val_shards
        self.val_batch_size = val_batch_size or batch_size
        self.val_max_samples = val_max_samples
        self._resume: dict[str, int] | None = None
        self._epochs_started = 0

    def setup(self, stage: str | None = None) -> None:
        # Fail here, with the path in the message, rather than as a hang inside a worker.
        if stage in (None, "fit"):
            if self.train_shards is None:
                raise ValueError("data.train_shards is not set: give the training shard folder")
            self.train_urls = list_shards(self.train_shards)
            self.train_sizes = shard_sizes(self.train_urls) if self.mode == "exact" else None
        if stage == "validate" and self.val_shards is None:
            raise ValueError("data.val_shards is not set: give the held-out shard folder to validate on")
        if self.val_shards is not None:
            self.val_urls, self.val_sizes = _first_samples(self.val_shards, self.val_max_samples)
        # One vocabulary for both: class ids of held-out products must mean what training's mean.
        self.labels = read_labels(self.train_shards) if self.train_shards is not None else None
        if self.labels is None and self.val_shards is not None:
            self.labels = read_labels(self.val_shards)

    def _distributed(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    # ---- the stream position in checkpoints ---------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer_or_none()
        if trainer is None:
            return {}
        # `processed` counts the batches of the last epoch started, the batch just trained included
        # (saved from on_train_batch_end), or all of them once it ended (saved from on_train_end,
        # when `trainer.current_epoch` already names the next epoch).
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        epoch = max(trainer.fit_loop.epoch_progress.current.started - 1, 0)
        return {"version": 2, "mode": self.mode, "epoch": epoch, "batches": progress.processed,
                "step": trainer.global_step}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state or None

    def _position(self) -> tuple[int, int]:
        """(epoch, batches of it to skip) for the epoch that is starting.

        A pure function of the trainer's progress and the restored position: the saved position
        applies while the trainer stands at the saved epoch *and* optimizer step, i.e. right after
        the restore, and never again (asking early, before Lightning restored its loops, consumes
        nothing).

        A checkpoint saved once every batch of its epoch was trained (a periodic save on the
        epoch's last batch, or the end of a run) resumes into the *next* epoch, and Lightning
        trains that epoch from the iterator it asked for while it still stood at the saved one:
        that iterator must deliver the next epoch from its start, not the finished one's empty
        rest (which silently trained nothing for a whole epoch)."""
        trainer, resume = self._trainer_or_none(), self._resume or {}
        if trainer is None:  # iterated by hand: epochs count the loader's iterations, no step to match
            epoch, self._epochs_started = self._epochs_started, self._epochs_started + 1
            step = resume.get("step")
        else:
            epoch, step = trainer.current_epoch, trainer.global_step
        if resume and resume.get("epoch") == epoch and resume.get("step", step) == step:
            batches = int(resume["batches"])
            length = self._epoch_length()
            if resume.get("version", 1) >= 2 and length is not None and batches >= length:
                return epoch + 1, 0
            return epoch, batches
        return epoch, 0

    def _epoch_length(self) -> int | None:
        """Batches the trainer takes per epoch (steps_per_epoch, or fewer with limit_train_batches)."""
        trainer = self._trainer_or_none()
        batches = getattr(trainer, "num_training_batches", None) if trainer is not None else None
        if isinstance(batches, (int, float)) and 0 < batches < float("inf"):
            return int(batches)
        return self.steps_per_epoch() if self.mode == "exact" and hasattr(self, "train_urls") else None

    def steps_per_epoch(self) -> int | None:
        """Batches per epoch, the same on every rank (exact mode); None for an infinite stream."""
        if self.mode != "exact":
            return None
        rank, world = self._distributed()
        steps, _ = plan_epoch(list(zip(self.train_urls, self.train_sizes)), rank, world, 1, self.batch_size)
        return steps

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Lightning's move, but the inputs a stem decodes from host memory (JPEG bitstreams) stay.
        return batch_to_device(batch, device, self.model_config)

    # ---- loaders -----------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        rank, world = self._distributed()
        # The job's error budget (DataErrorStop) enforces the rate, over every worker and rank.
        decoder = SampleDecoder(self.model_config, self.limits, enforce_error_rate=False, labels=self.labels)
        common = dict(decoder=decoder, batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer,
                      seed=self.seed, rank=rank, world=world)  # fmt: skip
        if self.mode == "exact":
            stream = ExactEpochStream(self.train_urls, self.train_sizes, **common)
        else:
            stream = ResampledStream(self.train_urls, **common)
        return EpochDataLoader(
            stream,
            self._position,
            seed=self.seed,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and self.mode == "resampled",
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if self.num_workers > 0 else None,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Every held-out sample once per validation, split across ranks, same steps on each."""
        if self.val_shards is None:
            return []  # Lightning then skips validation
        rank, world = self._distributed()
        decoder = SampleDecoder(self.model_config, self.limits, enforce_error_rate=False, labels=self.labels)
        stream = ExactEpochStream(self.val_urls, self.val_sizes, decoder, self.val_batch_size, seed=self.seed,
                                  rank=rank, world=world, shuffle_shards=False)  # fmt: skip
        # Persistent workers: the held-out stream is the same at every validation, so the workers
        # are started once per run, not once per validation. Its own generator: every iterator of a
        # DataLoader draws a base seed, and Lightning starts it before the validation hooks fork the
        # global generators (scale/module.py), so drawing it from torch's would shift training's
        # masks and dropout (with in-process loading, or a first validation without a sanity check).
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(self.seed))  # fmt: skip


def _first_samples(shards: str, limit: int | None) -> tuple[list[str], list[int]]:
    """The shards holding the first `limit` samples of `shards` (in order), the last one cut."""
    urls = list_shards(shards)
    sizes = shard_sizes(urls)
    if limit is None:
        return urls, sizes
    if limit < 1:
        raise ValueError(f"data.val_max_samples must be >= 1, got {limit}")
    kept_urls, kept_sizes = [], []
    for url, size in zip(urls, sizes):
        if limit <= 0:
            break
        kept_urls.append(url)
        kept_sizes.append(min(size, limit))
        limit -= size
    return kept_urls, kept_sizes


def eval_dataloader(
    shards: str, model_config: ModelConfig, batch_size: int = 64, num_workers: int = 0, labels: list[str] | None = None
) -> DataLoader:
    """Every sample of `shards` exactly once, shards in order, no shuffling (one process). Class ids
    follow `labels` (another set's vocabulary, e.g. the training set's), by default the set's own."""
    urls = list_shards(shards)
    decoder = SampleDecoder(model_config, labels=read_labels(shards) if labels is None else labels)
    stream = ExactEpochStream(urls, shard_sizes(urls), decoder, batch_size, shuffle_shards=False)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available())
