"""Checkpoints: atomic writes, the final step always saved, saves by wall time, reruns into the same
folder, and no code unpickled from a checkpoint, local or remote."""

from __future__ import annotations

import errno
import functools
import http.server
import os
import pathlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from callbacks.checkpoint import AtomicCheckpointIO, atomic_torch_save
from tests.conftest import ROOT, TINY_YAML


def write_config(path: Path, shards: Path, root: Path, max_steps: int, **checkpoint_args) -> Path:
    config = yaml.safe_load(TINY_YAML.read_text())
    config["trainer"].update(max_steps=max_steps, default_root_dir=str(root))
    config["trainer"]["callbacks"] = [{"class_path": "callbacks.checkpoint.SCALECheckpoint", "init_args": checkpoint_args}]
    config["data"].update(train_shards=str(shards), num_workers=0)
    path.write_text(yaml.safe_dump(config))
    return path


def run_fit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scale.cli", "fit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})  # fmt: skip


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- atomic writes -----------------------------------------------------------------------------
class _DiskFull:
    """A file object that accepts `limit` bytes, then fails as a full disk does."""

    def __init__(self, file, limit: int):
        self.file, self.left = file, limit

    def write(self, data) -> int:
        if len(data) > self.left:
            self.file.write(bytes(data)[: self.left])
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "weights": torch.ones(1000)}, target)

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _DiskFull(real_fdopen(fd, mode), limit=1500))
    with pytest.raises((OSError, RuntimeError)):  # torch reports the failed write as either
        AtomicCheckpointIO().save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, target)
    monkeypatch.undo()

    assert load(target)["step"] == 1  # the old checkpoint, whole
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"], "a partial file was left behind"


def test_atomic_save_replaces_in_place(tmp_path):
    target = tmp_path / "a.ckpt"
    atomic_torch_save({"v": 1}, target)
    inode = target.stat().st_ino
    atomic_torch_save({"v": 2}, target)
    assert load(target) == {"v": 2} and target.stat().st_ino != inode  # a new file renamed over the old


# ---- what a run saves --------------------------------------------------------------------------
@pytest.mark.slow
def test_final_step_saved_and_a_rerun_into_the_same_folder_continues(demo_shards, tmp_path):
    root = tmp_path / "run"
    config = write_config(tmp_path / "a.yaml", demo_shards["train"], root, max_steps=6, every_n_train_steps=4)
    result = run_fit("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = root / "checkpoints"
    assert load(checkpoints / "last.ckpt")["global_step"] == 6, "the run's last steps were not saved"
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")], "temporary files left"

    # A requeued job writes into the same folder (saved config included) and continues from `last`.
    config = write_config(tmp_path / "b.yaml", demo_shards["train"], root, max_steps=9, every_n_train_steps=4)
    result = run_fit("--config", str(config), "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert load(checkpoints / "last.ckpt")["global_step"] == 9


@pytest.mark.slow
def test_saves_by_wall_time(demo_shards, tmp_path):
    root = tmp_path / "run"
    # 0.6 ms: every step is past the interval; no step-based period at all.
    config = write_config(tmp_path / "c.yaml", demo_shards["train"], root, max_steps=3, every_n_minutes=1e-5, save_top_k=-1)
    result = run_fit("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = sorted(load(p)["global_step"] for p in (root / "checkpoints").glob("epoch=*.ckpt"))
    assert saved == [1, 2, 3]


# ---- nothing unpickled -------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a file: the proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture()
def served(tmp_path):
    """A local HTTP server over tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["url", "local"])
def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(demo_shards, tmp_path, served, where):
    www, base = served
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, www / "evil.ckpt")
    path = f"{base}/evil.ckpt" if where == "url" else str(www / "evil.ckpt")
    config = write_config(tmp_path / "d.yaml", demo_shards["train"], tmp_path / "run", max_steps=2, every_n_train_steps=2)
    result = run_fit("--config", str(config), "--ckpt_path", path, env={"TORCH_HOME": str(tmp_path / "torch-home")})
    assert result.returncode != 0
    assert not marker.exists(), "the checkpoint's pickle ran code"
    last = result.stderr.strip().splitlines()[-1]
    assert "refused to unpickle" in last and "evil.ckpt" in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_an_export_of_other_parameters_is_refused_naming_the_keys(tmp_path):
    """An export whose weights lack some of the model's parameters (an older stem's layout) fails
    in one line that names them, not only "does not match"."""
    import safetensors.torch

    from scale import load_pretrained
    from scale.export import export_model
    from scale.model import SCALE
    from tests.conftest import tiny_config

    export = export_model(SCALE(tiny_config(), load_weights=False), tmp_path / "export")
    weights = safetensors.torch.load_file(export / "model.safetensors")
    older = {k: v for k, v in weights.items() if not k.startswith("encoders.video.embed.peaks.")}
    assert len(older) == len(weights) - 2
    safetensors.torch.save_file(older, export / "model.safetensors")
    with pytest.raises(ValueError) as error:
        load_pretrained(export)
    message = str(error.value)
    assert "\n" not in message and "encoders.video.embed.peaks.weight" in message and "export the checkpoint again" in message
