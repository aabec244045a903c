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
