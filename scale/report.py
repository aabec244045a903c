"""Pictures of an evaluation, written next to its metrics.json and linked from a small report.md.

- `harmonization.png`: the 5 x 5 harmonization weights (pairs off the diagonal, the per-modality
  task weights on it), the mean over the evaluated products, per model state;
- `harmonization_trajectory.png`: each pair's mean weight over training, read from the run's
  TensorBoard logs (`train/harmonization/<a>-<b>`, logged every `log_every_n_steps`);
- `precision_at_k.png`: coarse and fine retrieval Prec@K per embedding kind, trained vs random;
- `projection.png`: a 2-D t-SNE (PCA beyond 5,000 products) of the `fused` and `contrastive`
  embeddings, coloured by category.

matplotlib draws off screen (Agg); nothing here is needed to compute a metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PICTURES = ("harmonization.png", "harmonization_trajectory.png", "precision_at_k.png", "projection.png")
REPORT = "report.md"
TSNE_LIMIT = 5000
"""Beyond this many products the projection is PCA: t-SNE's cost grows with N log N and minutes."""


def outputs(metrics_path: Path) -> list[Path]:
    """The files `write_report` may write beside `metrics_path`."""
    return [metrics_path.parent / name for name in (*PICTURES, REPORT)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def harmonization_heatmap(results: dict[str, dict], path: Path) -> Path:
    plt = _pyplot()
    states = list(results)
    fig, axes = plt.subplots(1, len(states), figsize=(4.6 * len(states), 4.2), squeeze=False)
    for ax, state in zip(axes[0], states):
        summary = results[state]["harmonization"]
        names, weights = summary["modalities"], np.asarray(summary["mean_weights"])
        image = ax.imshow(weights, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if weights[i, j] < weights.mean() else "black")  # fmt: skip
        ax.set_title(f"{state}: mean weight\n(pairs; diagonal = task weight)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_trajectories(tensorboard: str | Path, prefix: str = "train/harmonization/") -> dict[str, list[tuple[int, float]]]:
    """{pair or modality: [(step, value), ...]} from every event file under `tensorboard` (the last
    run's values win where two runs logged the same step, as a resumed run does)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for events in sorted(Path(tensorboard).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            if tag.startswith(prefix):
                points = series.setdefault(tag[len(prefix):], {})
                points.update((event.step, event.value) for event in accumulator.Scalars(tag))
    return {name: sorted(points.items()) for name, points in series.items()}


def harmonization_trajectory(tensorboard: str | Path, path: Path) -> Path | None:
    series = read_trajectories(tensorboard)
    if not series:
        return None
    plt = _pyplot()
    fig, (pairs_ax, tasks_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in sorted(series.items()):
        steps, values = zip(*points)
        (pairs_ax if "-" in name else tasks_ax).plot(steps, values, label=name, linewidth=1.2)
    for ax, title in ((pairs_ax, "pair weights (contrastive)"), (tasks_ax, "task weights (masked modeling)")):
        ax.set_xlabel("step")
        ax.set_ylabel("mean weight")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def precision_at_k(results: dict[str, dict], path: Path) -> Path:
    plt = _pyplot()
    states = list(results)
    kinds = list(results[states[0]]["embeddings"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / (len(states) * 3)
    for ax, task in zip(axes, ("coarse", "fine")):
        for s, state in enumerate(states):
            for k_index, k in enumerate((1, 5, 10)):
                values = [results[state]["embeddings"][kind].get(task, {}).get(f"prec@{k}", np.nan) for kind in kinds]
                offset = (s * 3 + k_index) * width - 0.4 + width / 2
                ax.bar(np.arange(len(kinds)) + offset, values, width, label=f"{state} P@{k}",
                       alpha=1.0 if s == 0 else 0.45, color=f"C{k_index}")  # fmt: skip
        ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"{task} retrieval precision at K", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def projection(data: dict[str, Any], path: Path, seed: int = 0) -> Path:
    """2-D map of the `fused` and `contrastive` query embeddings of the labelled products."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    plt = _pyplot()
    labelled = np.array([x is not None for x in data["label"]])
    labels = data["label"][labelled].astype(str)
    classes, colour = np.unique(labels, return_inverse=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, kind in zip(axes, ("fused", "contrastive")):
        x = data[f"query/{kind}"][labelled]
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        if len(x) <= TSNE_LIMIT and len(x) > 5:
            method = "t-SNE"
            points = TSNE(2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed).fit_transform(x)
        else:
            method, points = "PCA", PCA(2, random_state=seed).fit_transform(x)
        ax.scatter(points[:, 0], points[:, 1], c=colour, cmap="tab20", s=9)
        ax.set_title(f"{kind} ({method}, {len(classes)} categories)", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _headline(results: dict[str, dict]) -> list[str]:
    lines = ["| embedding | " + " | ".join(f"{s} coarse mAP@10 | {s} fine mAP@10 | {s} probe acc | {s} NMI" for s in results) + " |"]
    lines.append("|---" * (1 + 4 * len(results)) + "|")
    kinds = list(next(iter(results.values()))["embeddings"])

    def cell(state: str, kind: str, task: str, key: str) -> str:
        value = results[state]["embeddings"][kind].get(task, {}).get(key)
        return f"{value:.3f}" if isinstance(value, float) else "-"

    for kind in kinds:
        cells = [cell(s, kind, t, k) for s in results
                 for t, k in (("coarse", "map@10"), ("fine", "map@10"), ("linear_probe", "accuracy"), ("clustering", "nmi"))]  # fmt: skip
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


def write_report(metrics_path: Path, results: dict[str, dict], embeddings: dict[str, dict],
                 tensorboard: str | Path | None = None, seed: int = 0) -> Path:  # fmt: skip
    """The pictures and report.md beside `metrics_path` (which the caller writes)."""
    folder = metrics_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    drawn = {"harmonization.png": harmonization_heatmap(results, folder / "harmonization.png"),
             "precision_at_k.png": precision_at_k(results, folder / "precision_at_k.png"),
             "projection.png": projection(embeddings["trained"], folder / "projection.png", seed)}  # fmt: skip
    if tensorboard is not None:
        trajectory = harmonization_trajectory(tensorboard, folder / "harmonization_trajectory.png")
        if trajectory is not None:
            drawn["harmonization_trajectory.png"] = trajectory
    trained = results["trained"]
    lines = [
        "# Evaluation report", "",
        f"{trained['products']} products ({trained['labelled']} with a category, {trained['with_instance']} with an "
        f"instance id); queries from {'+'.join(trained['query'])}, gallery from {'+'.join(trained['gallery'])}; "
        f"{trained['ap']} AP. All numbers: [{metrics_path.name}]({metrics_path.name}).", "",
        *_headline(results), "",
        "## Retrieval precision at K", "", "![precision at K](precision_at_k.png)", "",
        "## Embeddings, coloured by category", "", "![projection](projection.png)", "",
        "## Harmonization weights", "", "![harmonization](harmonization.png)", "",
    ]  # fmt: skip
    if "harmonization_trajectory.png" in drawn:
        lines += ["Over training (from the TensorBoard logs):", "", "![trajectory](harmonization_trajectory.png)", ""]
    report = folder / REPORT
    report.write_text("\n".join(lines))
    return report
