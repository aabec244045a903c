"""`scale` command line.

    scale fit --config configs/smoke.yaml [--trainer.max_steps 100 ...]   LightningCLI (--print_config shows the config)
    scale validate --config configs/smoke.yaml --ckpt_path last          validation loss per part, in-loop retrieval mAP@10
    scale demo-data --out DIR --products N --seed S                      demo products as real media files
    scale shards --src RAW --out DIR [--processes N]                     a release -> tar shards (restartable)
    scale corrupt --src RAW --out DIR --modalities text --kind swap --rate 0.5   robustness settings
    scale export --ckpt CKPT --out DIR                                   checkpoint -> safetensors + config
    scale evaluate --model DIR --data SHARDS [--compare-random]          retrieval / probe / clustering
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys

from datamodules.error_budget import DataErrorRateExceeded
from scale.modalities import PluginError

TOOLS = {
    "demo-data": ("datamodules.demo", "write demo products (JPEG, MP4, WAV, meta.jsonl)"),
    "shards": ("datamodules.shards", "convert an M5Product release (meta.jsonl or the official JSON + folders) into tar shards"),
    "corrupt": ("datamodules.corrupt", "blank, swap or noise a known share of a modality (robustness protocol)"),
    "export": ("scale.export", "export a checkpoint for downstream use"),
    "evaluate": ("scale.evaluate", "evaluate an exported model on shards"),
}


def _run_tool(name: str, argv: list[str]) -> None:
    module = importlib.import_module(TOOLS[name][0])
    parser = argparse.ArgumentParser(prog=f"scale {name}", description=TOOLS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        module.run(args)
    except (FileNotFoundError, ValueError) as error:
        # Bad input: one line naming what is wrong, no traceback.
        sys.exit(f"scale {name}: error: {error}")


def build_cli(args: list[str] | None = None, run: bool = True):
    """The LightningCLI over SCALEModule and M5ProductDataModule (`run=False`: parse and build only)."""
    import torch
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from callbacks.checkpoint import AtomicCheckpointIO
    from callbacks.requeue import SlurmRequeue
    from datamodules.m5product import M5ProductDataModule
    from scale.module import SCALEModule
    from scale.strategies import check_hardware

    class SCALECLI(LightningCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            # `test` and `predict` are not offered: pretraining has no test step, and embeddings for
            # downstream use come from `scale evaluate` / `scale.load_pretrained(...).embed(batch)`.
            return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")}

        def add_arguments_to_parser(self, parser) -> None:
            # One source of truth for input shapes: the data module decodes what the model expects.
            parser.link_arguments("model.config", "data.model_config", apply_on="parse")

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            check_hardware(config.trainer.accelerator, config.trainer.strategy)  # one line, not a traceback
            # bf16 autocast on GPU, full precision on CPU, unless the config says otherwise.
            if config.trainer.precision is None:
                config.trainer.precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
            # Checkpoints without a dirpath go to <default_root_dir>/checkpoints (not under the
            # logger's versioned folder), so one flag moves a whole run and `last.ckpt` is findable.
            root = config.trainer.default_root_dir or "."
            for callback in config.trainer.callbacks or []:
                if callback.class_path.endswith(("ModelCheckpoint", "SCALECheckpoint")) and not callback.init_args.get("dirpath"):
                    callback.init_args["dirpath"] = os.path.join(root, "checkpoints")

        def instantiate_trainer(self, **kwargs):
            if SLURMEnvironment.detect():
                # Preemption is handled at step boundaries (callbacks/requeue.py), not by Lightning's
                # handler, which saves mid-step from inside the signal handler.
                init = self._get(self.config_init, "trainer")
                callbacks = init.get("callbacks") or []
                if not any(isinstance(c, SlurmRequeue) for c in callbacks):  # not twice if configured
                    init["callbacks"] = [*callbacks, SlurmRequeue()]
                plugins = init.get("plugins") or []
                plugins = plugins if isinstance(plugins, list) else [plugins]
                if not any(isinstance(p, SLURMEnvironment) for p in plugins):
                    init["plugins"] = [*plugins, SLURMEnvironment(auto_requeue=False)]
            trainer = super().instantiate_trainer(**kwargs)
            # Atomic local writes and weights-only loads (callbacks/checkpoint.py) for every strategy
            # that writes single files through Lightning's default IO.
            if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
                trainer.strategy.checkpoint_io = AtomicCheckpointIO()
            return trainer

    return SCALECLI(
        SCALEModule,
        M5ProductDataModule,
        args=args,
        run=run,
        # On SLURM requeue the same run directory is reused: the saved config must be overwritable.
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "yaml"},
    )


def _ckpt_path(args: list[str]) -> str:
    for i, arg in enumerate(args):
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
        if arg == "--ckpt_path" and i + 1 < len(args):
            return args[i + 1]
    return "?"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        _main(args, argv)
    except PluginError as error:
        if os.environ.get("SCALE_DEBUG"):
            raise
        # A plugin modality that does not load is a setting to fix, not a crash.
        sys.exit(f"scale {args[0] if args else 'fit'}: error: {error}")


def _main(args: list[str], argv: list[str] | None) -> None:
    if args and args[0] in TOOLS:
        _run_tool(args[0], args[1:])
    elif args and args[0] in ("-h", "--help"):
        print(__doc__)
    else:
        try:
            build_cli(argv)  # None: LightningCLI reads sys.argv itself
        except (FileNotFoundError, ValueError) as error:
            if os.environ.get("SCALE_DEBUG"):
                raise
            # Bad input (a missing shard folder, an invalid setting): one line, not a traceback.
            sys.exit(f"scale {args[0] if args else 'fit'}: error: {error} (SCALE_DEBUG=1 for the traceback)")
        except pickle.UnpicklingError as error:
            if os.environ.get("SCALE_DEBUG"):
                raise
            from callbacks.checkpoint import refused_to_unpickle

            # LightningCLI reads --ckpt_path's hyperparameters itself (weights_only=True), before
            # the trainer and its checkpoint IO exist: a pickle that would run code is refused there.
            sys.exit(f"scale {args[0] if args else 'fit'}: error: --ckpt_path {refused_to_unpickle(_ckpt_path(args), error)}")
        except DataErrorRateExceeded as error:
            if os.environ.get("SCALE_DEBUG"):
                raise
            # Raised in a data worker, it arrives wrapped in the worker's traceback: keep its own line.
            reason = str(error).strip().splitlines()[-1].split("DataErrorRateExceeded: ", 1)[-1]
            sys.exit(f"scale {args[0] if args else 'fit'}: stopped: {reason}")


if __name__ == "__main__":
    main()
