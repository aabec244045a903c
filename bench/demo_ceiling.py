"""How far each modality's coarse retrieval can go on the demo data, and where random features start.

    python bench/demo_ceiling.py --products 300 --seed 1 --missing video=0.2 --missing audio=0.2 --missing table=0.1

The demo plants each product's category in every modality, but with probability
`datamodules.demo.CONFUSION` a modality shows another category's cues (module doc of
`datamodules/demo.py`). The *ceiling* of a modality is the coarse mAP@10 (over the products that
have it) of a perfect detector of the category it shows: a one-hot of `shown`, ties broken at
random. An embedding can pass it only with instance cues (listings of one instance share its
category). With `--model EXPORT --data SHARDS` it also prints the export's and the random
initialisation's own projection per modality beside it (as `scale evaluate --compare-random`).
On the smoke run's 300 held-out products (seed 1): text .542, table .414, image .372, video .470,
audio .556. Before the demo's random-hue region and random tones (2026-12-03) the random
initialisation already scored image .366 and audio .535; now .157 and .268 (docs/measured.md,
"Does every modality learn?").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import demo  # noqa: E402
from scale.metrics import retrieval_metrics  # noqa: E402


def ceilings(rows: list[dict], modalities: tuple[str, ...] = demo.MODALITIES, seed: int = 0) -> dict[str, float]:
    """Coarse mAP@10 of a perfect detector of each modality's shown category (`demo.planted` rows)."""
    rng = np.random.default_rng(seed)
    labels = np.array([r["category"] for r in rows])
    categories = max(max(r["shown"].values()) for r in rows) + 1
    result = {}
    for m in modalities:
        have = np.array([r["present"][m] for r in rows])
        one_hot = np.eye(categories)[[r["shown"][m] for r in rows]] + 1e-3 * rng.normal(size=(len(rows), categories))
        result[m] = retrieval_metrics(one_hot[have], labels[have])["map@10"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--categories", type=int, default=8)
    parser.add_argument("--missing", action="append", default=[], help="MODALITY=RATE, as scale demo-data")
    parser.add_argument("--model", help="an export folder: print its per-modality coarse mAP@10 beside the ceiling")
    parser.add_argument("--data", help="the shards of the same products (with --model)")
    args = parser.parse_args()
    rows = demo.planted(args.products, args.seed, args.categories, missing=demo.parse_missing(args.missing))
    found = ceilings(rows)
    trained = random_init = {}
    if args.model:
        from scale import load_pretrained
        from scale.evaluate import evaluate
        from scale.model import SCALE

        import torch

        model = load_pretrained(args.model)
        torch.manual_seed(0)
        scores = [evaluate(m, args.data, tasks=("coarse",))[0]["embeddings"] for m in (model, SCALE(model.config, load_weights=False))]
        trained, random_init = ({m: s[m]["coarse"]["map@10"] for m in found if m in s} for s in scores)
    print(f"{'modality':10s} {'ceiling':>8s} {'trained':>8s} {'random':>8s}")
    for m, value in found.items():
        extra = f" {trained[m]:8.3f} {random_init[m]:8.3f}" if m in trained else ""
        print(f"{m:10s} {value:8.3f}{extra}")


if __name__ == "__main__":
    main()
