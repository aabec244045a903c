"""Exact and resampled streams over shard sets: planning, real ranks x workers, resume, bad tars."""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.decode import SampleDecoder
from datamodules.m5product import M5ProductDataModule
from datamodules.streams import (
    ExactEpochStream,
    ResampledStream,
    epoch_order,
    plan_epoch,
    rank_batch_sizes,
    read_samples,
    resume_point,
    shard_sizes,
)
from datamodules.tar_reader import DeferredMember
from scale.media import MediaError
from tests.conftest import tiny_config


def write_title_shards(folder: Path, counts: list[int]) -> list[str]:
    """Shards of title-only products (cheap to decode), `p<global index>`, with their sizes.json."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes, index = {}, 0
    for shard, count in enumerate(counts):
        name = f"shard-{shard:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for _ in range(count):
                data = json.dumps({"title": f"product number {index}", "category": index % 3}).encode()
                info = tarfile.TarInfo(f"p{index:05d}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                index += 1
        sizes[name] = count
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return [str(folder / name) for name in sizes]


def text_decoder() -> SampleDecoder:
    return SampleDecoder(tiny_config(modalities=["text"]))


# ---- planning (pure) ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "counts, world, workers, batch",
    [
        ([10, 7, 13, 5], 2, 2, 4),
        ([35], 2, 2, 4),  # fewer shards than ranks x workers: an even split inside the shard
        ([3, 3], 2, 4, 8),  # fewer batches than workers: some workers have none
        ([9, 9, 9, 9, 9], 3, 2, 5),
        ([129], 2, 1, 64),  # 1 sample past a full global batch: the tail is shared out, never empty
        ([64, 64], 2, 3, 64),
    ],
)
def test_plan_covers_every_sample_once_with_equal_steps(counts, world, workers, batch):
    urls = [f"s{i}" for i in range(len(counts))]
    order = epoch_order(urls, counts, seed=3, epoch=1)
    seen: Counter[tuple[str, int]] = Counter()
    steps_per_rank = []
    for rank in range(world):
        steps, plans = plan_epoch(order, rank, world, workers, batch)
        steps_per_rank.append(sum(len(p.batch_sizes) for p in plans))
        assert steps_per_rank[-1] == steps
        for plan in plans:
            assert all(1 <= size <= batch for size in plan.batch_sizes)
            assert sum(plan.batch_sizes) == sum(s.stop - s.start for s in plan.segments)
            seen.update((s.url, i) for s in plan.segments for i in range(s.start, s.stop))
    assert len(set(steps_per_rank)) == 1
    assert seen == Counter({(u, i): 1 for u, n in zip(urls, counts) for i in range(n)})


def test_rank_batch_sizes_are_full_first_and_never_empty():
    assert rank_batch_sizes(10, 3, 4) == [4, 4, 2]
    assert rank_batch_sizes(65, 2, 64) == [64, 1]
    assert rank_batch_sizes(64, 2, 64) == [32, 32]  # 64 + 0 would leave the second step empty
    assert rank_batch_sizes(12, 3, 4) == [4, 4, 4]
    with pytest.raises(ValueError):
        rank_batch_sizes(2, 3, 4)


def test_shard_order_is_deterministic_per_epoch_and_changes_between_epochs():
    urls, sizes = [f"s{i}" for i in range(20)], [1] * 20
    assert epoch_order(urls, sizes, 0, 4) == epoch_order(urls, sizes, 0, 4)
    assert epoch_order(urls, sizes, 0, 4) != epoch_order(urls, sizes, 0, 5)
    assert epoch_order(urls, sizes, 0, 4, shuffle=False) == list(zip(urls, sizes))


class _Tagged(IterableDataset):
    """Worker w yields `lengths[w]` items tagged (w, i); after `skip` consumed items it resumes as
    ExactEpochStream does (roles rotated, each role's consumed items skipped)."""

    def __init__(self, lengths, skip=0):
        self.lengths, self.skip = lengths, skip

    def __iter__(self):
        info = get_worker_info()
        taken, first = resume_point(self.lengths, self.skip)
        role = (info.id + first) % info.num_workers
        return iter([(role, i) for i in range(taken[role], self.lengths[role])])


@pytest.mark.parametrize("lengths", [[2, 3, 3], [3, 3], [4, 1, 2]])
def test_resume_point_replays_the_dataloader_order(lengths):
    order = list(DataLoader(_Tagged(lengths), batch_size=None, num_workers=len(lengths)))
    for consumed in range(len(order) + 1):
        expected = Counter(worker for worker, _ in order[:consumed])
        taken, _ = resume_point(lengths, consumed)
        assert taken == [expected[w] for w in range(len(lengths))]
        # A loader resumed after `consumed` items continues in the same order, not just the same set.
        resumed = list(DataLoader(_Tagged(lengths, consumed), batch_size=None, num_workers=len(lengths)))
        assert [tuple(x) for x in resumed] == [tuple(x) for x in order[consumed:]], consumed


# ---- real ranks x workers ----------------------------------------------------------------------
def _rank_process(rank: int, world: int, port: int, shard_sets: dict[str, list[str]], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for name, urls in shard_sets.items():
        Path(out, f"{name}-rank{rank}.json").write_text(json.dumps(_read_as_rank(rank, world, urls)))
    dist.destroy_process_group()


def _read_as_rank(rank: int, world: int, urls: list[str]) -> dict:
    """Two exact epochs and 6 resampled batches, as this rank sees them (2 workers)."""
    result = {"exact": [], "resampled": None}
    exact = ExactEpochStream(urls, shard_sizes(urls), text_decoder(), batch_size=4, shuffle_buffer=6,
                             seed=1, rank=rank, world=world)  # fmt: skip
    for epoch in range(2):
        exact.epoch = epoch
        batches = [b["key"] for b in DataLoader(exact, batch_size=None, num_workers=2)]
        result["exact"].append(batches)
        # Every rank takes the same number of steps: a collective per batch would hang otherwise.
        steps = torch.tensor([len(batches)])
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        assert steps.item() == len(batches)
    resampled = ResampledStream(urls, text_decoder(), batch_size=4, shuffle_buffer=6, seed=1, rank=rank, world=world)
    loader = DataLoader(resampled, batch_size=None, num_workers=2)
    result["resampled"] = [b["key"] for b in itertools.islice(loader, 6)]
    return result


def _spawn_ranks(shard_sets: dict[str, list[str]], tmp_path: Path, world: int = 2) -> dict[str, list[dict]]:
    port = 29500 + os.getpid() % 1000
    # fork, not spawn: the ranks start in a second instead of re-importing torch and timm (~50 s on
    # 2 loaded cores); gloo on CPU is safe to fork into.
    context = mp.start_processes(_rank_process, args=(world, port, shard_sets, str(tmp_path)), nprocs=world,
                                 join=False, start_method="fork")  # fmt: skip
    # A hang (a rank or worker without data) fails here instead of blocking the suite. join()
    # returns False while any rank still runs (it returns after each rank's exit).
    deadline = time.time() + 240
    while not context.join(timeout=max(1.0, deadline - time.time())):
        if time.time() > deadline:
            pytest.fail("ranks did not finish: a stream hung")
    return {name: [json.loads(Path(tmp_path, f"{name}-rank{r}.json").read_text()) for r in range(world)]
            for name in shard_sets}  # fmt: skip


SHARD_SETS = {"5-shards": [9, 14, 6, 11, 5], "1-shard": [23]}  # 1 shard for 2 ranks x 2 workers: an even split


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """Each shard set read by 2 real ranks (gloo) x 2 workers: one spawn for every test below."""
    root = tmp_path_factory.mktemp("ranks")
    shard_sets = {name: write_title_shards(root / name, counts) for name, counts in SHARD_SETS.items()}
    return _spawn_ranks(shard_sets, root)


@pytest.mark.parametrize("name", list(SHARD_SETS))
def test_two_ranks_two_workers(two_ranks, name):
    results, counts = two_ranks[name], SHARD_SETS[name]
    everything = {f"p{i:05d}" for i in range(sum(counts))}
    orders = []
    for epoch in range(2):
        keys = [k for r in results for batch in r["exact"][epoch] for k in batch]
        assert Counter(keys) == Counter(everything), f"epoch {epoch}: every key exactly once"
        assert len({len(r["exact"][epoch]) for r in results}) == 1, "same number of batches on every rank"
        orders.append([k for batch in results[0]["exact"][epoch] for k in batch])
    assert orders[0] != orders[1], "a new shard and sample order each epoch"
    streams = [[k for batch in r["resampled"] for k in batch] for r in results]
    assert streams[0] != streams[1], "resampled ranks read different streams"
    assert all(len(batch) == 4 for r in results for batch in r["resampled"])


# ---- resume ----------------------------------------------------------------------------------------
def test_resumed_epoch_continues_without_repeats_or_gaps(tmp_path):
    urls = write_title_shards(tmp_path / "shards", [11, 8, 13])
    stream = ExactEpochStream(urls, shard_sizes(urls), text_decoder(), batch_size=3, shuffle_buffer=5, seed=2)
    stream.epoch = 1
    full = [b["key"] for b in DataLoader(stream, batch_size=None, num_workers=2)]
    for consumed in (0, 1, 4, 5, len(full)):
        stream.skip_batches = consumed
        rest = [b["key"] for b in DataLoader(stream, batch_size=None, num_workers=2)]
        assert len(rest) == len(full) - consumed
        seen = [k for batch in full[:consumed] + rest for k in batch]
        assert Counter(seen) == Counter(k for batch in full for k in batch)


def test_datamodule_state_resumes_the_epoch_it_was_saved_in(tmp_path):
    write_title_shards(tmp_path / "shards", [10, 10])
    module = M5ProductDataModule(str(tmp_path / "shards"), batch_size=4, num_workers=0, shuffle_buffer=4,
                                 mode="exact", model_config=tiny_config(modalities=["text"]))  # fmt: skip
    module.setup("fit")
    loader = module.train_dataloader()
    first = [b["key"] for b in loader]  # epoch 0 (no trainer: epochs count iterations)
    module.load_state_dict({"mode": "exact", "epoch": 1, "batches": 2})
    second_part = [b["key"] for b in loader]  # epoch 1, skipping the 2 batches already trained on
    assert len(first) == 5 and len(second_part) == 3
    assert len([b["key"] for b in loader]) == 5  # epoch 2: whole again


# ---- bad shards ------------------------------------------------------------------------------------
def test_truncated_tar_ends_that_shard_and_is_counted(tmp_path):
    urls = write_title_shards(tmp_path / "shards", [6, 6])
    data = Path(urls[0]).read_bytes()
    Path(urls[0]).write_bytes(data[: len(data) // 2])  # cut mid-shard, as an interrupted copy would
    errors = []
    kept = list(read_samples(urls[0], on_error=lambda kind, url, error: errors.append((kind, url))))
    assert 0 < len(kept) < 6 and errors == [("tar", urls[0])]
    # The stream keeps every step (DDP needs them) and reads the intact shard whole.
    decoder = text_decoder()
    stream = ExactEpochStream(urls, [6, 6], decoder, batch_size=4, shuffle_buffer=0, shuffle_shards=False)
    batches = [b["key"] for b in DataLoader(stream, batch_size=None)]
    keys = [k for b in batches for k in b]
    assert len(batches) == 3 and {f"p{i:05d}" for i in range(6, 12)} <= set(keys)
    assert decoder.errors["tar"] == 1


def test_read_samples_seeks_to_an_offset(tmp_path):
    (url,) = write_title_shards(tmp_path / "shards", [9])
    assert [s["__key__"] for s in read_samples(url, 4, 7)] == ["p00004", "p00005", "p00006"]
    assert json.loads(next(read_samples(url, 8))["json"])["title"] == "product number 8"


def write_members(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """A shard of these (key, {member: bytes}) samples, members in the order given."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for member, data in members.items():
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_a_fallback_member_stays_in_the_shard_beside_its_preferred_one(tmp_path):
    """The MP4 beside its extracted frames (before or after them in the tar) and the original
    image beside its small copy are left in the shard, and read from it only if asked; without
    the preferred member, or from a streamed shard, they are read as before."""
    mp4, jpg, strip, small = (bytes([n]) * (3000 + 512 * n) for n in range(1, 5))
    url = write_members(tmp_path / "s.tar", [
        ("after", {"json": b"{}", "mp4": mp4, "frames.jpg": strip, "jpg": jpg, "small.jpg": small}),
        ("before", {"frames.jpg": strip, "json": b"{}", "mp4": mp4}),
        ("alone", {"json": b"{}", "mp4": mp4, "jpg": jpg}),
    ])  # fmt: skip
    deferred = {"mp4": frozenset({"frames.jpg"}), "jpg": frozenset({"small.jpg"})}
    after, before, alone = read_samples(url, deferred=deferred)
    assert isinstance(after["mp4"], DeferredMember) and isinstance(after["jpg"], DeferredMember)
    assert isinstance(before["mp4"], DeferredMember) and after["frames.jpg"] == before["frames.jpg"] == strip
    assert (len(after["mp4"]), len(after["jpg"])) == (len(mp4), len(jpg))  # a size limit needs no read
    assert bytes(after["mp4"]) == bytes(before["mp4"]) == mp4 and bytes(after["jpg"]) == jpg
    assert alone["mp4"] == mp4 and alone["jpg"] == jpg  # nothing to prefer: read
    streamed = list(read_samples(f"pipe:cat {url}", deferred=deferred))
    assert [s["mp4"] for s in streamed] == [mp4, mp4, mp4] and streamed[0]["jpg"] == jpg
    # A shard cut after it was read: the decoder gets a counted media error, not a crash.
    Path(url).write_bytes(Path(url).read_bytes()[: after["mp4"].offset + 100])
    with pytest.raises(MediaError, match="ends after 100 of"):
        bytes(after["mp4"])


def test_the_decoder_defers_only_fallbacks_of_the_configured_stems():
    pixels = SampleDecoder(tiny_config(modalities=["text", "image", "video"]))
    assert pixels.deferred_members() == {"jpg": {"small.jpg"}, "png": {"small.jpg"}, "webp": {"small.jpg"},
                                         "mp4": {"frames.jpg"}}  # fmt: skip
    assert text_decoder().deferred_members() == {}


def test_read_samples_reads_only_the_wanted_fields(tmp_path, demo_shards):
    url = sorted(str(p) for p in Path(demo_shards["train"]).glob("*.tar"))[0]
    whole = list(read_samples(url))
    text_only = list(read_samples(url, fields=text_decoder().shard_fields()))
    assert [s["__key__"] for s in text_only] == [s["__key__"] for s in whole]  # every sample, even media-only
    assert all(set(s) <= {"__key__", "__url__", "json"} for s in text_only)
    assert any("mp4" in s for s in whole)
