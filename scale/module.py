"""The LightningModule: one training step = SCALE forward with masking + its losses."""

from __future__ import annotations

import math

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from scale import rng_state
from scale.config import ModelConfig, OptimizerConfig, _from_dict
from scale.metrics import retrieval_metrics
from scale.model import SCALE

VALIDATION_SEED = 20_240_601
"""The masks of every validation run are drawn from this seed (then training's generators are restored)."""


def validation_retrieval(embeddings: torch.Tensor, categories: torch.Tensor, instances: list[str | None],
                         k: int = 10) -> dict[str, float]:  # fmt: skip
    """The in-loop retrieval metrics over the gathered held-out set, as `scale.metrics` computes them:
    `val/coarse_map@k` (relevant = same category; unlabelled samples, category -1, are left out, or
    they would all count as one category) and `val/fine_map@k` (same product instance). A metric is
    left out when fewer than k + 1 samples carry its label or no query has a positive (fine
    retrieval over products that are all distinct)."""
    labelled = categories >= 0
    with_instance = torch.tensor([i is not None for i in instances], dtype=torch.bool)
    out = {}
    for kind, x, labels in (("coarse", embeddings[labelled], categories[labelled]),
                            ("fine", embeddings[with_instance], [i for i in instances if i is not None])):  # fmt: skip
        if len(labels) > k:
            result = retrieval_metrics(x, labels, ks=(k,))
            if result["queries"] > 0:
                out[f"val/{kind}_map@{k}"] = result[f"map@{k}"]
    return out


def _zero_stage(strategy: Any) -> int | None:
    """DeepSpeed's ZeRO stage of a Lightning DeepSpeedStrategy (None for any other strategy)."""
    config = getattr(strategy, "config", None)
    return config.get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None


class SCALEModule(L.LightningModule):
    def __init__(self, config: ModelConfig | None = None, optimizer: OptimizerConfig | None = None,
                 compile: bool = False, activation_checkpointing: bool = False):
        """
        Args:
            config: the model (encoders, fusion, harmonization, losses).
            optimizer: AdamW, learning rates and schedule.
            compile: `torch.compile` each encoder and the fusion. Packed buckets and batches vary
                in length: torch's automatic dynamic shapes recompile a module once with dynamic
                sizes after its first change of shape (`dynamic=True` from the start hits an
                inductor error on the pinned torch). Worth it on a GPU for long runs; the first
                steps compile. The packing plan's host reads are graph breaks.
            activation_checkpointing: recompute each transformer block's activations in the
                backward pass instead of keeping them (memory for larger batches, about a third
                more compute). The FSDP strategy has its own switch; either one applies it once.
        """
        super().__init__()
        # Checkpoints keep plain dicts (loadable with torch.load(weights_only=True)); accept both.
        if isinstance(config, dict):
            config = ModelConfig.from_dict(config)
        if isinstance(optimizer, dict):
            optimizer = _from_dict(OptimizerConfig, optimizer)
        self.config = config or ModelConfig()
        self.optimizer_config = optimizer or OptimizerConfig()
        self.save_hyperparameters({"config": asdict(self.config), "optimizer": asdict(self.optimizer_config)})
        self.model = SCALE(self.config)
        self.compile_model, self.activation_checkpointing = compile, activation_checkpointing
        self._configured = False

    def configure_model(self) -> None:
        # Strategies that shard the model (FSDP: scale/strategies.py) do it here, before the
        # optimizer is built over the sharded parameters.
        if self._configured:  # fit, then validate or test: the hooks run once per call
            return
        self._configured = True
        trainer = self._trainer  # None when loaded outside a run (load_from_checkpoint)
        strategy = trainer.strategy if trainer is not None else None
        if self.activation_checkpointing and not getattr(strategy, "activation_checkpointing", False):
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

            from scale.model import TRANSFORMER_BLOCKS

            apply_activation_checkpointing(self.model, check_fn=lambda module: isinstance(module, TRANSFORMER_BLOCKS))
        shard = getattr(strategy, "shard_model", None)
        if shard is not None or _zero_stage(strategy) is not None:
            # Sharded parameters (FSDP, ZeRO-3): every rank must call each module equally often.
            # ZeRO-1/2 too, so that every DeepSpeed stage computes the very same numbers.
            self.model.use_one_bucket(True)
        if shard is not None:
            shard(self.model)
        if self.compile_model:
            # An encoder's work is its `encode` method, which the model calls directly:
            # `Module.compile` replaces only `__call__`, so `encode` itself is compiled. (Not a
            # module call on purpose: DeepSpeed ZeRO-3 re-gathers a module's parameters for the
            # backward through hooks on its outputs, which the `Encoded` dataclass would escape.)
            for modality in self.model.encoders.values():
                modality.encode = torch.compile(modality.encode)
            self.model.fusion.compile()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # The ~30 parts only on the steps the logger writes: `self.log` costs about 1 ms a call
        # whether or not the value is written (2 % of a smoke step each), and on a GPU finding
        # which pairs and modalities to log reads counts on the host (a sync each).
        logged = self._logged_this_step()
        losses = self.model(batch, masked_modeling=True, returns="losses", details=logged)
        size = len(batch["key"])
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        if logged:
            self.log_dict({f"train/{k}": v for k, v in losses.items() if k != "loss"}, batch_size=size)
            for modality in self.model.modalities:
                self.log(f"data/present_{modality}", batch[modality]["present"].float().mean(), batch_size=size)
        return losses["loss"]

    def _logged_this_step(self) -> bool:
        # Lightning's own rule for "the logger writes this step" (private, hence the fallback).
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    # ---- validation: the loss per part and in-loop retrieval on held-out shards ---------------------
    def on_validation_epoch_start(self) -> None:
        # Validation draws its masks from a fixed seed and hands the generators back as they were:
        # training is bitwise the same with or without validation, and every validation loss is
        # measured with the same masks.
        self._training_rng = rng_state.collect()
        torch.manual_seed(VALIDATION_SEED)  # CUDA too
        self._validation_embeddings: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        size = len(batch["key"])
        losses = self.model(batch, masked_modeling=True, returns="losses")
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=size, sync_dist=True)
        embedding = self.model.embed(batch)["contrastive"]  # unmasked, as `scale evaluate` sees it
        self._validation_embeddings.append((embedding.float().cpu(), batch["category"].cpu(), list(batch["instance"])))

    def on_validation_epoch_end(self) -> None:
        try:
            parts = self._validation_embeddings
            if self.trainer.world_size > 1:
                # Local sizes differ by up to one at the end of an exact epoch: gather as objects.
                gathered: list[Any] = [None] * self.trainer.world_size
                torch.distributed.all_gather_object(gathered, parts)
                parts = [part for rank_parts in gathered for part in rank_parts]
            if parts:
                embeddings = torch.cat([p[0] for p in parts])
                categories = torch.cat([p[1] for p in parts])
                instances = [i for p in parts for i in p[2]]
                for name, value in validation_retrieval(embeddings, categories, instances).items():
                    # Every rank computed the same value from the same gathered set: "max" keeps it
                    # exact (a mean of equal floats can round) and tells Lightning it is synced.
                    self.log(name, value, sync_dist=True, reduce_fx="max")
        finally:
            self._validation_embeddings = []
            rng_state.restore(self._training_rng)

    def configure_optimizers(self):
        from scale.optim import build_optimizer

        optimizer, scheduler = build_optimizer(self.model, self.optimizer_config, self._schedule_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule_steps(self) -> int:
        """The schedule's length: max_steps, or for exact epochs steps per epoch x max_epochs.

        Counted from the data module rather than with `trainer.estimated_stepping_batches`: that
        builds and starts the training loader before Lightning has restored a resumed run's loops,
        and Lightning keeps that first iterator, so a run resumed in epoch 1 replayed epoch 0."""
        trainer = self.trainer
        if trainer.max_steps > 0:
            return trainer.max_steps
        steps_per_epoch = getattr(trainer.datamodule, "steps_per_epoch", lambda: None)()
        if steps_per_epoch is None or trainer.max_epochs is None or trainer.max_epochs <= 0:
            return -1  # build_optimizer explains what is missing
        if isinstance(trainer.limit_train_batches, int):
            steps_per_epoch = min(steps_per_epoch, trainer.limit_train_batches)
        else:
            steps_per_epoch = int(steps_per_epoch * trainer.limit_train_batches)
        return math.ceil(steps_per_epoch / trainer.accumulate_grad_batches) * trainer.max_epochs

    # ---- random-number state: a resumed run draws the same masks and dropout -----------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_state.collect_all_ranks()  # every rank saves, rank 0 writes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_states_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # Restored here, after everything else of the resume, just before the first step: between a
        # save and the next step an uninterrupted run draws nothing from the global generators
        # (validation forks them, the loader has its own generator).
        states, self._rng_states_to_restore = getattr(self, "_rng_states_to_restore", None), None
        if states is None:
            return
        if len(states) != self.trainer.world_size:
            rank_zero_warn(f"the checkpoint holds the random state of {len(states)} ranks, this run has "
                           f"{self.trainer.world_size}: masks and dropout will differ from an uninterrupted run")  # fmt: skip
            return
        rng_state.restore(states[self.trainer.global_rank])
