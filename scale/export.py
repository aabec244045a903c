"""Checkpoint export for downstream finetuning, and loading without Lightning.

An export folder holds:

    model.safetensors   the SCALE weights (shared text/table tower stored once)
    config.json         {"format": "scale-export/1", "model": ModelConfig as a dict}
    tokenizer/          the WordPiece tokenizer (tokenizer.json, vocab), when a modality tokenizes
    ...                 what a modality needs besides its weights (`Modality.export_assets`), e.g.
                        text_encoder/: the pretrained text BERT's architecture (config.json)
    hf_text/ timm_image/  the text and image towers as folders `transformers` and `timm` load, and
    README.md           the model card (`scale/towers.py`)

Everything needed to rebuild the model is inside the folder: no package data, no hub, no Lightning.
"""

from __future__ import annotations

import argparse
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from scale.config import ModelConfig
from scale.model import SCALE
from scale.modalities import REGISTRY
from scale.outputs import output_folder, refuse_non_empty
from scale.pretrained_paths import load_tokenizer, resolve
from scale.towers import disk_errors, write_towers

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
        return _load_file(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"export --ckpt: {ckpt} not found")
    if (ckpt / ".metadata").is_file() and (ckpt / "meta.pt").is_file():
        from lightning.fabric.utilities.load import _load_distributed_checkpoint

        return _load_distributed_checkpoint(ckpt)
    if (ckpt / "latest").is_file():
        return _read_deepspeed(ckpt)
    raise ValueError(f"export --ckpt: {ckpt} is a folder but neither an FSDP sharded checkpoint "
                     "(.metadata + meta.pt) nor a DeepSpeed one (latest)")  # fmt: skip


def refused_to_unpickle(path: Any, error: pickle.UnpicklingError) -> str:
    """One line for a checkpoint a weights-only load refused: torch's message is a page long, and
    the line that names the offending global is the one worth keeping."""
    lines = str(error).strip().splitlines()
    reason = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
    return f"{path}: not a plain checkpoint, refused to unpickle it ({reason.strip()})"


def unreadable_checkpoint(path: str | Path, error: BaseException) -> str:
    """One line for a checkpoint file torch cannot read: most often one still being copied or
    written, or cut short by a full disk."""
    detail = str(error).strip().splitlines()[0].split(". ")[0][:120] if str(error).strip() else type(error).__name__
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    return (f"{path} ({size} bytes) is not a readable checkpoint, truncated or still being written? ({detail}); "
            "wait until it is complete, or use an earlier one")


def _load_file(ckpt: Path) -> dict[str, Any]:
    """A checkpoint file, or one line: truncated (a copy still growing, a disk that filled) or not
    a checkpoint at all; a pickle that would run code is refused by weights_only=True."""
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"export --ckpt {refused_to_unpickle(str(ckpt), error)}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ValueError(f"export --ckpt: {unreadable_checkpoint(ckpt, error)}") from None
    if not isinstance(state, dict) or "state_dict" not in state or "hyper_parameters" not in state:
        raise ValueError(f"export --ckpt: {ckpt} is not a `scale fit` checkpoint (no state_dict and hyper_parameters)")
    return state


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
    return model_from_checkpoint(read_checkpoint(ckpt))


def model_from_checkpoint(state: Mapping[str, Any]) -> SCALE:
    """The SCALE model of a checkpoint `read_checkpoint` returned, in eval mode."""
    config = ModelConfig.from_dict(state["hyper_parameters"]["config"])
    model = SCALE(config, load_weights=False)
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def export_model(model: SCALE, out: str | Path, overwrite: bool = False, checkpoint: Mapping[str, Any] | None = None) -> Path:
    """Write the export folder `out` (module doc) through a staging folder renamed into place
    (`scale/outputs.py`): a non-empty `out` is refused unless `overwrite`, and a failure midway
    (a full disk) leaves the previous export, or nothing. `checkpoint`, the `read_checkpoint` dict
    the model came from (its weights may be dropped), puts its training progress in the model card."""
    with output_folder(out, overwrite, "export --out") as staging:
        _write_export(model, staging, checkpoint)
    return Path(out)


def _write_export(model: SCALE, out: Path, checkpoint: Mapping[str, Any] | None) -> None:
    config = ModelConfig.from_dict(model.config.to_dict())  # a copy whose paths we rewrite
    if any(encoder.uses_tokenizer for encoder in model.encoders.values()):
        load_tokenizer(config.tokenizer).save_pretrained(str(out / TOKENIZER_FOLDER))
        config.tokenizer = TOKENIZER_FOLDER
    for encoder in model.encoders.values():
        encoder.export_assets(out, config)
    with disk_errors(out / "model.safetensors"):
        safetensors.torch.save_model(model, str(out / "model.safetensors"))
    write_towers(model, out, checkpoint)
    (out / "config.json").write_text(json.dumps({"format": EXPORT_FORMAT, "model": config.to_dict()}, indent=1))


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
    weights = directory / "model.safetensors"
    try:  # safetensors holds tensors only: a pickle (or anything else) in its place is refused unread
        safetensors.torch.load_model(model, str(weights), strict=True)
    except (safetensors.SafetensorError, OSError) as error:
        raise ValueError(f"load_pretrained: {weights} is not a safetensors file of this model ({error}); "
                         "export the checkpoint again") from None  # fmt: skip
    except RuntimeError as error:  # strict: other keys or shapes than config.json's model
        raise ValueError(f"load_pretrained: {weights} does not match {config_path} "
                         f"({' '.join(str(error).split())[:300]}); export the checkpoint again") from None  # fmt: skip
    return model.to(device).eval()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint: a Lightning .ckpt file, an FSDP sharded folder or a DeepSpeed ZeRO folder")
    parser.add_argument("--out", required=True, help="export folder (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (everything in it)")


def run(args: argparse.Namespace) -> None:
    refuse_non_empty(Path(args.out), args.overwrite, "export --out")  # before the checkpoint is read
    state = read_checkpoint(args.ckpt)
    model = model_from_checkpoint(state)
    progress = {key: value for key, value in state.items() if key not in ("state_dict", "optimizer_states")}
    del state  # the model holds the weights now
    out = export_model(model, args.out, overwrite=args.overwrite, checkpoint=progress)
    print(f"exported {args.ckpt} -> {out}")


__all__ = ["export_model", "load_checkpoint_model", "load_pretrained", "model_from_checkpoint", "read_checkpoint",
           "refused_to_unpickle", "resolve", "unreadable_checkpoint"]
