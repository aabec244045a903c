"""Typed configuration for SCALE.

Fusion, harmonization, contrastive and optimiser settings here; each modality's section is its own
dataclass, declared in its file (`scale/modalities/<name>.py`), and `ModelConfig` gathers one
section per registered modality. Every field has a docstring; `configs/*.yaml` are validated
against these classes by LightningCLI (and by `tests/test_configs.py`), so an unknown or mistyped
key is an error, not a silent default.

The modality sections also hold the *input specification* of their modality (image size, number
of video frames, audio length, token budgets). The data pipeline reads the same object, so the
shapes the loader produces and the shapes the encoders expect cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any, Literal

from scale.bounds import AT_LEAST_0, AT_LEAST_1, BELOW_1, POSITIVE, SHARE, check_bounds
from scale.modalities import REGISTRY
from scale.pretrained_paths import BUNDLED_MINILM

MODALITIES: tuple[str, ...] = tuple(REGISTRY)
"""The registered modalities (M5Product's five, then plugins), in the order their token segments
are concatenated for fusion."""


@dataclass
class FusionConfig:
    """The joint transformer over the concatenated modality sequences."""

    width: int = 768
    """Common width every modality is projected to (official: 768)."""
    layers: int = 6
    """Fusion depth (official: 6)."""
    heads: int = 8
    """Fusion attention heads (official: 8)."""
    mlp: int = 3072
    """Fusion feed-forward width (official: 3072)."""
    dropout: float = 0.1
    """Dropout in the fusion blocks."""

    BOUNDS = {"width": AT_LEAST_1, "layers": AT_LEAST_1, "heads": AT_LEAST_1, "mlp": AT_LEAST_1, "dropout": BELOW_1}
    DIVISIBLE = (("width", "heads"),)


@dataclass
class HarmonizationConfig:
    """Self-harmonization: per-sample modality and modality-pair weights (the SCALE paper and code)."""

    mode: Literal["per_sample", "learned", "uniform"] = "per_sample"
    """`per_sample`: the official parameter-free weights (cosine -> row softmax * -> row L2 norm),
    recomputed every step from the pooled vectors, absent modalities excluded. `learned`: the
    paper's 5 x 5 matrix, a parameter shared by all samples (see `scale/harmonization.py`).
    `uniform`: every weight 1 (ablation)."""
    pair_weighting: Literal["logit_scale", "loss_weight"] = "logit_scale"
    """How a pair weight G[i, j] enters the contrastive loss: `logit_scale` multiplies the sample's
    logits (a per-sample temperature tau / G[i, j], the official code) or `loss_weight` multiplies
    the sample's InfoNCE term (the paper's sum of S_ij * L_ij)."""
    detach: bool = True
    """Stop gradients through the weights. The official code does not (set false to reproduce it):
    the loss can then also be lowered by moving the weights, i.e. by making a product's modalities
    less similar; on the demo data that cut coarse mAP@10 from 0.50 to 0.21."""
    rescale: bool = True
    """Divide the weights by their mean over the present entries of the global batch (detached), so
    they redistribute emphasis without changing the loss scale. The raw off-diagonal weights are
    about 0.2-0.3, which with `logit_scale` multiplies the temperature by 3-5 (official: false)."""


@dataclass
class ContrastiveConfig:
    """Inter-modality contrastive learning over every present modality pair."""

    enabled: bool = True
    """Compute the contrastive loss."""
    projection_dim: int = 1024
    """Output width of the projection head (official: 768 -> 1024 -> ReLU)."""
    temperature: float = 0.07
    """InfoNCE temperature (official: 0.07); the initial value when `learn_temperature` is set."""
    learn_temperature: bool = False
    """Learn the temperature (as CLIP's log logit scale, clamped to a scale of at most 100)."""
    objective: Literal["infonce", "siglip"] = "infonce"
    """`infonce`: a softmax over the global batch's keys per query (the paper). `siglip`: a sigmoid
    per query-key pair with a learned offset (SigLIP, Zhai et al. 2023): no normalisation over the
    batch, so its quality depends less on the batch size. Both exact under data parallelism and
    weighted by harmonization the same way (`scale/pair_loss.py`)."""
    siglip_bias: float = -10.0
    """Initial value of SigLIP's learned logit offset (SigLIP's -10 with a temperature of 0.1: it
    starts from 'every pair is a negative', the right prior for a batch of mostly negatives)."""
    chunk_size: int = 4096
    """Query rows per block of the contrastive logits: memory per pair O(chunk_size x global batch)
    instead of O(local batch x global batch). Exact: loss and gradients do not depend on it."""

    BOUNDS = {"projection_dim": AT_LEAST_1, "temperature": POSITIVE, "chunk_size": AT_LEAST_1}


@dataclass
class _ModelSettings:
    """What every SCALE model has besides its modalities' sections."""

    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    """Modalities the model is built with (a subset of the registered ones: text, table, image,
    video, audio, and any plugin's)."""
    tokenizer: str = BUNDLED_MINILM
    """Directory with a Hugging Face `tokenizer.json` (or `minilm`), shared by text and table."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """Joint transformer."""
    harmonization: HarmonizationConfig = field(default_factory=HarmonizationConfig)
    """Modality weights."""
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    """Inter-modality contrastive loss."""
    pack_tokens: bool = True
    """Pay only for present tokens: each encoder runs on the samples that have its modality, and
    the fusion runs in length buckets without absent segments and padding (`scale/packing.py`).
    The same outputs and gradients as the padded computation (false), faster on batches with
    missing modalities or short titles; outputs at absent and padding positions are zeros."""
    micro_batches: int = 1
    """Run the encoders and fusion over the batch in this many pieces, one after the other, each
    under activation checkpointing, so memory holds one piece's activations; the contrastive loss
    is still over the whole global batch, exactly (a feature cache, as open_clip's `--accum-freq`:
    a large contrastive batch from small forward passes). Costs one more forward pass. The masked
    losses are averaged over the pieces (as data parallelism averages them over ranks)."""

    BOUNDS = {"micro_batches": AT_LEAST_1}

    def __post_init__(self) -> None:
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities:
            raise ValueError(f"model.config.modalities: unknown {unknown or 'empty list'}; choose from {list(MODALITIES)}")
        # Keep the canonical order: it fixes the fusion segment layout.
        self.modalities = [m for m in MODALITIES if m in self.modalities]
        for name in self.modalities:
            REGISTRY[name].stem_class(getattr(self, name))  # a stem that does not exist: one line
        check_bounds(self, "model.config")  # every section's numbers (scale/bounds.py)

    def modality(self, name: str) -> Any:
        """The config of one modality by key."""
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        unregistered = [name for name in data.get("modalities", []) if name not in MODALITIES]
        if unregistered:
            raise ValueError(f"the model uses modalities {unregistered}, which are not registered here "
                             f"(a plugin modality is loaded with SCALE_PLUGINS=<module>)")  # fmt: skip
        return _from_dict(cls, data)


ModelConfig = make_dataclass(
    "ModelConfig",
    [(name, spec.config, field(default_factory=spec.config)) for name, spec in REGISTRY.items()],
    bases=(_ModelSettings,),
    namespace={"__doc__": "The whole SCALE model: one section per registered modality (its encoder and "
                          "inputs, `scale/modalities/<name>.py`), fusion, harmonization and losses.",
               "__module__": __name__},
)  # fmt: skip
"""The model config: `_ModelSettings` plus one section per registered modality, named by its key
(`text`, `table`, `image`, `video`, `audio`, and any plugin's), of that modality's config class."""


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup then decay; parameter groups built from the modules."""

    lr: float = 1e-4
    """Peak learning rate (official: 1e-4)."""
    pretrained_lr: float = 1e-5
    """Peak learning rate of weights loaded from a pretrained checkpoint (official: 1e-5 for BERT)."""
    weight_decay: float = 0.01
    """Decoupled weight decay, applied to matrices only (never to biases, norms or embeddings' LayerNorm)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    warmup_ratio: float = 0.1
    """Share of `max_steps` spent in linear warmup (official: 10 %)."""
    schedule: Literal["linear", "cosine"] = "linear"
    """Decay after warmup (official: linear)."""
    fused: bool | None = None
    """AdamW's fused kernel (one kernel over all parameters). None: on when every parameter is on
    a CUDA device, off on CPU (where PyTorch's default multi-tensor loop is used)."""

    BOUNDS = {"lr": POSITIVE, "pretrained_lr": AT_LEAST_0, "weight_decay": AT_LEAST_0, "betas": BELOW_1,
              "warmup_ratio": SHARE}  # fmt: skip

    def __post_init__(self) -> None:
        check_bounds(self, "model.optimizer")


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from `asdict` output, rejecting unknown keys."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}")
    kwargs, defaults = {}, cls()  # built once: building checks every section's bounds
    for name, value in data.items():
        default = getattr(defaults, name)
        if is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
