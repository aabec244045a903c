"""The towers `scale export` writes for other libraries (`scale/towers.py`), loaded the way those
libraries load them, and the reverse: pretraining that starts from them. One tiny text + image
model is trained for two steps and exported by the command line; every test reads that export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from transformers import AutoModel, AutoTokenizer

from datamodules import demo
from datamodules.m5product import eval_dataloader
from datamodules.shards import write_shards
from scale.cli import main
from scale.config import ModelConfig, OptimizerConfig
from scale.export import export_model, load_pretrained
from scale.model import SCALE
from scale.modalities.image.stems import PixelStem
from scale.optim import parameter_groups
from scale.towers import text_embedding
from tests.conftest import TINY_YAML, tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("towers")
    demo.generate(root / "raw", products=16, seed=0, missing={"video": 1.0, "audio": 1.0, "table": 1.0}, image_size=32)
    write_shards(root / "raw", root / "shards", max_count=8)
    main(["fit", "--config", str(TINY_YAML), "--data.train_shards", str(root / "shards"), "--trainer.default_root_dir",
          str(root / "fit"), "--model.config.modalities", "[text, image]", "--trainer.max_steps", "2"])  # fmt: skip
    export = root / "export"
    main(["export", "--ckpt", str(root / "fit" / "checkpoints" / "last.ckpt"), "--out", str(export)])
    model = load_pretrained(export)
    batch = next(iter(eval_dataloader(str(root / "shards"), model.config, batch_size=8)))
    titles = {json.loads(line)["id"]: json.loads(line)["title"] for line in (root / "raw" / "meta.jsonl").open()}
    return {"root": root, "export": export, "model": model, "batch": batch, "titles": [titles[k] for k in batch["key"]]}


def config_with(model: SCALE, **changes) -> ModelConfig:
    """A copy of `model`'s config with some fields replaced (a dict: fields of that section)."""
    data = model.config.to_dict()
    for key, value in changes.items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    return ModelConfig.from_dict(data)


def pretrained_ids(model: SCALE) -> set[int]:
    groups = parameter_groups(model, OptimizerConfig())
    return {id(p) for group in groups if group["name"].startswith("pretrained/") for p in group["params"]}


# ---- text: transformers -------------------------------------------------------------------------
def test_hf_text_loads_with_auto_classes_and_gives_the_towers_hidden_states(run):
    folder, model, batch = run["export"] / "hf_text", run["model"], run["batch"]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    bert = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    # The saved tokenizer truncates at the title budget: its ids are the loader's.
    encoded = tokenizer(run["titles"], truncation=True, padding="max_length", return_tensors="pt")
    assert torch.equal(encoded["input_ids"], batch["text"]["input_ids"])
    assert torch.equal(encoded["attention_mask"], batch["text"]["attention_mask"])
    with torch.no_grad():
        theirs = bert(**encoded).last_hidden_state
        ours = model.encoders["text"].tower.bert(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                                                 token_type_ids=torch.zeros_like(encoded["input_ids"])).last_hidden_state  # fmt: skip
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_text_embedding_recipe_gives_embed_text_encoder(run):
    folder, model, batch = run["export"] / "hf_text", run["model"], run["batch"]
    bert = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    ids, mask = batch["text"]["input_ids"], batch["text"]["attention_mask"]
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    present = batch["text"]["present"].bool()
    assert present.all()
    expected = model.embed(batch)["text/encoder"]
    torch.testing.assert_close(text_embedding(hidden, mask, folder), expected, atol=1e-5, rtol=1e-5)


def test_the_model_cards_snippets_run_and_give_scales_embeddings(run):
    """The card's copy-paste code, run as written (the folder path filled in)."""
    export, model = run["export"], run["model"]
    blocks = re.findall(r"```python\n(.*?)```", (export / "README.md").read_text(), re.S)
    assert len(blocks) == 3  # the whole model, the text tower, the image tower
    text_code, image_code = (block.replace("path/to/this/folder", str(export)) for block in blocks[1:])
    scope: dict = {}
    exec(text_code, scope)
    image_absent = {**PixelStem.absent(model.config.image), "present": torch.zeros(1, dtype=torch.bool)}
    image_absent["pixels"] = image_absent["pixels"][None]
    text = {"input_ids": scope["batch"]["input_ids"], "attention_mask": scope["batch"]["attention_mask"],
            "present": torch.ones(1, dtype=torch.bool)}  # fmt: skip
    expected = model.embed({"text": text, "image": image_absent})["text/encoder"]
    torch.testing.assert_close(scope["embedding"], expected, atol=1e-5, rtol=1e-5)
    scope = {"image": Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))}
    exec(image_code, scope)
    pixels = PixelStem.transform(model.config.image)(scope["image"])[None]  # SCALE's own preprocessing
    with torch.no_grad():
        torch.testing.assert_close(scope["features"], model.encoders["image"].vit.forward_features(pixels))


# ---- image: timm ----------------------------------------------------------------------------------
def test_timm_image_loads_every_way_timm_offers_with_the_towers_features(run):
    folder, model, batch = run["export"] / "timm_image", run["model"], run["batch"]
    config = json.loads((folder / "config.json").read_text())
    weights = str(folder / "model.safetensors")
    loaded = {
        "local-dir": timm.create_model(f"local-dir:{folder}", pretrained=True),
        "checkpoint_path": timm.create_model(config["architecture"], **config["model_args"], checkpoint_path=weights),
        "file overlay": timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                                          pretrained_cfg_overlay={"file": weights}),
    }  # fmt: skip
    stem = model.encoders["image"]
    pixels = stem.prepare(batch["image"])["pixels"]  # the loader's uint8, normalised as in training
    with torch.no_grad():
        expected = stem.vit.forward_features(pixels)
        for way, vit in loaded.items():
            torch.testing.assert_close(vit.eval().forward_features(pixels), expected, atol=0, rtol=0, msg=way)
        # Token 0 through the saved projection is SCALE's pre-fusion image vector.
        projection = timm.models.load_state_dict(str(folder / "scale_projection.safetensors"))
        pooled = expected[:, 0] @ projection["weight"].T + projection["bias"]
        torch.testing.assert_close(pooled, model.embed(batch)["image/encoder"], atol=1e-5, rtol=1e-5)
    # timm's preprocessing for it is SCALE's: size, interpolation, crop and normalisation.
    data = timm.data.resolve_data_config(model=loaded["local-dir"])
    image = model.config.image
    assert data == {"input_size": (3, image.size, image.size), "interpolation": "bicubic", "mean": list(image.mean),
                    "std": list(image.std), "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip


# ---- the model card -------------------------------------------------------------------------------
def test_the_model_card_names_the_training_steps_and_what_it_holds(run):
    card = (run["export"] / "README.md").read_text()
    assert "Modalities: text, image" in card
    assert "| text | wordpiece |" in card and "| image | pixels |" in card
    assert "- optimizer steps: 2 (epoch 0)" in card
    assert f"train_shards={run['root'] / 'shards'}" in card and "batch_size=8" in card
    assert "- samples trained per rank: 16 " in card
    assert "scale evaluate --model" in card  # the checkpoint holds no validation metric


def test_an_export_without_a_checkpoint_omits_the_training_and_names_the_shared_tower(tmp_path):
    export = export_model(SCALE(tiny_config(), load_weights=False), tmp_path / "export")
    card = (export / "README.md").read_text()
    assert "Not recorded" in card and "optimizer steps" not in card
    assert "table (token_type_ids=1)" in card  # the table runs through the text BERT
    assert {"hf_text", "timm_image"} <= {p.name for p in export.iterdir()}


def test_a_regions_image_stem_writes_no_timm_folder(tmp_path):
    config = tiny_config(modalities=["text", "image"])
    config.image.stem = "regions"
    export = export_model(SCALE(config, load_weights=False), tmp_path / "export")
    assert not (export / "timm_image").exists() and (export / "hf_text").is_dir()


# ---- the reverse: pretraining from the towers ---------------------------------------------------------
def test_text_pretrained_from_hf_text_starts_from_the_exported_bert(run):
    folder, model = str(run["export"] / "hf_text"), run["model"]
    started = SCALE(config_with(model, tokenizer=folder, text={"pretrained": folder}))
    theirs, ours = started.encoders["text"].tower.bert.state_dict(), model.encoders["text"].tower.bert.state_dict()
    assert theirs.keys() == ours.keys()
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], atol=0, rtol=0, msg=key)
    assert {id(p) for p in started.encoders["text"].tower.bert.parameters()} <= pretrained_ids(started)


@pytest.mark.parametrize("source", ["folder", "safetensors", "pth with a classifier"])
def test_image_pretrained_from_a_timm_checkpoint_starts_from_its_weights(run, tmp_path, source):
    folder, model = run["export"] / "timm_image", run["model"]
    exported = model.encoders["image"].vit.state_dict()
    path = {"folder": folder, "safetensors": folder / "model.safetensors"}.get(source)
    if path is None:  # a timm training checkpoint: weights under state_dict, an ImageNet head
        path = tmp_path / "checkpoint.pth"
        head = {"head.weight": torch.randn(10, model.config.image.hidden), "head.bias": torch.zeros(10)}
        torch.save({"epoch": 3, "state_dict": {**exported, **head}}, path)
    started = SCALE(config_with(model, image={"pretrained": str(path)}))
    stem = started.encoders["image"]
    for key, value in stem.vit.state_dict().items():
        torch.testing.assert_close(value, exported[key], atol=0, rtol=0, msg=key)
    # Its weights follow optimizer.pretrained_lr, like the text BERT's; the projection does not.
    assert {id(p) for p in stem.vit.parameters()} <= pretrained_ids(started)
    assert not {id(p) for p in stem.project.parameters()} & pretrained_ids(started)


def test_a_timm_checkpoint_of_another_architecture_is_a_one_line_error(run, tmp_path):
    weights = run["export"] / "timm_image" / "model.safetensors"
    with pytest.raises(ValueError, match=rf"image.pretrained {re.escape(str(weights))}: cls_token is \(1, 1, 32\) "
                                         r"in the checkpoint, \(1, 1, 64\) in this config"):  # fmt: skip
        SCALE(config_with(run["model"], image={"pretrained": str(weights), "hidden": 64}))
    deeper = {"pretrained": str(weights), "layers": 2}
    with pytest.raises(ValueError, match=r"no 'blocks.1.norm1.weight' in the checkpoint"):
        SCALE(config_with(run["model"], image=deeper))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"image.pretrained {re.escape(str(garbage))}: "):
        SCALE(config_with(run["model"], image={"pretrained": str(garbage)}))
    with pytest.raises(ValueError, match="needs image.stem pixels"):
        SCALE(config_with(run["model"], image={"pretrained": str(weights), "stem": "regions"}))


def test_an_export_of_a_pretrained_image_tower_stays_pretrained_and_reads_no_original(run, tmp_path):
    original = tmp_path / "original.safetensors"
    original.write_bytes((run["export"] / "timm_image" / "model.safetensors").read_bytes())
    export = export_model(SCALE(config_with(run["model"], image={"pretrained": str(original)})), tmp_path / "export")
    assert json.loads((export / "config.json").read_text())["model"]["image"]["pretrained"] == "timm_image"
    original.unlink()  # the export needs its own folder only
    loaded = load_pretrained(export)
    assert loaded.config.image.pretrained == str(export / "timm_image")
    assert {id(p) for p in loaded.encoders["image"].vit.parameters()} <= pretrained_ids(loaded)
