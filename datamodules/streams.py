"""Shard sets -> batch streams for each (rank, data worker), in two modes.

**exact** (`ExactEpochStream`): every sample exactly once per epoch across all ranks and workers.
The epoch's order is the shard list shuffled with (seed, epoch); its samples, concatenated, form one
sequence that is cut into contiguous ranges: one per rank, then one per worker. Cutting at sample
level rather than shard level means any number of shards feeds any number of ranks x workers
(fewer shards than workers just means several workers read parts of one shard), and ranks differ by
at most one sample. Every rank runs the same number of steps, `ceil(ceil(N / world) / batch)`: full
batches first, the remainder spread over the last steps, so local batches may differ across ranks
at the end of an epoch (the losses gather unequal batches exactly: `scale/losses.py`). DDP never
hangs on a rank that ran out.

**resampled** (`ResampledStream`): infinite; each worker draws shards with replacement from its own
generator seeded by (seed, rank, worker, epoch, restart), so no two ranks or workers read the same
stream. The run length is `trainer.max_steps`.

In both, the shuffle buffer holds *encoded* samples (bytes) and decoding happens after it; a
stem's fallback file beside its preferred one (the MP4 beside its extracted frames) stays in the
shard until the decoder asks for it (`tar_reader.DeferredMember`).

**Mid-epoch resume** (exact mode): a stream told to skip the first `skip_batches` batches of the
epoch replays the same reads and shuffle without decoding and starts where the stopped run stopped.
Which batches each worker had delivered follows from the DataLoader's round-robin order over
workers (`resume_point`). A resampled stream resumes with a fresh seed instead: replaying an
infinite stream would mean re-reading everything read so far.

Bad shards do not stop a stream: a truncated or unreadable tar ends that shard's part, and members
that must not be read are refused (`datamodules/tar_reader.py`); both are counted as `tar` errors in
the job's error budget, which enforces `max_error_rate`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from datamodules.collate import collate
from datamodules.decode import SampleDecoder
from datamodules.error_budget import COUNTS_KEY, DataErrorRateExceeded, NoUsableSample
from datamodules.tar_reader import read_samples
from scale.shard_format import SIZES_FILE, read_size_index


# ---- the shard index ----------------------------------------------------------------------------
def shard_sizes(urls: list[str]) -> list[int]:
    """Sample count of each shard, from the `sizes.json` next to it (written by `scale shards`).

    Exact epochs are planned from counts before any shard is read; a shard missing from its
    folder's index is counted by reading its tar headers (local files only)."""
    indexes: dict[Path, dict[str, int]] = {}
    sizes = []
    for url in urls:
        path = Path(url)
        if path.parent not in indexes:
            indexes[path.parent] = read_size_index(path.parent)
        count = indexes[path.parent].get(path.name)
        if count is None:
            if not path.is_file():
                raise ValueError(f"{url}: no sample count (not in {SIZES_FILE}, not a local file to count)")
            count = sum(1 for _ in read_samples(url))
        sizes.append(int(count))
    return sizes


def shuffled(samples: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    """A buffer of `buffer_size` encoded samples, emitted in random order as new ones arrive.

    Hand-written (11 lines) because it must be exactly reproducible from `rng` for resume, and
    webdataset's equivalent is a private function."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


# ---- planning an exact epoch --------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """Samples `start` .. `stop`-1 of one shard."""

    url: str
    start: int
    stop: int


@dataclass(frozen=True)
class WorkerPlan:
    segments: tuple[Segment, ...]
    batch_sizes: tuple[int, ...]


def epoch_order(urls: list[str], sizes: list[int], seed: int, epoch: int, shuffle: bool = True) -> list[tuple[str, int]]:
    """The shards of one epoch, in a deterministic order drawn from (seed, epoch)."""
    order = list(zip(urls, sizes))
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def rank_batch_sizes(samples: int, steps: int, batch_size: int) -> list[int]:
    """`samples` split into `steps` batches of 1..batch_size: full batches first, the rest spread."""
    if not steps <= samples <= steps * batch_size:
        raise ValueError(f"cannot split {samples} samples into {steps} batches of 1..{batch_size}")
    full = steps if batch_size == 1 else min(steps, (samples - steps) // (batch_size - 1))
    rest, tail = samples - full * batch_size, steps - full
    return [batch_size] * full + [rest // tail + (i < rest % tail) for i in range(tail)]


def _cut(order: list[tuple[str, int]], begin: int, end: int) -> tuple[Segment, ...]:
    """The segments covering positions begin .. end-1 of the concatenated shards."""
    segments, offset = [], 0
    for url, size in order:
        lo, hi = max(begin, offset), min(end, offset + size)
        if lo < hi:
            segments.append(Segment(url, lo - offset, hi - offset))
        offset += size
    return tuple(segments)


def plan_epoch(
    order: list[tuple[str, int]], rank: int, world: int, workers: int, batch_size: int
) -> tuple[int, list[WorkerPlan]]:
    """(steps per rank, one plan per worker of `rank`) for an epoch over `order`."""
    total = sum(size for _, size in order)
    if total < world:
        raise ValueError(f"exact epochs: {total} samples cannot feed {world} ranks (need at least one each)")
    steps = -(-(-(-total // world)) // batch_size)  # ceil(ceil(N / world) / batch)
    begin, end = rank * total // world, (rank + 1) * total // world
    sizes = rank_batch_sizes(end - begin, steps, batch_size)
    plans = []
    for worker in range(workers):
        first, last = worker * steps // workers, (worker + 1) * steps // workers
        lo = begin + sum(sizes[:first])
        hi = lo + sum(sizes[first:last])
        plans.append(WorkerPlan(_cut(order, lo, hi), tuple(sizes[first:last])))
    return steps, plans


def resume_point(batches_per_worker: list[int], consumed: int) -> tuple[list[int], int]:
    """(how many of each worker's batches are among the first `consumed` a DataLoader yielded,
    the worker whose batch comes next).

    torch's DataLoader takes batches from its workers in turn, starting at worker 0, and skips a
    worker once it is exhausted; this replays that order. A resumed loader starts at its worker 0
    again, so its workers take the roles of the old ones rotated by the second value: the batches
    then continue in the uninterrupted order, not only the same set."""
    workers = len(batches_per_worker)
    taken = [0] * workers
    active = itertools.cycle(range(workers))
    following = 0
    while consumed > 0 and any(t < n for t, n in zip(taken, batches_per_worker)):
        worker = next(active)
        if taken[worker] < batches_per_worker[worker]:
            taken[worker] += 1
            consumed -= 1
            following = (worker + 1) % workers
    return taken, following


# ---- the streams ----------------------------------------------------------------------------
def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _Stream(IterableDataset):
    """What both modes share: the shard list, the rank, the decoder, and decoding after the shuffle."""

    def __init__(self, urls: list[str], decoder: SampleDecoder, batch_size: int, shuffle_buffer: int,
                 seed: int, rank: int = 0, world: int = 1):  # fmt: skip
        self.urls, self.decoder, self.batch_size = list(urls), decoder, batch_size
        self.shuffle_buffer, self.seed, self.rank, self.world = shuffle_buffer, seed, rank, world
        self.fields, self.max_bytes, self.deferred = decoder.shard_fields(), decoder.member_limits(), decoder.deferred_members()
        self.epoch = 0
        self.skip_batches = 0
        """Batches of this epoch this rank already trained on (set on resume; see the module doc)."""

    def _rng(self, kind: str, worker: int) -> random.Random:
        return random.Random(f"{kind}:{self.seed}:{self.epoch}:{self.rank}:{worker}:{self.skip_batches}")

    def _batch(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """The collated batch, carrying what the decoder counted since this worker's previous batch
        (the job's error budget sums them in the training process)."""
        return {**collate(samples), COUNTS_KEY: self.decoder.budget.take()}


class ExactEpochStream(_Stream):
    """One epoch: this rank's share of every sample, exactly once, in `steps` batches (module doc)."""

    def __init__(self, urls: list[str], sizes: list[int], decoder: SampleDecoder, batch_size: int,
                 shuffle_buffer: int = 0, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle_shards: bool = True):  # fmt: skip
        super().__init__(urls, decoder, batch_size, shuffle_buffer, seed, rank, world)
        self.sizes, self.shuffle_shards = list(sizes), shuffle_shards

    def plans(self, workers: int) -> tuple[int, list[WorkerPlan]]:
        order = epoch_order(self.urls, self.sizes, self.seed, self.epoch, self.shuffle_shards)
        return plan_epoch(order, self.rank, self.world, workers, self.batch_size)

    def __len__(self) -> int:
        """Steps per epoch on this rank (the same on every rank, for any number of workers): lets
        Lightning size the epoch and the schedule."""
        return self.plans(1)[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader_worker, workers = _worker()
        _, plans = self.plans(workers)
        taken, first = resume_point([len(p.batch_sizes) for p in plans], self.skip_batches)
        worker = (loader_worker + first) % workers  # the role this process plays (resume_point doc)
        plan, skip = plans[worker], taken[worker]
        # The shuffle seed leaves out skip_batches: a resumed worker must replay the same order.
        rng = random.Random(f"samples:{self.seed}:{self.epoch}:{self.rank}:{worker}")
        raw = itertools.chain.from_iterable(
            read_samples(s.url, s.start, s.stop, self.decoder.count_error, self.fields, self.max_bytes, self.deferred)
            for s in plan.segments
        )
        raw = shuffled(raw, self.shuffle_buffer, rng)
        for _ in range(sum(plan.batch_sizes[:skip])):  # replay without decoding
            next(raw, None)
        last_good = None
        for size in plan.batch_sizes[skip:]:
            batch = [d for d in (self.decoder(s) for s in itertools.islice(raw, size)) if d is not None]
            if batch:
                last_good = batch[-1]
            elif last_good is not None:
                # Every sample of this batch was unusable (or its shard was cut short): the rank
                # must still take its step, so it repeats the last good sample (counted).
                self.decoder.count_error("empty_batch", f"epoch {self.epoch} rank {self.rank}", "no usable sample")
                batch = [last_good]
            else:
                raise NoUsableSample(
                    f"exact epoch {self.epoch}, rank {self.rank}, worker {worker}: none of the {size} samples of its "
                    f"first batch is usable, so the rank cannot take its step (errors: {dict(self.decoder.errors)}; "
                    f"shards {[s.url for s in plan.segments]})"
                )
            yield self._batch(batch)


class ResampledStream(_Stream):
    """Batches forever, from shards drawn with replacement (module doc).

    A worker that cannot fill a batch would loop forever without a word (the job's budget only
    sees what arrives with batches), so it stops itself: when shards yield no sample at all, and
    when, since its last batch, it has read `error_rate_min_samples` samples with more than
    `max_error_rate` of them bad."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, _ = _worker()
        shard_rng, sample_rng = self._rng("shards", worker), self._rng("samples", worker)
        budget, limits = self.decoder.budget, self.decoder.limits

        def raw() -> Iterator[dict]:
            empty_draws = 0
            while True:
                url = shard_rng.choice(self.urls)
                read = 0
                for sample in read_samples(url, on_error=self.decoder.count_error, fields=self.fields,
                                           max_bytes=self.max_bytes, deferred=self.deferred):  # fmt: skip
                    read += 1
                    yield sample
                empty_draws = 0 if read else empty_draws + 1
                if empty_draws > 10 * len(self.urls):
                    raise ValueError(f"rank {self.rank}, worker {worker}: {empty_draws} shards in a row held no sample "
                                     f"(of {len(self.urls)}, e.g. {url}); check data.train_shards")  # fmt: skip

        batch: list[dict] = []
        since = budget.counts.copy()
        for sample in shuffled(raw(), self.shuffle_buffer, sample_rng):
            decoded = self.decoder(sample)
            if decoded is not None:
                batch.append(decoded)
            if len(batch) == self.batch_size:
                yield self._batch(batch)
                batch, since = [], budget.counts.copy()
            elif decoded is None:
                recent = budget.counts.since(since)
                if recent.over(limits.max_error_rate, limits.error_rate_min_samples):
                    raise DataErrorRateExceeded(recent.stop_message(limits.max_error_rate, f"rank {self.rank}, worker {worker} "
                                                                    "since its last batch"))  # fmt: skip
