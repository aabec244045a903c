"""Downstream evaluation of an export over a shard set: the paper's four tasks, every embedding kind.

    scale evaluate --model EXPORT --data SHARDS [--query text,image] [--gallery text,table,image,video,audio]
                   [--tasks coarse,fine,probe,clustering] [--official-ap] [--compare-random] [--out metrics.json]

Tasks (SPEC §4), each on every embedding kind:
- `coarse` retrieval (relevant = same category) and `fine` retrieval (same product instance):
  mAP@1/5/10 and Prec@1/5/10, the query itself left out, standard AP (`--official-ap`: the official
  code's variant, see `scale/metrics.py`); chunked over queries and gallery, never N x N;
- `probe`: linear-probe classification of the category (accuracy, macro-F1), split by instance;
- `clustering`: k-means over the categories (NMI, purity, ARI).

Embedding kinds (`SCALE.embed`): `fused` (sum of the normalised post-fusion pooled vectors of the
modalities used: the official retrieval embedding), `contrastive` (sum of the normalised contrastive
projections: the space the contrastive loss trains) and each modality alone (its own projection,
over the products that have it: what that encoder learned by itself). `--query` and `--gallery`
choose the modalities each side is embedded from (the model sees only those: absent for the rest);
they apply to `fused` and `contrastive`.

Ground truth is never invented: products without a category are left out of the tasks that need
one (and counted), products without an instance id out of fine retrieval; a task none of whose
products has its ground truth is refused with one line instead of scoring 0 or 1.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.m5product import eval_dataloader
from datamodules.streams import shard_sizes
from scale import metrics
from scale.export import load_pretrained
from scale.model import SCALE
from scale.outputs import refuse_existing_file, write_file
from scale.shard_format import list_shards

TASKS = ("coarse", "fine", "probe", "clustering")
LABEL_TASKS = ("coarse", "probe", "clustering")
KS = (1, 5, 10)
COMBINED = ("fused", "contrastive")


class MissingGroundTruth(ValueError):
    """A task asked for whose ground truth the data does not hold."""


def _only(batch: dict, modalities: list[str]) -> dict:
    """The batch as if its products had only `modalities` (the others absent)."""
    return {k: ({**v, "present": torch.zeros_like(v["present"])} if isinstance(v, dict) and k not in modalities else v)
            for k, v in batch.items()}  # fmt: skip


def _batches(shards: str, batch_size: int) -> int:
    return math.ceil(sum(shard_sizes(list_shards(shards))) / batch_size)


@torch.no_grad()
def compute_embeddings(model: SCALE, shards: str, batch_size: int = 64, num_workers: int = 0,
                       query: list[str] | None = None, gallery: list[str] | None = None,
                       progress: bool = False, labels: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Embeddings and ground truth of every sample of `shards`, on the model's device.

    Returns numpy arrays: `query/<kind>` and `gallery/<kind>` for the combined kinds (`fused`,
    `contrastive`), `<m>/projection` and `<m>/encoder` per modality, `present/<m>`, `label`
    (objects: the category as the release names it, None without one), `instance` (None without
    one), and `harmonization` ((N, M, M): each product's pair weights, diagonal = task weights)."""
    from tqdm import tqdm

    names = model.modalities
    query, gallery = query or names, gallery or names
    device = next(model.parameters()).device
    parts: dict[str, list] = {}

    def keep(name: str, value: Any) -> None:
        parts.setdefault(name, []).append(value.float().cpu().numpy() if isinstance(value, torch.Tensor) else value)

    loader = eval_dataloader(shards, model.config, batch_size, num_workers, labels=labels)
    for batch in tqdm(loader, total=_batches(shards, batch_size), desc="embedding", unit="batch", disable=not progress):
        batch = model.prepare(model.batch_to_device(batch, device))  # `present` as the model sees it
        full = model.embed(batch)
        subsets = {tuple(names): full}  # each modality subset embedded once (query and gallery may share one)
        for side, modalities in (("query", query), ("gallery", gallery)):
            if tuple(modalities) not in subsets:
                subsets[tuple(modalities)] = model.embed(_only(batch, modalities))
            for kind in COMBINED:
                keep(f"{side}/{kind}", subsets[tuple(modalities)][kind])
        for m in names:
            keep(f"{m}/projection", full[f"{m}/projection"])
            keep(f"{m}/encoder", full[f"{m}/encoder"])
            keep(f"present/{m}", batch[m]["present"])
        present = torch.stack([batch[m]["present"].bool() for m in names], dim=1)
        pairs = model.harmonize(torch.stack([full[f"{m}/projection"] for m in names], dim=1), present, pairs=True)
        tasks = model.harmonize(torch.stack([full[m] for m in names], dim=1), present, pairs=False)
        keep("harmonization", torch.diagonal_scatter(pairs, tasks, dim1=1, dim2=2))
        keep("label", np.asarray(batch["label"], dtype=object))
        keep("instance", np.asarray(batch["instance"], dtype=object))
    if not parts:
        raise ValueError(f"evaluate: no usable sample in {shards}")
    data = {name: np.concatenate(chunks) for name, chunks in parts.items()}
    data["modalities"], data["query_modalities"], data["gallery_modalities"] = names, query, gallery
    return data


def check_ground_truth(data: dict[str, Any], tasks: list[str], where: str) -> None:
    """Refuse, in one line, tasks whose ground truth `data` lacks (instead of scoring 0 or 1)."""
    labels = [x for x in data["label"] if x is not None]
    wanted = [t for t in tasks if t in LABEL_TASKS]
    rest = ",".join(t for t in tasks if t not in LABEL_TASKS)
    if wanted and len(set(labels)) < 2:
        found = "no product has a category label" if not labels else f"every labelled product is in one category ({labels[0]!r})"
        raise MissingGroundTruth(f"evaluate: {found} in {where}, so {', '.join(wanted)} cannot be computed; "
                                 f"convert a release with labels, or pass --tasks {rest or 'fine'}")  # fmt: skip
    if "fine" in tasks:
        instances = [x for x in data["instance"] if x is not None]
        if len(set(instances)) == len(instances):
            found = "no product has an instance id" if not instances else "no product instance has two listings"
            others = ",".join(t for t in tasks if t != "fine")
            raise MissingGroundTruth(f"evaluate: {found} in {where}, so fine retrieval cannot be computed; "
                                     f"pass --tasks {others or 'coarse'}")  # fmt: skip


def _retrieval(queries: np.ndarray, gallery: np.ndarray, truth: np.ndarray, official_ap: bool) -> dict:
    known = np.array([t is not None for t in truth])
    n = int(known.sum())
    ks = tuple(k for k in KS if k <= n - 1)
    if not ks:
        return {"skipped": f"{n} products with ground truth: too few to rank"}
    result = metrics.retrieval_metrics(queries[known], truth[known].astype(str), ks, official_ap, gallery=gallery[known])
    return {**result, "products": n}


def _score(queries: np.ndarray, gallery: np.ndarray, data: dict, rows: np.ndarray, tasks: list[str],
           official_ap: bool, seed: int) -> dict:  # fmt: skip
    """The tasks on one embedding kind, over the products `rows`."""
    labels, instances = data["label"][rows], data["instance"][rows]
    queries, gallery = queries[rows], gallery[rows]
    out: dict[str, Any] = {"products": int(rows.sum())}
    if "coarse" in tasks:
        out["coarse"] = _retrieval(queries, gallery, labels, official_ap)
    if "fine" in tasks:
        out["fine"] = _retrieval(queries, gallery, instances, official_ap)
    labelled = np.array([x is not None for x in labels])
    y = labels[labelled].astype(str)
    x = queries[labelled]
    if "probe" in tasks:
        # Split by instance (a product's listings never on both sides), by product when unknown.
        groups = np.array([i if i is not None else f"#{n}" for n, i in enumerate(instances[labelled])], dtype=str)
        try:
            out["linear_probe"] = metrics.linear_probe_accuracy(x, y, groups=groups, seed=seed)
        except ValueError as error:  # fewer than two classes in the train split
            out["linear_probe"] = {"skipped": str(error)}
    if "clustering" in tasks:
        out["clustering"] = (metrics.clustering_metrics(x, y, seed=seed) if len(set(y)) >= 2
                             else {"skipped": "fewer than two categories"})  # fmt: skip
    out["labelled"] = int(labelled.sum())
    return out


def evaluate_embeddings(data: dict[str, Any], tasks: list[str] | tuple[str, ...] = TASKS, seed: int = 0,
                        official_ap: bool = False, where: str = "the data") -> dict:  # fmt: skip
    """Every task on every embedding kind (module doc) from `compute_embeddings`' output."""
    tasks = list(tasks)
    check_ground_truth(data, tasks, where)
    names = data["modalities"]
    present = {m: data[f"present/{m}"].astype(bool) for m in names}
    query_side = np.any([present[m] for m in data["query_modalities"]], axis=0)
    gallery_side = np.any([present[m] for m in data["gallery_modalities"]], axis=0)
    results: dict[str, Any] = {
        "products": len(data["label"]),
        "labelled": int(sum(x is not None for x in data["label"])),
        "with_instance": int(sum(x is not None for x in data["instance"])),
        "query": list(data["query_modalities"]), "gallery": list(data["gallery_modalities"]),
        "ap": "official" if official_ap else "standard", "embeddings": {},
    }  # fmt: skip
    for kind in COMBINED:
        results["embeddings"][kind] = _score(data[f"query/{kind}"], data[f"gallery/{kind}"], data,
                                             query_side & gallery_side, tasks, official_ap, seed)  # fmt: skip
    for m in names:
        own = data[f"{m}/projection"]
        results["embeddings"][m] = _score(own, own, data, present[m], tasks, official_ap, seed)
    results["harmonization"] = harmonization_summary(data)
    return results


def harmonization_summary(data: dict[str, Any]) -> dict[str, Any]:
    """The mean harmonization weight of each modality pair over the products that have both
    (diagonal: the per-modality task weight over the products that have it)."""
    names = data["modalities"]
    present = np.stack([data[f"present/{m}"].astype(bool) for m in names], axis=1)
    both = present[:, :, None] & present[:, None, :]
    weights = np.where(both, data["harmonization"], 0.0).sum(0) / np.maximum(both.sum(0), 1)
    return {"modalities": names, "mean_weights": weights.round(6).tolist()}


def evaluate(model: SCALE, shards: str, batch_size: int = 64, seed: int = 0, tasks=TASKS, official_ap: bool = False,
             query: list[str] | None = None, gallery: list[str] | None = None, progress: bool = False,
             num_workers: int = 0) -> tuple[dict, dict]:  # fmt: skip
    """(results, embeddings) of `model` on `shards`."""
    data = compute_embeddings(model.eval(), shards, batch_size, num_workers, query, gallery, progress)
    return evaluate_embeddings(data, tasks, seed, official_ap, shards), data


def _cell(result: dict, *path: str) -> str:
    value: Any = result
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return f"{value:>8.3f}" if isinstance(value, float) else f"{'-':>8}"


COLUMNS = [
    ("cMAP@1", ("coarse", "map@1")), ("cMAP@5", ("coarse", "map@5")), ("cMAP@10", ("coarse", "map@10")),
    ("cP@10", ("coarse", "prec@10")), ("fMAP@1", ("fine", "map@1")), ("fMAP@10", ("fine", "map@10")),
    ("fP@10", ("fine", "prec@10")), ("acc", ("linear_probe", "accuracy")), ("F1", ("linear_probe", "macro_f1")),
    ("NMI", ("clustering", "nmi")), ("purity", ("clustering", "purity")), ("ARI", ("clustering", "ari")),
]  # fmt: skip
"""The table's columns: c = coarse (same category), f = fine (same product) retrieval."""


def format_table(results: dict[str, dict]) -> str:
    """One block per model state (trained, random_init): a row per embedding kind."""
    lines = []
    for state, result in results.items():
        lines.append(f"{state} ({result['products']} products, {result['labelled']} labelled; query "
                     f"{'+'.join(result['query'])}, gallery {'+'.join(result['gallery'])}; {result['ap']} AP)")
        lines.append(f"{'embedding':<12}" + "".join(f"{name:>8}" for name, _ in COLUMNS))
        for kind, scores in result["embeddings"].items():
            lines.append(f"{kind:<12}" + "".join(_cell(scores, *path) for _, path in COLUMNS))
    return "\n".join(lines)


def _modalities(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", required=True, help="export folder (from `scale export`)")
    a("--data", required=True, help="shard folder or pattern to evaluate on")
    a("--out", default=None, help="write metrics.json here (a new file), with the pictures and report.md beside it")
    a("--overwrite", action="store_true", help="replace an existing --out file (and its pictures)")
    a("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)} (default: all)")
    a("--query", default=None, help="modalities the queries are embedded from, e.g. text,image (default: all)")
    a("--gallery", default=None, help="modalities the gallery is embedded from (default: all)")
    a("--official-ap", action="store_true", help="the official code's AP (divide by hits in the top K; inflates AP)")
    a("--batch-size", type=int, default=64)
    a("--num-workers", type=int, default=0, help="data-loading processes")
    a("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    a("--seed", type=int, default=0)
    a("--compare-random", action="store_true", help="also evaluate the same architecture at random initialisation")
    a("--tensorboard", default=None, help="the run's TensorBoard folder: plots the harmonization weights over training")
    a("--no-pictures", dest="pictures", action="store_false", help="write metrics.json only")


def _check_arguments(args: argparse.Namespace, modalities: list[str]) -> None:
    unknown_tasks = [t for t in _modalities(args.tasks) if t not in TASKS]
    if unknown_tasks or not _modalities(args.tasks):
        raise ValueError(f"evaluate --tasks {args.tasks!r}: expected a comma-separated list of {', '.join(TASKS)}")
    for option in ("query", "gallery"):
        chosen = _modalities(getattr(args, option) or ",".join(modalities))
        wrong = [m for m in chosen if m not in modalities]
        if wrong or not chosen:
            raise ValueError(f"evaluate --{option} {getattr(args, option)!r}: the model's modalities are {', '.join(modalities)}")
    if args.batch_size < 1 or args.num_workers < 0:
        raise ValueError("evaluate: --batch-size must be >= 1 and --num-workers >= 0")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"evaluate --device {name}: no GPU is visible")
    return device


def run(args: argparse.Namespace) -> None:
    if args.out:  # before minutes of work
        from scale.report import outputs

        for path in [Path(args.out), *(outputs(Path(args.out)) if args.pictures else [])]:
            refuse_existing_file(path, args.overwrite, "evaluate --out")
    model = load_pretrained(args.model, device=_device(args.device))
    _check_arguments(args, model.modalities)
    tasks, query, gallery = _modalities(args.tasks), _modalities(args.query or ""), _modalities(args.gallery or "")
    options = dict(tasks=tasks, official_ap=args.official_ap, query=query or None, gallery=gallery or None,
                   progress=True, num_workers=args.num_workers)  # fmt: skip
    trained, data = evaluate(model, args.data, args.batch_size, args.seed, **options)
    results, embeddings = {"trained": trained}, {"trained": data}
    if args.compare_random:
        torch.manual_seed(args.seed)
        random_init = SCALE(model.config, load_weights=False).to(model.logit_scale.device)
        results["random_init"], embeddings["random_init"] = evaluate(random_init, args.data, args.batch_size, args.seed, **options)
    print(format_table(results))
    if args.out:
        write_file(args.out, json.dumps(results, indent=1).encode(), args.overwrite, "evaluate --out")
        print(f"wrote {args.out}")
        if args.pictures:
            from scale.report import write_report

            report = write_report(Path(args.out), results, embeddings, args.tensorboard, seed=args.seed)
            print(f"wrote {report}")
