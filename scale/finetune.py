"""`scale finetune`: an export folder (`scale export`) finetuned for classification or retrieval.

The LightningModule here starts from an export (`scale.load_pretrained`) and trains

- `classification`: a head on the post-fusion pooled vectors, as the official model's
  (M x width -> hidden -> activation -> dropout -> classes), with cross-entropy over the labelled
  samples only (category -1 is unlabelled: no loss, no metric);
- `retrieval`: the pretraining contrastive loss alone (`SCALE.losses` without masked modeling: the
  same InfoNCE over every present modality pair, with the export's harmonization), scored by coarse
  (same category) and fine (same product) mAP@10 of the `contrastive` embedding.

`freeze: encoders` is the linear-probe setting (the export's encoders and fusion frozen, in eval
mode, bitwise unchanged; only the head trains: the classifier, or for retrieval the contrastive
projections); `none` finetunes everything the task's output depends on, optionally with layer-wise
learning-rate decay (`layer_decay`, see `parameter_depths`).

`run_finetune` is the command: the validation metrics of the starting point, the training run,
the same metrics after, a before/after table, `<default_root_dir>/finetune_metrics.json` and the
finetuned model as a folder (`save_finetuned` / `load_finetuned`: self-contained) besides the usual
checkpoints (`FinetuneModule.load_from_checkpoint` rebuilds from the export folder the run started
from, then loads the checkpoint's weights: that folder must still exist).

"Before" for classification is the untrained head (chance: the same metric, the same samples,
so the two columns compare), with `linear_probe_accuracy` beside it: a logistic regression on the
head's input features of the held-out set (`scale.metrics.linear_probe_accuracy`, split in halves by
product), what the features alone tell; a probe run leaves it unchanged, a full finetune moves it.

Macro-F1 is sklearn's `f1_score(average="macro")`, computed once per validation on the predictions
gathered from every rank (gathered anyway, for the probe): one exact number with the library the
other metrics use (`scale.metrics`), no metric state to sync; torchmetrics' MulticlassF1Score gives
the same value (both average over the classes seen as a label or a prediction).

Strategies: one device or DDP (every parameter that trains receives a gradient: `used_parameters`);
the sharding strategies of pretraining (FSDP, DeepSpeed) are not wired here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scale.bounds import AT_LEAST_0, AT_LEAST_1, BELOW_1, POSITIVE, SHARE, Bound, check_bounds, check_value
from scale.config import ModelConfig, _from_dict
from scale.export import export_model, load_pretrained
from scale.metrics import linear_probe_accuracy, macro_f1
from scale.model import SCALE, TRANSFORMER_BLOCKS
from scale.module import SCALEModule, validation_retrieval
from scale.optim import DECAYED_TYPES
from scale.outputs import output_folder, write_file
from scale.shard_format import read_labels

TASKS = ("classification", "retrieval")
FINETUNED_FORMAT = "scale-finetune/1"
HEAD_FILE = "head.safetensors"
FINETUNE_FILE = "finetune.json"
DECAY = Bound(0, 1, low_open=True)
"""A decay factor: in (0, 1]."""


@dataclass
class HeadConfig:
    """The classification head (the official model's: 5 x 768 -> 1024 -> dropout -> classes)."""

    features: Literal["concat", "fused"] = "concat"
    """What the head reads: `concat`, the per-modality post-fusion pooled vectors side by side
    (M x width, zeros for an absent modality: the official head), or `fused`, their normalised sum
    over the present modalities (width; `SCALE.embed()["fused"]`, the official retrieval embedding)."""
    hidden: int = 1024
    """Width of the hidden layer (official: 1024)."""
    activation: Literal["relu", "gelu"] = "relu"
    """Non-linearity after the hidden layer."""
    dropout: float = 0.1
    """Dropout before the output layer."""

    BOUNDS = {"hidden": AT_LEAST_1, "dropout": BELOW_1}

    def __post_init__(self) -> None:
        check_bounds(self, "model.head")


class ClassifierHead(nn.Sequential):
    """Linear(in, hidden) -> activation -> dropout -> Linear(hidden, classes)."""

    def __init__(self, in_features: int, classes: int, config: HeadConfig):
        activation = nn.ReLU() if config.activation == "relu" else nn.GELU()
        super().__init__(nn.Linear(in_features, config.hidden), activation, nn.Dropout(config.dropout),
                         nn.Linear(config.hidden, classes))  # fmt: skip


def classification_loss(logits: Tensor, category: Tensor) -> Tensor:
    """Mean cross-entropy over the labelled samples (category >= 0). A batch without any is a zero
    that still depends on the logits (every rank then runs the same backward under DDP)."""
    labelled = category >= 0
    if not labelled.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled].float(), category[labelled])


def parameter_depths(model: SCALE, head: list[nn.Parameter], through_fusion: bool) -> dict[int, int]:
    """Every trainable parameter's depth from the top (id -> depth), for layer-wise lr decay.

    A level per transformer block, counted down from the output: the head (and the fusion's final
    norm) at 0; fusion block i of F at F - i; the fusion's own embeddings (type, positions) at
    F + 1; below it each encoder's blocks, block j of L at F + 1 + L - j; every other parameter of
    an encoder (stem, embeddings, final norm, projection to the fusion width) at F + L + 2, one level
    below its first block. Retrieval's output (the contrastive projections of the pre-fusion pooled
    tokens) does not pass through the fusion: F + 1 levels fewer, and the projections are the head.
    Depths are per encoder, so a 12-layer text BERT and a 2-layer audio trunk both have their last
    block right below the fusion."""
    depths: dict[int, int] = {id(p): 0 for p in head}

    def assign(module: nn.Module, depth: int) -> None:
        for parameter in module.parameters():
            depths.setdefault(id(parameter), depth)

    fusion_layers = 0
    if through_fusion:
        blocks = list(model.fusion.transformer.blocks)
        fusion_layers = len(blocks)
        assign(model.fusion.transformer.norm, 0)
        for index, block in enumerate(blocks):
            assign(block, fusion_layers - index)
        assign(model.fusion, fusion_layers + 1)
    top = fusion_layers + 1 if through_fusion else 0
    for encoder in model.encoders.values():  # a shared tower (text / table) is counted once
        blocks = [m for m in encoder.modules() if isinstance(m, TRANSFORMER_BLOCKS)]
        for index, block in enumerate(blocks):
            assign(block, top + len(blocks) - index)
        assign(encoder, top + len(blocks) + 1)
    assign(model, 0)  # projections, learned temperature / SigLIP bias / harmonization matrix
    return depths


def used_parameters(model: SCALE, task: str) -> set[int]:
    """The parameters the task's output depends on (ids): found by a backward from a two-sample
    example batch, so the masked-modeling heads (and, for retrieval, the fusion) are left out of
    training without a list of their names per modality; DDP would stop on parameters that never
    receive a gradient."""
    batch = {}
    for name, encoder in model.encoders.items():
        inputs = type(encoder).example(encoder.config, 2)
        batch[name] = {**inputs, "present": torch.ones(2, dtype=torch.bool)}
    with torch.enable_grad():
        embeddings = model(batch, returns="embeddings")
        keys = ["contrastive"] if task == "retrieval" else [*model.modalities, "fused"]
        total = sum(embeddings[key].float().sum() for key in keys)
        parameters = [p for p in model.parameters()]
        grads = torch.autograd.grad(total, parameters, allow_unused=True)
    used = {id(p) for p, g in zip(parameters, grads) if g is not None}
    if task == "retrieval" and model.harmonization_matrix is not None:
        used.add(id(model.harmonization_matrix))  # the loss uses it, the embedding does not
    if task == "retrieval" and isinstance(model.logit_scale, nn.Parameter):
        used.add(id(model.logit_scale))
    if task == "retrieval" and model.logit_bias is not None:
        used.add(id(model.logit_bias))
    return used


class FinetuneModule(L.LightningModule):
    def __init__(
        self,
        export: str,
        task: Literal["classification", "retrieval"] = "classification",
        head: HeadConfig | None = None,
        freeze: Literal["encoders", "none"] = "encoders",
        layer_decay: float | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup: float = 0.1,
        num_classes: int | None = None,
    ):
        """
        Args:
            export: the export folder to start from (`scale export --out`); it also fixes the
                input shapes the data module decodes.
            task: `classification` (a head, cross-entropy, accuracy and macro-F1) or `retrieval`
                (the contrastive loss, coarse / fine mAP@10).
            head: the classification head (classification only).
            freeze: `encoders`: the export's encoders and fusion stay as exported (a linear probe:
                only the head, or for retrieval the contrastive projections, trains); `none`: full
                finetune of everything the task's output depends on.
            layer_decay: layer-wise lr decay: a parameter `d` levels below the output trains at
                lr * layer_decay**d (`parameter_depths`); None: every parameter at lr.
            lr: peak learning rate (of the head, and of everything without layer_decay).
            weight_decay: AdamW's decoupled weight decay, on matrices only (as in pretraining).
            warmup: share of the run spent in linear warmup, then linear decay to 0.
            num_classes: classes of the head; None: the training shards' label vocabulary
                (`labels.json` beside them) decides, and shards without one are refused.
        """
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"model.task {task!r}: expected one of {', '.join(TASKS)}")
        if freeze not in ("encoders", "none"):
            raise ValueError(f"model.freeze {freeze!r}: expected encoders or none")
        if isinstance(head, dict):
            head = _from_dict(HeadConfig, head)
        check_value("model.layer_decay", layer_decay, DECAY, optional=True)
        check_value("model.lr", lr, POSITIVE)
        check_value("model.weight_decay", weight_decay, AT_LEAST_0)
        check_value("model.warmup", warmup, SHARE)
        check_value("model.num_classes", num_classes, Bound(2), optional=True)
        if not (Path(export) / "config.json").is_file():
            raise FileNotFoundError(f"model.export {export}: not an export folder (no config.json); "
                                    "give the folder `scale export --out` wrote")  # fmt: skip
        self.task, self.freeze, self.layer_decay = task, freeze, layer_decay
        self.lr, self.weight_decay, self.warmup = lr, weight_decay, warmup
        self.head_config = head or HeadConfig()
        self.save_hyperparameters({"export": str(export), "task": task, "head": asdict(self.head_config), "freeze": freeze,
                                   "layer_decay": layer_decay, "lr": lr, "weight_decay": weight_decay, "warmup": warmup,
                                   "num_classes": num_classes})  # fmt: skip
        self.model = load_pretrained(export).train()
        if task == "retrieval" and not (self.model.config.contrastive.enabled and len(self.model.modalities) > 1):
            raise ValueError(f"model.task retrieval: the export {export} has no contrastive loss to finetune "
                             "(contrastive.enabled false, or a single modality)")  # fmt: skip
        used = used_parameters(self.model, task)
        for parameter in self.model.parameters():
            parameter.requires_grad_(id(parameter) in used)
        if freeze == "encoders":
            for parameter in [*self.model.encoders.parameters(), *self.model.fusion.parameters()]:
                parameter.requires_grad_(False)
        self.labels: list[str] | None = None
        self.head: nn.Module | None = None
        if task == "classification" and num_classes is not None:
            self._build_head(num_classes)
        self.val_metrics: dict[str, float] = {}
        self.with_probe = False
        """Also fit a linear probe on the validation features (`run_finetune` asks for it before
        and after training, not at every in-loop validation)."""

    @property
    def model_config(self) -> ModelConfig:
        """The export's model config (absolute tokenizer and asset paths): the data module's inputs."""
        return self.model.config

    def _build_head(self, classes: int) -> None:
        modalities, width = len(self.model.modalities), self.model.config.fusion.width
        in_features = modalities * width if self.head_config.features == "concat" else width
        self.head = ClassifierHead(in_features, classes, self.head_config)
        self.hparams["num_classes"] = classes  # a reload (`load_from_checkpoint`) builds the same head

    def setup(self, stage: str) -> None:
        if self.task != "classification":
            return
        shards = getattr(self.trainer.datamodule, "train_shards", None)
        if shards is None:
            raise ValueError("data.train_shards is not set: finetune classification takes its classes "
                             "from the training shards")  # fmt: skip
        self.labels = read_labels(str(shards))
        wanted = self.hparams["num_classes"]
        if self.labels is None and wanted is None:
            raise ValueError(f"data.train_shards {shards}: no labels.json beside the shards (converted by an older "
                             "`scale shards`?): convert them again, or set --model.num_classes (class ids are then "
                             "the records' integer categories)")  # fmt: skip
        if self.labels is not None and wanted is not None and wanted < len(self.labels):
            raise ValueError(f"model.num_classes={wanted}: data.train_shards {shards} has {len(self.labels)} labels "
                             "(labels.json); leave it unset to take the vocabulary's size")  # fmt: skip
        if self.head is None:
            self._build_head(wanted or len(self.labels))

    def train(self, mode: bool = True) -> "FinetuneModule":
        super().train(mode)
        if self.freeze == "encoders":  # frozen features are the export's: no dropout in them
            self.model.encoders.eval()
            self.model.fusion.eval()
        return self

    # ---- the task -----------------------------------------------------------------------------------
    def features(self, embeddings: dict[str, Tensor]) -> Tensor:
        """The head's input from `SCALE.forward(returns="embeddings")` (with gradients)."""
        if self.head_config.features == "fused":
            return embeddings["fused"]
        return torch.cat([embeddings[m] for m in self.model.modalities], dim=1)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        """Class logits (classification) or the contrastive embedding (retrieval)."""
        embeddings = self.model(batch, returns="embeddings")
        return embeddings["contrastive"] if self.task == "retrieval" else self.head(self.features(embeddings))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        size = len(batch["key"])
        if self.task == "retrieval":
            losses = self.model(batch, returns="losses")
            loss = losses["loss"]
            self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=size)
        else:
            category = self._checked(batch["category"])
            loss = classification_loss(self(batch), category)
            self.log("train/labelled", (category >= 0).float().mean(), batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def _checked(self, category: Tensor) -> Tensor:
        classes = self.hparams["num_classes"]
        if bool((category >= classes).any()):
            raise ValueError(f"data: class id {int(category.max())} >= model.num_classes={classes} "
                             "(the shards' labels.json and the head disagree)")  # fmt: skip
        return category

    # ---- validation: metrics over the whole held-out set --------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._parts: list[dict[str, Any]] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        embeddings = self.model(batch, returns="embeddings")
        part: dict[str, Any] = {"category": batch["category"].cpu(), "instance": list(batch["instance"])}
        if self.task == "retrieval":
            part["embedding"] = embeddings["contrastive"].float().cpu()
        else:
            features = self.features(embeddings)
            part["predicted"] = self.head(features).argmax(dim=1).cpu()
            if self.with_probe:
                part["features"] = features.float().cpu()
        self._parts.append(part)

    def on_validation_epoch_end(self) -> None:
        parts, self._parts = self._parts, []
        if self.trainer.world_size > 1:
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, parts)
            parts = [part for rank_parts in gathered for part in rank_parts]
        if not parts:
            return
        category = torch.cat([p["category"] for p in parts])
        instances = [i for p in parts for i in p["instance"]]
        if self.task == "retrieval":
            metrics = validation_retrieval(torch.cat([p["embedding"] for p in parts]), category, instances)
            metrics = {name.removeprefix("val/"): value for name, value in metrics.items()}
        else:
            metrics = classification_metrics(torch.cat([p["predicted"] for p in parts]), category)
            if self.with_probe:
                metrics["linear_probe_accuracy"] = probe(torch.cat([p["features"] for p in parts]), category, instances)
        self.val_metrics = metrics
        for name, value in metrics.items():
            if value is not None:  # every rank computed it from the same gathered set (see SCALEModule)
                self.log(f"val/{name}", float(value), sync_dist=True, reduce_fx="max")

    # ---- optimisation -------------------------------------------------------------------------------
    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        steps = SCALEModule._schedule_steps(self)  # the same count as pretraining's (its doc says why)
        if steps <= 0:
            raise ValueError("trainer.max_steps must be set (> 0), or trainer.max_epochs with data.mode=exact")
        optimizer = torch.optim.AdamW(parameter_groups(self))
        schedule = get_linear_schedule_with_warmup(optimizer, int(self.warmup * steps), steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def parameter_groups(module: FinetuneModule) -> list[dict]:
    """AdamW groups of the trainable parameters: (depth, decayed) pairs, lr * layer_decay**depth
    (`parameter_depths`; every depth at lr without layer_decay), weight decay on the matrices of
    Linear and Conv layers only, as in pretraining (`scale/optim.py`)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    head = [] if module.head is None else list(module.head.parameters())
    if module.task == "retrieval":
        head += [p for p in module.model.projections.parameters()]
    if module.layer_decay is None:
        depths = {id(p): 0 for p in trainable}
    else:
        depths = parameter_depths(module.model, head, through_fusion=module.task == "classification")
    decayed = {id(m.weight) for m in module.modules() if isinstance(m, DECAYED_TYPES) and m.weight is not None}
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for parameter in trainable:
        groups.setdefault((depths[id(parameter)], id(parameter) in decayed), []).append(parameter)
    if not groups:
        raise ValueError("model.freeze: nothing left to train")
    decay = module.layer_decay or 1.0
    return [
        {"params": params, "lr": module.lr * decay**depth, "weight_decay": module.weight_decay if is_decayed else 0.0,
         "name": f"depth{depth}/{'decay' if is_decayed else 'no_decay'}"}
        for (depth, is_decayed), params in sorted(groups.items())
    ]  # fmt: skip


def classification_metrics(predicted: Tensor, category: Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 over the labelled samples (category -1 left out)."""
    labelled = category >= 0
    predicted, category = predicted[labelled], category[labelled]
    if len(category) == 0:
        return {"samples": 0}
    accuracy = float((predicted == category).float().mean())
    return {"accuracy": accuracy, "macro_f1": macro_f1(predicted, category), "samples": int(len(category))}


def probe(features: Tensor, category: Tensor, instances: list) -> float | None:
    """A linear probe's accuracy on the held-out features (split in halves by product instance):
    what the features alone tell, untouched by the head. None when the labelled held-out set has
    too few classes or products to split."""
    labelled = category >= 0
    groups = [str(i) for i, keep in zip(instances, labelled.tolist()) if keep]
    try:
        return linear_probe_accuracy(features[labelled], category[labelled], groups=groups)["accuracy"]
    except ValueError:
        return None


# ---- the command ------------------------------------------------------------------------------------
def run_finetune(cli: Any) -> dict[str, dict[str, float]]:
    """Validate the starting point, fit, validate again; print and write the before/after metrics
    (`<default_root_dir>/finetune_metrics.json`) and save the finetuned model (`<root>/finetuned`)."""
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    if getattr(data, "val_shards", None) is None:
        raise ValueError("data.val_shards is not set: finetune reports held-out metrics before and after training; "
                         "give the held-out shard folder")  # fmt: skip
    before = _validate(trainer, module, data)
    trainer.fit(module, datamodule=data)
    after = _validate(trainer, module, data)
    results = {"task": module.task, "before": before, "after": after}
    if trainer.is_global_zero:
        root = Path(trainer.default_root_dir)
        results["finetuned"] = str(save_finetuned(module, root / "finetuned"))
        write_file(root / "finetune_metrics.json", json.dumps(results, indent=1).encode(), overwrite=True,
                   option="finetune metrics")  # fmt: skip
        print(format_before_after(before, after))
        print(f"wrote {root / 'finetune_metrics.json'} and {results['finetuned']}")
    return results


def _validate(trainer: L.Trainer, module: FinetuneModule, data: L.LightningDataModule) -> dict[str, float]:
    module.with_probe = module.task == "classification"
    try:
        trainer.validate(module, datamodule=data, verbose=False)
    finally:
        module.with_probe = False
    return dict(module.val_metrics)


def format_before_after(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The before/after table (`-`: a metric that could not be computed)."""
    def cell(value: Any) -> str:
        return f"{value:>10.3f}" if isinstance(value, float) else f"{'-' if value is None else value:>10}"

    lines = [f"{'metric':<24}{'before':>10}{'after':>10}"]
    for name in dict.fromkeys([*before, *after]):
        lines.append(f"{name:<24}{cell(before.get(name))}{cell(after.get(name))}")
    return "\n".join(lines)


def save_finetuned(module: FinetuneModule, out: str | Path) -> Path:
    """The finetuned model as a folder: an export of the finetuned SCALE (`scale.load_pretrained`
    reads it as any export) plus `head.safetensors` and `finetune.json` (task, head, labels).
    Replaces an earlier one in the same run folder, as the run's checkpoints are, whole or not at
    all: the export, the head and the metadata are written into one staging folder first, so a
    full disk midway leaves the earlier folder as it was (`scale/outputs.py`)."""
    meta = {"format": FINETUNED_FORMAT, "task": module.task, "head": asdict(module.head_config),
            "num_classes": module.hparams["num_classes"], "labels": module.labels}  # fmt: skip
    with output_folder(out, overwrite=True, option="finetune") as staging:
        export_model(module.model, staging, overwrite=True)
        if module.head is not None:
            safetensors.torch.save_model(module.head, str(staging / HEAD_FILE))
        (staging / FINETUNE_FILE).write_text(json.dumps(meta, indent=1))
    return Path(out)


def load_finetuned(directory: str | Path) -> FinetuneModule:
    """A `save_finetuned` folder rebuilt in eval mode (no Lightning run, no original export needed)."""
    directory = Path(directory)
    meta_path = directory / FINETUNE_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"load_finetuned: {meta_path} not found (not a `scale finetune` output)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FINETUNED_FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FINETUNED_FORMAT!r}")
    module = FinetuneModule(str(directory), task=meta["task"], head=meta["head"], num_classes=meta["num_classes"])
    if module.head is not None:
        safetensors.torch.load_model(module.head, str(directory / HEAD_FILE), strict=True)
    module.labels = meta.get("labels")
    return module.eval()


__all__ = ["FinetuneModule", "HeadConfig", "load_finetuned", "parameter_depths", "parameter_groups", "run_finetune",
           "save_finetuned"]
