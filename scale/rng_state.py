"""The random-number state of every rank, in a form `torch.load(weights_only=True)` reads back.

A resumed run sees the same samples as an uninterrupted one (the data stream's position is in the
checkpoint), but it only ends with bitwise-equal weights if the masking and dropout draws are the
same too: they come from torch's global generators, which a checkpoint must therefore carry, per
rank (each rank draws its own masks). Lightning's own `_collect_rng_states` keeps NumPy's state as
an ndarray, which a weights-only load refuses; here everything is tensors, ints, floats and strings.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def collect() -> dict[str, Any]:
    """This process's generators: torch CPU (and CUDA when present), NumPy, Python."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Set this process's generators to a state from `collect`."""
    torch.set_rng_state(state["torch"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def collect_all_ranks() -> list[dict[str, Any]]:
    """One state per global rank (a collective: every rank must call it, as checkpoint saving does)."""
    local = collect()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, local)
    return states
