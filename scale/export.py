"""Checkpoint export for downstream finetuning, and loading without Lightning.

An export folder holds:

    model.safetensors   the SCALE weights (shared text/table tower stored once)
    config.json         {"format": "scale-export/1", "model": ModelConfig as a dict}
    tokenizer/          the WordPiece tokenizer (tokenizer.json, vocab), when a modality tokenizes
    ...                 what a modality needs besides its weights (`Modality.export_assets`), e.g.
                        text_encoder/: the pretrained text BERT's architecture (config.json)

Everything needed to rebuild the model is inside the folder: no package data, no hub, no Lightning.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from scale.config import ModelConfig
from scale.model import SCALE
from scale.modalities import REGISTRY
from scale.pretrained_paths import load_tokenizer, resolve

TOKENIZER_FOLDER = "tokenizer"

EXPORT_FORMAT = "scale-export/1"


def read_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """The state_dict and hyper_parameters of a checkpoint in any of the formats `scale fit` writes:

    - a Lightning checkpoint file (DDP, one process, FSDP with `sharded_checkpoint: false`);
    - an FSDP sharded folder (`torch.distributed.checkpoint` shards + `meta.pt`), consolidated in CPU
      memory without a process group;
    - a DeepSpeed ZeRO folder (`latest`, `checkpoint/mp_rank_00_model_states.pt`, one optimizer
      shard per rank), converted to fp32 weights with DeepSpeed's own `zero_to_fp32`.

    Files are read with weights_only=True (no code runs); DeepSpeed's converter unpickles its files
    itself, so each is first proven to load as plain data.
    """
    ckpt = Path(ckpt)
    if ckpt.is_file():
        return torch.load(ckpt, map_location="cpu", weights_only=True)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"export --ckpt: {ckpt} not found")
    if (ckpt / ".metadata").is_file() and (ckpt / "meta.pt").is_file():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(ckpt)
    if (ckpt / "latest").is_file():
        return _read_deepspeed(ckpt)
    raise ValueError(f"export --ckpt: {ckpt} is a folder but neither an FSDP sharded checkpoint "
                     "(.metadata + meta.pt) nor a DeepSpeed one (latest)")  # fmt: skip


DEEPSPEED_DATA_CLASSES = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})  # fmt: skip
"""The classes a DeepSpeed ZeRO checkpoint may pickle besides tensors and containers (seen in 0.19)."""


def _read_deepspeed(folder: Path) -> dict[str, Any]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (folder / "latest").read_text().strip()
    files = sorted((folder / tag).glob("*.pt"))
    if not files:
        raise ValueError(f"export --ckpt: {folder / tag} holds no DeepSpeed state files")
    for file in files:
        # DeepSpeed pickles a few of its own plain-data classes (loss scaler, ZeRO stage enum,
        # fragment addresses); anything else (a function, another package's class) is refused.
        unexpected = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(file)
                      if name not in DEEPSPEED_DATA_CLASSES]  # fmt: skip
        if unexpected:
            raise ValueError(f"export --ckpt: {file} pickles {', '.join(unexpected)}: refused to unpickle it")
    # Lightning's client state (hyper_parameters, ...) is in the model-states file: one
    # `mp_rank_00_model_states.pt` up to ZeRO-2, one `zero_pp_rank_<r>_mp_rank_00_model_states.pt`
    # per rank under ZeRO-3 (each holds the whole client state).
    states = sorted((folder / tag).glob("*mp_rank_00_model_states.pt"))
    if not states:
        raise ValueError(f"export --ckpt: {folder / tag} holds no DeepSpeed model-states file")
    client = torch.load(states[0], map_location="cpu", weights_only=True)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    # Lightning's DeepSpeed strategy saves the LightningModule's parameters, named `model.<...>`
    # as in a plain checkpoint, after DeepSpeed's own `module.` prefix where present.
    weights = {k.removeprefix("_forward_module.").removeprefix("module."): v for k, v in weights.items()}
    return {"state_dict": weights, "hyper_parameters": client["hyper_parameters"]}


def load_checkpoint_model(ckpt: str | Path) -> SCALE:
    """The SCALE model inside a checkpoint of any format `read_checkpoint` reads (no code runs)."""
    state = read_checkpoint(ckpt)
    config = ModelConfig.from_dict(state["hyper_parameters"]["config"])
    model = SCALE(config, load_weights=False)
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def export_model(model: SCALE, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_dict(model.config.to_dict())  # a copy whose paths we rewrite
    if any(encoder.uses_tokenizer for encoder in model.encoders.values()):
        load_tokenizer(config.tokenizer).save_pretrained(str(out / TOKENIZER_FOLDER))
        config.tokenizer = TOKENIZER_FOLDER
    for encoder in model.encoders.values():
        encoder.export_assets(out, config)
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
    if config.tokenizer == TOKENIZER_FOLDER:
        config.tokenizer = str(directory / TOKENIZER_FOLDER)
    for spec in REGISTRY.values():
        if spec.resolve_assets is not None:
            spec.resolve_assets(config, directory)
    model = SCALE(config, load_weights=False)
    missing, unexpected = safetensors.torch.load_model(model, str(directory / "model.safetensors"), strict=True)
    return model.to(device).eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint: a Lightning .ckpt file, an FSDP sharded folder or a DeepSpeed ZeRO folder")
    parser.add_argument("--out", required=True, help="export folder")


def run(args: argparse.Namespace) -> None:
    out = export_model(load_checkpoint_model(args.ckpt), args.out)
    print(f"exported {args.ckpt} -> {out}")


__all__ = ["export_model", "load_checkpoint_model", "load_pretrained", "read_checkpoint", "resolve"]
