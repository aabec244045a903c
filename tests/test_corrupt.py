"""The robustness protocol's corruptions: exact shares, recorded, readable, deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
from PIL import Image

from datamodules.corrupt import FIELDS, corrupt, has_modality
from datamodules.shards import write_shards


def load(folder):
    return [json.loads(line) for line in (folder / "meta.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["missing", "swap", "noise"])
def test_exact_share_is_corrupted_and_recorded(demo_shards, tmp_path, kind):
    src = demo_shards["raw_train"]
    counts = corrupt(src, tmp_path / "out", ["text"], kind, rate=0.5, seed=3)
    clean, corrupted = load(src), load(tmp_path / "out")
    assert counts == {"text": 20}  # 40 products, all with a title
    marked = [p for p in corrupted if p.get("corrupted")]
    assert len(marked) == 20 and all(p["corrupted"] == {"text": kind} for p in marked)
    by_id = {p["id"]: p for p in clean}
    for product in corrupted:
        original = by_id[product["id"]]
        if product.get("corrupted"):
            if kind == "missing":
                assert product["title"] == ""
            elif kind == "swap":
                donors = [p for p in clean if p["title"] == product["title"]]
                assert any(d["instance"] != original["instance"] for d in donors)
            else:
                assert product["title"] != original["title"]
        else:
            assert product["title"] == original["title"]
        assert product["category"] == original["category"] and product["instance"] == original["instance"]


def test_noise_media_are_real_files_of_the_same_shape(demo_shards, tmp_path):
    src = demo_shards["raw_train"]
    corrupt(src, tmp_path / "out", ["image", "audio"], "noise", rate=0.5, seed=1)
    for product in load(tmp_path / "out"):
        done = product.get("corrupted", {})
        if "image" in done:
            with Image.open(product["image"]) as image:
                assert image.format == "JPEG" and image.size == (48, 48)
            assert "/noise/" in product["image"]
        if "audio" in done:
            wave, rate = soundfile.read(product["audio"])
            assert rate == 16000 and len(wave) == 16000 and np.abs(wave).max() > 0.1
    # The corrupted folder converts to shards like any raw folder.
    summary = write_shards(tmp_path / "out", tmp_path / "shards")
    assert summary["samples"] == 40 and not summary["missing_media"]


def test_mixed_setting_picks_one_modality_per_product_and_is_deterministic(demo_shards, tmp_path):
    src = demo_shards["raw_train"]
    first = corrupt(src, tmp_path / "a", ["text", "image"], "swap", rate=0.8, seed=5)
    second = corrupt(src, tmp_path / "b", ["text", "image"], "swap", rate=0.8, seed=5)
    assert first == second and sum(first.values()) == 32 and min(first.values()) > 0
    assert (tmp_path / "a" / "meta.jsonl").read_text() == (tmp_path / "b" / "meta.jsonl").read_text()
    assert all(len(p.get("corrupted", {})) <= 1 for p in load(tmp_path / "a"))


def test_missing_never_empties_a_product(demo_shards, tmp_path):
    corrupt(demo_shards["raw_train"], tmp_path / "out", ["text", "image"], "missing", rate=1.0)
    for product in load(tmp_path / "out"):
        assert any(has_modality(product, m) for m in FIELDS)


def test_bad_arguments_name_the_problem(demo_shards, tmp_path):
    with pytest.raises(ValueError, match="smell"):
        corrupt(demo_shards["raw_train"], tmp_path, ["smell"], "swap", 0.5)
    with pytest.raises(ValueError, match="kind"):
        corrupt(demo_shards["raw_train"], tmp_path, ["text"], "scramble", 0.5)
    with pytest.raises(FileNotFoundError, match="meta.jsonl"):
        corrupt(tmp_path / "nowhere", tmp_path, ["text"], "swap", 0.5)
