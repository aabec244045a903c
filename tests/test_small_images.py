"""Images downscaled once at conversion (`scale shards --shrink-images S`): a `small.jpg` beside
each large image that the `pixels` stem decodes instead of the original."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image

from datamodules.limits import DataLimits
from datamodules.shards import write_shards
from scale.media import MediaError
from scale.media.image import shrink_image, shrunk_size
from tests.conftest import ROOT, one_batch_and_warnings, tiny_config


def _members(shards) -> dict[str, bytes]:
    members = {}
    for path in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return members


@pytest.fixture(scope="module")
def converted(demo_shards, tmp_path_factory):
    """The demo's 48-px images (the tiny config decodes at 32) shrunk to 40, to 24 (under the
    config's size) and to 48 (no image is larger: nothing to make)."""
    root = tmp_path_factory.mktemp("small")
    out = {"plain": demo_shards["train"]}
    for side in (40, 24, 48):
        out[side] = root / str(side)
        out[f"{side}_summary"] = write_shards(demo_shards["raw_train"], out[side], max_count=10,
                                              limits=DataLimits(shrink_images=side))  # fmt: skip
    return out


def test_every_larger_image_gets_one_small_copy_and_the_report_counts_them(converted):
    members = _members(converted[40])
    images = {name.rsplit(".", 1)[0] for name in members if name.endswith(".jpg") and name.count(".") == 1}
    small = {name[: -len(".small.jpg")]: data for name, data in members.items() if name.endswith(".small.jpg")}
    assert images and set(small) == images
    for data in small.values():
        with Image.open(io.BytesIO(data)) as image:
            assert min(image.size) == 40 and image.format == "JPEG"
    assert converted["40_summary"]["derived"]["image/images_shrunk"] == len(images)
    plain = _members(converted["plain"])
    assert {n: d for n, d in members.items() if not n.endswith(".small.jpg")}.keys() == plain.keys()
    assert not [n for n in _members(converted[48]) if n.endswith(".small.jpg")]  # none larger than 48
    assert "image/images_shrunk" not in converted["48_summary"].get("derived", {})


def test_the_stem_reads_the_small_copy_and_sees_the_same_image(converted):
    """The same samples, the same pixels up to a second resampling and JPEG's rounding; every
    other modality bitwise equal."""
    config = tiny_config()
    plain, _ = one_batch_and_warnings(converted["plain"], config)
    small, messages = one_batch_and_warnings(converted[40], config)
    assert not [m for m in messages if "small.jpg" in m]
    assert plain["key"] == small["key"]
    present = plain["image"]["present"]
    assert present.any() and torch.equal(present, small["image"]["present"])
    assert small["image"]["pixels"].dtype == torch.uint8  # normalised on the device, not in the workers
    ours, theirs = (batch["image"]["pixels"][present].float() for batch in (small, plain))
    error = (ours - theirs).abs().flatten(1).mean(1)  # per image, in 0..255 units
    assert (error > 0).all() and (error < 6.0).all(), error  # 0: it read the original
    # Each image is closest to its own original: the right copy for the right product.
    distances = (ours[:, None] - theirs[None, :]).abs().flatten(2).mean(-1)
    assert torch.equal(distances.argmin(dim=1), torch.arange(len(ours)))
    for name in ("text", "table", "video", "audio"):
        for key, value in plain[name].items():
            assert torch.equal(value, small[name][key]), (name, key)


def test_copies_smaller_than_the_config_fall_back_to_the_original_with_a_warning(converted):
    config = tiny_config()
    plain, _ = one_batch_and_warnings(converted["plain"], config)
    under, messages = one_batch_and_warnings(converted[24], config)
    assert torch.equal(plain["image"]["pixels"], under["image"]["pixels"])
    assert any("small.jpg is 24 px" in m and "--shrink-images 32" in m for m in messages), messages


def test_shrink_sizes_and_refusals():
    assert shrunk_size(800, 600, 256) == (341, 256)
    assert shrunk_size(300, 1200, 256) == (256, 1024)
    assert shrunk_size(256, 900, 256) is None and shrunk_size(100, 80, 256) is None
    buffer = io.BytesIO()
    Image.new("RGB", (90, 60), (200, 30, 10)).save(buffer, "PNG")
    small = shrink_image(buffer.getvalue(), [60, 40], max_pixels=None)
    with Image.open(io.BytesIO(small)) as image:
        assert image.size == (60, 40) and image.format == "JPEG"
        assert abs(image.getpixel((30, 20))[0] - 200) < 4
    with pytest.raises(MediaError):
        shrink_image(b"not an image", [60, 40], max_pixels=None)
    with pytest.raises(MediaError, match="max_image_pixels"):
        shrink_image(buffer.getvalue(), [60, 40], max_pixels=100)


def test_the_cli_flag_is_checked(tmp_path):
    run = subprocess.run([sys.executable, "-m", "scale.cli", "shards", "--src", str(tmp_path), "--out", str(tmp_path / "o"),
                          "--shrink-images", "0"], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "--shrink-images: not a side in pixels: '0'" in run.stderr


def test_a_copy_at_image_size_is_only_cropped_not_resampled():
    """The README's advice (`--shrink-images` = `image.size`) rests on the loader's resize being a
    no-op for such a copy: its pixels are the decoded JPEG's own, centre-cropped (a timm or
    torchvision change that resampled here would cost the feed x1.15-1.3 and fail this)."""
    import numpy as np

    from scale.media.image import decode_image
    from scale.modalities.image import ImageConfig
    from scale.modalities.image.stems import PixelStem

    config = ImageConfig(size=32, patch=16)
    original = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    original.save(buffer, "JPEG")
    small = shrink_image(buffer.getvalue(), list(shrunk_size(80, 60, config.size)), None)
    pixels = decode_image(small, PixelStem.byte_transform(config), size=config.size)
    decoded = torch.from_numpy(np.asarray(Image.open(io.BytesIO(small)).convert("RGB"))).permute(2, 0, 1)
    assert decoded.shape[1] == config.size  # the copy's shorter side is the training size
    left = int(round((decoded.shape[2] - config.size) / 2))  # torchvision CenterCrop's offset
    assert torch.equal(pixels, decoded[:, :, left : left + config.size])
