"""SCALE: Self-harmonized ContrAstive LEarning over product modalities (M5Product's five, and plugins)."""

from __future__ import annotations

from typing import Any

__all__ = ["MODALITIES", "ModelConfig", "load_pretrained"]


def __getattr__(name: str) -> Any:
    # Lazy: importing any `scale.*` module must not load the modality registry (and its plugins)
    # before the command line can report a plugin that does not import.
    if name in ("MODALITIES", "ModelConfig"):
        from scale import config

        return getattr(config, name)
    raise AttributeError(f"module 'scale' has no attribute {name!r}")


def load_pretrained(directory, device="cpu"):
    """Load an exported model (`scale export`) without Lightning; see `scale.export.load_pretrained`."""
    from scale.export import load_pretrained as _load

    return _load(directory, device)
