"""Robustness to missing and noisy modalities: K3M's protocol on planted demo data (the K3M paper).

For each setting (text, image, mixed text+image), kind (missing: blanked; swap: replaced by another
product's, K3M's "noise") and rate (0/20/50/80/100 % of products), the train and eval demo sets are
corrupted alike, and three methods are trained with the same steps and seeds:

- `harmonized`: SCALE with its default per-sample harmonization, all five modalities;
- `uniform`: the same model with every harmonization weight 1;
- `image_text`: image-text-only contrastive training (no other modality, no masked task).

Each is scored on the corrupted eval set: coarse (category) retrieval mAP@10 and linear-probe accuracy
of the default (`contrastive`) embedding. The harmonization weights of the text pairs over training
(per-sample mode, text settings) are plotted against the rate.

    python bench/robustness.py --out outputs/bench/robustness            # the full grid
    python bench/robustness.py --rates 0,50,100 --settings text          # a slice

Writes results.json, results.md (the tables) and harmonization.png under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"text": ["text"], "image": ["image"], "mixed": ["text", "image"]}
KIND_LABELS = {"missing": "missing", "swap": "noise (swap)"}
METHODS = {
    "harmonized": [],
    "uniform": ["--model.config.harmonization.mode", "uniform"],
    "image_text": ["--model.config.modalities", "[text, image]", "--model.config.text.masked_modeling", "false",
                   "--model.config.image.masked_modeling", "false"],
}  # fmt: skip
DEMO = dict(image_size=48, video_size=32, video_seconds=1.0, fps=6, audio_seconds=1.0)


def prepare_data(out: Path, rates: list[int], settings: list[str], kinds: list[str], products: int) -> dict:
    """Clean demo sets, their corrupted variants and shards; returns {variant: (train, eval) shards}."""
    from datamodules import demo
    from datamodules.corrupt import corrupt
    from datamodules.shards import write_shards

    clean = {}
    for split, count, seed in (("train", products, 0), ("eval", products // 2, 1)):
        raw = out / "data" / "clean" / split
        if not (raw / "meta.jsonl").is_file():
            demo.generate(raw, products=count, seed=seed, missing={"video": 0.2, "audio": 0.2}, **DEMO)
        clean[split] = raw
    variants = {}
    for setting in settings:
        for kind in kinds:
            for rate in rates:
                name = "clean" if rate == 0 else f"{setting}-{kind}-{rate}"
                shards = []
                for split, seed in (("train", 11), ("eval", 12)):
                    raw = clean[split] if rate == 0 else out / "data" / name / split
                    if rate and not (raw / "meta.jsonl").is_file():
                        corrupt(clean[split], raw, SETTINGS[setting], kind, rate / 100, seed=seed + rate)
                    shard_dir = out / "data" / name / f"shards-{split}"
                    if not (shard_dir / "sizes.json").is_file():
                        write_shards(raw, shard_dir, max_count=120)
                    shards.append(str(shard_dir))
                variants[name] = tuple(shards)
    return variants


def run_one(job: tuple[str, str, str, str, str, int]) -> dict:
    """`train_and_score`, with a failure recorded (and the grid carried on) instead of raised: a
    rerun with the same --out redoes only the runs that have no result.json."""
    try:
        return train_and_score(job)
    except Exception as error:  # noqa: BLE001 - one broken run must not lose the other results
        return {"variant": job[0], "method": job[1], "error": f"{type(error).__name__}: {error}"}


def train_and_score(job: tuple[str, str, str, str, str, int]) -> dict:
    """Train one method on one variant and evaluate it (runs in a single-threaded worker process)."""
    variant, method, train, evaluation, root, steps = job
    import torch

    torch.set_num_threads(1)
    from scale.cli import main
    from scale.evaluate import evaluate
    from scale.export import load_checkpoint_model

    run_dir = Path(root) / "runs" / f"{variant}-{method}"
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    start = time.time()
    main(["fit", "--config", str(ROOT / "configs" / "bench_robustness.yaml"), "--data.train_shards", train,
          "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
          "--trainer.max_steps", str(steps), *METHODS[method]])  # fmt: skip
    model = load_checkpoint_model(run_dir / "checkpoints" / "last.ckpt")
    metrics = evaluate(model, evaluation)
    result = {
        "variant": variant, "method": method, "seconds": round(time.time() - start, 1),
        "map@10": metrics["coarse"]["map@10"], "fine_map@10": metrics["fine"]["map@10"],
        "probe": metrics["linear_probe"]["accuracy"], "weights": harmonization_history(run_dir),
    }  # fmt: skip
    result_file.write_text(json.dumps(result))
    return result


def harmonization_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The logged pair weights (train/harmonization/<a>-<b>) over steps, from TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = {}
    for events in run_dir.glob("tensorboard/version_*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            if tag.startswith("train/harmonization/") and "-" in tag:
                history[tag.rsplit("/", 1)[1]] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    return history


def tables(results: list[dict], rates: list[int], settings: list[str], kinds: list[str]) -> str:
    by_key = {(r["variant"], r["method"]): r for r in results}
    lines = []
    for metric, label in (("map@10", "coarse retrieval mAP@10"), ("probe", "linear-probe accuracy")):
        lines += [f"\n{label} (rows: setting, kind, method; columns: corruption rate)\n",
                  "| setting | kind | method | " + " | ".join(f"{r} %" for r in rates) + " |",
                  "|---|---|---|" + "---|" * len(rates)]  # fmt: skip
        for setting in settings:
            for kind in kinds:
                for method in METHODS:
                    cells = []
                    for rate in rates:
                        variant = "clean" if rate == 0 else f"{setting}-{kind}-{rate}"
                        hit = by_key.get((variant, method))
                        cells.append(f"{hit[metric]:.3f}" if hit else "")
                    lines.append(f"| {setting} | {KIND_LABELS[kind]} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_weights(results: list[dict], rates: list[int], path: Path) -> None:
    """Mean weight of the text pairs over training, per corruption rate (text settings, harmonized)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["variant"].split("-")[1] for r in results if r["variant"].startswith("text-")})
    if not kinds:
        return
    figure, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        for rate in rates:
            variant = "clean" if rate == 0 else f"text-{kind}-{rate}"
            hit = next((r for r in results if r["variant"] == variant and r["method"] == "harmonized"), None)
            if not hit:
                continue
            series = [v for k, v in hit["weights"].items() if "text" in k.split("-")]
            if not series:
                continue
            steps = [s for s, _ in series[0]]
            mean = [sum(s[i][1] for s in series) / len(series) for i in range(len(steps))]
            axis.plot(steps, mean, label=f"{rate} %")
        axis.axhline(1.0, color="grey", linewidth=0.5)
        axis.set(title=f"text {KIND_LABELS[kind]}: weight of text pairs", xlabel="step", ylabel="mean pair weight")
        axis.legend(title="corrupted")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench/robustness")
    parser.add_argument("--rates", default="0,20,50,80,100")
    parser.add_argument("--settings", default="text,image,mixed")
    parser.add_argument("--kinds", default="missing,swap")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--products", type=int, default=480, help="training products (eval: half)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    args = parser.parse_args()
    out = Path(args.out)
    rates = [int(r) for r in args.rates.split(",")]
    settings, kinds, methods = args.settings.split(","), args.kinds.split(","), args.methods.split(",")
    start = time.time()
    variants = prepare_data(out, rates, settings, kinds, args.products)
    print(f"data: {len(variants)} variants in {time.time() - start:.0f} s", flush=True)
    jobs = [(v, m, *shards, str(out), args.steps) for v, shards in variants.items() for m in methods]
    results = []
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        for result in pool.map(run_one, jobs):
            if "error" in result:
                print(f"{result['variant']:>20} {result['method']:>11}  FAILED: {result['error']}", flush=True)
                continue
            results.append(result)
            print(f"{result['variant']:>20} {result['method']:>11}  mAP@10 {result['map@10']:.3f}  "
                  f"probe {result['probe']:.3f}  ({result['seconds']} s)", flush=True)  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = tables(results, rates, settings, kinds)
    (out / "results.md").write_text(report + "\n")
    plot_weights(results, rates, out / "harmonization.png")
    print(report)
    print(f"\n{len(jobs)} runs in {time.time() - start:.0f} s; wrote {out}/results.md, results.json, harmonization.png")


if __name__ == "__main__":
    main()
