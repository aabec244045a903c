"""The LightningDataModule: shards -> decoded samples -> batches with presence masks.

Training streams are *resampled*: each rank and each data worker draws shards with replacement
from its own random stream, seeded from (seed, rank, worker, epoch), so ranks never read the same
sequence and every rank yields batches forever (equal batch counts on every rank: DDP cannot hang
on a rank that ran out). The run length is `trainer.max_steps`. Lightning does not split iterable
datasets across ranks, so the rank is taken from the trainer and bound into the worker seed here,
rather than relying on `get_worker_info().seed` (equal across ranks under `seed_everything`).

The shuffle buffer holds *encoded* samples and decoding happens after it, so the buffer costs bytes,
not decoded tensors.

Evaluation streams (`eval_dataloader`) read every shard once, in order, on one process.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from datamodules.collate import collate
from datamodules.decode import SampleDecoder
from datamodules.shards import list_shards
from scale.config import ModelConfig


def _worker_seed(seed: int, rank: int) -> Callable[[], int]:
    def seed_fn() -> int:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        return (seed * 1_000_003 + rank) * 1_009 + worker

    return seed_fn


class M5ProductDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_shards: str,
        batch_size: int = 64,
        num_workers: int = 4,
        shuffle_buffer: int = 2000,
        seed: int = 0,
        model_config: ModelConfig | None = None,
    ):
        """
        Args:
            train_shards: a shard folder (with sizes.json), a brace pattern or a glob.
            batch_size: samples per batch per rank.
            num_workers: data-loading processes per rank.
            shuffle_buffer: encoded samples held for shuffling (per worker).
            seed: base seed of the shard and sample streams (combined with rank and worker).
            model_config: input specification (sizes, token budgets); linked from the model by the CLI.
        """
        super().__init__()
        self.train_shards = train_shards
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.model_config = model_config or ModelConfig()

    def setup(self, stage: str | None = None) -> None:
        # Fail here, with the path in the message, rather than as a hang inside a worker.
        self.train_urls = list_shards(self.train_shards)

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.global_rank if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        decoder = SampleDecoder(self.model_config)
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.train_urls, seed=self.seed, worker_seed=_worker_seed(self.seed, self._rank())),
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=random.Random(self.seed + self._rank())),
            wds.map(decoder, handler=wds.warn_and_continue),
            wds.batched(self.batch_size, collation_fn=collate, partial=False),
        )
        return DataLoader(
            pipeline,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if self.num_workers > 0 else None,
        )


def eval_dataloader(
    shards: str, model_config: ModelConfig, batch_size: int = 64, num_workers: int = 0
) -> DataLoader:
    """Every sample of `shards` exactly once, in shard order (one process, no resampling)."""
    urls = list_shards(shards)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.map(SampleDecoder(model_config), handler=wds.warn_and_continue),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    return DataLoader(pipeline, batch_size=None, num_workers=min(num_workers, len(urls)))
