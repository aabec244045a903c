"""`scale` command line.

    scale fit --config configs/smoke.yaml [--trainer.max_steps 100 ...]   LightningCLI (--print_config shows the config)
    scale validate --config configs/smoke.yaml --ckpt_path last          validation loss per part, in-loop retrieval mAP@10
    scale finetune --config configs/finetune/classify_probe.yaml --model.export DIR --data.train_shards SHARDS
                   --data.val_shards SHARDS                            classification / retrieval finetune, metrics before/after
    scale demo-data --out DIR --products N --seed S                      demo products as real media files
    scale shards --src RAW --out DIR [--processes N]                     a release -> tar shards (restartable)
    scale corrupt --src RAW --out DIR --modalities text --kind swap --rate 0.5   robustness settings
    scale tokenizer --src RAW_OR_SHARDS --out DIR [--compare minilm]   a WordPiece vocabulary from the release's text
    scale export --ckpt CKPT --out DIR                                   checkpoint -> safetensors + config
    scale evaluate --model DIR --data SHARDS [--compare-random]          retrieval / probe / clustering

A mistake is one line naming the option, file or field; add --debug (anywhere) for the traceback.
Commands that write an --out refuse to write over an earlier output unless given --overwrite.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pickle
import re
import sys
import warnings

from datamodules.error_budget import DataErrorRateExceeded
from scale.modalities import PluginError
from scale.outputs import disk_error

log = logging.getLogger(__name__)

TOOLS = {
    "demo-data": ("datamodules.demo", "write demo products (JPEG, MP4, WAV, meta.jsonl)"),
    "shards": ("datamodules.shards", "convert an M5Product release (meta.jsonl or the official JSON + folders) into tar shards"),
    "corrupt": ("datamodules.corrupt", "blank, swap or noise a known share of a modality (robustness protocol)"),
    "tokenizer": ("datamodules.tokenizer_train", "train a WordPiece tokenizer (Chinese: one token per character) on a release's titles and tables"),
    "export": ("scale.export", "export a checkpoint for downstream use"),
    "evaluate": ("scale.evaluate", "evaluate an exported model on shards"),
}


def _command(argv: list[str]) -> str:
    """The command a command line runs (LightningCLI's default, `fit`, when it names none)."""
    return argv[0] if argv and not argv[0].startswith("-") else "fit"


def _option_error(command: str, message: str):
    """A bad option or value: one line and exit status 2, as argparse's, without the usage."""
    print(f"scale {command}: error: {message} (scale {command} --help lists the options)", file=sys.stderr)
    sys.exit(2)


class _ToolParser(argparse.ArgumentParser):
    """No abbreviated options, and a bad option is one line (argparse prints the usage first)."""

    def __init__(self, command: str, **kwargs) -> None:
        super().__init__(prog=f"scale {command}", allow_abbrev=False, **kwargs)
        self.command = command

    def error(self, message: str):
        _option_error(self.command, message)


def _run_tool(name: str, argv: list[str]) -> None:
    module = importlib.import_module(TOOLS[name][0])
    parser = _ToolParser(name, description=TOOLS[name][1])
    module.add_arguments(parser)
    module.run(parser.parse_args(argv))


def one_line(message: str, argv: list[str]) -> str:
    """The line of a (multi-line, nested) parser message that says what is wrong: our own checks'
    `field=value: must be ...`, an unknown option as typed, a value of the wrong type with its full
    key, else the first line."""
    lines = [re.sub(r"^-\s+", "", line.strip()) for line in message.splitlines() if line.strip(" -")]
    for line in lines:
        if re.search(r"^\S+=.*: must be |is not divisible by|^(model|data)\.\S+ ", line):
            return line
    keys = []
    for line in lines:
        unknown = re.search(r"unrecognized arguments: (\S+?)(=|$| )", line)
        if unknown:  # nested parsers name the key relative to their section: name it as typed
            key = unknown[1].lstrip("-")
            typed = next((a.split("=", 1)[0] for a in argv if a.startswith("--") and a.split("=", 1)[0].endswith(key)), unknown[1])
            return f"{typed}: no such option (check its spelling; options are never abbreviated)"
        nested = re.match(r'Parser key "(.+)":', line)
        if nested:
            keys.append(nested[1])
        elif line.startswith("Expected a") and "NoneType" not in line:
            return f"--{'.'.join(keys)}: {line[0].lower()}{line[1:]}"
    return lines[0] if lines else message.strip()


def build_cli(args: list[str] | None = None, run: bool = True, finetune: bool = False):
    """The LightningCLI over SCALEModule and M5ProductDataModule (`run=False`: parse and build only).
    `finetune`: over `scale.finetune.FinetuneModule` instead, without subcommands (`scale finetune`:
    `run_finetune` validates, fits and validates again)."""
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from callbacks.checkpoint import AtomicCheckpointIO
    from callbacks.requeue import SlurmRequeue
    from datamodules.error_budget import DataErrorStop
    from datamodules.m5product import M5ProductDataModule
    from scale.module import SCALEModule
    from scale.strategies import check_hardware

    class SCALEArgumentParser(LightningArgumentParser):
        """No abbreviated options (`--trainer.max_step` is a typo, not `max_steps`), and a bad
        option or value is one line, not the usage (--debug: jsonargparse's whole message)."""

        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("allow_abbrev", False)
            super().__init__(*args, **kwargs)

        def error(self, message: str, ex: Exception | None = None):
            if not self.exit_on_error or os.environ.get("SCALE_DEBUG"):
                return super().error(message, ex)
            argv = sys.argv[1:] if args is None else list(args)
            _option_error("finetune" if finetune else _command(argv), one_line(message, argv))

    class SCALECLI(LightningCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            # `test` and `predict` are not offered: pretraining has no test step, and embeddings for
            # downstream use come from `scale evaluate` / `scale.load_pretrained(...).embed(batch)`.
            return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")}

        def add_arguments_to_parser(self, parser) -> None:
            # One source of truth for input shapes: the data module decodes what the model expects
            # (when finetuning, what the export was trained on: its config, read by the module).
            if finetune:
                parser.link_arguments("model.model_config", "data.model_config", apply_on="instantiate")
            else:
                parser.link_arguments("model.config", "data.model_config", apply_on="parse")

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads --ckpt_path's hyperparameters (weights_only=True) before anything
            # else, before the trainer and its checkpoint IO exist: a pickle that would run code,
            # or a checkpoint still being written (or cut short by a full disk), is one line here.
            from scale.export import refused_to_unpickle, unreadable_checkpoint

            try:
                super()._parse_ckpt_path()
            except pickle.UnpicklingError as error:
                path = self.config[self.config.subcommand].get("ckpt_path")
                raise ValueError(f"--ckpt_path {refused_to_unpickle(path, error)}") from None
            except (RuntimeError, EOFError) as error:
                path = self.config[self.config.subcommand].get("ckpt_path")
                raise ValueError(f"--ckpt_path {unreadable_checkpoint(path, error)}") from None

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
            init = self._get(self.config_init, "trainer")

            def ensure(kind: type, make) -> None:  # a callback the run needs, once, configured or not
                callbacks = init.get("callbacks") or []
                if not any(isinstance(c, kind) for c in callbacks):
                    init["callbacks"] = [*callbacks, make()]

            # One error budget for the whole job (datamodules/error_budget.py).
            ensure(DataErrorStop, DataErrorStop)
            callbacks = init.get("callbacks") or []
            kept = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
            if init.get("logger") in (False, None, []) and len(kept) < len(callbacks):
                # `--trainer.logger false` asks for no logs, not for a crash in the callbacks that log.
                init["callbacks"] = kept
                log.info("trainer.logger is off: LearningRateMonitor left out")
            if SLURMEnvironment.detect():
                # Preemption is handled at step boundaries (callbacks/requeue.py), not by Lightning's
                # handler, which saves mid-step from inside the signal handler.
                ensure(SlurmRequeue, SlurmRequeue)
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

    if finetune:
        from scale.finetune import FinetuneModule, run_finetune

    with warnings.catch_warnings():
        if finetune:  # it is handed the arguments after `finetune`, not sys.argv: not a mistake
            warnings.filterwarnings("ignore", "LightningCLI's args parameter")
        cli = SCALECLI(
            FinetuneModule if finetune else SCALEModule,
            M5ProductDataModule,
            args=args,
            run=run and not finetune,
            # On SLURM requeue the same run directory is reused: the saved config must be overwritable.
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "yaml"},
            parser_class=SCALEArgumentParser,
        )
    if finetune and run:
        run_finetune(cli)
    return cli


def main(argv: list[str] | None = None) -> None:
    """Run a command; a failure the user can fix is one line on stderr and exit status 1 (a bad
    option: 2). `--debug` (anywhere) or SCALE_DEBUG=1 shows the traceback instead."""
    args = sys.argv[1:] if argv is None else list(argv)
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        os.environ["SCALE_DEBUG"] = "1"  # data workers and DDP processes inherit it
        argv, sys.argv = args, [sys.argv[0], *args]
    command = _command(args)
    try:
        if args and args[0] in TOOLS:
            _run_tool(args[0], args[1:])
        elif args and args[0] in ("-h", "--help"):
            print(__doc__)
        elif args and args[0] == "finetune":
            build_cli(args[1:], finetune=True)
        else:
            build_cli(argv)  # None: LightningCLI reads sys.argv itself
    except Exception as error:
        line = failure_line(error, args)
        if line is None or os.environ.get("SCALE_DEBUG"):
            raise
        sys.exit(f"scale {command}: {line}")


def failure_line(error: BaseException, args: list[str]) -> str | None:
    """What to print for a failure the user can act on (None: a bug, shown with its traceback)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    hint = " (--debug for the traceback)"
    message = str(error).strip()
    if "Original Traceback" in message:
        # Raised in a data worker, it arrives wrapped in the worker's traceback: keep its own line.
        message = re.sub(r"^[\w.]+: ", "", message.splitlines()[-1])
    if isinstance(error, DataErrorRateExceeded):
        return f"stopped: {message}"
    if isinstance(error, PluginError):  # a plugin modality that does not load is a setting to fix
        return f"error: {error}"
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
        line = disk_error(error, "error: writing")
        return None if line is None else line + hint
    if isinstance(error, (FileNotFoundError, ValueError, MisconfigurationException)):
        # Bad input (a missing shard folder, an invalid setting): one line, not a traceback.
        return f"error: {one_line(message, args)}{hint}"
    return None


if __name__ == "__main__":
    main()
