"""Checkpoint export for downstream finetuning, and loading without Lightning.

An export folder holds:

    model.safetensors   the SCALE weights (shared text/table tower stored once)
    config.json         {"format": "scale-export/1", "model": ModelConfig as a dict}
    tokenizer/          the WordPiece tokenizer (tokenizer.json, vocab)
    text_encoder/       the pretrained text BERT's architecture (config.json), when one was used

Everything needed to rebuild the model is inside the folder: no package data, no hub, no Lightning.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import safetensors.torch
import torch

from scale.config import ModelConfig
from scale.model import SCALE
from scale.pretrained_paths import load_tokenizer, resolve

EXPORT_FORMAT = "scale-export/1"


def load_checkpoint_model(ckpt: str | Path) -> SCALE:
    """The SCALE model inside a Lightning checkpoint (read with weights_only=True: no code runs)."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"export --ckpt: {ckpt} not found")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    config = ModelConfig.from_dict(state["hyper_parameters"]["config"])
    model = SCALE(config, load_weights=False)
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def export_model(model: SCALE, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_dict(model.config.to_dict())  # a copy whose paths we rewrite
    if "text" in config.modalities or "table" in config.modalities:
        load_tokenizer(config.tokenizer).save_pretrained(str(out / "tokenizer"))
        config.tokenizer = "tokenizer"
    if config.text.pretrained is not None:
        tower = model.encoders["text"].tower if "text" in model.encoders else model.encoders["table"].tower
        tower.bert.config.save_pretrained(str(out / "text_encoder"))
        config.text.pretrained = "text_encoder"
    safetensors.torch.save_model(model, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"format": EXPORT_FORMAT, "model": config.to_dict()}, indent=1))
    return out


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu") -> SCALE:
    """Rebuild an exported SCALE model in eval mode: `model.embed(batch)` gives embeddings."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"load_pretrained: {config_path} not found (not an export folder)")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{config_path}: format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
    config = ModelConfig.from_dict(meta["model"])
    # Paths inside the folder become absolute, so the data pipeline finds the same tokenizer.
    if config.tokenizer == "tokenizer":
        config.tokenizer = str(directory / "tokenizer")
    if config.text.pretrained == "text_encoder":
        config.text.pretrained = str(directory / "text_encoder")
    model = SCALE(config, load_weights=False)
    missing, unexpected = safetensors.torch.load_model(model, str(directory / "model.safetensors"), strict=True)
    return model.to(device).eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="export folder")


def run(args: argparse.Namespace) -> None:
    out = export_model(load_checkpoint_model(args.ckpt), args.out)
    print(f"exported {args.ckpt} -> {out}")


__all__ = ["export_model", "load_checkpoint_model", "load_pretrained", "resolve"]
