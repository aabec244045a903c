"""The robustness benchmark's report: tables and the weight plot from (synthetic) run results."""

from __future__ import annotations

import importlib.util

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("robustness", ROOT / "bench" / "robustness.py")
robustness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(robustness)


def fake_results():
    results = []
    for variant in ("clean", "text-swap-50"):
        for method in robustness.METHODS:
            score = 0.6 if variant == "clean" else 0.4
            results.append({"variant": variant, "method": method, "map@10": score, "probe": score + 0.1,
                            "weights": {"text-image": [(10, 1.0), (20, 0.9)], "image-video": [(10, 1.0), (20, 1.1)]}})
    return results


def test_tables_put_each_run_in_its_cell():
    report = robustness.tables(fake_results(), [0, 50], ["text"], ["swap"])
    assert "| text | noise (swap) | harmonized | 0.600 | 0.400 |" in report
    assert "| text | noise (swap) | uniform | 0.700 | 0.500 |" in report  # the probe table


def test_weight_plot_is_written(tmp_path):
    robustness.plot_weights(fake_results(), [0, 50], tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 1000


def test_data_benchmark_quick_run(tmp_path):
    """`bench/data.py --quick`: tiny media through the pipeline and the libraries direct; the table
    is printed and results.json holds positive rates, ratios and a cores-per-GPU figure."""
    import json
    import math
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(ROOT / "bench" / "data.py"), "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pipeline/s/core" in run.stdout and "all five" in run.stdout and "cores per GPU" in run.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["throughput"]["rows"]
    assert {row["modality"] for row in rows} == {"text", "table", "image", "video", "audio", "all five"}
    for row in rows:
        assert row["pipeline"] > 0 and row["direct"] > 0 and 0 < row["ratio"] < 10, row
    limit = results["throughput"]["sum_of_parts_limit"]
    direct = [row["direct"] for row in rows if row["modality"] != "all five"]
    assert limit < min(direct)  # the sum of the parts is slower than any part
    assert all(m["cpu_s_per_video"] > 0 for m in results["video"]["methods"].values())
    gpu = results["gpu"]
    assert gpu["forward_gflops_per_sample"] > 1 and gpu["gpu_samples_per_s"] > 0
    assert all(math.isfinite(c) and c > 0 for c in gpu["cores_per_gpu"].values())
    # Frames extracted at conversion: the video path decodes one small JPEG instead of the MP4.
    strips = results["strips"]
    assert strips["strip_kb"] > 0 and strips["extract_cpu_s_per_video"] > 0
    assert set(gpu["cores_per_gpu_with_strips"]) == set(gpu["cores_per_gpu"])
    assert all(rate > 0 for rate in strips["rates"].values()) and "from the strip" in run.stdout
    # The small copies are made at the training size, as the README recommends (no resize in the loader).
    assert results["small_images"]["side"] == 224 and "--shrink-images 224" in run.stdout
    # Through data workers: every product of the replicated set, with 0, 1 and 2 workers.
    workers = results["workers"]
    assert workers["products"] >= 12 and set(workers["rates"]) == {"0", "1", "2"}
    assert all(value["rate"] > 0 and value["samples"] == workers["products"] for value in workers["rates"].values())
    assert "through data workers" in run.stdout
    # The same with the small JPEGs decoded after the transfer: every image and strip a bitstream
    # (pipeline_pass refuses a run in which the workers decoded any), the host's figure printed.
    device = results["device_decode"]
    assert set(device["rates"]) == {"0", "1", "2"} and device["cpu_ms_per_product"] > 0
    assert all(value["rate"] > 0 and value["samples"] == workers["products"] for value in device["rates"].values())
    assert "decode_on: device" in run.stdout and set(gpu["host_cores_per_gpu_decoding_on_device"]) == {"0", "1", "2"}


def test_retrieval_benchmark_small_gallery():
    """`bench/retrieval.py` on a 20,000-product gallery: it runs, and its working memory stays near
    the budget, far below the N x N matrix (1.5 GiB here)."""
    import re
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(ROOT / "bench" / "retrieval.py"), "--gallery", "20000", "--queries", "300"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    extra = float(re.search(r"memory beyond the embeddings: ([\d.]+) GiB", run.stdout)[1])
    assert extra < 0.6, run.stdout
    assert "300 queries" in run.stdout and re.search(r"mAP@1/5/10 0\.\d+", run.stdout)


def test_performance_benchmark_quick_run(tmp_path):
    """`bench/performance.py --quick` (the peer and feed benchmarks need open_clip and the media
    cache: `make bench` runs them): every figure is measured, finite and printed."""
    import json
    import math
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(ROOT / "bench" / "performance.py"), "--quick", "--out", str(tmp_path),
                          "--only", "utilisation,overhead,contrastive,absent,micro"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for heading in ("1. utilisation", "2. framework overhead", "4. contrastive loss", "5. absent modalities", "7. micro-batches"):
        assert heading in run.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    for row in results["utilisation"]["models"].values():
        assert row["gflops_per_sample"] > 0 and 0 < row["utilisation"] < 1.5
    assert math.isfinite(results["overhead"]["overhead"])
    assert {(r["global_batch"], r["chunk"]) for r in results["contrastive"]["rows"]} == {(256, "autograd"), (256, None), (256, 256)}
    rows = results["absent"]["rows"]
    assert "M5Product-like" in rows and all(r["packed"] > 0 for r in rows.values())
    assert rows["M5Product-like"]["padded"] > 0 and rows["0 % missing video+audio"]["padded"] > 0
    # Counted FLOPs are exact: packing computes less wherever something is absent, never more.
    assert all(r["packed_gflops"] <= r["padded_gflops"] * 1.0001 for r in rows.values())
    assert {"20 % missing video+audio", "80 % missing video+audio"} <= set(rows)  # whole rows at batch 5
    assert rows["80 % missing video+audio"]["packed_gflops"] < 0.9 * rows["80 % missing video+audio"]["padded_gflops"]
    assert set(results["micro"]["rows"]) == {"1", "4"}
    assert all(r["seconds"] > 0 and r["peak_mib"] >= 0 for r in results["micro"]["rows"].values())
