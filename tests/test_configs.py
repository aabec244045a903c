"""Every YAML in configs/ parses against the code's signatures (unknown keys are errors)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scale.cli import build_cli
from scale.config import ModelConfig
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FINETUNE_CONFIGS = sorted((ROOT / "configs" / "finetune").glob("*.yaml"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scale.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_and_builds_model_config(path: Path):
    result = run_cli("fit", "--config", str(path), "--data.train_shards", "unused", "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    # The printed config is complete and round-trips into the typed dataclass.
    config = ModelConfig.from_dict(printed["model"]["config"])
    declared = yaml.safe_load(path.read_text())["model"]["config"]
    for section, values in declared.items():
        if isinstance(values, dict):
            for key, value in values.items():
                actual = getattr(getattr(config, section), key)
                assert actual == (tuple(value) if isinstance(value, list) else value), f"{section}.{key}"


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=[p.name for p in FINETUNE_CONFIGS])
def test_finetune_config_parses(path: Path, capsys):
    """`scale finetune` configs against FinetuneModule's signature (in this process: parsing
    only, the export is never read)."""
    with pytest.raises(SystemExit) as exit:
        build_cli(["--config", str(path), "--model.export", "unused", "--print_config"], finetune=True)
    assert exit.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["model"]
    for key, value in yaml.safe_load(path.read_text())["model"].items():
        assert printed[key] == value if not isinstance(value, dict) else value.items() <= printed[key].items(), key


def test_unknown_config_key_is_a_one_line_error_naming_the_key():
    result = run_cli("fit", "--config", "configs/smoke.yaml", "--model.config.fusion.depthh", "3", "--print_config")
    assert result.returncode != 0
    assert "depthh" in result.stderr


def test_command_line_override_reaches_the_model_and_the_data():
    cli = build_cli(["--config", "configs/smoke.yaml", "--model.config.image.size", "96",
                     "--data.train_shards", "unused"], run=False)  # fmt: skip
    assert cli.model.config.image.size == 96
    assert cli.datamodule.model_config.image.size == 96  # linked: one source of truth


def test_missing_shard_folder_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "scale.cli", "fit", "--config", "configs/test_tiny.yaml",
         "--data.train_shards", str(tmp_path / "no-such-shards")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "no-such-shards" in last and "no shard found" in last


def test_modalities_validated():
    with pytest.raises(ValueError, match="smell"):
        ModelConfig(modalities=["text", "smell"])


def test_features_config_has_the_official_sizes_and_runs_video_through_the_image_layers():
    """configs/m5product_features.yaml as the official model: region/video/audio trunks with 8 heads
    and MLP 1024, video through the image's trunk; the option off gives video its own."""
    from scale.model import SCALE

    declared = yaml.safe_load((ROOT / "configs" / "m5product_features.yaml").read_text())["model"]["config"]
    config = ModelConfig.from_dict(declared)
    for name in ("image", "video", "audio"):
        section = getattr(config, name)
        assert section.heads == 8 and int(section.hidden * section.mlp_ratio) == 1024, name
    shared = SCALE(config, load_weights=False)
    assert shared.encoders["video"].trunk is shared.encoders["image"].trunk
    config.video.share_image_trunk = False
    separate = SCALE(config, load_weights=False)
    assert separate.encoders["video"].trunk is not separate.encoders["image"].trunk
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731 (shared counted once)
    trunk = sum(p.numel() for p in separate.encoders["video"].trunk.parameters())
    assert count(separate) - count(shared) == trunk  # 36 regions: the image's positions already cover 12 clips


def test_sharing_the_image_trunk_needs_region_features_and_equal_sizes():
    from tests.conftest import tiny_config

    with pytest.raises(ValueError, match="needs the image modality with image.stem regions"):
        from scale.model import SCALE

        config = tiny_config()
        config.video.share_image_trunk = True
        SCALE(config)
