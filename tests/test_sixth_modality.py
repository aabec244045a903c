"""A sixth modality, declared entirely in this file, and run through what users run.

The product's price: a scalar, tokenised into a few tokens (sine / cosine features of its log at a
few frequencies), encoded by the shared mean-token trunk, with masked token regression through the
shared head. Nothing else in the repository names it: the CLI loads this module as a plugin
(`SCALE_PLUGINS=tests.test_sixth_modality`), and demo products get a `price` field here. The test
runs demo products -> `scale shards` -> `scale fit` -> `scale export` -> `scale evaluate`, and the
model's every-missing-pattern check with six modalities, so the property "a modality is one file"
cannot silently erode.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from scale.media import MediaError, MediaTooLarge
from scale.modalities.base import Encoded, Masked, Modality, TensorSpec
from scale.modalities.masking import MaskedRegression, after_pooled_token, mask_slots
from scale.modalities.spec import DecodeContext, Missing, ModalitySpec, RawSample, RecordField, TrunkConfig
from scale.modalities.transformer import MeanTokenTrunk

# ---- the modality: config, limits, field, stem, spec --------------------------------------------


@dataclass
class PriceConfig(TrunkConfig):
    """The product's price."""

    hidden: int = 32
    layers: int = 1
    heads: int = 2
    mask_prob: float = 0.25
    tokens: int = 4
    """Price tokens: sin / cos of log10(price) at frequencies 1, 2, 4, ... (one token each)."""


@dataclass
class PriceLimits:
    max_price: float = 1e9
    """Prices above this are refused (a typo of a few zeros, not a product)."""


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MediaError(f"price is a JSON {type(value).__name__}, not a number", "not_number")
    if not math.isfinite(value) or value <= 0:
        raise MediaError(f"price {value!r} is not a positive number", "not_positive")
    return float(value)


def clean_price(value: Any, limits: Any) -> tuple[Any, list]:
    try:
        price = _number(value)
    except MediaError as error:
        return None, [(error.reason, str(error), "dropped")]
    if price > limits.max_price:
        return None, [("too_large", f"price {price:g} is over max_price={limits.max_price:g}", "dropped")]
    return value, []


PRICE = RecordField("price", official="price", clean=clean_price)


class PriceStem(Modality):
    modality = "price"
    stem = "log_fourier"
    reads = (PRICE,)

    def __init__(self, config: PriceConfig, width: int):
        super().__init__()
        self.config = config
        self.embed = nn.Linear(2, config.hidden)
        self.trunk = MeanTokenTrunk(config, config.tokens, width)
        self.head = MaskedRegression(width, 2)

    @classmethod
    def tensors(cls, config: PriceConfig) -> dict[str, TensorSpec]:
        return {"features": TensorSpec((config.tokens, 2), torch.float32)}

    @classmethod
    def decode(cls, sample: RawSample, config: PriceConfig, context: DecodeContext) -> dict[str, Tensor]:
        value = sample.record.get(PRICE.name)
        if value is None or value == "":
            raise Missing(PRICE.name)
        price = _number(value)
        if price > context.limits.max_price:
            raise MediaTooLarge(f"price {price:g} is over max_price={context.limits.max_price:g}")
        angle = math.log10(price) * math.pi / 4 * 2.0 ** torch.arange(config.tokens)
        return {"features": torch.stack([angle.sin(), angle.cos()], dim=-1).float()}

    @property
    def num_tokens(self) -> int:
        return 1 + self.config.tokens

    def encode(self, inputs: dict[str, Tensor]) -> Encoded:
        features = inputs["features"]
        return self.trunk(self.embed(features), torch.ones(features.shape[:2], dtype=torch.bool, device=features.device))

    def mask(self, inputs: dict[str, Tensor], present: Tensor) -> Masked | None:
        if not self.config.masked_modeling:
            return None
        features = inputs["features"]
        eligible = present[:, None].expand(-1, features.shape[1])
        corrupted, chosen = mask_slots(features, eligible, self.config.mask_prob)
        return Masked(inputs={"features": corrupted}, positions=after_pooled_token(chosen), targets=features[chosen])

    def masked_loss(self, fused_tokens: Tensor, masked: Masked, sample_weight: Tensor) -> Tensor:
        return self.head(fused_tokens, masked, sample_weight)


MODALITY = ModalitySpec(name="price", config=PriceConfig, fields=(PRICE,), stems={"log_fourier": PriceStem},
                        limits=PriceLimits)  # fmt: skip


# ---- the tests: what users run, with this module as a plugin ------------------------------------
ROOT = Path(__file__).resolve().parents[1]
PLUGIN = {**os.environ, "SCALE_PLUGINS": "tests.test_sixth_modality"}
USED = "[text,table,image,price]"


def scale(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "scale.cli", *args], cwd=ROOT, env=env or PLUGIN,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    return result


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def priced_demo(out: Path, products: int, seed: int) -> list[dict]:
    """Demo products with a price planted by category (x 2.5 per category), some missing."""
    from datamodules import demo

    demo.generate(out, products, seed=seed, missing={"video": 1.0, "audio": 1.0}, image_size=32)
    rows = [json.loads(line) for line in (out / "meta.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(seed)
    for row in rows:
        if rng.random() < 0.15:
            row["price"] = None
        else:
            row["price"] = round(float(10 * 2.5 ** row["category"] * np.exp(rng.normal(0, 0.1))), 2)
    (out / "meta.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def test_a_plugin_modality_runs_from_products_to_evaluation(tmp_path):
    rows = priced_demo(tmp_path / "raw" / "train", 48, seed=0)
    bad = [{"id": "cheap", "title": "a kettle", "price": "cheap"}, {"id": "negative", "title": "a kettle", "price": -5},
           {"id": "typo", "title": "a kettle", "price": 3e12}]  # fmt: skip
    with open(tmp_path / "raw" / "train" / "meta.jsonl", "a") as meta:
        meta.write("".join(json.dumps(row) + "\n" for row in bad))
    priced_demo(tmp_path / "raw" / "eval", 24, seed=1)
    for split in ("train", "eval"):
        ok(scale("shards", "--src", str(tmp_path / "raw" / split), "--out", str(tmp_path / split), "--processes", "1"))

    # The converter validated the field: good prices kept, bad ones dropped and reported, by reason.
    items = [json.loads(line) for line in (tmp_path / "train" / "skipped.jsonl").read_text().splitlines()]
    assert {(i["id"], i["modality"], i["reason"]) for i in items if i["modality"] == "price"} == {
        ("cheap", "price", "not_number"), ("negative", "price", "not_positive"), ("typo", "price", "too_large")}
    from tests.test_data import read_tar_members

    records = {key: json.loads(sample["json"]) for key, sample in read_tar_members(tmp_path / "train").items()}
    assert all(records[r["id"]].get("price") == r["price"] for r in rows if r["price"] is not None)
    assert all("price" not in records[b["id"]] for b in bad)

    # A few steps of training with two data workers, logging every part of the loss.
    ok(scale("fit", "--config", "configs/test_tiny.yaml", "--data.train_shards", str(tmp_path / "train"),
             "--model.config.modalities", USED, "--data.num_workers", "2", "--trainer.max_steps", "6",
             "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.log_every_n_steps", "1",
             "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "run")))  # fmt: skip
    logged = [row for row in csv.DictReader(open(next((tmp_path / "run").rglob("metrics.csv")))) if row["train/masked/price"]]
    assert len(logged) == 6 and all(math.isfinite(float(r["train/masked/price"])) for r in logged)
    assert all(r["train/contrastive/image-price"] and r["train/harmonization/price"] for r in logged)
    assert 0.7 < np.mean([float(r["data/present_price"]) for r in logged]) < 1.0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["config"]["modalities"] == ["text", "table", "image", "price"]
    assert any(name.startswith("model.encoders.price.") for name in checkpoint["state_dict"])

    ok(scale("export", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "export")))
    ok(scale("evaluate", "--model", str(tmp_path / "export"), "--data", str(tmp_path / "eval"), "--out", str(tmp_path / "m.json")))
    metrics = json.loads((tmp_path / "m.json").read_text())["trained"]
    assert metrics["products"] == 24 and set(metrics["embeddings"]) == {"fused", "contrastive", "text", "table", "image", "price"}
    assert all(0 <= scores["coarse"]["map@10"] <= 1 for scores in metrics["embeddings"].values())

    # Without the plugin, the export names what is missing in one line.
    plain = {k: v for k, v in os.environ.items() if k != "SCALE_PLUGINS"}
    result = scale("evaluate", "--model", str(tmp_path / "export"), "--data", str(tmp_path / "eval"), env=plain)
    assert result.returncode != 0
    assert "price" in result.stderr.strip().splitlines()[-1] and "SCALE_PLUGINS" in result.stderr.strip().splitlines()[-1]


def test_the_model_takes_the_sixth_modality_in_every_missing_pattern():
    """The model tests' own fixtures, looping over the registry, with six modalities (63 patterns)."""
    check = """
import torch
from scale.config import MODALITIES
from scale.model import SCALE
from tests.conftest import tiny_config
from tests.test_model import all_patterns, assert_every_parameter_gets_a_gradient, random_batch
assert MODALITIES[-1] == "price" and len(MODALITIES) == 6
torch.manual_seed(0)
model = SCALE(tiny_config(modalities=list(MODALITIES)))
present = all_patterns()
assert present.shape == (63, 6)
batch = random_batch(model.config, present, fill_absent=float("nan"))
batch["price"]["features"].requires_grad_(True)
losses = model.losses(model(batch, masked_modeling=True))
assert all(torch.isfinite(v) for v in losses.values()) and "masked/price" in losses and "contrastive/audio-price" in losses
losses["loss"].backward()
grad = batch["price"]["features"].grad.flatten(1).abs().sum(1)
assert (grad[~present[:, 5]] == 0).all() and (grad[present[:, 5]] > 0).all()
assert_every_parameter_gets_a_gradient(model, present)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=PLUGIN, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
