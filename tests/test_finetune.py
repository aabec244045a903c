"""`scale finetune` end to end, in this process: demo products -> shards -> a tiny pretraining run ->
export -> classification (linear probe, full finetune with layer-wise lr) and retrieval finetunes,
each with its before/after metrics; and the pieces a run cannot show cheaply (unlabelled samples,
per-group learning rates) on the module directly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from datamodules import demo
from datamodules.m5product import eval_dataloader
from datamodules.shards import write_shards
from scale.cli import main
from scale.export import export_model, load_checkpoint_model, load_pretrained
from scale.finetune import (FinetuneModule, classification_loss, classification_metrics, load_finetuned,
                            parameter_groups)  # fmt: skip
from scale.shard_format import LABELS_FILE, read_labels
from tests.conftest import ROOT, TINY_YAML

CONFIGS = ROOT / "configs" / "finetune"
CATEGORIES = 4
"""Few categories, so that 80 training products hold each several times (the demo's categories are
unevenly common by design)."""


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> Path:
    """Demo shards (80 training, 40 held-out products with a label vocabulary) and the export of a
    4-step pretraining run of the tiny model."""
    w = tmp_path_factory.mktemp("finetune")
    for split, count, seed in (("train", 80, 0), ("eval", 40, 1)):
        demo.generate(w / "raw" / split, products=count, seed=seed, categories=CATEGORIES, image_size=32,
                      video_size=32, video_seconds=0.5, fps=6, audio_seconds=1.0)  # fmt: skip
        write_shards(w / "raw" / split, w / "shards" / split, max_count=20)
    main(["fit", "--config", str(TINY_YAML), "--data.train_shards", str(w / "shards" / "train"),
          "--trainer.default_root_dir", str(w / "pretrain")])  # fmt: skip
    export_model(load_checkpoint_model(w / "pretrain" / "checkpoints" / "last.ckpt"), w / "export")
    return w


def finetune(w: Path, config: str, root: str, *overrides: str) -> dict:
    """`scale finetune --config configs/finetune/<config>.yaml` on the demo shards, small and on CPU."""
    main(["finetune", "--config", str(CONFIGS / f"{config}.yaml"), "--model.export", str(w / "export"),
          "--data.train_shards", str(w / "shards" / "train"), "--data.val_shards", str(w / "shards" / "eval"),
          "--trainer.default_root_dir", str(w / root), "--trainer.logger", "false", "--trainer.accelerator", "cpu",
          "--trainer.enable_progress_bar", "false", "--data.batch_size", "8", "--data.num_workers", "0",
          *overrides])  # fmt: skip
    return json.loads((w / root / "finetune_metrics.json").read_text())


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_linear_probe_learns_the_head_and_leaves_the_export_bitwise(w, capsys):
    results = finetune(w, "classify_probe", "probe", "--trainer.max_epochs", "10", "--model.lr", "1e-2",
                       "--model.head.hidden", "256", "--trainer.check_val_every_n_epoch", "100")  # fmt: skip
    before, after = results["before"], results["after"]
    assert "before" in capsys.readouterr().out  # the table
    assert before["samples"] == after["samples"] == 40
    # The untrained head is chance: it predicts about one class, which may be the most common one
    # (the demo's categories are unevenly common: accuracy up to 0.7) but scores a low macro-F1. The
    # trained one tells the held-out products' categories apart.
    assert after["macro_f1"] > before["macro_f1"] + 0.15, results
    assert after["accuracy"] > 1 / CATEGORIES + 0.2, results
    # Frozen: the features, hence the probe on them, and every weight are the export's.
    assert after["linear_probe_accuracy"] == before["linear_probe_accuracy"]
    exported, finetuned = weights(load_pretrained(w / "export")), weights(load_pretrained(results["finetuned"]))
    assert exported.keys() == finetuned.keys()
    assert all(torch.equal(exported[k], finetuned[k]) for k in exported)
    # The finetuned folder and the run's checkpoint both give back the trained head.
    reloaded = load_finetuned(results["finetuned"])
    assert reloaded.labels == read_labels(str(w / "shards" / "train"))
    # ... which has learned the products it was trained on.
    right = total = 0
    with torch.no_grad():
        for batch in eval_dataloader(str(w / "shards" / "train"), reloaded.model_config, batch_size=40):
            right += int((reloaded(batch).argmax(1) == batch["category"]).sum())
            total += len(batch["category"])
    counts = json.loads((w / "shards" / "train" / LABELS_FILE).read_text())["counts"]
    assert right / total > max(counts) / sum(counts) + 0.2, (right / total, counts)  # well above "always the commonest"
    checkpoint = FinetuneModule.load_from_checkpoint(w / "probe" / "checkpoints" / "last.ckpt", map_location="cpu",
                                                     weights_only=True)  # fmt: skip
    for name, value in checkpoint.head.state_dict().items():
        assert torch.equal(value, reloaded.head.state_dict()[name]), name


def test_full_finetune_moves_the_encoders_at_layer_wise_learning_rates(w):
    results = finetune(w, "classify_full", "full", "--trainer.max_steps", "3", "--model.layer_decay", "0.5",
                       "--model.lr", "1e-3", "--model.head.hidden", "32", "--data.num_workers", "2")  # fmt: skip
    assert set(results["after"]) >= {"accuracy", "macro_f1", "linear_probe_accuracy"}
    exported, finetuned = weights(load_pretrained(w / "export")), weights(load_pretrained(results["finetuned"]))
    for name in ("encoders.text.tower.bert.encoder.layer.0.attention.self.query.weight",
                 "encoders.image.vit.blocks.0.attn.qkv.weight", "fusion.transformer.blocks.0.mlp.fc1.weight"):  # fmt: skip
        assert not torch.equal(exported[name], finetuned[name]), name
    # The optimizer the run used: one group per (depth, decay), at lr * 0.5**depth (tiny model:
    # head 0, fusion block 1, fusion embeddings 2, each encoder's block 3, its stem 4).
    state = torch.load(w / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    groups = {g["name"]: g["initial_lr"] for g in state["optimizer_states"][0]["param_groups"]}
    assert {int(name.split("/")[0].removeprefix("depth")) for name in groups} == {0, 1, 2, 3, 4}
    for name, lr in groups.items():
        assert lr == pytest.approx(1e-3 * 0.5 ** int(name.split("/")[0].removeprefix("depth"))), name


def test_parameter_groups_by_depth_and_what_trains(w):
    module = FinetuneModule(str(w / "export"), freeze="none", layer_decay=0.5, lr=1.0, num_classes=CATEGORIES)
    lr_of = {id(p): g["lr"] for g in parameter_groups(module) for p in g["params"]}
    grouped = [id(p) for g in parameter_groups(module) for p in g["params"]]
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable  # each trainable parameter once
    model = module.model
    expected = {
        module.head[0].weight: 1.0, module.head[3].bias: 1.0, model.fusion.transformer.norm.weight: 1.0,
        model.fusion.transformer.blocks[0].attn.qkv.weight: 0.5, model.fusion.type_embedding.weight: 0.25,
        model.encoders["text"].tower.bert.encoder.layer[0].output.dense.weight: 0.125,
        model.encoders["audio"].trunk.transformer.blocks[0].mlp.fc2.weight: 0.125,
        model.encoders["text"].tower.bert.embeddings.word_embeddings.weight: 0.0625,
        model.encoders["image"].vit.patch_embed.proj.weight: 0.0625,
    }  # fmt: skip
    for parameter, lr in expected.items():
        assert lr_of[id(parameter)] == lr
    # Off the classification path: masked-modeling heads and contrastive projections do not train.
    for parameter in (model.encoders["text"].tower.lm_bias, model.encoders["image"].head.predict.weight,
                      model.projections["text"][0].weight):  # fmt: skip
        assert not parameter.requires_grad
    probe = FinetuneModule(str(w / "export"), freeze="encoders", num_classes=CATEGORIES)
    assert {id(p) for p in probe.parameters() if p.requires_grad} == {id(p) for p in probe.head.parameters()}
    retrieval = FinetuneModule(str(w / "export"), task="retrieval", freeze="none", layer_decay=0.5, lr=1.0)
    lr_of = {id(p): g["lr"] for g in parameter_groups(retrieval) for p in g["params"]}
    assert lr_of[id(retrieval.model.projections["image"][0].weight)] == 1.0
    assert lr_of[id(retrieval.model.encoders["image"].vit.blocks[0].attn.qkv.weight)] == 0.5
    assert not any(p.requires_grad for p in retrieval.model.fusion.parameters())  # not on the path


def test_unlabelled_samples_are_left_out_of_loss_and_metrics(w):
    logits = torch.randn(6, CATEGORIES, requires_grad=True)
    category = torch.tensor([0, -1, 2, -1, 3, 1])
    loss = classification_loss(logits, category)
    labelled = category >= 0
    torch.testing.assert_close(loss, F.cross_entropy(logits[labelled], category[labelled]))
    loss.backward()
    assert torch.equal(logits.grad[~labelled], torch.zeros(2, CATEGORIES))
    nothing = classification_loss(logits, torch.full((6,), -1))
    assert nothing.item() == 0.0 and nothing.requires_grad  # a batch without labels: a zero, no NaN
    metrics = classification_metrics(torch.tensor([0, 3, 2, 3, 3, 0]), category)
    assert metrics["samples"] == 4 and metrics["accuracy"] == 0.75
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0 + 1 + 1) / 4)  # classes 0..3, unlabelled rows left out
    # Through the module: what an unlabelled sample holds changes nothing.
    module = FinetuneModule(str(w / "export"), freeze="none", num_classes=CATEGORIES).eval()
    batch = next(iter(eval_dataloader(str(w / "shards" / "eval"), module.model_config, batch_size=8,
                                      labels=read_labels(str(w / "shards" / "train")))))  # fmt: skip
    batch["category"][::2] = -1
    with torch.no_grad():
        first = classification_loss(module(batch), batch["category"])
        text = batch["text"]
        text["input_ids"][::2] = text["input_ids"][::2].roll(1, dims=0)  # other titles, unlabelled rows only
        torch.testing.assert_close(classification_loss(module(batch), batch["category"]), first)


def test_retrieval_finetune_reports_map_before_and_after(w):
    results = finetune(w, "retrieval", "retrieval", "--trainer.max_steps", "3", "--data.num_workers", "2")
    for when in ("before", "after"):
        assert set(results[when]) == {"coarse_map@10", "fine_map@10"}
        assert all(0.0 <= value <= 1.0 for value in results[when].values())
    exported, finetuned = weights(load_pretrained(w / "export")), weights(load_pretrained(results["finetuned"]))
    assert not torch.equal(exported["projections.text.0.weight"], finetuned["projections.text.0.weight"])
    assert all(torch.equal(exported[k], finetuned[k]) for k in exported if k.startswith("fusion."))


@pytest.mark.parametrize("case", ["no export", "no held-out shards", "no label vocabulary"])
def test_a_bad_finetune_invocation_is_one_line(w, case, capsys):
    unlabelled = w / "shards_without_labels"
    if not unlabelled.exists():
        shutil.copytree(w / "shards" / "train", unlabelled)
        (unlabelled / LABELS_FILE).unlink()
    args = {"no export": ["--model.export", str(w / "no-such-export")],
            "no held-out shards": ["--data.val_shards", "null"],
            "no label vocabulary": ["--data.train_shards", str(unlabelled)]}[case]  # fmt: skip
    says = {"no export": "model.export", "no held-out shards": "data.val_shards is not set",
            "no label vocabulary": "no labels.json"}[case]  # fmt: skip
    with pytest.raises(SystemExit) as exit:
        finetune(w, "classify_probe", f"bad-{case}", "--trainer.max_steps", "1", *args)
    message = exit.value.code
    assert isinstance(message, str), message  # a message: exit status 1
    assert message.startswith("scale finetune: error: ") and says in message and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    assert not (w / f"bad-{case}" / "finetune_metrics.json").exists()
    assert os.path.isdir(w / "export")


def test_a_full_disk_while_saving_leaves_the_earlier_finetuned_folder_whole(w, tmp_path, monkeypatch):
    """`save_finetuned` replaces the run's `finetuned/` whole or not at all: the head failing to
    write (after the export part is written) leaves the earlier folder loadable, with its head."""
    import errno

    import scale.finetune as finetune_module

    module = FinetuneModule(str(w / "export"), freeze="encoders", num_classes=CATEGORIES)
    out = finetune_module.save_finetuned(module, tmp_path / "finetuned")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert Path(finetune_module.HEAD_FILE) in before

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    torch.nn.init.ones_(module.head[0].weight)  # a different head, which must not half-replace the old
    monkeypatch.setattr(finetune_module.safetensors.torch, "save_model", full_disk)
    with pytest.raises(OSError):
        finetune_module.save_finetuned(module, out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetuned"]  # no staging folder left
    monkeypatch.undo()
    assert load_finetuned(out).head is not None
