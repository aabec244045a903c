"""Labels as releases give them: names, numbers, both, or none; and `scale evaluate` never scoring a
task whose ground truth is missing. Real official-layout releases through `scale shards`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import demo
from datamodules.m5product import M5ProductDataModule, eval_dataloader
from datamodules.shards import write_shards
from scale import metrics
from scale.cli import main as cli_main
from scale.evaluate import compute_embeddings, evaluate_embeddings
from scale.export import export_model
from scale.model import SCALE
from scale.shard_format import canonical_label, read_labels
from tests.conftest import tiny_config

SMALL = dict(image_size=32, video_size=16, video_seconds=1.0, fps=4, audio_seconds=1.0,
             missing={"video": 0.3, "audio": 0.3})  # fmt: skip
NAMES = ["Women's dresses", "手机", "Kettles", "Shoes & boots", "Toys", "Lamps", "Bags", "Watches"]


def test_canonical_labels():
    assert [canonical_label(v) for v in (3, "3", " 03 ", 3.0, -2, "-2")] == ["3", "3", "3", "3", "-2", "-2"]
    assert [canonical_label(v) for v in (" Bags ", "手机", 3.5)] == ["Bags", "手机", "3.5"]
    assert [canonical_label(v) for v in (None, "", "  ", True, [1], {"a": 1}, float("nan"))] == [None] * 7


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    """One official-layout release of 48 products, written out again with its labels as names,
    as names and numbers mixed, without labels and without instance ids."""
    root = tmp_path_factory.mktemp("labels")
    demo.generate(root / "ints", 48, seed=0, layout="official", **SMALL)
    products = json.loads((root / "ints" / "products.json").read_text())
    truth = {pid: record["label"] for pid, record in products.items()}
    raw: dict[str, dict] = {}

    def variant(name: str, change) -> Path:
        folder = root / name
        folder.mkdir()
        for media in ("image", "video", "audio"):
            (folder / media).symlink_to(root / "ints" / media)
        changed = {pid: change(n, dict(record)) for n, (pid, record) in enumerate(products.items())}
        (folder / "products.json").write_text(json.dumps(changed, ensure_ascii=False))
        raw[name] = {pid: record["label"] for pid, record in changed.items() if "label" in record}
        return folder

    def names(n, record):
        return {**record, "label": NAMES[record["label"]]}

    def mixed(n, record):  # even products by name, odd by number (as a string), every 6th unlabeled
        record = {**record, "label": NAMES[record["label"]] if n % 2 == 0 else str(record["label"])}
        return {k: v for k, v in record.items() if k != "label"} if n % 6 == 5 else record

    def unlabeled(n, record):
        return {k: v for k, v in record.items() if k != "label"}

    def no_instance(n, record):
        return {k: v for k, v in record.items() if k != "instance"}

    folders = {"ints": root / "ints", "names": variant("names", names), "mixed": variant("mixed", mixed),
               "unlabeled": variant("unlabeled", unlabeled), "no_instance": variant("no_instance", no_instance)}  # fmt: skip
    shards = {}
    for name, folder in folders.items():
        write_shards(folder, root / "shards" / name, max_count=20)
        shards[name] = root / "shards" / name
    return {"truth": truth, "shards": shards, "root": root, "raw": raw}


def test_the_vocabulary_keeps_every_category_whatever_its_form(release):
    shards = release["shards"]
    assert read_labels(str(shards["ints"])) == [str(i) for i in range(8)]
    assert sorted(read_labels(str(shards["names"]))) == sorted(NAMES)
    mixed = json.loads((shards["mixed"] / "labels.json").read_text())
    unlabeled = sum(1 for n in range(48) if n % 6 == 5)
    assert mixed["unlabeled"] == unlabeled and sum(mixed["counts"]) == 48 - unlabeled
    assert json.loads((shards["mixed"] / "report.json").read_text())["unlabeled"] == unlabeled
    assert json.loads((shards["unlabeled"] / "labels.json").read_text()) == {
        "format": "scale-labels/1", "labels": [], "counts": [], "unlabeled": 48}

    config = tiny_config()
    # Every decoded product's class id names its true category, by name as by number.
    for name in ("ints", "names", "mixed"):
        vocabulary = read_labels(str(shards[name]))
        for batch in eval_dataloader(str(shards[name]), config, batch_size=16):
            for key, label, category in zip(batch["key"], batch["label"], batch["category"].tolist()):
                true = release["truth"][key]
                if label is None:
                    assert category == -1 and name == "mixed"
                else:
                    assert label in (str(true), NAMES[true]) and vocabulary[category] == label


def test_held_out_class_ids_follow_the_training_vocabulary(release, tmp_path):
    # Training labels by name (8 categories); held-out products labelled by name too, but only
    # some categories: their ids must be the training set's.
    train = release["shards"]["names"]
    module = M5ProductDataModule(train_shards=str(train), val_shards=str(release["shards"]["mixed"]),
                                 batch_size=8, num_workers=0, model_config=tiny_config(), mode="exact")  # fmt: skip
    module.setup("fit")
    vocabulary = read_labels(str(train))
    seen = 0
    for batch in module.val_dataloader():
        for label, category in zip(batch["label"], batch["category"].tolist()):
            if label is not None and not label.isdigit():
                assert vocabulary[category] == label
                seen += 1
            elif label is not None:  # a number the name vocabulary does not hold: unknown, not a class
                assert category == -1
    assert seen > 10


@pytest.fixture(scope="module")
def model() -> SCALE:
    torch.manual_seed(0)
    return SCALE(tiny_config(), load_weights=False).eval()


def test_names_score_exactly_as_the_numbers_they_stand_for(release, model):
    scores = {}
    for name in ("ints", "names"):
        data = compute_embeddings(model, str(release["shards"][name]), batch_size=16)
        scores[name] = evaluate_embeddings(data, tasks=("coarse", "probe", "clustering"))["embeddings"]
    # The same partition: the same scores (up to the rounding of a class order that differs).
    assert _flat(scores["ints"]) == pytest.approx(_flat(scores["names"]), rel=1e-6)
    # A random model: coarse retrieval near chance (the old bug scored names as one category: 1.0).
    assert scores["names"]["contrastive"]["coarse"]["map@10"] < 0.6


def _flat(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_mixed_labels_leave_out_the_unlabeled_and_say_how_many(release, model):
    data = compute_embeddings(model, str(release["shards"]["mixed"]), batch_size=16)
    results = evaluate_embeddings(data, tasks=("coarse", "fine", "probe"))
    assert results["labelled"] == 40 and results["products"] == 48
    assert results["embeddings"]["contrastive"]["labelled"] == 40
    # Coarse retrieval over the 40 labelled products only, each label as the release wrote it (a
    # name and a number are two labels: nothing says they are one category).
    labels = [release["raw"]["mixed"].get(k) for k in _keys(release["shards"]["mixed"])]
    keep = np.array([x is not None for x in labels])
    expected = metrics.retrieval_metrics(data["query/contrastive"][keep], np.array(labels, dtype=object)[keep].astype(str),
                                         ks=(1, 5, 10))  # fmt: skip
    got = results["embeddings"]["contrastive"]["coarse"]
    assert got["map@10"] == pytest.approx(expected["map@10"]) and got["products"] == 40


def _keys(shards: Path) -> list[str]:
    return [k for batch in eval_dataloader(str(shards), tiny_config(), batch_size=16) for k in batch["key"]]


def _evaluate(capsys, export: Path, shards: Path, *options: str) -> tuple[int, list[str]]:
    try:
        cli_main(["evaluate", "--model", str(export), "--data", str(shards), "--no-pictures", *options])
        status = 0
    except SystemExit as exit:
        print(exit.code, file=__import__("sys").stderr)
        status = 1
    return status, capsys.readouterr().err.strip().splitlines()


def test_evaluate_refuses_a_task_without_ground_truth_in_one_line(release, model, tmp_path, capsys):
    export = export_model(model, tmp_path / "export")
    status, err = _evaluate(capsys, export, release["shards"]["unlabeled"])
    assert status == 1 and "no product has a category label" in err[-1] and "--tasks fine" in err[-1]
    assert "coarse, probe, clustering cannot be computed" in err[-1] and "Traceback" not in "\n".join(err)
    status, _ = _evaluate(capsys, export, release["shards"]["unlabeled"], "--tasks", "fine")
    assert status == 0

    status, err = _evaluate(capsys, export, release["shards"]["no_instance"])
    assert status == 1 and "no product has an instance id" in err[-1] and "fine retrieval cannot be computed" in err[-1]
    out = tmp_path / "m.json"
    status, _ = _evaluate(capsys, export, release["shards"]["no_instance"], "--tasks", "coarse,probe,clustering",
                          "--out", str(out))  # fmt: skip
    assert status == 0 and "fine" not in json.loads(out.read_text())["trained"]["embeddings"]["fused"]

    status, err = _evaluate(capsys, export, release["shards"]["ints"], "--query", "text,smell")
    assert status == 1 and "--query" in err[-1] and "text, table, image, video, audio" in err[-1]


def test_query_and_gallery_modalities(release, model):
    shards = str(release["shards"]["ints"])
    data = compute_embeddings(model, shards, batch_size=16, query=["text"], gallery=["text", "table", "image"])
    batch = next(iter(eval_dataloader(shards, model.config, batch_size=16)))
    text_only = {k: ({**v, "present": v["present"] & (k == "text")} if isinstance(v, dict) else v) for k, v in batch.items()}
    three = {k: ({**v, "present": v["present"] & (k in ("text", "table", "image"))} if isinstance(v, dict) else v)
             for k, v in batch.items()}  # fmt: skip
    for kind in ("fused", "contrastive"):
        assert np.allclose(data[f"query/{kind}"][:16], model.embed(text_only)[kind].numpy(), atol=1e-6)
        assert np.allclose(data[f"gallery/{kind}"][:16], model.embed(three)[kind].numpy(), atol=1e-6)
    full = compute_embeddings(model, shards, batch_size=16)
    assert not np.allclose(full["query/fused"], data["query/fused"])
    results = evaluate_embeddings(data, tasks=("coarse",))
    assert results["query"] == ["text"] and results["gallery"] == ["text", "table", "image"]
    # Retrieval from text queries into the three-modality gallery, scored independently.
    labels = data["label"].astype(str)
    expected = metrics.retrieval_metrics(data["query/fused"], labels, ks=(1, 5, 10), gallery=data["gallery/fused"])
    assert results["embeddings"]["fused"]["coarse"]["map@10"] == pytest.approx(expected["map@10"])
