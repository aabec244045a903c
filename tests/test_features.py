"""The feature stems (image regions, video clip features, audio mel), on real demo files:
demo `--features` -> shards -> decoded batches -> the model, and its masked feature tasks."""

from __future__ import annotations

import argparse
import io
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import demo
from datamodules.decode import SampleDecoder
from datamodules.limits import DataLimits
from datamodules.m5product import eval_dataloader
from datamodules.shards import write_shards
from scale.config import MODALITIES, ModelConfig
from scale.model import SCALE
from scale.modalities import stem_class
from scale.modalities.spec import DecodeContext, RawSample
from tests.conftest import tiny_config
from tests.test_data import read_tar_members
from tests.test_model import (
    all_patterns,
    assert_embeddings_unchanged,
    assert_every_parameter_gets_a_gradient,
    assert_losses_gradients_embeddings_finite,
    random_batch,
)

DIMS = dict(region_dim=16, video_feature_dim=12, mel_bins=8, mel_frames=40)
FIELDS = {"image_regions": "regions.npy", "image_boxes": "boxes.npy", "video_features": "video.npy", "audio_mel": "mel.npy"}
OWNER = {"image_regions": "image", "image_boxes": "image", "video_features": "video", "audio_mel": "audio"}
MAX_REGIONS = 24  # demo images have 10..36 regions: some padded, some cut


def feature_config(**overrides) -> ModelConfig:
    """The tiny test model with every feature stem, sized to the demo features above."""
    config = tiny_config(**overrides)
    config.image.stem, config.image.max_regions, config.image.region_dim = "regions", MAX_REGIONS, DIMS["region_dim"]
    config.video.stem, config.video.feature_dim = "features", DIMS["video_feature_dim"]  # frames: 3
    config.audio.stem, config.audio.feature_frames, config.audio.mel_bins = "features", DIMS["mel_frames"], DIMS["mel_bins"]
    return config


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> dict:
    """24 products with features (2-s videos: 2 clips < 3 frames; 0.5-s audio: 32 mel frames < 40)."""
    root = tmp_path_factory.mktemp("features")
    meta = demo.generate(root / "raw", 24, seed=5, missing={"video": 0.3, "audio": 0.3}, image_size=32,
                         video_size=16, video_seconds=2.0, fps=4, audio_seconds=0.5, features=True, **DIMS)  # fmt: skip
    write_shards(root / "raw", root / "shards", max_count=10)
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    return {"raw": root / "raw", "shards": root / "shards", "rows": {r["id"]: r for r in rows}}


def load(features: dict, path: str) -> np.ndarray:
    return np.load(features["raw"] / path, allow_pickle=False)


def test_demo_writes_feature_files_and_meta_fields(features):
    for r in features["rows"].values():
        for field, modality in OWNER.items():
            assert (r[field] is None) == (r[modality] is None), (r["id"], field)
        if r["image"]:
            regions, boxes = load(features, r["image_regions"]), load(features, r["image_boxes"])
            assert regions.dtype == np.float16 and boxes.dtype == np.float32
            assert 10 <= len(regions) <= 36 and regions.shape[1] == DIMS["region_dim"]
            assert boxes.shape == (len(regions), 5)
            assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:4] >= boxes[:, :2]).all()
            np.testing.assert_allclose(boxes[:, 4], (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), rtol=1e-5)
        if r["video"]:
            video = load(features, r["video_features"])
            assert video.dtype == np.float16 and video.shape == (2, DIMS["video_feature_dim"])
        if r["audio"]:
            mel = load(features, r["audio_mel"])
            assert mel.dtype == np.float32 and mel.shape == (DIMS["mel_bins"], 32) and np.isfinite(mel).all()


def test_features_leave_media_and_meta_unchanged(tmp_path):
    """Turning features on adds files and four fields; media bytes and every other field stay."""
    kw = dict(image_size=32, video_size=16, video_seconds=1.0, fps=4, audio_seconds=0.5)
    plain = demo.generate(tmp_path / "plain", 5, seed=2, **kw)
    rich = demo.generate(tmp_path / "rich", 5, seed=2, features=True, **kw, **DIMS)
    for a, b in zip(plain.read_text().splitlines(), rich.read_text().splitlines()):
        a, b = json.loads(a), json.loads(b)
        assert {k: v for k, v in b.items() if k not in FIELDS} == a
        for medium in ("image", "video", "audio"):
            assert (tmp_path / "plain" / a[medium]).read_bytes() == (tmp_path / "rich" / b[medium]).read_bytes()


def test_feature_files_round_trip_through_shards_byte_identical(features):
    samples = read_tar_members(features["shards"])
    assert sorted(samples) == sorted(features["rows"])
    for key, r in features["rows"].items():
        assert not set(FIELDS) & set(json.loads(samples[key]["json"])), "feature paths leaked into the shard JSON"
        for field, extension in FIELDS.items():
            if r[field]:
                assert samples[key][extension] == (features["raw"] / r[field]).read_bytes()
            else:
                assert extension not in samples[key]


def test_decoded_feature_batches_shapes_masks_and_values(features):
    config = feature_config()
    batches = list(eval_dataloader(str(features["shards"]), config, batch_size=8))
    assert sum(len(b["key"]) for b in batches) == 24
    batch = batches[0]
    assert batch["image"]["regions"].shape == (8, MAX_REGIONS, DIMS["region_dim"])
    assert batch["image"]["boxes"].shape == (8, MAX_REGIONS, 5)
    assert batch["image"]["region_mask"].dtype == torch.bool and batch["video"]["frame_mask"].dtype == torch.bool
    assert batch["video"]["features"].shape == (8, 3, DIMS["video_feature_dim"])
    assert batch["audio"]["fbank"].shape == (8, DIMS["mel_frames"], DIMS["mel_bins"])
    a = config.audio
    for b in batches:
        for i, key in enumerate(b["key"]):
            r, image, video, audio = features["rows"][key], b["image"], b["video"], b["audio"]
            for modality in ("image", "video", "audio"):
                assert bool(b[modality]["present"][i]) == bool(r[modality]), (key, modality)
            if r["image"]:
                regions, boxes = load(features, r["image_regions"]), load(features, r["image_boxes"])
                n = min(len(regions), MAX_REGIONS)
                assert image["region_mask"][i].tolist() == [True] * n + [False] * (MAX_REGIONS - n)
                assert torch.equal(image["regions"][i, :n], torch.from_numpy(regions[:n].astype(np.float32)))
                assert torch.equal(image["boxes"][i, :n], torch.from_numpy(boxes[:n]))
                assert not image["regions"][i, n:].any() and not image["boxes"][i, n:].any()
            else:
                assert not image["region_mask"][i].any() and not image["regions"][i].any()
            if r["video"]:
                assert video["frame_mask"][i].tolist() == [True, True, False]
                clips = torch.from_numpy(load(features, r["video_features"]).astype(np.float32))
                assert torch.equal(video["features"][i, :2], clips) and not video["features"][i, 2].any()
            else:
                assert not video["frame_mask"][i].any() and not video["features"][i].any()
            if r["audio"]:
                mel = torch.from_numpy(load(features, r["audio_mel"]))
                assert audio["length"][i] == 32
                torch.testing.assert_close(audio["fbank"][i, :32], (mel.T - a.norm_mean) / a.norm_std)
                assert not audio["fbank"][i, 32:].any()
            else:
                assert audio["length"][i] == 0 and not audio["fbank"][i].any()


def npy(array: np.ndarray) -> bytes:
    """The bytes of an .npy file (object arrays pickled into it, as an untrusted writer could)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def stem_decode(config: ModelConfig, modality: str, members: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """The configured stem's decode of one sample's members (what the loader runs)."""
    limits = DataLimits()
    sample = RawSample("k", {}, members, limits)
    return stem_class(config, modality).decode(sample, getattr(config, modality), DecodeContext(config, limits))


def test_long_feature_arrays_are_cut_to_the_configured_sizes():
    config = feature_config()
    regions = stem_decode(config, "image", {"regions.npy": npy(np.ones((40, 16), np.float16)),
                                            "boxes.npy": npy(np.ones((40, 5), np.float32))})  # fmt: skip
    assert regions["region_mask"].all() and regions["regions"].shape == (MAX_REGIONS, 16)
    video = stem_decode(config, "video", {"video.npy": npy(np.arange(20 * 12, dtype=np.float16).reshape(20, 12))})
    assert video["frame_mask"].all() and video["features"][:, 0].tolist() == [0.0, 12.0, 24.0]  # the first 3 clips
    mel = stem_decode(config, "audio", {"mel.npy": npy(np.zeros((8, 751), np.float32))})
    fbank, length = mel["fbank"], mel["length"]
    assert fbank.shape == (40, 8) and length == 40


UNPICKLED: list[str] = []


def _tripwire() -> str:
    UNPICKLED.append("unpickled")
    return "boom"


class Tripwire:
    """An object whose unpickling leaves a trace: proves the decoder never unpickles."""

    def __reduce__(self):
        return (_tripwire, ())


def test_malformed_feature_arrays_make_the_modality_absent_counted_never_unpickled(caplog):
    config = feature_config()
    good = {"regions.npy": npy(np.ones((12, 16), np.float16)), "boxes.npy": npy(np.full((12, 5), 0.5, np.float32)),
            "video.npy": npy(np.ones((2, 12), np.float16)), "mel.npy": npy(np.zeros((8, 30), np.float32))}  # fmt: skip
    objects = np.empty((12, 16), dtype=object)
    objects[:] = Tripwire()
    npz = io.BytesIO()
    np.savez(npz, regions=np.ones((12, 16)))
    bad_cases = [
        {"regions.npy": npy(objects)},                                      # pickled object array
        {"video.npy": pickle.dumps(Tripwire())},                            # a bare pickle
        {"regions.npy": npy(np.ones((12, 17), np.float16))},                # wrong region width
        {"boxes.npy": npy(np.ones((11, 5), np.float32))},                   # boxes do not match regions
        {"video.npy": npy(np.ones((2, 12, 1), np.float16))},                # wrong rank
        {"mel.npy": npy(np.zeros((80, 30), np.float32))},                   # wrong mel bins
        {"mel.npy": npy(np.full((8, 30), np.nan, np.float32))},             # not finite
        {"video.npy": npy(np.array([["a"] * 12] * 2))},                     # not numeric
        {"regions.npy": npz.getvalue()},                                    # a zip, not an .npy
        {"regions.npy": npy(np.ones((0, 16), np.float16)), "boxes.npy": npy(np.ones((0, 5), np.float32))},  # empty
    ]  # fmt: skip
    decoder = SampleDecoder(config)
    meta = json.dumps({"title": "red kettle", "table": "color#:#red", "category": 1, "instance": "i"}).encode()
    clean = decoder({"__key__": "ok", "json": meta, **good})
    assert all(bool(clean[m]["present"]) for m in ("image", "video", "audio")) and not decoder.errors
    expected = {"image": 0, "video": 0, "audio": 0}
    owner = {"regions.npy": "image", "boxes.npy": "image", "video.npy": "video", "mel.npy": "audio"}
    with caplog.at_level(logging.WARNING):
        for case in bad_cases:
            decoded = decoder({"__key__": "bad", "json": meta, **good, **case})
            for modality in {owner[field] for field in case}:
                expected[modality] += 1
                assert not decoded[modality]["present"], case.keys()
                assert all(not value.any() for name, value in decoded[modality].items() if name != "present")
            assert decoded["text"]["present"]
    assert dict(decoder.errors) == expected
    assert not UNPICKLED, "a feature file was unpickled"
    assert "image unusable" in caplog.text and "video unusable" in caplog.text and "audio unusable" in caplog.text
    # Regions without boxes: counted, not silently accepted.
    decoded = decoder({"__key__": "nobox", "json": meta, "regions.npy": good["regions.npy"]})
    assert not decoded["image"]["present"] and decoder.errors["image"] == expected["image"] + 1


# ---- the model on feature-stem batches -------------------------------------------------------------
FEATURE_LEAVES = {"image": ("regions", "boxes"), "video": ("features",), "audio": ("fbank",)}


@pytest.fixture(scope="module")
def model() -> SCALE:
    torch.manual_seed(0)
    return SCALE(feature_config())


def test_feature_stems_keys_and_token_sequences(model):
    image, video, audio = (model.encoders[m] for m in ("image", "video", "audio"))
    assert image.input_keys == ("regions", "boxes", "region_mask") and video.input_keys == ("features", "frame_mask")
    assert audio.input_keys == ("fbank", "length")
    assert (image.num_tokens, video.num_tokens, audio.num_tokens) == (1 + MAX_REGIONS, 1 + 3, 1 + 40 // 16)
    batch = random_batch(model.config, torch.ones(6, 5, dtype=torch.bool))
    for name, real in (("image", batch["image"]["region_mask"]), ("video", batch["video"]["frame_mask"])):
        encoded = model.encoders[name].encode(batch[name])
        assert encoded.tokens.shape == (6, model.encoders[name].num_tokens, model.config.fusion.width)
        assert encoded.token_mask[:, 0].all(), "the mean token must always be attended"
        assert torch.equal(encoded.token_mask[:, 1:], real)


def test_every_missing_pattern_goes_forward_and_backward_with_gradients_only_where_present(model):
    torch.manual_seed(1)
    present = all_patterns()
    batch = random_batch(model.config, present)
    leaves = {(m, k): batch[m][k].requires_grad_(True) for m, keys in FEATURE_LEAVES.items() for k in keys}
    model.zero_grad()
    losses = model.losses(model(batch, masked_modeling=True))
    assert {"loss", "contrastive"} | {f"masked/{m}" for m in MODALITIES} <= set(losses)
    assert all(torch.isfinite(value) for value in losses.values())
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for (name, key), tensor in leaves.items():
        per_sample = tensor.grad.flatten(1).abs().sum(1)
        column = present[:, MODALITIES.index(name)]
        assert torch.all(per_sample[~column] == 0), f"{name}.{key}: gradient reached absent samples"
        assert torch.all(per_sample[column] > 0), f"{name}.{key}: present samples got no gradient"


def test_nan_in_absent_samples_or_padding_never_reaches_outputs(model):
    torch.manual_seed(3)
    present = all_patterns()
    batch = random_batch(model.config, present, fill_absent=float("nan"))
    batch["image"]["regions"][~batch["image"]["region_mask"]] = float("nan")  # padding slots of present images
    batch["video"]["features"][~batch["video"]["frame_mask"]] = float("nan")
    assert_losses_gradients_embeddings_finite(model, batch)


def test_absent_video_and_padding_regions_do_not_move_embeddings(model):
    torch.manual_seed(4)
    present = torch.tensor([[True, True, True, False, True]] * 4)

    def scramble_absent_video_and_padding(batch):
        batch["video"]["features"] = torch.randn_like(batch["video"]["features"]) * 100
        padding = ~batch["image"]["region_mask"]
        batch["image"]["regions"][padding] = 100.0
        batch["image"]["boxes"][padding] = -7.0

    assert_embeddings_unchanged(model, random_batch(model.config, present), scramble_absent_video_and_padding)


def test_every_parameter_gets_a_gradient_when_a_feature_modality_is_absent_from_the_batch(model):
    for missing in ("image", "video"):
        present = torch.ones(6, 5, dtype=torch.bool)
        present[:, MODALITIES.index(missing)] = False
        assert_every_parameter_gets_a_gradient(model, present)


def test_masked_region_and_clip_targets_are_the_original_features(model):
    torch.manual_seed(6)
    present = torch.ones(64, 5, dtype=torch.bool)
    present[::4, MODALITIES.index("image")] = False
    present[1::4, MODALITIES.index("video")] = False
    batch = random_batch(model.config, present)
    for name, key, mask_key in (("image", "regions", "region_mask"), ("video", "features", "frame_mask")):
        encoder, column = model.encoders[name], present[:, MODALITIES.index(name)]
        clean = encoder.sanitize(batch[name], column)
        masked = encoder.mask(clean, column)
        chosen = masked.positions[:, 1:]
        assert not masked.positions[:, 0].any(), "the mean token is never a masked position"
        assert not (chosen & ~clean[mask_key]).any(), "a padding slot was masked"
        assert torch.equal(chosen.any(1), column), "every present sample (and no absent one) has a masked slot"
        assert torch.equal(masked.targets, batch[name][key][chosen])
        corrupted = masked.inputs[key]
        assert torch.equal(corrupted[~chosen], clean[key][~chosen]), "an unchosen slot was changed"
        zeroed = (corrupted[chosen] == 0).all(-1).float().mean()
        if name == "image":
            assert 0.75 < zeroed < 1.0, zeroed  # zero_prob 0.9: the rest stay intact
            assert torch.equal(masked.inputs["boxes"], clean["boxes"]), "boxes are kept"
        else:
            assert zeroed == 1.0


def test_short_training_loop_reduces_the_masked_region_loss(features):
    """40 AdamW steps on one demo batch (the feature modalities only, for speed)."""
    config = feature_config(modalities=["image", "video", "audio"])
    batch = next(iter(eval_dataloader(str(features["shards"]), config, batch_size=24)))
    torch.manual_seed(0)
    model = SCALE(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(40):
        losses = model.losses(model(batch, masked_modeling=True))
        history.append(float(losses["masked/image"].detach()))
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    first, last = np.mean(history[:8]), np.mean(history[-8:])
    assert last < 0.75 * first, (first, last)  # measured: about 0.6 -> 0.35


def test_planted_signal_in_demo_region_features(tmp_path):
    """Nearest centroid on the mean region feature: clearly above chance (1/8), not perfect."""
    data = {}
    for split, seed, n in (("train", 0, 120), ("test", 1, 80)):
        meta = demo.generate(tmp_path / split, n, seed=seed, missing={"video": 1.0, "audio": 1.0}, image_size=32,
                             features=True, **DIMS)  # fmt: skip
        rows = [json.loads(line) for line in meta.read_text().splitlines()]
        x = np.stack([np.load(meta.parent / r["image_regions"]).astype(np.float32).mean(0) for r in rows])
        data[split] = x, np.array([r["category"] for r in rows])
    (x, y), (xt, yt) = data["train"], data["test"]
    centroids = np.stack([x[y == c].mean(0) if (y == c).any() else np.full(x.shape[1], 1e6) for c in range(8)])
    accuracy = float((((xt[:, None] - centroids[None]) ** 2).sum(-1).argmin(1) == yt).mean())
    assert 0.4 < accuracy < 0.95, accuracy


def test_cli_features_flag(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    demo.run(parser.parse_args(["--out", str(tmp_path), "--products", "3", "--features", "--region-dim", "8",
                                "--missing", "video=1", "--missing", "audio=1", "--image-size", "32"]))  # fmt: skip
    assert "3 products" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "meta.jsonl").read_text().splitlines()]
    assert all(r["video_features"] is None and r["audio_mel"] is None for r in rows)
    assert all(np.load(tmp_path / r["image_regions"]).shape[1] == 8 for r in rows)
