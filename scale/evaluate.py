"""Downstream evaluation of a model over a shard set: retrieval, linear probe, clustering.

- coarse retrieval: relevant = same category; fine retrieval: relevant = same product instance;
  mAP@1/5/10 and Prec@1/5/10 with the standard AP (see `scale/metrics.py` for the official variant);
- linear-probe category accuracy, split by product instance (no instance in both halves);
- k-means over categories: NMI and purity;
- per modality: coarse mAP@10 of each encoder's own (pre-fusion) embedding, over the samples that
  have that modality, to see what each modality alone knows.
The retrieval/probe/clustering embedding is one of `SCALE.embed`'s outputs: `contrastive` by
default (sum of the present modalities' normalised contrastive projections: the space the
contrastive loss trains), or `fused` (sum of normalised post-fusion pooled vectors, the official
choice; its post-fusion tokens are trained by the masked tasks only). The other one's coarse and
fine mAP@10 are reported too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from datamodules.m5product import eval_dataloader
from scale import metrics
from scale.export import load_pretrained
from scale.model import SCALE
from scale.outputs import refuse_existing_file, write_file


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: ({n: t.to(device) for n, t in v.items()} if isinstance(v, dict) else v) for k, v in batch.items()}


@torch.no_grad()
def compute_embeddings(model: SCALE, shards: str, batch_size: int = 64, num_workers: int = 0) -> dict[str, np.ndarray]:
    """Embeddings and labels of every sample of `shards` (keys: embedding names, `category`,
    `instance`, `present/<m>`)."""
    device = next(model.parameters()).device
    collected: dict[str, list] = {}
    for batch in eval_dataloader(shards, model.config, batch_size, num_workers):
        for name, value in model.embed(_to_device(batch, device)).items():
            collected.setdefault(name, []).append(value.cpu().numpy())
        collected.setdefault("category", []).append(batch["category"].numpy())
        collected.setdefault("instance", []).append(np.asarray(batch["instance"]))
        for m in model.modalities:
            collected.setdefault(f"present/{m}", []).append(batch[m]["present"].numpy())
    if not collected:
        raise ValueError(f"evaluate: no usable sample in {shards}")
    return {name: np.concatenate(parts) for name, parts in collected.items()}


EMBEDDINGS = ("contrastive", "fused")


def evaluate_embeddings(data: dict[str, np.ndarray], seed: int = 0, embedding: str = "contrastive") -> dict:
    if embedding not in EMBEDDINGS:
        raise ValueError(f"evaluate --embedding {embedding!r}: expected one of {EMBEDDINGS}")
    fused, category, instance = data[embedding], data["category"], data["instance"]
    results = {
        "samples": int(len(category)),
        "embedding": embedding,
        "coarse": metrics.retrieval_metrics(fused, category),
        "fine": metrics.retrieval_metrics(fused, instance),
        "linear_probe": metrics.linear_probe_accuracy(fused, category, groups=instance, seed=seed),
        "clustering": metrics.clustering_metrics(fused, category, seed=seed),
        "per_modality_coarse_map@10": {},
    }
    for other in EMBEDDINGS:
        if other != embedding:
            results[f"{other}_embedding_map@10"] = {
                "coarse": metrics.retrieval_metrics(data[other], category)["map@10"],
                "fine": metrics.retrieval_metrics(data[other], instance)["map@10"],
            }
    for name in data:
        if name.endswith("/projection"):
            modality = name.split("/")[0]
            keep = data[f"present/{modality}"].astype(bool)
            if keep.sum() > 10:
                score = metrics.retrieval_metrics(data[name][keep], category[keep])["map@10"]
                results["per_modality_coarse_map@10"][modality] = score
    return results


def evaluate(model: SCALE, shards: str, batch_size: int = 64, seed: int = 0, embedding: str = "contrastive") -> dict:
    return evaluate_embeddings(compute_embeddings(model.eval(), shards, batch_size), seed, embedding)


ROWS = [
    ("coarse mAP@1", ("coarse", "map@1")), ("coarse mAP@10", ("coarse", "map@10")),
    ("fine mAP@1", ("fine", "map@1")), ("fine mAP@10", ("fine", "map@10")),
    ("linear probe acc", ("linear_probe", "accuracy")), ("k-means NMI", ("clustering", "nmi")),
]  # fmt: skip


def format_table(results: dict[str, dict]) -> str:
    names = list(results)
    lines = [f"{'metric':<18}" + "".join(f"{n:>14}" for n in names)]
    for label, (group, key) in ROWS:
        lines.append(f"{label:<18}" + "".join(f"{results[n][group][key]:>14.3f}" for n in names))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="export folder (from `scale export`)")
    parser.add_argument("--data", required=True, help="shard folder or pattern to evaluate on")
    parser.add_argument("--out", default=None, help="write metrics.json here (a new file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedding", choices=EMBEDDINGS, default="contrastive", help="which embedding is scored")
    parser.add_argument("--compare-random", action="store_true", help="also evaluate the same architecture at random initialisation")


def run(args: argparse.Namespace) -> None:
    if args.out:
        refuse_existing_file(args.out, args.overwrite, "evaluate --out")  # before minutes of work
    model = load_pretrained(args.model)
    results = {"trained": evaluate(model, args.data, args.batch_size, args.seed, args.embedding)}
    if args.compare_random:
        torch.manual_seed(args.seed)
        random_init = SCALE(model.config, load_weights=False)
        results["random_init"] = evaluate(random_init, args.data, args.batch_size, args.seed, args.embedding)
    print(format_table(results))
    if args.out:
        write_file(args.out, json.dumps(results, indent=1).encode(), args.overwrite, "evaluate --out")
        print(f"wrote {args.out}")
