"""SCALE = per-modality encoders + fusion transformer + contrastive and masked-modeling heads.

One batch, top to bottom (see `datamodules/collate.py` for its layout):

    batch[m] (tensors + `present` mask)  -- Modality.prepare: the device half of decoding
                                          -- sanitize: absent inputs -> zeros
      -> Modality.mask (training only)    -- corrupted inputs + masked positions/targets
      -> Modality.encode                  -- (B, L_m, width) tokens, token 0 pooled
      -> Fusion                           -- one transformer over all present segments
      -> losses():
           contrastive on pre-fusion pooled tokens -> projection -> L2 norm, every modality pair,
               logits scaled per sample by the pair harmonization weights (pre-fusion);
           masked modeling per modality from its fused tokens, each sample's loss scaled by the
               modality's harmonization weight (post-fusion);
           total = sum of masked losses + contrastive (harmonization is the only weighting).

Plain PyTorch: the LightningModule (`scale/module.py`) and `scale.load_pretrained` both use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.models.bert.modeling_bert import BertLayer

from scale.config import ModelConfig
from scale.fusion import Fusion
from scale.harmonization import harmonization_weights, pair_mask, rescale_to_unit_mean
from scale.losses import contrastive_loss, global_sum
from scale.modalities import batch_to_device, build_modalities
from scale.modalities.base import Encoded, Masked

TRANSFORMER_BLOCKS: tuple[type[nn.Module], ...] = (Block, BertLayer)
"""The repeated layers of every trunk (timm blocks: image, video, audio, fusion; BERT layers: text
and table): the units FSDP shards and activation checkpointing recomputes (`scale/strategies.py`)."""

Batch = dict[str, dict[str, Tensor]]


@dataclass
class SCALEOutput:
    present: dict[str, Tensor]
    """modality -> (B,) bool."""
    pooled: dict[str, Tensor]
    """modality -> (B, width) pre-fusion pooled token (token 0 of the encoder output)."""
    fused: dict[str, Tensor]
    """modality -> (B, L_m, width) fused tokens of that modality's segment."""
    masked: dict[str, Masked]
    """modality -> masked-modeling inputs/targets (training only; empty otherwise)."""


class SCALE(nn.Module):
    def __init__(self, config: ModelConfig, load_weights: bool = True):
        super().__init__()
        self.config = config
        self.encoders = build_modalities(config, load_weights=load_weights)
        lengths = {name: enc.num_tokens for name, enc in self.encoders.items()}
        self.fusion = Fusion(config.fusion, lengths, packed=config.pack_tokens)
        # Official projection: width -> projection_dim -> ReLU, then L2 normalisation.
        self.projections = nn.ModuleDict(
            {
                name: nn.Sequential(nn.Linear(config.fusion.width, config.contrastive.projection_dim), nn.ReLU())
                for name in self.encoders
            }
        )
        if config.harmonization.mode == "learned":
            # The paper's M x M modality-pair matrix, initialised at 0 (= uniform weights).
            self.harmonization_matrix = nn.Parameter(torch.zeros(len(self.encoders), len(self.encoders)))
        else:
            self.harmonization_matrix = None
        # log(1 / temperature), learned CLIP-style when asked; a buffer otherwise.
        logit_scale = torch.tensor(math.log(1.0 / config.contrastive.temperature))
        if config.contrastive.learn_temperature:
            self.logit_scale = nn.Parameter(logit_scale)
        else:
            self.register_buffer("logit_scale", logit_scale)
        # SigLIP's learned logit offset (its objective only: InfoNCE is shift-invariant).
        if config.contrastive.objective == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(config.contrastive.siglip_bias))
        else:
            self.logit_bias = None

    def use_one_bucket(self, flag: bool = True) -> None:
        """Run every packed transformer in one length bucket per call (absent segments and padding
        beyond the batch's longest sample are still dropped): strategies that shard the parameters
        gather a module's weights on every call, so every rank must call each module equally often."""
        for module in self.modules():
            if hasattr(module, "one_bucket"):
                module.one_bucket = flag

    @property
    def temperature(self) -> Tensor:
        return 1.0 / self.logit_scale.clamp(max=math.log(100.0)).exp()

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def forward(self, batch: Batch, masked_modeling: bool = False, returns: str = "outputs", details: bool = True) -> Any:
        """The encoders and fusion over a batch; `returns` "outputs" (SCALEOutput), "losses"
        (`losses(outputs, details)`) or "embeddings" (`embed`). The training and evaluation steps
        ask for losses or embeddings through this one call: a sharded model (FSDP) gathers its root
        parameters (heads, projections) only for the duration of `forward`."""
        batch = self.prepare(batch)  # once, before micro-batches (a checkpointed piece would redo it)
        if returns == "losses" and self.config.micro_batches > 1:
            return self._micro_batched_losses(batch, masked_modeling, details)
        output = self._encode_and_fuse(batch, masked_modeling)
        if returns == "losses":
            return self.losses(output, details)
        if returns == "embeddings":
            return self._embeddings(output)
        if returns != "outputs":
            raise ValueError(f"SCALE.forward returns={returns!r}: expected outputs, losses or embeddings")
        return output

    def prepare(self, batch: Batch) -> Batch:
        """Every modality's `prepare` (the device half of decoding) run on the batch: floats from
        bytes, JPEG bitstreams decoded, `present` narrowed where those fail. Idempotent."""
        return {**batch, **{name: modality.prepare(batch[name]) for name, modality in self.encoders.items()}}

    def batch_to_device(self, batch: Batch, device: torch.device | str) -> Batch:
        """The batch on `device`, but for the inputs a stem's `prepare` reads in host memory
        (`scale.modalities.batch_to_device`)."""
        return batch_to_device(batch, device, self.config)

    def _encode_and_fuse(self, batch: Batch, masked_modeling: bool) -> SCALEOutput:
        """Over a prepared batch (`prepare`)."""
        present = {name: batch[name]["present"].bool() for name in self.encoders}
        encoded, masked = {}, {}
        for name, modality in self.encoders.items():
            inputs = modality.sanitize(batch[name], present[name])
            corrupted = modality.mask(inputs, present[name]) if masked_modeling else None
            if corrupted is not None:
                masked[name] = corrupted
                inputs = corrupted.inputs
            encoded[name] = self._encode(modality, inputs, present[name])
        fused = self.fusion(encoded, present)
        pooled = {name: enc.tokens[:, 0] for name, enc in encoded.items()}
        return SCALEOutput(present=present, pooled=pooled, fused=fused, masked=masked)

    def _encode(self, modality: nn.Module, inputs: dict[str, Tensor], present: Tensor) -> Encoded:
        """The modality's tokens; with `pack_tokens`, computed for the samples that have it only
        (zeros elsewhere; the fusion masks those samples' segments out anyway)."""
        if not self.config.pack_tokens or bool(present.all()):
            return modality.encode(inputs)
        rows = present.nonzero().flatten()
        if rows.numel() == 0:  # still one row through the encoder: every parameter gets a gradient (DDP)
            rows = rows.new_zeros(1)
        encoded = modality.encode({key: value[rows] for key, value in inputs.items()})
        tokens = encoded.tokens.new_zeros((present.shape[0], *encoded.tokens.shape[1:]))
        token_mask = encoded.token_mask.new_zeros((present.shape[0], *encoded.token_mask.shape[1:]))
        return Encoded(tokens=tokens.index_copy(0, rows, encoded.tokens),
                       token_mask=token_mask.index_copy(0, rows, encoded.token_mask))

    def harmonize(self, pooled: Tensor, present: Tensor, pairs: bool) -> Tensor:
        """Harmonization weights of (B, M, D) pooled vectors as the config asks: the (B, M, M) pair
        weights (`pairs`) or the (B, M) per-modality task weights (the diagonal)."""
        config = self.config.harmonization
        weights = harmonization_weights(pooled, present, config.mode, self.harmonization_matrix)
        if not pairs:
            weights = weights.diagonal(dim1=1, dim2=2)
        if config.detach and config.mode != "learned":  # a learned matrix must receive its gradient
            weights = weights.detach()
        if config.rescale:
            weights = rescale_to_unit_mean(weights, pair_mask(present, diagonal=False) if pairs else present)
        return weights

    def losses(self, output: SCALEOutput, details: bool = True) -> dict[str, Tensor]:
        """The training objective (`loss`) and its parts, every entry loggable. `details`: also each
        contrastive pair's loss and count of queries (pairs with a query anywhere) and the mean
        harmonization weights; without them nothing is read on the host for logging (on a GPU a
        training step between logging steps then skips those syncs)."""
        logs = self._contrastive_losses(self._contrastive_features(output.pooled), output.present, details)
        return self._with_total(logs, self._masked_losses(output, details), output.present)

    def _with_total(self, logs: dict[str, Tensor], masked: dict[str, Tensor], present: dict[str, Tensor]) -> dict[str, Tensor]:
        """The contrastive part's `logs` with the `masked` entries added and `loss`: the
        contrastive loss plus every masked term (`is_loss_term`)."""
        total = logs.get("contrastive", torch.zeros((), device=present[self.modalities[0]].device))
        for name, value in masked.items():
            if is_loss_term(name):
                total = total + value
        logs.update(masked)
        logs["loss"] = total
        return logs

    def _contrastive_features(self, pooled: dict[str, Tensor]) -> dict[str, Tensor]:
        """modality -> (B, P) L2-normalised contrastive projection of its pre-fusion pooled vector."""
        if not self.config.contrastive.enabled or len(self.modalities) < 2:
            return {}
        return {m: F.normalize(self.projections[m](pooled[m]).float(), dim=-1) for m in self.modalities}

    def _contrastive_losses(self, features: dict[str, Tensor], present: dict[str, Tensor],
                            details: bool = True) -> dict[str, Tensor]:  # fmt: skip
        """The contrastive loss over the whole (global) batch's `features`, with its logs; {} when off."""
        if not features:
            return {}
        names = self.modalities
        present_matrix = torch.stack([present[m] for m in names], dim=1)
        pair_weights = self.harmonize(torch.stack([features[m] for m in names], dim=1), present_matrix, pairs=True)
        contrastive, per_pair, queries = contrastive_loss(
            features, present, pair_weights, self.temperature, self.config.harmonization.pair_weighting,
            self.config.contrastive.objective, self.logit_bias, self.config.contrastive.chunk_size,
        )  # fmt: skip
        logs = pair_weight_logs(pair_weights, present_matrix, names) if details else {}
        logs["contrastive"] = contrastive
        logs["temperature"] = self.temperature.detach()
        if details:  # the counts are global: every rank logs the same pairs (validation syncs them)
            for pair, value in per_pair.items():
                if queries[pair] > 0:
                    logs[f"contrastive/{pair}"] = value
        return logs

    def _masked_losses(self, output: SCALEOutput, details: bool = True) -> dict[str, Tensor]:
        """Each modality's masked-modeling loss and extra losses (`is_loss_term`), weighted per
        sample by its post-fusion harmonization weight, and the mean weights (logs only)."""
        if not output.masked:
            return {}
        names = self.modalities
        present = torch.stack([output.present[m] for m in names], dim=1)
        post_pooled = torch.stack([output.fused[m][:, 0] for m in names], dim=1)
        task_weights = self.harmonize(post_pooled, present, pairs=False)
        logs: dict[str, Tensor] = {}
        for index, name in enumerate(names):
            if name in output.masked:
                modality, masked, weight = self.encoders[name], output.masked[name], task_weights[:, index]
                if modality.config.masked_modeling:  # masking may exist for an extra loss only
                    logs[f"masked/{name}"] = modality.masked_loss(output.fused[name], masked, weight)
                for extra, value in modality.extra_losses(output.fused[name], masked, weight).items():
                    logs[f"{name}/{extra}"] = value
        if details:
            logs.update(masked_mean_logs(task_weights, present, [f"harmonization/{name}" for name in names]))
        return logs

    def _micro_batched_losses(self, batch: Batch, masked_modeling: bool, details: bool = True) -> dict[str, Tensor]:
        """`losses` with the encoders and fusion run over `micro_batches` pieces of the batch, one
        at a time, under activation checkpointing: each piece keeps only its contrastive features
        and masked-loss values for the backward pass, which recomputes the piece's activations
        (with the same masks and dropout: the checkpoint restores the random state). So memory
        holds one piece's activations, while the contrastive loss is still the whole (global)
        batch's, exactly: the large contrastive batch of open_clip's `--accum-freq` from small
        forward passes, in one optimizer step. The masked losses are averaged over the pieces, as
        data parallelism averages them over ranks."""
        size = batch[self.modalities[0]]["present"].shape[0]
        count = min(self.config.micro_batches, size)
        splits = {m: {key: value.tensor_split(count) for key, value in batch[m].items()} for m in self.modalities}
        pieces = [{m: {key: parts[k] for key, parts in splits[m].items()} for m in self.modalities} for k in range(count)]
        results = []
        for piece in pieces:
            if torch.is_grad_enabled():
                results.append(checkpoint(self._piece_losses, piece, masked_modeling, details, use_reentrant=False))
            else:
                results.append(self._piece_losses(piece, masked_modeling, details))
        features = {m: torch.cat([features[m] for features, _, _ in results]) for m in results[0][0]}
        present = {m: torch.cat([present[m] for _, present, _ in results]) for m in self.modalities}
        masked = {}
        for name in dict.fromkeys(name for _, _, piece_masked in results for name in piece_masked):
            values = torch.stack([piece_masked[name] for _, _, piece_masked in results if name in piece_masked])
            # Every piece has the same loss terms (the config decides them): their mean over pieces.
            masked[name] = values.sum() / count if is_loss_term(name) else values.mean()
        return self._with_total(self._contrastive_losses(features, present, details), masked, present)

    def _piece_losses(self, piece: Batch, masked_modeling: bool,
                      details: bool) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:  # fmt: skip
        output = self._encode_and_fuse(piece, masked_modeling)
        return self._contrastive_features(output.pooled), output.present, self._masked_losses(output, details)

    @torch.no_grad()
    def embed(self, batch: Batch) -> dict[str, Tensor]:
        """Embeddings for downstream use (no masking); zeros wherever a modality is absent.

        - `<m>`: the post-fusion pooled vector of modality m;
        - `<m>/encoder`: the pre-fusion pooled vector (the modality alone, before fusion);
        - `<m>/projection`: the L2-normalised contrastive projection of `<m>/encoder`;
        - `fused`: the sum of the normalised post-fusion pooled vectors of the present modalities
          (the official retrieval embedding sums the per-modality pooled vectors);
        - `contrastive`: the sum of the present modalities' `<m>/projection`, the space the
          contrastive loss shapes (the default retrieval embedding of `scale evaluate`).
        """
        return self(batch, masked_modeling=False, returns="embeddings")

    def _embeddings(self, output: SCALEOutput) -> dict[str, Tensor]:
        embeddings: dict[str, Tensor] = {}
        fused, contrastive = 0.0, 0.0
        for name in self.modalities:
            keep = output.present[name][:, None]
            post, pre = output.fused[name][:, 0].float(), output.pooled[name].float()
            projection = F.normalize(self.projections[name](pre), dim=-1)
            embeddings[name] = torch.where(keep, post, 0.0)
            embeddings[f"{name}/encoder"] = torch.where(keep, pre, 0.0)
            embeddings[f"{name}/projection"] = torch.where(keep, projection, 0.0)
            fused = fused + torch.where(keep, F.normalize(post, dim=-1), 0.0)
            contrastive = contrastive + embeddings[f"{name}/projection"]
        embeddings["fused"] = fused
        embeddings["contrastive"] = contrastive
        return embeddings


def is_loss_term(name: str) -> bool:
    """Whether a `_masked_losses` entry is part of the objective (not a logged weight)."""
    return not name.startswith("harmonization/")


def masked_mean_logs(values: Tensor, masks: Tensor, names: list[str]) -> dict[str, Tensor]:
    """names[k] -> the mean of values[:, k] over masks[:, k], detached, for logging. A name is kept
    when its mask holds anywhere in the global batch, so every rank logs the same names (validation
    logs with sync_dist: a name one rank lacks would pair up the wrong collectives); a rank without
    any of its samples logs 0 for it."""
    anywhere = global_sum(masks.sum(dim=0).to(torch.float32))
    sums = torch.where(masks, values.detach(), 0.0).sum(dim=0)
    means = sums / masks.sum(dim=0).clamp_min(1)
    return {name: means[k] for k, name in enumerate(names) if anywhere[k] > 0}


def pair_weight_logs(pair_weights: Tensor, present: Tensor, names: list[str]) -> dict[str, Tensor]:
    """Mean weight of each modality pair over the samples that have both (symmetrised), for logging."""
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    values = torch.stack([(pair_weights[:, i, j] + pair_weights[:, j, i]) / 2 for i, j in pairs], dim=1)
    masks = torch.stack([present[:, i] & present[:, j] for i, j in pairs], dim=1)
    return masked_mean_logs(values, masks, [f"harmonization/{names[i]}-{names[j]}" for i, j in pairs])
