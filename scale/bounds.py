"""Numeric settings are checked where a config is built, so that a bad value is one line naming the
field (`model.config.fusion.heads=0: must be >= 1`), not a hang, a ZeroDivisionError or a tensor
shape error three layers down.

A config dataclass declares the bounds of its fields in a class variable, `BOUNDS = {"heads":
AT_LEAST_1, "dropout": BELOW_1}` (and width / heads pairs in `DIVISIBLE`); `check_bounds(config,
path)` checks them, walking into nested config dataclasses, each found in any class of the
config's MRO (a `make_dataclass` that gathers several sections keeps every section's bounds).
Fields without a bound are not checked here (their type is, by the CLI parser).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from typing import Any


@dataclass(frozen=True)
class Bound:
    """A closed or open interval; None on a side: unbounded there."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_1 = Bound(1)
AT_LEAST_0 = Bound(0)
POSITIVE = Bound(0, low_open=True)
SHARE = Bound(0, 1)
"""A probability or a share, 0 and 1 included."""
BELOW_1 = Bound(0, 1, high_open=True)
"""A dropout rate or an Adam beta: 0 included, 1 not."""


def check_value(name: str, value: Any, bound: Bound, optional: bool = False) -> None:
    """ValueError `name=value: must be <bound>` unless the value (each element of a tuple or list)
    holds; `optional`: None is allowed."""
    if value is None and optional:
        return
    values = value if isinstance(value, (tuple, list)) else (value,)
    if not all(bound.holds(v) for v in values):
        raise ValueError(f"{name}={value!r}: must be {'None or ' if optional else ''}{bound}")


def check_bounds(config: Any, path: str) -> None:
    """Check every bound `config`'s classes declare, then its nested config dataclasses' (module doc)."""
    for klass in type(config).__mro__:
        for name, bound in vars(klass).get("BOUNDS", {}).items():
            check_value(f"{path}.{name}", getattr(config, name), bound)
        for width, heads in vars(klass).get("DIVISIBLE", ()):
            w, h = getattr(config, width), getattr(config, heads)
            if w % h:
                raise ValueError(f"{path}.{width}={w} is not divisible by {path}.{heads}={h}: each attention "
                                 f"head gets {width} / {heads} channels")  # fmt: skip
    for item in fields(config):
        value = getattr(config, item.name)
        if is_dataclass(value) and not isinstance(value, type):
            check_bounds(value, f"{path}.{item.name}")
