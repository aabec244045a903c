"""A training process killed with SIGKILL mid-epoch and resumed from its checkpoint continues the
exact epoch where it stopped: no sample seen twice, none skipped."""

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
import yaml

from tests.conftest import ROOT, TINY_YAML

CHECKPOINT_EVERY, STALL_AT = 3, 7


def write_config(tmp_path: Path, shards: Path, stall: bool) -> Path:
    config = yaml.safe_load(TINY_YAML.read_text())
    config["trainer"].update(max_steps=-1, max_epochs=1, default_root_dir=str(tmp_path / "run"))
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "every_n_train_steps": CHECKPOINT_EVERY}},
        {"class_path": "callbacks.sample_log.SampleKeyLog",
         "init_args": {"path": str(tmp_path / "keys" / ("first.jsonl" if stall else "resumed.jsonl"))}},
    ] + ([{"class_path": "tests.stall.StallAtStep", "init_args": {"step": STALL_AT}}] if stall else [])  # fmt: skip
    config["data"].update(train_shards=str(shards), mode="exact", batch_size=4, num_workers=2, shuffle_buffer=6)
    path = tmp_path / ("first.yaml" if stall else "resumed.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_sees_every_sample_once(demo_shards, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "scale.cli", "fit"]
    first = subprocess.Popen(command + ["--config", str(write_config(tmp_path, demo_shards["train"], stall=True))],
                             cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    log = tmp_path / "keys" / "first.jsonl"
    deadline = time.time() + 300
    while not any(r["step"] == STALL_AT for r in read_log(log)):  # trained one step past the checkpoint
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert time.time() < deadline, "the first run did not reach the stall step"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the trainer and its data workers, with no chance to clean up
    first.wait()

    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    resumed = subprocess.run(command + ["--config", str(write_config(tmp_path, demo_shards["train"], stall=False)),
                                        "--ckpt_path", str(checkpoint)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    saved_step = (STALL_AT // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
    before = [r for r in read_log(log) if r["step"] <= saved_step]  # what the checkpoint includes
    after = read_log(tmp_path / "keys" / "resumed.jsonl")
    assert [r["step"] for r in before] == list(range(1, saved_step + 1))
    assert after[0]["step"] == saved_step + 1 and all(r["epoch"] == 0 for r in before + after)
    seen = Counter(k for r in before + after for k in r["keys"])
    assert max(seen.values()) == 1, "a sample was seen twice"
    total = json.loads((demo_shards["train"] / "sizes.json").read_text())
    assert sum(seen.values()) == sum(total.values()), "a sample was skipped"
