"""On a real SLURM cluster (scripts/local_slurm.sh: slurmctld + slurmd + munged on this machine):
the project's own sbatch template trains with 2-task CPU DDP, a preempted job saves, requeues itself
and finishes exactly, and two launches posing as two nodes split the data exactly.

The template is edited as a user edits it for this cluster: no GPUs, 2 tasks of 1 CPU, logs in the
test's folder. `CONFIG=` picks the tiny test model (a `--config` after the template's own overrides
would set `trainer.devices` back to the YAML's 1).

The last tests check callbacks/requeue.py in one process, without a cluster: it saves at an optimizer-
step boundary (after an accumulation window, never inside one), as a real file even with
`save_last="link"`, and does nothing outside SLURM."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "local_slurm.sh"
EPOCHS, BATCH = 2, 4


def _can_run_slurm() -> str | None:
    if shutil.which("sbatch") and shutil.which("slurmctld"):
        return None
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it needs root"
    return None


@pytest.fixture(scope="module")
def cluster():
    reason = _can_run_slurm()
    if reason:
        pytest.skip(reason)
    subprocess.run([str(SCRIPT), "install"], check=True, timeout=900)
    # A cluster already up (`make slurm-up`, another test session) is used and left running.
    already_up = subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    subprocess.run([str(SCRIPT), "start"], check=True, timeout=120, capture_output=True)
    yield
    if not already_up:
        subprocess.run([str(SCRIPT), "stop"], timeout=120)


def user_template(tmp_path: Path) -> Path:
    """configs/slurm/single_node.sbatch as a user edits it for a 2-CPU node without GPUs."""
    text = (ROOT / "configs" / "slurm" / "single_node.sbatch").read_text()
    text = re.sub(r"^#SBATCH --(gpus-per-node|partition)=.*\n", "", text, flags=re.M)
    text = re.sub(r"--ntasks-per-node=\d+", "--ntasks-per-node=2", text)
    text = re.sub(r"--cpus-per-task=\d+", "--cpus-per-task=1", text)
    text = re.sub(r"--mem=\S+", "--mem=4G", text)
    text = re.sub(r"--output=\S+", f"--output={tmp_path}/job-%j.out", text)
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    return path


def overrides(tmp_path: Path, shards: Path, mode: str, extra_callbacks: list[dict]) -> Path:
    """A YAML given after the template's own arguments: data, run length, logging callbacks."""
    config = {
        "trainer": {
            "accelerator": "cpu", "strategy": "ddp", "default_root_dir": str(tmp_path / "run"),
            "callbacks": [
                {"class_path": "callbacks.checkpoint.SCALECheckpoint", "init_args": {"every_n_train_steps": 100}},
                {"class_path": "callbacks.sample_log.SampleKeyLog", "init_args": {"path": str(tmp_path / "keys-{rank}.jsonl")}},
                {"class_path": "tests.stall.SaveRankWeights", "init_args": {"path": str(tmp_path / "weights-{rank}.pt")}},
                *extra_callbacks,
            ],
        },
        "data": {"train_shards": str(shards), "mode": mode, "batch_size": BATCH, "num_workers": 2, "shuffle_buffer": 6},
    }  # fmt: skip
    if mode == "exact":
        config["trainer"].update(max_steps=-1, max_epochs=EPOCHS)
    else:
        config["trainer"].update(max_steps=6)
    path = tmp_path / "overrides.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def submit(template: Path, config: Path) -> str:
    env = {**os.environ, "CONFIG": "configs/test_tiny.yaml", "PYTHONPATH": str(ROOT),
           "SCALE": str(Path(sys.executable).parent / "scale")}  # this venv's entry point  # fmt: skip
    result = subprocess.run(["sbatch", "--parsable", str(template), "--config", str(config)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return result.stdout.strip().split(";")[0]


def job_field(job: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", shown)
    return match.group(1) if match else ""


def wait_for(job: str) -> str:
    """The job's final state. No wall-clock limit (a loaded CI machine is slow, not wrong): a job
    that never ends is stopped by pytest's timeout (setup.cfg), and the cluster fixture's teardown
    stops the daemons and with them the job."""
    while True:
        state = job_field(job, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        if state == "PENDING" and job_field(job, "Reason") == "BeginTime":
            # SLURM holds a requeued job back for a while (BeginTime); start it now.
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        time.sleep(1)


def job_log(tmp_path: Path, job: str) -> str:
    path = tmp_path / f"job-{job}.out"
    return path.read_text() if path.is_file() else ""


def read_keys(tmp_path: Path, rank: int) -> list[dict]:
    path = tmp_path / f"keys-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def assert_ranks_agree(tmp_path: Path) -> None:
    first, second = (torch.load(tmp_path / f"weights-{r}.pt", weights_only=True) for r in (0, 1))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), "the two DDP ranks ended with different weights"


def assert_exact_epochs(logs: list[list[dict]], total: int) -> None:
    """Every sample once per epoch across the ranks, and every rank took every step."""
    steps = [sorted(r["step"] for r in log) for log in logs]
    assert all(s == steps[0] for s in steps), "ranks took different steps"
    assert steps[0] == list(range(1, len(steps[0]) + 1))
    for epoch in range(EPOCHS):
        seen = Counter(k for log in logs for r in log if r["epoch"] == epoch for k in r["keys"])
        assert max(seen.values()) == 1, f"epoch {epoch}: a sample was seen twice"
        assert sum(seen.values()) == total, f"epoch {epoch}: {total - sum(seen.values())} samples never seen"


@pytest.mark.slow
def test_sbatch_two_task_ddp_trains_and_exports(cluster, demo_shards, tmp_path):
    job = submit(user_template(tmp_path), overrides(tmp_path, demo_shards["train"], "resampled", []))
    assert wait_for(job) == "COMPLETED", job_log(tmp_path, job)[-3000:]
    log = job_log(tmp_path, job)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # Lightning took rank and world size from SLURM
    assert [r["step"] for r in read_keys(tmp_path, 0)] == [r["step"] for r in read_keys(tmp_path, 1)] == [1, 2, 3, 4, 5, 6]
    assert_ranks_agree(tmp_path)

    export = subprocess.run([sys.executable, "-m", "scale.cli", "export", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
                             "--out", str(tmp_path / "export")], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    from scale import load_pretrained

    model = load_pretrained(tmp_path / "export")
    trained = torch.load(tmp_path / "weights-0.pt", weights_only=True)
    exported = model.state_dict()
    assert all(torch.equal(exported[k], trained[f"model.{k}"]) for k in exported)


@pytest.mark.slow
def test_preempted_job_saves_requeues_and_finishes_exactly(cluster, demo_shards, tmp_path):
    slow = [{"class_path": "tests.stall.SlowSteps", "init_args": {"seconds": 0.7}}]
    job = submit(user_template(tmp_path), overrides(tmp_path, demo_shards["train"], "exact", slow))
    while len(read_keys(tmp_path, 0)) < 3:  # mid-epoch 0 (5 steps per epoch); a hang: pytest's timeout
        assert job_field(job, "JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job_log(tmp_path, job)[-3000:]
        time.sleep(0.3)
    # What `#SBATCH --signal=SIGUSR1@90` does before the time limit, sent now: to every task.
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    assert wait_for(job) == "COMPLETED", job_log(tmp_path, job)[-3000:]

    log = job_log(tmp_path, job)
    assert job_field(job, "Restarts") == "1", "the job was not requeued"
    saved = re.search(r"SLURM preemption signal: saving last.ckpt at step (\d+)", log)
    assert saved and 3 <= int(saved.group(1)) < 10, log[-3000:]
    assert "Restoring states from the checkpoint path" in log  # the requeued job resumed from `last`

    total = sum(json.loads((demo_shards["train"] / "sizes.json").read_text()).values())
    steps_per_epoch = -(-(total // 2) // BATCH)
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == EPOCHS * steps_per_epoch  # the same steps as an uninterrupted run
    # The first job logged steps 1..saved and stopped there; the requeued one logged the rest.
    assert_exact_epochs([read_keys(tmp_path, 0), read_keys(tmp_path, 1)], total)
    assert_ranks_agree(tmp_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_split_the_data_exactly_once_per_epoch(demo_shards, tmp_path):
    """trainer.num_nodes 2, one process per node: two launches with NODE_RANK 0 and 1 (no SLURM)."""
    config = overrides(tmp_path, demo_shards["train"], "exact", [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "scale.cli", "fit", "--config", "configs/test_tiny.yaml", "--config", str(config),
               "--trainer.num_nodes", "2", "--trainer.devices", "1"]  # fmt: skip
    nodes = [subprocess.Popen(command, cwd=ROOT, env={**env, "NODE_RANK": str(n)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for n in (0, 1)]  # fmt: skip
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    total = sum(json.loads((demo_shards["train"] / "sizes.json").read_text()).values())
    assert_exact_epochs([read_keys(tmp_path, 0), read_keys(tmp_path, 1)], total)
    assert_ranks_agree(tmp_path)


# --- SlurmRequeue in one process, without a cluster (fast) -----------------------------------------


class _SignalAtStep(L.Callback):
    """Sends this process SIGUSR1 at the start of the step with index `step` (what srun forwards)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        first_micro_batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready == self.step * trainer.accumulate_grad_batches + 1
        if trainer.global_step == self.step and first_micro_batch:
            os.kill(os.getpid(), signal.SIGUSR1)


def _fit_with_requeue(tmp_path: Path, save_last, accumulate: int = 1, signal_step: int | None = 3):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from callbacks.requeue import SlurmRequeue

    requeue = SlurmRequeue(requeue=False)
    callbacks = [requeue, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=save_last, every_n_train_steps=1)]
    if signal_step is not None:
        callbacks.append(_SignalAtStep(signal_step))
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=10, accumulate_grad_batches=accumulate, callbacks=callbacks,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(BoringModel())
    return trainer, requeue


@pytest.mark.parametrize("save_last", [True, "link"])
def test_requeue_callback_saves_last_at_the_step_boundary(tmp_path, monkeypatch, save_last):
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    before = signal.getsignal(signal.SIGUSR1)
    trainer, _ = _fit_with_requeue(tmp_path, save_last)
    assert trainer.global_step == 4  # signalled during step index 3: that step completes, then stop
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_file() and not last.is_symlink()
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is removed at teardown


def test_requeue_callback_waits_for_the_end_of_an_accumulation_window(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    trainer, _ = _fit_with_requeue(tmp_path, True, accumulate=2, signal_step=2)  # first micro-batch of step 3
    assert trainer.global_step == 3
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3
    assert state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 6


def test_requeue_callback_does_nothing_outside_slurm(tmp_path, monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    before = signal.getsignal(signal.SIGUSR1)
    seen = []
    signal.signal(signal.SIGUSR1, lambda *a: seen.append(1))
    try:
        trainer, requeue = _fit_with_requeue(tmp_path, True)
        assert trainer.global_step == 10 and seen == [1]  # the run's own handler got it, training went on
        assert requeue._previous_handler is None
    finally:
        signal.signal(signal.SIGUSR1, before)
