"""The modality registry: key -> `ModalitySpec` (`spec.py`), in fusion order.

M5Product's five modalities are built in (`text`, `table`, `image`, `video`, `audio`): one folder
each, whose `__init__.py` declares it (config, limits, fields and their checks: no torch, so the
converter and the config read it cheaply) and whose `stems.py` implements its input variants
(`base.py` is their interface), imported when a model or a decoder first needs them.

A new modality is one module (or package) defining `MODALITY = ModalitySpec(...)`, named in the
`SCALE_PLUGINS` environment variable (comma-separated names of importable modules: installed, or on
PYTHONPATH) or in an installed package's `scale.modalities` entry points. It imports from
`scale.modalities.spec` and `base` (and `masking`, `transformer`, `scale.media`), never the registry
or `scale.config`, which do not exist yet while it loads.

The registry is loaded once, on first use (`REGISTRY`), and fixed for the process: the model config
(`scale.config.ModelConfig`) and the data limits gather every registered modality's section when
they are first imported, and data workers and converter processes load the same plugins from the
same environment.

Everything that used to name modalities loops over `REGISTRY` instead: the model builder below,
the sample decoder, the collate, the converter's field table, the corruptions and the test fixtures.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from types import ModuleType

from typing import TYPE_CHECKING

from scale.modalities.spec import ModalitySpec

if TYPE_CHECKING:
    from torch import nn

    from scale.modalities.base import Modality

__all__ = ["BUILTIN", "PluginError", "ModalitySpec", "REGISTRY", "batch_layout", "batch_to_device", "build_modalities",
           "registry", "spec", "stem_class"]  # fmt: skip

BUILTIN: tuple[str, ...] = ("text", "table", "image", "video", "audio")
"""M5Product's modalities, in the order their token segments are concatenated for fusion."""
PLUGINS_ENV = "SCALE_PLUGINS"
ENTRY_POINT_GROUP = "scale.modalities"


class PluginError(ImportError):
    """A plugin modality that cannot be loaded (the command line reports it in one line)."""


def _spec_of(module: ModuleType | ModalitySpec, where: str) -> ModalitySpec:
    found = module if isinstance(module, ModalitySpec) else getattr(module, "MODALITY", None)
    if not isinstance(found, ModalitySpec):
        raise PluginError(f"{where}: module {getattr(module, '__name__', module)} defines no MODALITY = ModalitySpec(...)")
    return found


def _load() -> dict[str, ModalitySpec]:
    sources = [(f"scale.modalities.{name}", "built in") for name in BUILTIN]
    sources += [(name.strip(), PLUGINS_ENV) for name in os.environ.get(PLUGINS_ENV, "").split(",") if name.strip()]
    registry: dict[str, ModalitySpec] = {}
    modules: list[tuple[ModuleType | ModalitySpec, str]] = []
    for name, where in sources:
        try:
            modules.append((importlib.import_module(name), where))
        except ImportError as error:
            raise PluginError(f"{where}: cannot import modality module {name!r} ({error})") from error
    for point in entry_points(group=ENTRY_POINT_GROUP):
        modules.append((point.load(), f"entry point {point.name}"))
    for module, where in modules:
        item = _spec_of(module, where)
        if item.name in registry:
            raise PluginError(f"{where}: modality {item.name!r} is registered twice")
        registry[item.name] = item
    return registry


_registry: dict[str, ModalitySpec] | None = None
_loading = False


def registry() -> dict[str, ModalitySpec]:
    """Every registered modality by key, in fusion order: the built-in five, then plugins."""
    global _registry, _loading
    if _registry is None:
        if _loading:
            raise PluginError("a modality module read the registry while it was being loaded (import from "
                              "scale.modalities.base, not scale.modalities or scale.config)")  # fmt: skip
        _loading = True
        try:
            _registry = _load()
        finally:
            _loading = False
    return _registry


def __getattr__(name: str):
    if name == "REGISTRY":  # loaded on first use, so importing the package (or its base) loads nothing
        return registry()
    raise AttributeError(f"module 'scale.modalities' has no attribute {name!r}")


def spec(name: str) -> ModalitySpec:
    try:
        return registry()[name]
    except KeyError:
        raise ValueError(f"modality {name!r} is not registered (registered: {list(registry())}; a plugin "
                         f"modality is loaded with {PLUGINS_ENV}=<module>)") from None  # fmt: skip


def stem_class(config, name: str) -> "type[Modality]":
    """The stem class of modality `name` under `config` (a ModelConfig)."""
    return spec(name).stem_class(getattr(config, name))


def build_modalities(config, load_weights: bool = True) -> "nn.ModuleDict":
    """The encoders of `config.modalities`, in fusion order (`load_weights=False`: pretrained
    towers are built from their architecture only, a checkpoint's weights are loaded after)."""
    from torch import nn

    from scale.modalities.base import BuildContext

    context = BuildContext(config, load_weights)
    return nn.ModuleDict({name: stem_class(config, name).build(context) for name in config.modalities})


def batch_layout(config) -> dict[str, dict[str, tuple[tuple[int, ...], "torch.dtype"]]]:
    """{modality: {key: (per-sample shape, dtype)}} of a batch under `config`, as each stem declares
    it (plus `present`, a bool per sample): what the loader delivers and the encoders expect."""
    import torch

    layout = {}
    for name in config.modalities:
        specs = stem_class(config, name).tensors(getattr(config, name))
        layout[name] = {key: (spec.shape, spec.dtype) for key, spec in specs.items()} | {"present": ((), torch.bool)}
    return layout


def batch_to_device(batch: dict, device, config) -> dict:
    """A batch of `config`'s layout on `device`, but for the inputs a stem's `prepare` reads in
    host memory (`TensorSpec.host`: JPEG bitstreams for `torchvision.io.decode_jpeg`); what is
    not a tensor as it is. The data module's transfer hook and `SCALE.batch_to_device`."""
    from torch import Tensor

    host = {name: {key for key, spec in stem_class(config, name).tensors(getattr(config, name)).items() if spec.host}
            for name in config.modalities}  # fmt: skip

    def move(value, stays: bool = False):
        return value.to(device, non_blocking=True) if isinstance(value, Tensor) and not stays else value

    return {name: ({key: move(value, key in host.get(name, ())) for key, value in entry.items()}
                   if isinstance(entry, dict) else move(entry)) for name, entry in batch.items()}  # fmt: skip
