"""Raw products -> shards -> decoded samples -> batches, on real files."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch

from datamodules.collate import collate
from datamodules.decode import SampleDecoder
from datamodules.m5product import eval_dataloader
from datamodules.shards import write_shards
from scale.config import MODALITIES
from scale.shard_format import list_shards, parse_table
from tests.conftest import tiny_config

MEDIA = {"image": "jpg", "video": "mp4", "audio": "wav"}


def read_tar_members(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, extension = member.name.partition(".")
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def test_shards_round_trip_every_product_once_with_identical_bytes(demo_shards):
    raw, shards = demo_shards["raw_train"], demo_shards["train"]
    products = [json.loads(line) for line in (raw / "meta.jsonl").read_text().splitlines()]
    samples = read_tar_members(shards)
    assert sorted(samples) == sorted(p["id"].replace(".", "_") for p in products)
    sizes = json.loads((shards / "sizes.json").read_text())
    assert sum(sizes.values()) == len(products) and max(sizes.values()) <= 10
    assert not list(shards.glob("*.tmp")), "a temporary shard was left behind"
    for product in products:
        sample = samples[product["id"]]
        meta = json.loads(sample["json"])
        assert meta["title"] == product["title"] and meta["table"] == product["table"]
        assert meta["category"] == product["category"] and meta["instance"] == product["instance"]
        for modality, extension in MEDIA.items():
            if product[modality]:
                assert sample[extension] == (raw / product[modality]).read_bytes()
            else:
                assert extension not in sample


def test_missing_media_file_becomes_missing_modality(tmp_path, demo_shards):
    raw = demo_shards["raw_train"]
    products = [json.loads(line) for line in (raw / "meta.jsonl").read_text().splitlines()]
    with_image = next(p for p in products if p["image"])
    copy = tmp_path / "raw"
    copy.mkdir()
    (copy / "meta.jsonl").write_text(json.dumps({**with_image, "image": "images/gone.jpg", "video": None, "audio": None}) + "\n")
    summary = write_shards(copy, tmp_path / "shards")
    assert summary["samples"] == 1 and summary["missing_media"] == {"image": 1}


def test_bad_inputs_fail_with_the_path_in_the_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.jsonl"):
        write_shards(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "meta.jsonl").write_text('{"id": "a", "title": "x"}\nnot json\n')
    # A bad record is skipped and reported with its line; the rest is converted.
    summary = write_shards(tmp_path / "raw", tmp_path / "out")
    assert summary["samples"] == 1 and summary["skipped"] == {"*/bad_record": 1}
    assert "meta.jsonl:2: not valid JSON" in (tmp_path / "out" / "skipped.jsonl").read_text()
    with pytest.raises(FileNotFoundError, match="no shard found"):
        list_shards(str(tmp_path / "missing-folder"))


def test_parse_table_skips_malformed_pairs():
    assert parse_table("color#:#red#;#broken#;#size#:#L#;##:#x") == [("color", "red"), ("size", "L")]


def test_decoder_shapes_presence_and_collate(demo_shards):
    config = tiny_config()
    batches = list(eval_dataloader(str(demo_shards["eval"]), config, batch_size=7))
    assert sum(len(b["key"]) for b in batches) == 24  # every sample once, last batch partial
    batch = batches[0]
    assert batch["text"]["input_ids"].shape == (7, config.text.max_tokens)
    assert batch["table"]["entity_index"].shape == (7, config.table.max_tokens)
    assert batch["image"]["pixels"].shape == (7, 3, config.image.size, config.image.size)
    assert batch["video"]["frames"].shape == (7, config.video.frames, 3, config.video.size, config.video.size)
    # Audio leaves the workers as waves; the fbank is computed on the device (`prepare`).
    samples = int(round(config.audio.seconds * config.audio.sample_rate))
    assert batch["audio"]["wave"].shape == (7, samples) and batch["audio"]["samples"].shape == (7,)
    # Presence follows the raw metadata (the demo set has missing video/audio/table).
    products = {json.loads(l)["id"]: json.loads(l) for l in (demo_shards["raw_eval"] / "meta.jsonl").read_text().splitlines()}
    for b in batches:
        for i, key in enumerate(b["key"]):
            for modality in ("image", "video", "audio"):
                assert bool(b[modality]["present"][i]) == bool(products[key][modality]), (key, modality)
            assert bool(b["table"]["present"][i]) == bool(products[key]["table"])
    absent = ~batch["video"]["present"]
    assert torch.all(batch["video"]["frames"][absent] == 0)
    # Table tokens: [CLS] first, entities numbered from 0, keys (role 0) before values (role 1).
    row = batch["table"]["present"].nonzero()[0, 0]
    entity, role = batch["table"]["entity_index"][row], batch["table"]["entity_role"][row]
    assert batch["table"]["input_ids"][row, 0] == 101 and entity[0] == -1
    first_value = (role == 1).nonzero()[0, 0]
    assert entity[first_value] == 0 and (role[1:first_value] == 0).all()


def test_corrupt_media_is_skipped_counted_and_warned(demo_shards, caplog):
    config = tiny_config()
    decoder = SampleDecoder(config)
    meta = {"title": "red kettle", "table": "color#:#red", "category": 3, "instance": "i1"}
    sample = {"__key__": "bad", "json": json.dumps(meta).encode(), "jpg": b"\xff\xd8 not a jpeg",
              "mp4": b"\x00\x00\x00 not an mp4", "wav": b"RIFF junk"}  # fmt: skip
    with caplog.at_level(logging.WARNING):
        decoded = decoder(sample)
    assert decoded is not None and decoded["text"]["present"] and decoded["table"]["present"]
    assert not decoded["image"]["present"] and not decoded["video"]["present"] and not decoded["audio"]["present"]
    assert decoder.errors == {"image": 1, "video": 1, "audio": 1}
    assert "bad" in caplog.text and "image unusable" in caplog.text
    # Nothing usable at all: the sample is dropped (and counted), not a crash.
    assert decoder({**sample, "json": json.dumps({"category": 1}).encode()}) is None
    assert decoder({"__key__": "x", "json": b"{not json"}) is None
    assert decoder.errors["json"] == 1 and decoder.dropped == 1


def test_collate_rejects_empty():
    with pytest.raises(ValueError):
        collate([])


class _CollateInWorker(torch.utils.data.IterableDataset):
    """Collates inside the data worker and reports, from there, where each tensor lives."""

    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __iter__(self):
        batch = collate(self.samples)
        shared = {name: {key: value.is_shared() for key, value in part.items()}
                  for name, part in batch.items() if isinstance(part, dict)}  # fmt: skip
        yield {"batch": batch, "shared": shared}


def test_collate_stacks_into_shared_memory_inside_a_data_worker(demo_shards):
    # A batch stacked in ordinary memory is copied again when the worker's queue pickles it; one
    # stacked into shared memory is handed over as is (docs/performance.md, the data workers' hand-over).
    decoder = SampleDecoder(tiny_config())
    samples = [s for s in (decoder(raw) for raw in _raw_samples(demo_shards["eval"])[:6]) if s is not None]
    loader = torch.utils.data.DataLoader(_CollateInWorker(samples), batch_size=None, num_workers=1,
                                         multiprocessing_context="fork")  # fmt: skip
    (out,) = list(loader)
    assert set(out["shared"]) == set(MODALITIES) and all(all(part.values()) for part in out["shared"].values())
    for name in MODALITIES:  # the same values as stacking in the training process
        for key, value in out["batch"][name].items():
            expected = torch.stack([s[name][key] for s in samples])
            assert value.dtype == expected.dtype and torch.equal(value, expected), (name, key)
    assert not any(v.is_shared() for v in collate(samples)["image"].values())  # in-process: ordinary memory


def _raw_samples(shard_dir: Path) -> list[dict]:
    return [{"__key__": key, **members} for key, members in sorted(read_tar_members(shard_dir).items())]
