"""The converter and the loader check media one way (`scale/media/`): what `scale shards` keeps, the
loader decodes; what one refuses, the other refuses, for the same reason. Real encoded files."""

from __future__ import annotations

import io
import json
import resource
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from datamodules.decode import SampleDecoder
from datamodules.limits import DataLimits
from datamodules.shards import write_shards
from tests.conftest import tiny_config
from tests.test_data import read_tar_members


def encoded(fmt: str, width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small real PNG whose IHDR header claims width x height (CRC fixed, so PIL reads it)."""
    data = encoded("PNG", 8, 8)
    start = data.index(b"IHDR")
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[start + 12 : start + 17]
    return data[:start] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[start + 21 :]


# file name in the release -> (bytes, what the converter says, the loader's error kinds or None)
CASES = {
    "a.jpg": (encoded("JPEG"), "kept", None),
    "png-named-jpg.jpg": (encoded("PNG", seed=1), "kept", None),  # a real PNG saved as .jpg
    "b.png": (encoded("PNG", seed=1), "kept", None),
    "c.webp": (encoded("WEBP", seed=2), "kept", None),
    "gif.jpg": (encoded("GIF"), "corrupt", {"image": 1}),  # not a format product photos come in
    "half.png": (encoded("PNG", 400, 300)[:3000], "truncated", {"image": 1}),
    "bomb.png": (png_claiming(30000, 30000), "too_many_pixels", {"image": 1, "image: too large": 1}),
    "big.png": (png_claiming(8000, 6000), "too_many_pixels", {"image": 1, "image: too large": 1}),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "raw" / "m").mkdir(parents=True)
    rows = []
    for name, (data, _, _) in CASES.items():
        (root / "raw" / "m" / name).write_bytes(data)
        rows.append({"id": name.replace(".", "_"), "title": "a red kettle", "category": 1, "image": f"m/{name}"})
    (root / "raw" / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_shards(root / "raw", root / "shards")
    items = [json.loads(line) for line in (root / "shards" / "skipped.jsonl").read_text().splitlines()]
    return read_tar_members(root / "shards"), {i["id"]: i for i in items if i["modality"] == "image"}


@pytest.mark.parametrize("name", CASES)
def test_converter_and_loader_agree(converted, name):
    samples, items = converted
    data, verdict, loader_errors = CASES[name]
    key = name.replace(".", "_")
    decoder = SampleDecoder(tiny_config())
    record = json.dumps({"title": "a red kettle", "category": 1}).encode()
    if verdict == "kept":
        assert key not in items, items.get(key)
        member = {"jpg": "jpg", "png": "png", "webp": "webp"}[name.rsplit(".", 1)[1]]
        assert samples[key][member] == data  # stored byte for byte, under its file's extension
        decoded = decoder({"__key__": key, "json": record, member: data})
        assert decoded["image"]["present"] and not decoder.errors
    else:
        assert items[key]["reason"] == verdict and items[key]["action"] == "dropped", items[key]
        assert set(samples[key]) == {"json"}
        decoded = decoder({"__key__": key, "json": record, "jpg": data})  # a foreign shard holding it
        assert not decoded["image"]["present"] and decoded["text"]["present"]
        assert dict(decoder.errors) == loader_errors


def test_a_png_named_jpg_decodes_to_the_same_pixels_as_the_png(converted):
    samples, _ = converted
    decoder = SampleDecoder(tiny_config())
    record = json.dumps({"title": "t"}).encode()
    as_jpg = decoder({"__key__": "x", "json": record, "jpg": samples["png-named-jpg_jpg"]["jpg"]})["image"]["pixels"]
    as_png = decoder({"__key__": "y", "json": record, "png": samples["b_png"]["png"]})["image"]["pixels"]
    assert as_jpg.abs().sum() > 0 and (as_jpg == as_png).all()


def test_pixel_limits_are_checked_from_the_header_before_any_decode():
    """A 30000 x 30000 PNG header on a small file: refused by both without allocating its pixels."""
    bomb = png_claiming(30000, 30000)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    decoder = SampleDecoder(tiny_config(), DataLimits())
    decoded = decoder({"__key__": "bomb", "json": json.dumps({"title": "t"}).encode(), "png": bomb})
    assert not decoded["image"]["present"] and decoder.errors["image: too large"] == 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 * 1024


def test_pixels_leave_the_workers_as_bytes_and_are_normalised_on_the_device():
    """The loader ships uint8 images and frames (a quarter of float pixels' bytes); the stems'
    `prepare` gives exactly what timm's float transform (and the former in-worker normalisation)
    gave, in the parameters' dtype, and takes floats as already normalised."""
    import torch

    from scale.model import SCALE
    from scale.modalities.image.stems import PixelStem
    from tests.test_bad_data import mp4, record

    config = tiny_config()
    data = encoded("JPEG", 64, 48, seed=3)
    decoded = SampleDecoder(config)({"__key__": "x", "json": record(), "jpg": data, "mp4": mp4(size=48)})
    pixels, frames = decoded["image"]["pixels"], decoded["video"]["frames"]
    assert pixels.dtype == frames.dtype == torch.uint8 and decoded["video"]["present"]
    model = SCALE(config)
    image, video = model.encoders["image"], model.encoders["video"]
    with Image.open(io.BytesIO(data)) as opened:
        timm_pixels = PixelStem.transform(config.image)(opened.convert("RGB"))
    assert torch.equal(image.prepare({"pixels": pixels[None]})["pixels"][0], timm_pixels)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (config.video.mean, config.video.std))
    torch.testing.assert_close(video.prepare({"frames": frames[None]})["frames"][0], (frames.float() / 255 - mean) / std,
                               atol=0, rtol=0)  # fmt: skip
    assert torch.equal(image.prepare({"pixels": timm_pixels[None]})["pixels"][0], timm_pixels)  # floats: as given
    image.to(torch.bfloat16)  # precision: bf16-true
    assert image.prepare({"pixels": pixels[None]})["pixels"].dtype == torch.bfloat16
