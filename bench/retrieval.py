"""Retrieval over a large gallery: time and memory of `scale.metrics.retrieval_metrics` on a
synthetic gallery of N products (default 1,000,000), side by side with what the N x N similarity
matrix would take.

    python bench/retrieval.py --gallery 1000000 --queries 2000     # make bench-retrieval

The gallery is N random 256-d float32 embeddings in 10,000 categories of 100 products (a
category centre plus noise), so a query has positives and the ranking work is real. Queries are
the first `--queries` products (each against the whole gallery, itself excluded): a full 1 M x 1 M
evaluation is queries/s x N, printed as an estimate. Memory is the process's peak resident size
above what the embeddings themselves take, read from the kernel (`ru_maxrss`).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale.metrics import GALLERY_BLOCK, RETRIEVAL_MEMORY_BUDGET_BYTES, retrieval_metrics  # noqa: E402

GiB = 2**30


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def gallery(n: int, dim: int, per_category: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    labels = np.arange(n) // per_category
    centres = torch.randn(n // per_category + 1, dim, generator=generator)
    x = torch.randn(n, dim, generator=generator)  # in place: one N x D array at a time
    x.mul_(2.0).add_(centres[torch.from_numpy(labels)])
    return x, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--per-category", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    x, labels = gallery(args.gallery, args.dim, args.per_category, args.seed)
    embeddings_bytes = x.numel() * 4
    before = peak_rss()
    start = time.perf_counter()
    result = retrieval_metrics(x, labels, ks=(1, 5, 10), max_queries=args.queries)
    seconds = time.perf_counter() - start
    extra = max(peak_rss() - before, 0)
    rate = result["queries"] / seconds
    dense = args.gallery**2 * 4
    print(f"gallery {args.gallery:,} x {args.dim}-d float32 ({embeddings_bytes / GiB:.2f} GiB), "
          f"{result['queries']:,} queries, {torch.get_num_threads()} threads")
    print(f"  time: {seconds:.1f} s, {rate:,.0f} queries/s -> all {args.gallery:,} queries in ~{args.gallery / rate / 3600:.1f} h")
    print(f"  memory beyond the embeddings: {extra / GiB:.2f} GiB peak (budget {RETRIEVAL_MEMORY_BUDGET_BYTES / GiB:.2f} GiB, "
          f"gallery blocks of {GALLERY_BLOCK:,})")
    print(f"  the N x N float32 similarity matrix would take {dense / GiB:,.0f} GiB: ratio {dense / max(extra, 1):,.0f}x")
    print(f"  mAP@1/5/10 {result['map@1']:.3f} / {result['map@5']:.3f} / {result['map@10']:.3f}")


if __name__ == "__main__":
    main()
