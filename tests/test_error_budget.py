"""One error budget for the whole job: counted across data workers and ranks, kept across epochs and
resumes, and when it is exceeded every rank stops with the same one line and a non-zero exit.
Real `scale fit` processes, two data workers, exact epochs, real DDP."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from datamodules.error_budget import DataCounts, ErrorBudget
from tests.conftest import ROOT, TINY_YAML

STOPPED = "scale fit: stopped:"


def write_products(folder: Path, bad: list[bool]) -> Path:
    """One shard of title-only products; where `bad`, the record is not JSON (counted as `json`)."""
    folder.mkdir(parents=True)
    with tarfile.open(folder / "shard-000000.tar", "w") as tar:
        for index, is_bad in enumerate(bad):
            data = b"{not json" if is_bad else json.dumps(
                {"title": f"red kettle {index}", "category": index % 4, "instance": f"i{index}"}).encode()
            info = tarfile.TarInfo(f"p{index:04d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (folder / "sizes.json").write_text(json.dumps({"shard-000000.tar": len(bad)}))
    return folder


def fit(shards: Path, run: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "scale.cli", "fit", "--config", str(TINY_YAML), "--data.train_shards", str(shards),
               "--data.mode", "exact", "--trainer.max_steps", "-1", "--data.num_workers", "2",
               "--data.shuffle_buffer", "0", "--trainer.default_root_dir", str(run), *args]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def stop_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(STOPPED)]


def budget_of(checkpoint: Path) -> dict:
    return torch.load(checkpoint, weights_only=True)["callbacks"]["DataErrorStop"]["counts"]


def test_counts_handed_on_with_batches_add_up_to_what_was_counted():
    budget = ErrorBudget(max_error_rate=1.0, min_samples=1, enforce=False)
    handed = DataCounts()
    for index in range(10):
        with budget.sample():
            if index % 3 == 0:
                budget.count("image", f"k{index}", "junk")
                budget.count("image: too large", f"k{index}", "huge")
        if index % 4 == 3:
            handed.add(budget.take())
    budget.count("tar", "shard", "truncated")  # outside a sample: a bad sample of its own
    handed.add(budget.take())
    assert handed.to_dict() == budget.counts.to_dict() == {
        "samples": 11, "bad_samples": 5, "dropped": 0, "errors": {"image": 8, "image: too large": 4, "tar": 1}}
    assert budget.take().to_dict() == DataCounts().to_dict()


@pytest.mark.slow
def test_an_epoch_of_mostly_bad_data_stops_the_run_whatever_the_minimum(tmp_path):
    """Two thirds bad, 60 samples over 2 workers: far under error_rate_min_samples, but the epoch has
    read everything, so its end is a verdict (per-worker counting with a minimum used to exit 0)."""
    shards = write_products(tmp_path / "shards", [index % 3 != 0 for index in range(60)])
    result = fit(shards, tmp_path / "run", "--trainer.max_epochs", "1")
    assert result.returncode != 0
    assert stop_lines(result) == [result.stderr.strip().splitlines()[-1]]
    assert "40 of 60 samples (66.7%) read by this run (all ranks and workers)" in stop_lines(result)[0]
    assert "(errors: json=40)" in stop_lines(result)[0] and "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_stop_fires_mid_epoch_once_the_minimum_is_read(tmp_path):
    shards = write_products(tmp_path / "shards", [index % 3 != 0 for index in range(120)])
    result = fit(shards, tmp_path / "run", "--trainer.max_epochs", "1", "--data.limits.error_rate_min_samples", "20")
    assert result.returncode != 0 and len(stop_lines(result)) == 1
    read = int(stop_lines(result)[0].split(" of ")[1].split()[0])
    assert 20 <= read < 120, stop_lines(result)  # at the first logging step past the minimum, not at the end


@pytest.mark.slow
def test_every_ddp_rank_stops_at_the_same_step_with_the_same_line(tmp_path):
    """Rank 1's half is 80 % bad, rank 0's clean: 40 % over the job. Both ranks stop together (no
    rank left waiting in a collective) with the job's counts."""
    bad = [index >= 40 and index % 5 != 0 for index in range(80)]
    shards = write_products(tmp_path / "shards", bad)
    result = fit(shards, tmp_path / "run", "--trainer.max_epochs", "1", "--trainer.devices", "2",
                 "--trainer.strategy", "ddp", "--data.num_workers", "1", "--data.limits.max_error_rate", "0.3",
                 "--data.limits.error_rate_min_samples", "16")  # fmt: skip
    assert result.returncode != 0
    lines = stop_lines(result)
    assert len(lines) == 2 and lines[0] == lines[1], result.stderr[-3000:]
    assert "read by this run (all ranks and workers)" in lines[0] and "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_budget_is_kept_across_epochs_and_a_resume(tmp_path):
    """10 % bad (at the rate, so no stop): two epochs straight, and one epoch then a resumed second,
    end with the same job counts in the checkpoint: twice one epoch's."""
    shards = write_products(tmp_path / "shards", [index % 10 == 0 for index in range(60)])
    straight = fit(shards, tmp_path / "straight", "--trainer.max_epochs", "2")
    first = fit(shards, tmp_path / "resumed", "--trainer.max_epochs", "1")
    assert straight.returncode == first.returncode == 0, straight.stderr[-2000:] + first.stderr[-2000:]
    assert budget_of(tmp_path / "resumed" / "checkpoints" / "last.ckpt") == {
        "samples": 60, "bad_samples": 6, "dropped": 0, "errors": {"json": 6}}
    second = fit(shards, tmp_path / "resumed", "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert second.returncode == 0, second.stderr[-2000:]
    expected = {"samples": 120, "bad_samples": 12, "dropped": 0, "errors": {"json": 12}}
    assert budget_of(tmp_path / "straight" / "checkpoints" / "last.ckpt") == expected
    assert budget_of(tmp_path / "resumed" / "checkpoints" / "last.ckpt") == expected
