"""`image.decode_on: device` / `video.decode_on: device`: the converter's small JPEGs (`small.jpg`,
`frames.jpg`) travel as bitstreams and are decoded after the transfer, in the model's `prepare`
(nvJPEG on a GPU; on this CPU libjpeg-turbo, which gives PIL's pixels bit for bit)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import subprocess
import sys
import tarfile
import warnings

import pytest
import torch
import yaml
from PIL import Image

from datamodules.limits import DataLimits
from datamodules.m5product import M5ProductDataModule, eval_dataloader
from datamodules.shards import write_shards
from scale.media.pixels import centre_crop, pack_jpeg, unpack_pixels
from scale.model import SCALE
from tests.conftest import ROOT, TINY_YAML, tiny_config
from tests.test_checkpoints import run_fit


def on_device(config):
    return dataclasses.replace(config, image=dataclasses.replace(config.image, decode_on="device"),
                               video=dataclasses.replace(config.video, decode_on="device"))  # fmt: skip


def _rewrite(shards, out, edit) -> None:
    """A copy of the shard set with each member passed through `edit(name, bytes)` (None: drop it)."""
    out.mkdir()
    for path in sorted(shards.iterdir()):
        if path.is_file() and not path.name.endswith(".tar"):  # the index, the label vocabulary
            (out / path.name).write_bytes(path.read_bytes())
        if not path.name.endswith(".tar"):
            continue
        with tarfile.open(path) as source, tarfile.open(out / path.name, "w") as target:
            for member in source.getmembers():
                data = edit(member.name, source.extractfile(member).read())
                if data is not None:
                    member.size = len(data)
                    target.addfile(member, io.BytesIO(data))


def _progressive(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, "JPEG", quality=90, subsampling=0, progressive=True)
    return buffer.getvalue()


def _cut_scan(data: bytes) -> bytes:
    """The JPEG cut halfway through its entropy-coded scan: the header reads, the pixels do not."""
    start = data.index(b"\xff\xda")
    return data[: start + (len(data) - start) // 2]


@pytest.fixture(scope="module")
def shards(demo_shards, tmp_path_factory):
    """The demo converted with small copies at the tiny config's image.size and strips of its
    frames; then, in a copy, a mixture: some products lose their copy (the worker resizes the
    original), one copy is progressive (not for the device), one copy and one strip are cut in
    half through their scan (unusable either way)."""
    root = tmp_path_factory.mktemp("device_decode")
    config = tiny_config()
    limits = DataLimits(shrink_images=config.image.size, extract_frames=config.video.frames,
                        extract_size=config.video.size)  # fmt: skip
    write_shards(demo_shards["raw_train"], root / "clean", max_count=10, limits=limits)
    seen = {"small.jpg": 0, "frames.jpg": 0}

    def edit(name: str, data: bytes) -> bytes | None:
        kind = next((k for k in seen if name.endswith("." + k)), None)
        if kind is None:
            return data
        seen[kind] += 1
        index = seen[kind]
        if kind == "small.jpg" and index % 3 == 0:
            return None
        if kind == "small.jpg" and index == 4:
            return _progressive(data)
        return _cut_scan(data) if index == 5 else data

    _rewrite(root / "clean", root / "mixed", edit)
    return {"clean": root / "clean", "mixed": root / "mixed"}


def _batch(shards, config, workers: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cut files' errors (counted by the workers' budget)
        batches = list(eval_dataloader(str(shards), config, batch_size=64, num_workers=workers))
    assert len(batches) == 1
    return batches[0]


def _prepared(config, batch):
    torch.manual_seed(0)
    model = SCALE(config).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = model.prepare(batch)
    return model, prepared, [str(w.message) for w in caught]


@pytest.mark.parametrize("name", ["clean", "mixed"])
def test_decoded_on_the_device_the_pixels_are_the_workers_bit_for_bit(shards, name):
    """Through 2 data workers; every row either a bitstream or the worker's pixels, and the model's
    losses the same to the last bit."""
    config = tiny_config()
    plain, device = _batch(shards[name], config), _batch(shards[name], on_device(config), workers=2)
    assert plain["key"] == device["key"]
    model_plain, ours, _ = _prepared(config, plain)
    model_device, theirs, messages = _prepared(on_device(config), device)
    for modality, values in (("image", "pixels"), ("video", "frames")):
        present = plain[modality]["present"]
        lengths = device[modality]["encoded_length"]
        assert present.any() and (lengths[present] > 0).any(), modality  # bitstreams did travel
        assert torch.equal(ours[modality][values], theirs[modality][values]), modality
        assert torch.equal(ours[modality]["present"], theirs[modality]["present"]), modality
        assert set(theirs[modality]) == {values, "present"}  # the host buffers were consumed
    image_lengths = device["image"]["encoded_length"][plain["image"]["present"]]
    if name == "mixed":  # the worker decoded the rows without a plain copy at image.size
        assert (image_lengths == 0).any() and (image_lengths > 0).any()
        # The cut copy's bitstream failed on the device as it fails in a worker: the image absent.
        assert any("failed to decode" in m and m.startswith("image: 1 of") for m in messages), messages
        assert any("failed to decode" in m and m.startswith("video: 1 of") for m in messages), messages
    else:
        assert (image_lengths > 0).all() and not messages
    with torch.no_grad():
        torch.manual_seed(1)
        expected = model_plain(plain, masked_modeling=True, returns="losses")
        torch.manual_seed(1)
        got = model_device(device, masked_modeling=True, returns="losses")
    assert torch.isfinite(got["loss"]) and torch.equal(expected["loss"], got["loss"])


def test_a_bitstream_that_fails_on_the_device_makes_that_sample_absent_and_nothing_else():
    """What a corrupt JPEG that passed the workers' header check does after the transfer, and one
    of a size the layout does not hold (refused by `fit`, not stretched)."""
    def jpeg(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (200, 30, 90)).save(buffer, "JPEG", quality=90, subsampling=0)
        return buffer.getvalue()

    streams = [jpeg(40, 32), _cut_scan(jpeg(40, 32)), jpeg(48, 48), jpeg(32, 40)]
    capacity = 3 * 32 * 32
    worker_pixels = torch.full((capacity,), 7, dtype=torch.uint8)  # pixels a worker decoded
    buffers = torch.stack([*(pack_jpeg(stream, capacity) for stream in streams), worker_pixels])
    lengths = torch.tensor([len(s) for s in streams] + [0])
    pixels, decoded = unpack_pixels(buffers, lengths, (3, 32, 32), torch.device("cpu"), lambda im: centre_crop(im, 32))
    assert decoded.tolist() == [True, False, False, True, True] and decoded.device.type == "cpu"
    assert (pixels[1] == 0).all() and (pixels[2] == 0).all() and (pixels[4] == 7).all()
    for row in (0, 3):
        assert (pixels[row].float().mean((1, 2)) - torch.tensor([200.0, 30.0, 90.0])).abs().max() < 3


def test_the_bitstreams_stay_in_host_memory_when_the_batch_moves(shards):
    config = on_device(tiny_config())
    batch = _batch(shards["clean"], config)
    data = M5ProductDataModule(model_config=config)  # the transfer hook `scale fit` and `scale finetune` use
    for moved in (SCALE(config).batch_to_device(batch, "meta"), data.transfer_batch_to_device(batch, torch.device("meta"), 0)):
        for modality in ("image", "video"):
            assert {k: v.device.type for k, v in moved[modality].items()} == {
                "encoded": "cpu", "encoded_length": "cpu", "present": "meta"}
        assert moved["text"]["present"].device.type == "meta" and moved["key"] == batch["key"]


def test_scale_fit_trains_with_bitstreams_through_data_workers(shards, tmp_path):
    """The user's command: `scale fit` with both options, 2 data workers, past an epoch boundary
    (40 products, 6 steps of 16)."""
    config = yaml.safe_load(TINY_YAML.read_text())
    config["trainer"].update(max_steps=6, default_root_dir=str(tmp_path))
    config["data"].update(train_shards=str(shards["mixed"]), num_workers=2, batch_size=16)
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    run = run_fit("--config", str(path), "--model.config.image.decode_on", "device", "--model.config.video.decode_on",
                  "device", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
                  str(tmp_path))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "JPEG bitstreams in the batch failed to decode" in run.stderr  # the cut copy
    assert "transfer_batch_to_device" not in run.stderr  # one hook, the data module's: Lightning says nothing
    logged = [row for row in csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))) if row["train/loss"]]
    assert len(logged) == 6 and all(math.isfinite(float(row["train/loss"])) for row in logged)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["config"]["image"]["decode_on"] == "device"


def test_the_gpu_decode_check_runs_here_on_the_cpu(shards):
    """`bench/gpu_decode_check.py`, which `bench/gpu_check.sh` runs on a GPU: on the CPU the same
    decoder on both sides, so the pixels are equal and no queued sum is overwritten."""
    config = tiny_config()
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_decode_check.py"), "--shards", str(shards["clean"]),
                          "--image-size", str(config.image.size), "--frames", str(config.video.frames),
                          "--frame-size", str(config.video.size), "--iterations", "2"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.split("GPU_DECODE ", 1)[1])
    assert [row["name"] for row in report["rows"]] == ["images", "strips"]
    for row in report["rows"]:
        assert row["batch"] > 0 and row["checked_sums"] == 8 and row["corrupted_sums"] == 0
        assert row["max_level_difference"] == 0 and row["decode_ms_best"] > 0


@pytest.mark.slow
def test_two_process_ddp_fit_decoding_on_the_device_equals_decoding_in_the_workers(shards, tmp_path):
    """`scale fit` on 2 processes (DDP, exact epochs, a data worker each) over the mixed shards,
    through an epoch boundary: the bitstreams each rank decodes after its own transfer, with the
    cut copy made absent on the rank that reads it, train the same weights as the workers' pixels."""
    weights = {}
    for where in ("workers", "device"):
        run = run_fit("--config", str(TINY_YAML), "--data.train_shards", str(shards["mixed"]),
                      "--trainer.default_root_dir", str(tmp_path / where), "--trainer.devices", "2",
                      "--trainer.strategy", "ddp", "--trainer.max_steps", "4", "--data.mode", "exact",
                      "--data.batch_size", "8", "--data.num_workers", "1", "--model.config.image.decode_on", where,
                      "--model.config.video.decode_on", where)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        state = torch.load(tmp_path / where / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert state["global_step"] == 4 and state["epoch"] == 1  # 40 products: 3 steps of 2 x 8 (the last 2 x 4) per epoch
        weights[where] = state["state_dict"]
    assert "JPEG bitstreams in the batch failed to decode" in run.stderr
    assert weights["device"].keys() == weights["workers"].keys()
    for name, value in weights["workers"].items():
        torch.testing.assert_close(weights["device"][name], value, rtol=0, atol=0, msg=name)
