"""The code's shape, checked: packages depend one way (the import contract in setup.cfg, checked by
import-linter), and code outside the modality files names no modality."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scale.modalities import BUILTIN
from tests.conftest import ROOT

LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the packages under `root`, not the installed checkout
    return subprocess.run([str(LINT), "--no-cache", str(root / "setup.cfg")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_the_import_contract_holds():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("importer, imported, contract", [
    ("scale/model.py", "datamodules.streams", "Packages depend one way"),  # the library uses the data side
    ("scale/modalities/base.py", "scale.cli", "Packages depend one way"),  # ... or the command line
    ("datamodules/decode.py", "scale.module", "Packages depend one way"),  # the data side uses the training app
    ("datamodules/streams.py", "datamodules.shards", "The loader"),  # the loader uses the converter
    ("datamodules/sources.py", "datamodules.m5product", "The converter never imports the loader"),
])  # fmt: skip
def test_the_contract_catches_an_import_against_the_layers(tmp_path, importer, imported, contract):
    for package in ("scale", "datamodules", "callbacks"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path)
    with open(tmp_path / importer, "a") as module:
        module.write(f"\nimport {imported}  # the planted violation\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken) or contract in result.stdout.split("BROKEN")[0], result.stdout[-3000:]
    assert f"{importer.removesuffix('.py').replace('/', '.')} -> {imported}" in result.stdout


# Modules that loop over the registry: none of them may name a modality (a literal "image", ...).
GENERIC = [
    *[f"scale/{name}.py" for name in ("config", "model", "fusion", "harmonization", "losses", "export", "optim",
                                      "module", "evaluate", "metrics", "strategies", "cli", "shard_format")],
    *[f"scale/modalities/{name}.py" for name in ("__init__", "spec", "base", "masking", "transformer", "bert")],
    *[f"scale/media/{name}" for name in os.listdir(ROOT / "scale" / "media") if name.endswith(".py")],
    *[f"datamodules/{name}.py" for name in ("decode", "collate", "streams", "m5product", "sources", "validate",
                                            "shards", "limits", "error_budget", "corrupt")],
    *[f"callbacks/{name}" for name in os.listdir(ROOT / "callbacks") if name.endswith(".py")],
]  # fmt: skip


def _registry_list(tree: ast.AST) -> set[int]:
    """The constants of `BUILTIN = (...)`, the registry's list of its built-in modules (the one
    place outside the modality files allowed to name them)."""
    return {id(node) for statement in ast.walk(tree) if isinstance(statement, ast.AnnAssign)
            and getattr(statement.target, "id", None) == "BUILTIN" for node in ast.walk(statement.value)}  # fmt: skip


@pytest.mark.parametrize("path", GENERIC)
def test_generic_code_names_no_modality(path):
    tree = ast.parse((ROOT / path).read_text())
    allowed = _registry_list(tree)
    named = [(node.lineno, node.value) for node in ast.walk(tree)
             if isinstance(node, ast.Constant) and node.value in BUILTIN and id(node) not in allowed]  # fmt: skip
    assert not named, f"{path} names modalities {named}: declare it in the modality's file instead"


def test_the_converter_the_demo_and_the_config_import_no_torch():
    """Reading the modalities' declarations (fields, checks, limits, config sections) builds no model:
    `scale shards` (its main process and every converter process), `scale demo-data` and
    `scale.config` start in a fraction of a second, not the seconds torch, timm and transformers take."""
    check = ("import sys, datamodules.shards, datamodules.demo, datamodules.corrupt, scale.config; "
             "from scale.modalities import REGISTRY; assert len(REGISTRY) >= 5; "
             "print(sorted(m for m in ('torch', 'timm', 'transformers', 'lightning') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"imported {result.stdout.strip()}"
