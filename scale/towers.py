"""Towers other libraries load: what `scale export` writes beside the SCALE weights, so that a
downstream user needs neither this package nor Lightning to reuse one encoder.

    hf_text/     the text BERT as a Hugging Face folder: `config.json` + `model.safetensors` (a
                 BertModel) and the tokenizer files, which `transformers.AutoModel` /
                 `AutoTokenizer.from_pretrained(folder)` load; `scale_text.json` (pooling, token
                 budget) and `scale_projection.safetensors` (the tower's Linear to the fusion width)
    timm_image/  the `pixels` ViT as a timm folder: `config.json` in timm's Hub format (architecture,
                 `model_args`, preprocessing) + `model.safetensors`, which
                 `timm.create_model("local-dir:<folder>", pretrained=True)` loads (or
                 `create_model(architecture, **model_args, checkpoint_path=<folder>/model.safetensors)`);
                 `scale_projection.safetensors` as for the text
    README.md    the model card: modalities, stems and sizes, how long it trained, metrics, and the
                 copy-paste code that loads each tower

"The same embeddings", exactly:
- text: the BertModel's `last_hidden_state` for the same ids and attention mask (token type 0, what
  the tokenizer returns for one title) equals `model.encoders["text"].tower.bert(...)` inside
  `scale.load_pretrained(export)` (to float tolerance), and `text_embedding` (the projection on every
  token, then the masked mean over attended tokens, or the [CLS] token with `text.pooling: cls`)
  equals `load_pretrained(export).embed(batch)["text/encoder"]`. The tokenizer is saved with
  `model_max_length` = `text.max_tokens`, so `tokenizer(titles, truncation=True,
  padding="max_length")` gives the ids SCALE's loader gives. Hugging Face adds a BERT pooler SCALE
  never trained (a warning on load): its `pooler_output` means nothing here.
- image: `forward_features(pixels)` of the timm model equals `PixelStem.vit.forward_features`;
  token 0 through `scale_projection.safetensors` is `embed(batch)["image/encoder"]`.

These are the pre-fusion towers: what fusion adds (`embed(batch)["text"]`, `"fused"`,
`"contrastive"`) needs the whole model, `scale.load_pretrained`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from scale.model import SCALE
from scale.modalities.bert import BertTower
from scale.modalities.image import TIMM_FOLDER
from scale.modalities.image.stems import TIMM_ARCHITECTURE, PixelStem, vit_arguments
from scale.pretrained_paths import resolve

HF_TEXT_FOLDER = "hf_text"
PROJECTION_FILE = "scale_projection.safetensors"
"""A tower's Linear to the fusion width (`weight`, `bias`; the identity when the widths agree)."""
TEXT_SETTINGS_FILE = "scale_text.json"
MODEL_CARD = "README.md"
TEXT, IMAGE = "text", "image"


@contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """safetensors reports a failed write (a full disk) as a SafetensorError, not an OSError: make it
    one, so the command line's disk-error line and the staging folder's clean-up see it."""
    try:
        yield
    except safetensors.SafetensorError as error:
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


def write_towers(model: SCALE, out: Path, checkpoint: Mapping[str, Any] | None = None) -> None:
    """Write `hf_text/` (when the model has a text tower), `timm_image/` (a `pixels` image tower)
    and the model card into the export folder `out`; `checkpoint` (what `read_checkpoint` returned,
    weights optional) tells the card how long the model trained."""
    written = [folder for folder in (write_hf_text(model, out), write_timm_image(model, out)) if folder is not None]
    (out / MODEL_CARD).write_text(model_card(model, checkpoint, [folder.name for folder in written]))


# ---- text: a Hugging Face BERT folder -------------------------------------------------------------
def write_hf_text(model: SCALE, out: Path) -> Path | None:
    """The text BertModel, its tokenizer and SCALE's pooling head as `out/hf_text` (module doc)."""
    encoder = model.encoders[TEXT] if TEXT in model.encoders else None
    tower = getattr(encoder, "tower", None)
    if not isinstance(tower, BertTower):
        return None
    from transformers import AutoTokenizer

    folder = out / HF_TEXT_FOLDER
    with disk_errors(folder):
        tower.bert.save_pretrained(str(folder))
        _save_projection(tower.project, tower.bert.config.hidden_size, folder / PROJECTION_FILE)
    # A copy of the tokenizer whose default truncation is the title budget SCALE trained with.
    tokenizer = AutoTokenizer.from_pretrained(str(resolve(model.config.tokenizer)), local_files_only=True,
                                              model_max_length=encoder.config.max_tokens)  # fmt: skip
    tokenizer.save_pretrained(str(folder))
    settings = {"pooling": encoder.config.pooling, "max_tokens": encoder.config.max_tokens,
                "token_type_id": encoder.token_type, "projection": PROJECTION_FILE, "width": tower.width}  # fmt: skip
    (folder / TEXT_SETTINGS_FILE).write_text(json.dumps(settings, indent=1))
    return folder


def text_embedding(hidden_states: Tensor, attention_mask: Tensor, folder: str | Path) -> Tensor:
    """SCALE's pre-fusion text vector, `load_pretrained(export).embed(batch)["text/encoder"]`, from
    the Hugging Face BertModel's `last_hidden_state` (B, L, H) over `hf_text/` and its attention
    mask (B, L): the tower's projection on every token, then the mean over the attended tokens
    (`text.pooling: mean`) or the [CLS] token (`cls`), in the order SCALE computes them."""
    folder = Path(folder)
    settings = json.loads((folder / TEXT_SETTINGS_FILE).read_text())
    projection = safetensors.torch.load_file(str(folder / settings["projection"]))
    tokens = hidden_states @ projection["weight"].T.to(hidden_states) + projection["bias"].to(hidden_states)
    if settings["pooling"] == "cls":
        return tokens[:, 0].float()
    weights = attention_mask.to(tokens.dtype).unsqueeze(-1)
    return ((tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)).float()


def _save_projection(project: nn.Module, hidden: int, path: Path) -> None:
    if isinstance(project, nn.Linear):
        weight, bias = project.weight, project.bias
    else:  # nn.Identity: the tower's width already is the fusion width
        weight, bias = torch.eye(hidden), torch.zeros(hidden)
    safetensors.torch.save_file({"weight": weight.detach().contiguous().cpu(), "bias": bias.detach().contiguous().cpu()}, str(path))


# ---- image: a timm ViT folder ---------------------------------------------------------------------
def timm_config(stem: PixelStem) -> dict[str, Any]:
    """`timm_image/config.json` in the format timm reads for a Hub or `local-dir:` model: the
    architecture, the arguments that rebuild this ViT, and the preprocessing SCALE applies (bicubic
    resize, centre crop of the whole image, the image.mean / image.std normalisation)."""
    config = stem.config
    return {
        "architecture": TIMM_ARCHITECTURE,
        "num_classes": 0,
        "num_features": config.hidden,
        "global_pool": "token",
        "model_args": vit_arguments(config),
        "pretrained_cfg": {
            "input_size": [3, config.size, config.size], "fixed_input_size": True, "interpolation": "bicubic",
            "crop_pct": 1.0, "crop_mode": "center", "mean": list(config.mean), "std": list(config.std),
            "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head",
        },
    }  # fmt: skip


def write_timm_image(model: SCALE, out: Path) -> Path | None:
    """The `pixels` image ViT as `out/timm_image` (module doc)."""
    stem = model.encoders[IMAGE] if IMAGE in model.encoders else None
    if not isinstance(stem, PixelStem):
        return None
    folder = out / TIMM_FOLDER
    folder.mkdir()
    with disk_errors(folder):
        weights = {key: value.detach().contiguous().cpu() for key, value in stem.vit.state_dict().items()}
        safetensors.torch.save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        _save_projection(stem.project, stem.config.hidden, folder / PROJECTION_FILE)
    (folder / "config.json").write_text(json.dumps(timm_config(stem), indent=1))
    return folder


# ---- the model card ---------------------------------------------------------------------------------
def model_card(model: SCALE, checkpoint: Mapping[str, Any] | None, towers: list[str]) -> str:
    """The export's README.md: what the model is, what is known of its training, how to load it."""
    lines = ["# SCALE export", "", "A SCALE model (`scale export`): one encoder per modality, a fusion transformer, "
             "contrastive projections. `model.safetensors` + `config.json` rebuild it with `scale.load_pretrained`.", ""]  # fmt: skip
    lines += _configuration(model) + _training(checkpoint) + _metrics(checkpoint) + _loading(model, towers)
    return "\n".join(lines) + "\n"


def _configuration(model: SCALE) -> list[str]:
    config = model.config
    lines = ["## Configuration", "", f"Modalities: {', '.join(model.modalities)}; tokenizer: `{config.tokenizer}`.", "",
             "| modality | stem | parameters | settings |", "|---|---|---|---|"]  # fmt: skip
    for name, encoder in model.encoders.items():
        section = getattr(config, name)
        settings = ", ".join(f"{key}={value}" for key, value in vars(section).items() if key != "stem")
        bert = getattr(getattr(encoder, "tower", None), "bert", None)
        if bert is not None:  # a pretrained BERT's sizes are its own, not the size fields'
            settings += (f"; BERT: hidden {bert.config.hidden_size}, layers {bert.config.num_hidden_layers}, "
                         f"heads {bert.config.num_attention_heads}, vocabulary {bert.config.vocab_size}")  # fmt: skip
        parameters = sum(p.numel() for p in encoder.parameters())
        lines.append(f"| {name} | {getattr(encoder, 'stem', '')} | {parameters:,} | {settings} |")
    fusion, total = config.fusion, sum(p.numel() for p in model.parameters())
    lines += ["", f"Fusion: width {fusion.width}, layers {fusion.layers}, heads {fusion.heads}; contrastive projection "
              f"{config.contrastive.projection_dim}; harmonization {config.harmonization.mode}; {total:,} parameters "
              "in all (a shared tower counts once).", ""]  # fmt: skip
    return lines


def _training(checkpoint: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Training", ""]
    if checkpoint is None:
        return lines + ["Not recorded: exported from a model in memory, not from a checkpoint.", ""]
    if "global_step" in checkpoint:
        lines.append(f"- optimizer steps: {int(checkpoint['global_step'])}" +
                     (f" (epoch {int(checkpoint['epoch'])})" if "epoch" in checkpoint else ""))  # fmt: skip
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    plain = {key: value for key, value in data.items() if isinstance(value, (str, int, float, bool)) or value is None}
    if plain:
        lines.append("- data: " + ", ".join(f"{key}={value}" for key, value in plain.items()))
    if "global_step" in checkpoint and isinstance(data.get("batch_size"), int):
        lines.append(f"- samples trained per rank: {int(checkpoint['global_step']) * data['batch_size']:,} "
                     "(steps x batch size; times the ranks and any gradient accumulation)")  # fmt: skip
    counts = next((state["counts"] for key, state in (checkpoint.get("callbacks") or {}).items()
                   if key.startswith("DataErrorStop") and isinstance(state, dict) and "counts" in state), None)  # fmt: skip
    if isinstance(counts, dict) and "samples" in counts:
        lines.append(f"- samples the training loaders read: {counts['samples']:,}, {counts.get('bad_samples', 0):,} "
                     "of them unusable (read-ahead included: a shuffle buffer reads beyond the last step)")  # fmt: skip
    optimizer = (checkpoint.get("hyper_parameters") or {}).get("optimizer")
    if isinstance(optimizer, dict):
        lines.append("- optimizer: " + ", ".join(f"{key}={value}" for key, value in optimizer.items()))
    if len(lines) == 2:
        lines.append("The checkpoint records no training progress.")
    return lines + [""]


def _metrics(checkpoint: Mapping[str, Any] | None) -> list[str]:
    scores = []
    for state in ((checkpoint or {}).get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") and state.get("current_score") is not None:
            best = state.get("best_model_score")
            scores.append(f"- `{state['monitor']}`: {float(state['current_score']):.4g} at this checkpoint"
                          + (f", best {float(best):.4g}" if best is not None else ""))  # fmt: skip
    lines = ["## Metrics", ""]
    if scores:
        lines += ["The validation metric the checkpoint callback monitored:", "", *scores, ""]
    lines += ["Retrieval, probe and clustering metrics: `scale evaluate --model <this folder> --data <held-out shards>`.", ""]
    return lines


def _loading(model: SCALE, towers: list[str]) -> list[str]:
    lines = ["## Loading", "", "The whole model (every modality, fusion, projections):", "", "```python",
             "import scale", "", 'model = scale.load_pretrained("path/to/this/folder")',
             "embeddings = model.embed(batch)  # batch: datamodules.m5product.eval_dataloader(shards, model.config)",
             "```", ""]  # fmt: skip
    if HF_TEXT_FOLDER in towers:
        shared = [f"{name} (token_type_ids={encoder.token_type})" for name, encoder in model.encoders.items()
                  if name != TEXT and getattr(encoder, "tower", None) is model.encoders[TEXT].tower]  # fmt: skip
        lines += [f"The text tower alone, with `transformers` (`{HF_TEXT_FOLDER}/`; its last_hidden_state is SCALE's, "
                  "and the lines after it give `embed(batch)[\"text/encoder\"]`; the BERT pooler is untrained):", "",
                  "```python", "import json, torch", "from safetensors.torch import load_file",
                  "from transformers import AutoModel, AutoTokenizer", "",
                  f'folder = "path/to/this/folder/{HF_TEXT_FOLDER}"',
                  "tokenizer = AutoTokenizer.from_pretrained(folder)",
                  "bert = AutoModel.from_pretrained(folder, local_files_only=True).eval()",
                  f'settings = json.load(open(f"{{folder}}/{TEXT_SETTINGS_FILE}"))',
                  'projection = load_file(f"{folder}/" + settings["projection"])',
                  'batch = tokenizer(["red cotton t-shirt"], truncation=True, padding="max_length", return_tensors="pt")',
                  "with torch.no_grad():", "    hidden = bert(**batch).last_hidden_state",
                  'tokens = hidden @ projection["weight"].T + projection["bias"]',
                  'mask = batch["attention_mask"].unsqueeze(-1).float()',
                  'embedding = (tokens * mask).sum(1) / mask.sum(1) if settings["pooling"] == "mean" else tokens[:, 0]',
                  "```", "", "(`scale.towers.text_embedding(hidden, batch[\"attention_mask\"], folder)` does the last three lines.)",
                  ""]  # fmt: skip
        if shared:
            lines += [f"The same BERT also encodes: {', '.join(shared)}.", ""]
    if TIMM_FOLDER in towers:
        lines += [f"The image tower alone, with `timm` (`{TIMM_FOLDER}/`; forward_features is SCALE's image tower "
                  "before its projection, `scale_projection.safetensors`, applied to token 0):", "",
                  "```python", "import json, timm", "",
                  f'folder = "path/to/this/folder/{TIMM_FOLDER}"',
                  'config = json.load(open(f"{folder}/config.json"))',
                  'vit = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()',
                  "# or, with a timm that has no `local-dir:` source: the folder's architecture, arguments and weights",
                  'vit = timm.create_model(config["architecture"], **config["model_args"], '
                  'checkpoint_path=f"{folder}/model.safetensors").eval()',
                  "# SCALE's preprocessing: bicubic resize, whole-image centre crop, its mean / std",
                  'transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=config["pretrained_cfg"]))',
                  "features = vit.forward_features(transform(image).unsqueeze(0))  # image: a PIL image; (1, 1 + patches, hidden)",
                  "```", ""]  # fmt: skip
    starts = {HF_TEXT_FOLDER: f"`text.pretrained` and `tokenizer`: `path/to/this/folder/{HF_TEXT_FOLDER}`",
              TIMM_FOLDER: f"`image.pretrained`: `path/to/this/folder/{TIMM_FOLDER}`"}  # fmt: skip
    if towers:
        lines += ["A new SCALE pretraining run starts from these towers with", "",
                  *[f"- {starts[name]}" for name in towers], ""]  # fmt: skip
    return lines
