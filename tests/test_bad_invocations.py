"""A table of bad invocations of every command, run as a user runs them (`python -m scale.cli ...`):
each ends with one line naming the option, file or field and what to do, a non-zero exit, no
traceback, and every output that already existed byte for byte as it was."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY_YAML
from tests.test_error_budget import write_products


class RunsCode:
    """A pickle that would create `marker` when unpickled: proves nothing is unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def scale(*args: str, cwd: Path, limit_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limits() -> None:  # a "full disk" for files past this size (Python ignores SIGXFSZ: EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.run([sys.executable, "-m", "scale.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, preexec_fn=limits if limit_file_bytes else None,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip


def snapshot(*paths: Path) -> dict[str, str]:
    """Every file under `paths` -> its hash (a folder that does not exist: nothing)."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")) if p.exists() else []) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> Path:
    """A workspace: title-only shards, a checkpoint and an export of a text-only model, and
    outputs a user already has (an export with a file of theirs, demo data, metrics, shards)."""
    w = tmp_path_factory.mktemp("invocations")
    write_products(w / "shards", [False] * 24)
    write_products(w / "bad_shards", [True] * 40)
    write_products(w / "empty_shards", [])
    fit = scale("fit", "--config", str(TINY_YAML), "--data.train_shards", "shards", "--model.config.modalities", "[text]",
                "--trainer.default_root_dir", "run", cwd=w)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-2000:]
    shutil.copy(w / "run/checkpoints/last.ckpt", w / "good.ckpt")
    data = (w / "good.ckpt").read_bytes()
    (w / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": RunsCode(w / "UNPICKLED")}, w / "evil.ckpt")
    assert scale("export", "--ckpt", "good.ckpt", "--out", "export", cwd=w).returncode == 0
    (w / "export/my_notes.txt").write_text("a user's own file")
    shutil.copytree(w / "export", w / "pickled_export")
    (w / "pickled_export/model.safetensors").write_bytes(pickle.dumps(RunsCode(w / "UNPICKLED")))
    assert scale("demo-data", "--out", "raw", "--products", "6", "--image-size", "32", cwd=w).returncode == 0
    (w / "metrics.json").write_text('{"kept": true}')
    (w / "notes").mkdir()
    (w / "notes/todo.txt").write_text("a user's folder")
    (w / "half_converted/_progress").mkdir(parents=True)  # a conversion that never finished
    with tarfile.open(w / "half_converted/shard-000000.tar", "w") as tar:
        info = tarfile.TarInfo("p0.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    return w


FIT = ("fit", "--config", str(TINY_YAML), "--data.train_shards", "shards", "--trainer.default_root_dir", "fitrun")
CASES = {
    # name: (arguments, what the one line says)
    "batch size 0": ([*FIT, "--data.batch_size", "0"], "data.batch_size=0: must be >= 1"),
    "batch size -1, resampled": ([*FIT, "--data.batch_size", "-1", "--data.mode", "resampled"], "data.batch_size=-1: must be >= 1"),
    "batch size -1, exact": ([*FIT, "--data.batch_size=-1", "--data.mode", "exact"], "data.batch_size=-1: must be >= 1"),
    "negative workers": ([*FIT, "--data.num_workers", "-2"], "data.num_workers=-2: must be >= 0"),
    "error rate over 1": ([*FIT, "--data.limits.max_error_rate", "1.5"], "data.limits.max_error_rate=1.5: must be in [0, 1]"),
    "zero limit": ([*FIT, "--data.limits.max_image_bytes", "0"], "data.limits.max_image_bytes=0: must be >= 1"),
    "zero heads": ([*FIT, "--model.config.fusion.heads", "0"], "model.config.fusion.heads=0: must be >= 1"),
    "width not divisible": ([*FIT, "--model.config.fusion.width", "33"], "model.config.fusion.width=33 is not divisible by"),
    "probability over 1": ([*FIT, "--model.config.text.mask_prob", "1.2"], "model.config.text.mask_prob=1.2: must be in [0, 1]"),
    "negative learning rate": ([*FIT, "--model.optimizer.lr", "-1"], "model.optimizer.lr=-1.0: must be > 0"),
    "abbreviated option": ([*FIT, "--trainer.max_step", "5"], "--trainer.max_step: no such option"),
    "typo'd model key": ([*FIT, "--model.config.fusion.hedas", "3"], "--model.config.fusion.hedas: no such option"),
    "typo'd data key": ([*FIT, "--data.batch_sze", "3"], "--data.batch_sze: no such option"),
    "wrong type": ([*FIT, "--data.batch_size", "many"], "--data.batch_size: expected a <class 'int'>"),
    "unknown modality": ([*FIT, "--model.config.modalities", "[text, smell]"], "model.config.modalities: unknown ['smell']"),
    "no shards": ([*FIT, "--data.train_shards", "nowhere"], "shards 'nowhere': no shard found"),
    "all samples bad, resampled": ([*FIT, "--data.train_shards", "bad_shards", "--data.num_workers", "2",
                                    "--data.limits.error_rate_min_samples", "100"], "since its last batch had errors"),
    "shards without samples": ([*FIT, "--data.train_shards", "empty_shards", "--data.num_workers", "2"],
                               "shards in a row held no sample"),
    "unfinished conversion": ([*FIT, "--data.train_shards", "half_converted"], "a conversion that has not finished"),
    "truncated checkpoint to resume": ([*FIT, "--ckpt_path", "truncated.ckpt"], "--ckpt_path truncated.ckpt"),
    "checkpoint that runs code, resume": ([*FIT, "--ckpt_path", "evil.ckpt"], "refused to unpickle"),
    "export a truncated checkpoint": (["export", "--ckpt", "truncated.ckpt", "--out", "new_export"], "is not a readable checkpoint"),
    "export a checkpoint that runs code": (["export", "--ckpt", "evil.ckpt", "--out", "new_export"], "refused to unpickle"),
    "export onto an export": (["export", "--ckpt", "good.ckpt", "--out", "export"], "export --out export: the folder is not empty"),
    "export onto a file": (["export", "--ckpt", "good.ckpt", "--out", "metrics.json"], "exists and is not a folder"),
    "export, abbreviated option": (["export", "--ck", "good.ckpt", "--out", "new_export"], "the following arguments are required: --ckpt"),
    "evaluate a pickle as weights": (["evaluate", "--model", "pickled_export", "--data", "shards"], "is not a safetensors file"),
    "evaluate onto metrics": (["evaluate", "--model", "export", "--data", "shards", "--out", "metrics.json"], "the file exists"),
    "evaluate no export": (["evaluate", "--model", "notes", "--data", "shards"], "not an export folder"),
    "demo-data onto demo data": (["demo-data", "--out", "raw", "--products", "2"], "demo-data --out raw: the folder is not empty"),
    "demo-data, no products": (["demo-data", "--out", "new_raw", "--products", "0"], "products >= 1"),
    "shards onto a user's folder": (["shards", "--src", "raw", "--out", "notes"], "is not empty and not a conversion"),
    "shards from nowhere": (["shards", "--src", "nowhere", "--out", "new_shards"], "nowhere"),
    "corrupt onto demo data": (["corrupt", "--src", "raw", "--out", "raw", "--modalities", "text", "--kind", "swap", "--rate", "0.5"], "the folder is not empty"),
}
EXISTING = ("shards", "export", "pickled_export", "raw", "metrics.json", "notes", "good.ckpt", "half_converted")
NEVER_CREATED = ("new_export", "new_raw", "new_shards", "fitrun/checkpoints", "UNPICKLED")


AS_A_PROCESS = {"batch size -1, resampled", "abbreviated option", "export onto an export", "evaluate a pickle as weights"}
"""Run as the console script is (a process of its own); the others call `scale.cli.main` in this
process, the same code without the 5-s start of torch and Lightning each time."""


def invoke(args: list[str], w: Path, capsys) -> tuple[int, str]:
    """(exit status, stderr) of `scale.cli.main(args)` run in `w`, as the console script would end."""
    from scale.cli import main

    cwd = os.getcwd()
    os.chdir(w)
    try:
        main(list(args))
        status, message = 0, ""
    except SystemExit as exit:
        status, message = (1, exit.code) if isinstance(exit.code, str) else (exit.code or 0, "")
    finally:
        os.chdir(cwd)
    return status, capsys.readouterr().err + message


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_invocation_is_one_line_and_touches_nothing(w, case, capsys):
    args, says = CASES[case]
    before = snapshot(*(w / p for p in EXISTING))
    if case in AS_A_PROCESS:
        result = scale(*args, cwd=w)
        status, stderr = result.returncode, result.stderr
    else:
        status, stderr = invoke(args, w, capsys)
    lines = [line for line in stderr.strip().splitlines() if line.startswith(f"scale {args[0]}: ")]
    assert status in (1, 2), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0] == stderr.strip().splitlines()[-1], stderr[-3000:]
    assert says in lines[0], lines[0]
    assert snapshot(*(w / p for p in EXISTING)) == before
    assert not any((w / p).exists() for p in NEVER_CREATED)
    assert not list(w.glob(".*partial*")), "a staging folder was left behind"


@pytest.mark.slow
def test_a_full_disk_during_export_leaves_the_old_export(w):
    before = snapshot(w / "export")
    # Files past 1 MB cannot be written: the tokenizer fits, the weights do not.
    result = scale("export", "--ckpt", "good.ckpt", "--out", "export", "--overwrite", cwd=w, limit_file_bytes=2**20)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("scale export: error: writing: export/model.safetensors is too large"), last
    assert snapshot(w / "export") == before and not list(w.glob(".*partial*"))
    # With room, --overwrite replaces the whole folder (the user's own file included: they asked).
    assert scale("export", "--ckpt", "good.ckpt", "--out", "export2", cwd=w).returncode == 0
    assert scale("export", "--ckpt", "good.ckpt", "--out", "export2", "--overwrite", cwd=w).returncode == 0
    assert json.loads((w / "export2/config.json").read_text())["format"] == "scale-export/1"
