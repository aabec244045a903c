"""SCALE: Self-harmonized ContrAstive LEarning over five product modalities (M5Product)."""

from scale.config import MODALITIES, ModelConfig

__all__ = ["MODALITIES", "ModelConfig", "load_pretrained"]


def load_pretrained(directory, device="cpu"):
    """Load an exported model (`scale export`) without Lightning; see `scale.export.load_pretrained`."""
    from scale.export import load_pretrained as _load

    return _load(directory, device)
