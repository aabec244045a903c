"""Training-step performance, each figure measured side by side in one run (`make bench`).

    python bench/performance.py                    # every benchmark, about 15 min on 2 CPU cores (best of 3 steps)
    python bench/performance.py --only absent      # one (utilisation, overhead, peer, contrastive, absent, feed, micro)
    python bench/performance.py --quick            # tiny sizes: checks the script runs (tests/test_bench.py)

1. utilisation: training-step throughput of configs/base.yaml and configs/m5product_features.yaml,
   the FLOPs of a step counted by `torch.utils.flop_counter` (forward + backward, masked modelling
   on), against a large matmul in the same dtype timed in the same run: fp32 on CPU, bf16 on a GPU.
2. overhead: the same model and batches stepped by a plain PyTorch loop and by `SCALEModule` under a
   Lightning `Trainer` (logging, hooks, optimizer wrapper); target <= 5 %.
3. peer: the image-text subset against open_clip's training step at matched tower sizes, batch and
   precision (`open-clip-torch` from PyPI, installed into the venv by this benchmark only).
4. contrastive: time and peak memory of the inter-modality loss on 2 processes as the global batch
   doubles, in blocks of queries (`contrastive.chunk_size`) and in one block.
5. absent: step time of the features config with 0/20/50/80 % of samples missing video and audio,
   and on M5Product-like batches, packed (`pack_tokens`) and padded; target: an absent modality
   costs at most 10 % of a present one.
6. feed: CPU cores per GPU needed to feed configs/base.yaml from raw media (bench/data.py), decoding
   the MP4s, with the frames extracted at conversion (`scale shards --extract-frames`) and with
   the images downscaled at conversion too (`--shrink-images` at `image.size`), in one process and
   through 0, 1 and 2 data workers, and with the small JPEGs decoded on the GPU (host cores only).
7. micro: the features config's training step with the batch in 1 and in 4 micro-batches
   (`micro_batches`, the contrastive loss still over the whole batch): s/step and the peak memory
   above weights, gradients and optimizer state (peak RSS on CPU, allocated on a GPU), each in a
   fresh process.

Writes `<out>/results.json`; docs/performance.md holds the latest table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scale.config import ModelConfig, OptimizerConfig  # noqa: E402
from scale.model import SCALE  # noqa: E402
from scale.modalities import stem_class  # noqa: E402

BENCHMARKS = ("utilisation", "overhead", "peer", "contrastive", "absent", "feed", "micro")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BF16 = DEVICE.type == "cuda"


# ---- helpers ----------------------------------------------------------------------------------------
def model_config(name: str, **overrides: Any) -> ModelConfig:
    data = yaml.safe_load((ROOT / "configs" / name).read_text())["model"]["config"]
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if key:
            data.setdefault(section, {})[key] = value
        else:
            data[section] = value
    return ModelConfig.from_dict(data)


def make_batch(config: ModelConfig, size: int, present: torch.Tensor | None = None,
               lengths: dict[str, torch.Tensor] | None = None) -> dict:
    """Random valid inputs from each stem's `example`; `present` (size, M) in config.modalities
    order (default all); `lengths` gives text/table rows their real token counts (right padding)."""
    batch: dict[str, Any] = {"key": [f"k{i}" for i in range(size)]}
    for index, name in enumerate(config.modalities):
        inputs = stem_class(config, name).example(getattr(config, name), size)
        inputs["present"] = torch.ones(size, dtype=torch.bool) if present is None else present[:, index].clone()
        if lengths and name in lengths:
            pad = torch.arange(inputs["attention_mask"].shape[1])[None, :] >= lengths[name][:, None]
            inputs["attention_mask"][pad] = 0
            inputs["input_ids"][pad] = 0
        batch[name] = {k: v.to(DEVICE) for k, v in inputs.items()}
    return batch


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def train_step(model: SCALE, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=BF16):
        loss = model(batch, masked_modeling=True, returns="losses")["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def seconds_per_call(fn: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    """Best wall seconds of `fn` over `repeats` calls after `warmup` (the best, not the median: on
    a shared machine other work only ever adds time)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def build(config: ModelConfig) -> tuple[SCALE, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = SCALE(config, load_weights=False).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEVICE.type == "cuda")
    return model, optimizer


def step_flops(model: SCALE, batch: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=BF16):
        model(batch, masked_modeling=True, returns="losses")["loss"].backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def matmul_peak(size: int, repeats: int) -> float:
    """FLOP/s of a (size x size) @ (size x size) matmul in the training dtype."""
    dtype = torch.bfloat16 if BF16 else torch.float32
    a, b = (torch.randn(size, size, device=DEVICE, dtype=dtype) for _ in range(2))
    return 2 * size**3 / seconds_per_call(lambda: a @ b, repeats, warmup=2)


# ---- 1. utilisation ---------------------------------------------------------------------------------
def utilisation(args: argparse.Namespace) -> dict:
    peak = matmul_peak(512 if args.quick else (8192 if BF16 else 2048), 3 if args.quick else 10)
    rows = {}
    for name in ("base.yaml", "m5product_features.yaml"):
        config = model_config(name) if not args.quick else tiny(name)
        model, optimizer = build(config)
        batch = make_batch(config, args.batch)
        flops = step_flops(model, batch)  # also the warm-up: the same forward and backward
        seconds = seconds_per_call(lambda: train_step(model, optimizer, batch), args.steps, warmup=0)
        rows[name] = {"batch": args.batch, "gflops_per_sample": flops / args.batch / 1e9,
                      "samples_per_s": args.batch / seconds, "utilisation": flops / seconds / peak}
        del model, optimizer
    return {"peak_tflops": peak / 1e12, "dtype": "bf16" if BF16 else "fp32", "models": rows}


def tiny(name: str) -> ModelConfig:
    """--quick: the test-sized model with the named config's stems."""
    stems = {"m5product_features.yaml": {"image.stem": "regions", "video.stem": "features", "audio.stem": "features"}}
    return model_config("test_tiny.yaml", **stems.get(name, {}))


# ---- 2. framework overhead --------------------------------------------------------------------------
def overhead(args: argparse.Namespace) -> dict:
    import lightning as L

    from scale.module import SCALEModule

    config = model_config("test_tiny.yaml" if args.quick else "smoke.yaml")
    batches = [make_batch(config, args.overhead_batch) for _ in range(4)]
    # 20 steps a round (5 on the quick run): the difference measured is a few %, the VM's noise more.
    steps, rounds = (4, 1) if args.quick else (20, 3)

    class StepTimes(L.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, *_: Any) -> None:
            sync()
            self.starts.append(time.perf_counter())

    model, optimizer = build(config)
    torch.manual_seed(0)
    module = SCALEModule(config, OptimizerConfig(lr=1e-5, warmup_ratio=0.0))
    plain, lightning = [], []
    # Alternating rounds, best step of each: the machine's speed drifts more than the difference.
    for _ in range(rounds):
        cycle = iter(batches * (steps + 2))
        plain.append(seconds_per_call(lambda: train_step(model, optimizer, next(cycle)), steps, warmup=4))
        times = StepTimes()
        trainer = L.Trainer(max_steps=steps + 4, accelerator=DEVICE.type, devices=1, logger=False, callbacks=[times],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            precision="bf16-mixed" if BF16 else "32-true", log_every_n_steps=10)  # fmt: skip
        trainer.fit(module, torch.utils.data.DataLoader(batches * ((steps + 4) // 4 + 1), batch_size=None))
        lightning.append(min(b - a for a, b in zip(times.starts[4:], times.starts[5:])))
    return {"config": "test_tiny.yaml" if args.quick else "smoke.yaml", "batch": args.overhead_batch,
            "plain_s_per_step": min(plain), "lightning_s_per_step": min(lightning),
            "overhead": min(lightning) / min(plain) - 1}


# ---- 3. peer: open_clip -----------------------------------------------------------------------------
def peer(args: argparse.Namespace) -> dict:
    try:
        import open_clip
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "open-clip-torch", "ftfy", "wcwidth"], check=True)
        import open_clip
    from open_clip.loss import ClipLoss
    from torch.utils.flop_counter import FlopCounterMode

    width, layers, heads, size, patch, text_len = (64, 2, 2, 32, 16, 16) if args.quick else (384, 6, 6, 224, 16, 36)
    batch = args.peer_batch
    clip_cfg = {
        "embed_dim": 512,
        "vision_cfg": {"image_size": size, "layers": layers, "width": width, "head_width": width // heads, "patch_size": patch, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": text_len, "vocab_size": 30522, "width": width, "heads": heads, "layers": layers, "mlp_ratio": 4.0},
    }
    torch.manual_seed(0)
    clip = open_clip.CLIP(**clip_cfg).to(DEVICE).train()
    clip_opt = torch.optim.AdamW(clip.parameters(), lr=1e-5, fused=DEVICE.type == "cuda")
    loss_fn = ClipLoss()
    images = torch.randn(batch, 3, size, size, device=DEVICE)
    texts = torch.randint(1000, 5000, (batch, text_len), device=DEVICE)

    def clip_step() -> None:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=BF16):
            image_features, text_features, scale = clip(images, texts)
            loss = loss_fn(image_features, text_features, scale)
        loss.backward()
        clip_opt.step()
        clip_opt.zero_grad(set_to_none=True)

    # Ours at the same sizes: image ViT and text BERT of the same width/depth, contrastive only
    # (no masked modelling, so both steps compute the same objective), fusion of one layer.
    config = model_config(
        "test_tiny.yaml", modalities=["text", "image"],
        text={"max_tokens": text_len, "hidden": width, "layers": layers, "heads": heads, "mlp": 4 * width, "masked_modeling": False},
        image={"size": size, "patch": patch, "hidden": width, "layers": layers, "heads": heads, "masked_modeling": False},
        fusion={"width": width, "layers": 1, "heads": heads, "mlp": 4 * width, "dropout": 0.0},
        contrastive={"projection_dim": 512},
    )  # fmt: skip
    model, optimizer = build(config)
    ours_batch = make_batch(config, batch)
    ours_batch["image"]["pixels"] = images
    results = {}
    for label, fn in (("open_clip", clip_step), ("scale", lambda: train_step(model, optimizer, ours_batch))):
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        counter = FlopCounterMode(display=False)
        with counter:  # one step, also the warm-up: the two steps differ in work (ours has the fusion layer)
            fn()
        seconds = seconds_per_call(fn, args.steps, warmup=0)
        memory = torch.cuda.max_memory_allocated() / 2**20 if DEVICE.type == "cuda" else None
        results[label] = {"samples_per_s": batch / seconds, "peak_mib": memory,
                          "gflops_per_sample": counter.get_total_flops() / batch / 1e9}
    parameters = {"open_clip": sum(p.numel() for p in clip.parameters()), "scale": sum(p.numel() for p in model.parameters())}
    return {"batch": batch, "width": width, "layers": layers, "image_size": size, "text_tokens": text_len,
            "parameters": parameters, **results,
            "ratio": results["scale"]["samples_per_s"] / results["open_clip"]["samples_per_s"],
            "flop_rate_ratio": (results["scale"]["samples_per_s"] * results["scale"]["gflops_per_sample"])
            / (results["open_clip"]["samples_per_s"] * results["open_clip"]["gflops_per_sample"])}


# ---- 4. contrastive scaling -------------------------------------------------------------------------
def _autograd_contrastive(features: dict, present: dict, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """The loss as it was before `scale/pair_loss.py`: autograd over the full logits of every pair
    and direction, all kept for the backward pass (the reference column)."""
    from itertools import combinations

    import torch.distributed as dist
    import torch.nn.functional as F

    from scale.losses import gather_no_grad, gather_with_grad

    names, rank = list(features), dist.get_rank()
    batch = len(next(iter(present.values())))
    keys = {m: gather_with_grad(features[m]) for m in names}
    key_present = {m: gather_no_grad(present[m]) for m in names}
    labels = torch.arange(batch) + rank * batch
    total = []
    for (i, a), (j, b) in combinations(enumerate(names), 2):
        valid = present[a] & present[b]
        for (qi, q), (ki, k) in (((i, a), (j, b)), ((j, b), (i, a))):
            logits = (features[q] @ keys[k].T) / temperature * weights[:, qi, ki, None]
            logits = logits.masked_fill(~key_present[k][None, :], float("-inf"))
            total.append(F.cross_entropy(logits[valid], labels[valid]))
    return torch.stack(total).mean()


def _contrastive_worker(rank: int, port: int, sizes: tuple[int, ...], dim: int, out: str) -> None:
    """Every (global batch, variant) in one pair of processes: a spawn per configuration cost more
    in interpreter start-up than the losses themselves."""
    import torch.distributed as dist

    from scale.losses import contrastive_loss

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # two ranks share the machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    names = ("text", "table", "image", "video", "audio")
    rows = []
    for global_batch in sizes:
        local = global_batch // 2
        torch.manual_seed(rank)
        leaves = {m: torch.randn(local, dim, requires_grad=True) for m in names}
        present = {m: torch.rand(local) > 0.1 for m in names}
        weights = torch.rand(local, 5, 5) + 0.5
        for chunk in ("autograd", None, 256):
            saved = [0]

            def keep(tensor: torch.Tensor) -> torch.Tensor:
                saved[0] += tensor.numel() * tensor.element_size()
                return tensor

            def step() -> None:
                saved[0] = 0
                # What the backward pass holds: every tensor autograd saves, counted as it is saved.
                with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
                    features = {m: torch.nn.functional.normalize(v, dim=-1) for m, v in leaves.items()}
                    if chunk == "autograd":
                        loss = _autograd_contrastive(features, present, weights, 0.07)
                    else:
                        loss, *_ = contrastive_loss(features, present, weights, 0.07, chunk_size=chunk)
                loss.backward()

            seconds = seconds_per_call(step, 2)
            rows.append({"global_batch": global_batch, "chunk": chunk, "seconds": seconds, "saved_mib": saved[0] / 2**20})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def contrastive(args: argparse.Namespace) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    sizes = (256,) if args.quick else (1024, 2048, 4096)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        port = 29700 + os.getpid() % 1000
        mp.spawn(_contrastive_worker, args=(port, sizes, 256, out.name), nprocs=2, join=True)
        rows = json.loads(Path(out.name).read_text())
    return {"rows": rows, "dim": 256, "modalities": 5, "processes": 2}


# ---- 5. absent modalities and M5Product-like batches ------------------------------------------------
def absent(args: argparse.Namespace) -> dict:
    base = tiny("m5product_features.yaml") if args.quick else model_config("m5product_features.yaml")
    names = base.modalities
    size = args.absent_batch
    generator = torch.Generator().manual_seed(0)

    def missing_video_audio(count: int) -> torch.Tensor:
        present = torch.ones(size, len(names), dtype=torch.bool)
        for m in ("video", "audio"):
            present[:count, names.index(m)] = False
        return present

    def m5product_like() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """About 20 % of products missing at least one modality, 5 % with a single one; titles and
        tables of spread lengths (M5Product's are mostly shorter than the limits)."""
        present = torch.ones(size, len(names), dtype=torch.bool)
        roll = torch.rand(size, generator=generator)
        for row in range(size):
            if roll[row] < 0.05:
                present[row] = False
                present[row, names.index("image")] = True
            elif roll[row] < 0.20:
                present[row, torch.randint(2, len(names), (1,), generator=generator)] = False
        lengths = {m: torch.randint(getattr(base, m).max_tokens // 3, getattr(base, m).max_tokens + 1, (size,), generator=generator)
                   for m in ("text", "table")}  # fmt: skip
        return present, lengths

    # The share each row is labelled with is the one it has: round(0.2 * 8) = 2 rows are 25 %.
    counts = sorted({round(share * size) for share in (0.0, 0.2, 0.5, 0.8, 1.0)})
    missing = {f"{round(100 * count / size)} % missing video+audio": count for count in counts}
    cases = {label: (missing_video_audio(count), None) for label, count in missing.items()}
    cases["M5Product-like"] = m5product_like()
    every, none = next(iter(missing)), list(missing)[-1]
    rows: dict[str, dict[str, float]] = {}
    for packed in (True, False):
        config = model_config("m5product_features.yaml", pack_tokens=packed) if not args.quick else tiny("m5product_features.yaml")
        config.pack_tokens = packed
        model, optimizer = build(config)
        mode = "packed" if packed else "padded"
        for index, (label, (present, lengths)) in enumerate(cases.items()):
            batch = make_batch(config, size, present, lengths)
            row = rows.setdefault(label, {})
            row[f"{mode}_gflops"] = step_flops(model, batch) / 1e9  # also the warm-up: the same forward and backward
            # Padded, the step computes every modality whatever is present (its counted FLOPs show
            # it row by row): timed on two rows only, which keeps `make bench` within its budget.
            # The first row also warms up the optimizer (its state is allocated on the first step).
            if packed or label in (every, "M5Product-like"):
                row[mode] = seconds_per_call(lambda: train_step(model, optimizer, batch), args.steps, warmup=int(index == 0))
        del model, optimizer
    # An absent modality's cost as a share of a present one's: the step's excess over the ideal
    # (all-present minus the share of video+audio's cost, measured packed between 0 % and 100 %),
    # in counted FLOPs (exact) and packed in seconds (noisy on a shared CPU).
    # Each mode against its own all-present step: padded pays ~100 % by construction.
    for unit, suffix, modes in (("flops", "_gflops", ("packed", "padded")), ("time", "", ("packed",))):
        present_cost = rows[every][f"packed{suffix}"] - rows[none][f"packed{suffix}"]
        for label, count in missing.items():
            share = count / size
            if label not in (every, none):
                for mode in modes:
                    excess = rows[label][f"{mode}{suffix}"] - (rows[every][f"{mode}{suffix}"] - share * present_cost)
                    rows[label][f"absent_cost_{unit}_{mode}"] = excess / (share * present_cost) if present_cost > 0 else float("nan")
    return {"batch": size, "rows": rows}


# ---- 6. raw media feed ------------------------------------------------------------------------------
def feed(args: argparse.Namespace) -> dict:
    out = Path(args.out) / "feed"
    command = [sys.executable, str(ROOT / "bench" / "data.py"), "--out", str(out)]
    command += ["--quick"] if args.quick else ["--samples", "24", "--repeats", "1", "--video-compare", "4"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((out / "results.json").read_text())
    gpu = results["gpu"]
    return {"cores_per_gpu": gpu["cores_per_gpu"], "cores_per_gpu_with_strips": gpu["cores_per_gpu_with_strips"],
            "cores_per_gpu_with_strips_and_small_images": gpu["cores_per_gpu_with_strips_and_small_images"],
            "cores_per_gpu_through_workers": gpu["cores_per_gpu_through_workers"],
            "host_cores_per_gpu_decoding_on_device": gpu["host_cores_per_gpu_decoding_on_device"],
            "cores_per_gpu_without_video": gpu["cores_per_gpu_at_limit_without_video"],
            "gpu_samples_per_s": gpu["gpu_samples_per_s"], "measured_gpu_rate": gpu["measured_gpu_rate"], "target": 16}


# ---- 7. micro-batches (feature cache) --------------------------------------------------------------
def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Start a new memory peak; returns the memory in use now (GPU: allocated; CPU: RSS)."""
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    # Linux: writing 5 to clear_refs resets the RSS high-water mark (VmHWM), which setup raised.
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def _peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if DEVICE.type == "cuda" else _status_bytes("VmHWM")


def _micro_worker(rank: int, quick: bool, batch_size: int, micro_batches: int, steps: int, out: str) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    config = tiny("m5product_features.yaml") if quick else model_config("m5product_features.yaml")
    config.micro_batches = micro_batches
    model, optimizer = build(config)
    batch = make_batch(config, batch_size)
    # Gradients and AdamW's state exist before the measured steps: the peak above them is the step's.
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    before = _reset_peak()

    def step() -> None:
        train_step(model, optimizer, batch)
        for parameter in model.parameters():  # keep the gradients allocated (train_step frees them)
            parameter.grad = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad

    seconds = seconds_per_call(step, steps, warmup=0)
    Path(out).write_text(json.dumps({"seconds": seconds, "peak_mib": (_peak_bytes() - before) / 2**20}))


def micro(args: argparse.Namespace) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    size = 4 if args.quick else args.micro_batch
    rows = {}
    for micro_batches in (1, 4):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            mp.spawn(_micro_worker, args=(args.quick, size, micro_batches, 1 if args.quick else 2, out.name), nprocs=1, join=True)
            rows[str(micro_batches)] = json.loads(Path(out.name).read_text())
    return {"batch": size, "rows": rows, "memory": "allocated" if DEVICE.type == "cuda" else "peak RSS"}


# ---- report -----------------------------------------------------------------------------------------
def report(results: dict) -> str:
    lines = [f"machine: {results['machine']}"]
    if "utilisation" in results:
        u = results["utilisation"]
        lines.append(f"\n1. utilisation ({u['dtype']}, measured matmul peak {u['peak_tflops'] * 1e3:.0f} GFLOP/s)")
        for name, r in u["models"].items():
            lines.append(f"  {name:26s} batch {r['batch']}: {r['samples_per_s']:.2f} samples/s, "
                         f"{r['gflops_per_sample']:.1f} GFLOP/sample, {100 * r['utilisation']:.0f} % of peak")
    if "overhead" in results:
        o = results["overhead"]
        lines.append(f"\n2. framework overhead ({o['config']}, batch {o['batch']}): plain loop {o['plain_s_per_step'] * 1e3:.0f} ms/step, "
                     f"Lightning {o['lightning_s_per_step'] * 1e3:.0f} ms/step: {100 * o['overhead']:+.1f} % (target <= 5 %)")
    if "peer" in results:
        p = results["peer"]
        mem = lambda r: f", peak {r['peak_mib']:.0f} MiB" if r["peak_mib"] else ""  # noqa: E731
        lines.append(f"\n3. peer: image-text, width {p['width']} x {p['layers']} layers, {p['image_size']} px, batch {p['batch']}")
        for label in ("open_clip", "scale"):
            lines.append(f"  {label:10s} {p[label]['samples_per_s']:.1f} samples/s{mem(p[label])}, {p['parameters'][label] / 1e6:.1f} M parameters, "
                         f"{p[label]['gflops_per_sample']:.2f} GFLOP/sample (counted)")
        lines.append(f"  scale / open_clip: x{p['ratio']:.2f} samples/s (target >= 1.0), x{p['flop_rate_ratio']:.2f} FLOP/s")
    if "contrastive" in results:
        c = results["contrastive"]
        lines.append(f"\n4. contrastive loss, {c['processes']} processes, {c['modalities']} modalities, dim {c['dim']} (fwd + bwd per rank)")
        lines.append("  (s per step, and MiB autograd keeps for the backward, per rank; autograd: the full logits kept, as before blocks)")
        lines.append(f"  {'global batch':>12s} {'autograd s':>11s} {'MiB':>7s} {'one block s':>12s} {'MiB':>7s} {'chunk 256 s':>12s} {'MiB':>7s}")
        by = {(r["global_batch"], r["chunk"]): r for r in c["rows"]}
        for n in sorted({r["global_batch"] for r in c["rows"]}):
            cells = "".join(f" {by[(n, k)]['seconds']:{w}.3f} {by[(n, k)]['saved_mib']:7.1f}"
                            for k, w in (("autograd", 11), (None, 12), (256, 12)))
            lines.append(f"  {n:12d}{cells}")
    if "absent" in results:
        a = results["absent"]
        lines.append(f"\n5. absent modalities, features config, batch {a['batch']}: packed vs padded, GFLOP/step (counted) and s/step")
        lines.append("  (absent cost: the share of a present video+audio's cost an absent one still costs; target <= 10 %)")
        lines.append("  (padded: timed with every modality present and on M5Product-like batches; it computes the same whatever is present)")
        lines.append(f"  {'':30s} {'GFLOP packed':>12s} {'padded':>7s} {'s packed':>9s} {'padded':>7s}  {'speed-up':>8s}  absent cost (FLOPs; time)")
        for label, r in a["rows"].items():
            padded, speed_up, extra = f"{'-':>7s}", f"{'':9s}", ""
            if "padded" in r:
                padded, speed_up = f"{r['padded']:7.2f}", f"x{r['padded'] / r['packed']:7.2f}"
            if "absent_cost_flops_packed" in r:
                extra = (f"  packed {100 * r['absent_cost_flops_packed']:.0f} %; {100 * r['absent_cost_time_packed']:.0f} %, "
                         f"padded {100 * r['absent_cost_flops_padded']:.0f} %")
            lines.append(f"  {label:30s} {r['packed_gflops']:12.1f} {r['padded_gflops']:7.1f} {r['packed']:9.2f} {padded}  {speed_up}{extra}")
    if "feed" in results:
        f = results["feed"]
        rate = "measured" if f["measured_gpu_rate"] else "assumed"
        cores = ", ".join(f"{k} {v:.0f}" for k, v in f["cores_per_gpu"].items())
        strips = ", ".join(f"{k} {v:.0f}" for k, v in f["cores_per_gpu_with_strips"].items())
        small = ", ".join(f"{k} {v:.0f}" for k, v in f["cores_per_gpu_with_strips_and_small_images"].items())
        lines.append(f"\n6. raw media feed: cores per GPU at {f['gpu_samples_per_s']:.0f} samples/s per GPU ({rate}), target <= {f['target']}:")
        lines.append(f"  decoding the MP4s: {cores}; frames extracted at conversion (--extract-frames): {strips}; "
                     f"and images downscaled (--shrink-images): {small}; "
                     f"no video decode at all (features stem): {f['cores_per_gpu_without_video']:.0f}")
        workers = ", ".join(f"{k} workers {v:.0f}" for k, v in f["cores_per_gpu_through_workers"].items())
        lines.append(f"  through data workers (strips and small images, the training stream): {workers}")
        on_device = ", ".join(f"{k} workers {v:.0f}" for k, v in f["host_cores_per_gpu_decoding_on_device"].items())
        lines.append(f"  and those JPEGs decoded on the GPU (decode_on: device), host cores only: {on_device}")
    if "micro" in results:
        m = results["micro"]
        one, four = m["rows"]["1"], m["rows"]["4"]
        lines.append(f"\n7. micro-batches, features config, batch {m['batch']} ({m['memory']} above weights, gradients, optimizer state):")
        lines.append(f"  1 piece: {one['seconds']:.2f} s/step, {one['peak_mib']:.0f} MiB; 4 pieces: {four['seconds']:.2f} s/step, "
                     f"{four['peak_mib']:.0f} MiB: memory x{four['peak_mib'] / max(one['peak_mib'], 1e-9):.2f}, time x{four['seconds'] / one['seconds']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench-performance")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes (the test)")
    parser.add_argument("--batch", type=int, help="batch of utilisation (default 8; GPU 64; quick 4)")
    parser.add_argument("--absent-batch", type=int, help="batch of absent (default 10, where 20/50/80 %% are whole rows; GPU 80; quick 5)")
    parser.add_argument("--overhead-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=16, help="batch of micro (default 16)")
    parser.add_argument("--peer-batch", type=int, help="default 16; GPU 256; quick 4")
    parser.add_argument("--steps", type=int, help="timed steps per measurement, the best kept (default 3; GPU 10; quick 1)")
    args = parser.parse_args(argv)
    gpu = DEVICE.type == "cuda"
    args.batch = args.batch or (4 if args.quick else 64 if gpu else 8)
    args.absent_batch = args.absent_batch or (5 if args.quick else 80 if gpu else 10)
    args.peer_batch = args.peer_batch or (4 if args.quick else 256 if gpu else 16)
    args.steps = args.steps or (1 if args.quick else 10 if gpu else 3)
    if args.quick:
        args.overhead_batch = 4
    chosen = [b for b in args.only.split(",") if b]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {BENCHMARKS}")
    torch.set_num_threads(os.cpu_count() or 1)
    machine = torch.cuda.get_device_name() if gpu else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    results: dict[str, Any] = {"machine": machine, "torch": torch.__version__}
    for name in chosen:
        start = time.perf_counter()
        results[name] = globals()[name](args)
        results[name]["wall_s"] = time.perf_counter() - start
        print(f"[{name}: {results[name]['wall_s']:.0f} s]", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(report(results))
    return results


if __name__ == "__main__":
    main()
