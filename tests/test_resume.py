"""Crash and resume: a training process killed with SIGKILL and resumed with `--ckpt_path last`
ends bitwise equal to an uninterrupted run with the same seed (weights and optimizer state), having
trained on the same batches in the same order: in exact mode every sample once per epoch.

Two epochs of 10 steps (40 samples, batch 4), 2 data workers. Kill points: mid-epoch 0 (resumed
from step 6), just after the epoch boundary (resumed from step 11, the first batch of epoch 1:
the case where the schedule's setup used to replay epoch 0's order), and on epoch 0's last batch,
saved before the epoch's end (resumed from step 10: Lightning's loop state then said the epoch was
still running, and the resumed run trained epoch 1 from an empty iterator, or miscounted epochs).
And a finished run continued for more epochs trains each new epoch once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, TINY_YAML

EPOCHS, BATCH = 2, 4


def write_config(path: Path, shards: Path, run: Path, keys: Path, every: int, stall_at: int | None,
                 epochs: int = EPOCHS) -> Path:  # fmt: skip
    """`stall_at`: stall before training that step; `-1`: stall at the end of epoch 0 (before the
    checkpoint callback's own end-of-epoch hook)."""
    config = yaml.safe_load(TINY_YAML.read_text())
    config["trainer"].update(max_steps=-1, max_epochs=epochs, default_root_dir=str(run))
    stall = ({"class_path": "tests.stall.StallAtEpochEnd", "init_args": {"epoch": 0}} if stall_at == -1 else
             {"class_path": "tests.stall.StallAtStep", "init_args": {"step": stall_at}})  # fmt: skip
    config["trainer"]["callbacks"] = [
        {"class_path": "callbacks.checkpoint.SCALECheckpoint", "init_args": {"every_n_train_steps": every}},
        {"class_path": "callbacks.sample_log.SampleKeyLog", "init_args": {"path": str(keys)}},
    ] + ([stall] if stall_at else [])  # fmt: skip
    config["data"].update(train_shards=str(shards), mode="exact", batch_size=BATCH, num_workers=2, shuffle_buffer=6)
    path.write_text(yaml.safe_dump(config))
    return path


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "scale.cli", "fit", "--config", str(config), *extra]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def saved_step(run: Path) -> int:
    path = run / "checkpoints" / "last.ckpt"  # written atomically: complete whenever it exists
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"] if path.is_file() else -1


def fit_until_killed(config: Path, log: Path, step: int, run: Path, saved: int) -> None:
    """Start a fit, wait until it has trained `step` (it stalls after it) and saved `saved`, then
    SIGKILL it and its workers."""
    process = subprocess.Popen([sys.executable, "-m", "scale.cli", "fit", "--config", str(config)], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    # No wall-clock limit here (a loaded CI machine is slow, not wrong): a run that dies fails at
    # once, one that hangs is stopped by pytest's timeout (setup.cfg), and killed in any case.
    try:
        while not any(r["step"] == step for r in read_log(log)) or saved_step(run) < saved:
            assert process.poll() is None, process.stderr.read()[-3000:]
            time.sleep(0.3)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # no chance to clean up, as on a node failure
        process.wait()


def final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(demo_shards, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("uninterrupted")
    keys = root / "keys.jsonl"
    result = fit(write_config(root / "config.yaml", demo_shards["train"], root / "run", keys, every=100, stall_at=None))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"state": final_state(root / "run"), "log": read_log(keys)}


def assert_every_sample_once_per_epoch(log: list[dict], total: int) -> None:
    for epoch in range(EPOCHS):
        seen = Counter(k for r in log if r["epoch"] == epoch for k in r["keys"])
        assert max(seen.values()) == 1, f"epoch {epoch}: a sample was seen twice"
        assert sum(seen.values()) == total, f"epoch {epoch}: {total - sum(seen.values())} samples never seen"


@pytest.mark.slow
@pytest.mark.parametrize("every, killed_after, stall_at", [(3, 7, 7), (11, 12, 12), (10, 10, -1)],
                         ids=["mid_epoch", "after_epoch_boundary", "on_the_last_batch"])  # fmt: skip
def test_kill_9_then_resume_is_bitwise_equal_to_uninterrupted(demo_shards, uninterrupted, tmp_path, every, killed_after,
                                                              stall_at):  # fmt: skip
    run, keys = tmp_path / "run", tmp_path / "keys.jsonl"
    config = write_config(tmp_path / "first.yaml", demo_shards["train"], run, keys, every, stall_at=stall_at)
    saved = killed_after // every * every
    fit_until_killed(config, keys, killed_after, run, saved)
    before = [r for r in read_log(keys) if r["step"] <= saved]  # what the checkpoint includes
    assert [r["step"] for r in before] == list(range(1, saved + 1))

    resumed_keys = tmp_path / "resumed.jsonl"
    config = write_config(tmp_path / "resumed.yaml", demo_shards["train"], run, resumed_keys, every, stall_at=None)
    result = fit(config, "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]

    log = before + read_log(resumed_keys)
    assert [r["step"] for r in log] == [r["step"] for r in uninterrupted["log"]]
    total = sum(json.loads((demo_shards["train"] / "sizes.json").read_text()).values())
    assert_every_sample_once_per_epoch(log, total)
    # The same batches, in the same order, as without the crash.
    assert [r["keys"] for r in log] == [r["keys"] for r in uninterrupted["log"]]

    state, reference = final_state(run), uninterrupted["state"]
    assert state["global_step"] == reference["global_step"] == EPOCHS * total // BATCH
    assert state["state_dict"].keys() == reference["state_dict"].keys()
    different = [k for k, v in state["state_dict"].items() if not torch.equal(v, reference["state_dict"][k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    for mine, theirs in zip(state["optimizer_states"][0]["state"].values(), reference["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(mine[k], theirs[k]) for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.slow
def test_a_finished_run_continued_for_more_epochs_trains_each_new_epoch_once(demo_shards, uninterrupted, tmp_path):
    """One epoch, then `--ckpt_path last` with max_epochs 2: the end of the first run is saved on
    its last batch; the second trains epoch 1 in full (it used to train nothing and exit 0)."""
    run, first, second = tmp_path / "run", tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    result = fit(write_config(tmp_path / "first.yaml", demo_shards["train"], run, first, 100, None, epochs=1))
    assert result.returncode == 0, result.stderr[-3000:]
    after_one = final_state(run)["state_dict"]
    result = fit(write_config(tmp_path / "second.yaml", demo_shards["train"], run, second, 100, None), "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(first) + read_log(second)
    # The same steps and batches as two epochs straight (the weights differ: the first run's
    # learning-rate schedule was one epoch long).
    assert [r["step"] for r in log] == [r["step"] for r in uninterrupted["log"]]
    assert [r["keys"] for r in log] == [r["keys"] for r in uninterrupted["log"]]
    state = final_state(run)
    assert state["global_step"] == uninterrupted["state"]["global_step"] and state["epoch"] == EPOCHS
    assert any(not torch.equal(v, after_one[k]) for k, v in state["state_dict"].items()), "epoch 1 trained nothing"
