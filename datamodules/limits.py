"""`DataLimits`: the size and time limits on untrusted product data (`data.limits`), gathered from
every registered modality's own limits (`ImageLimits`, `VideoLimits`, ... in `scale/modalities/`)
and the few that are not any one modality's (below).

Real product data holds files no pipeline should try to decode whole: a 30000 x 30000 JPEG header on
a 50-KB file (a decompression bomb), an hour-long video, a megabyte "title". The converter
(`scale shards`) checks every file against these limits once, when it writes shards; the loader
checks again, because shards may come from elsewhere; both through the same checks
(`scale/media/`). A value over a limit makes that modality absent for the product; it is counted,
never fatal.

`max_error_rate` is the one limit that stops a run (`datamodules/error_budget.py`): when more than
that share of the samples the whole job has read had any error (checked at logging intervals once
`error_rate_min_samples` were read, so that one bad shard at the start does not stop a run, and at
every epoch's end), every rank stops with the counts per kind: a run fed mostly broken data is a
broken run, and should say so rather than train on the remainder.
"""

from __future__ import annotations

from dataclasses import dataclass, make_dataclass

from scale.bounds import AT_LEAST_1, SHARE, check_bounds
from scale.modalities import REGISTRY

MB = 2**20


@dataclass
class CommonLimits:
    """The limits that are not one modality's."""

    max_npy_bytes: int = 64 * MB
    """Largest pre-extracted feature array (`.npy`), of any modality."""
    max_json_bytes: int = 1 * MB
    """Largest product record as used (title and table cut to their limits, label, instance id, as
    JSON): a record over it is dropped. What the record holds beyond that is never read."""
    max_json_member_bytes: int = 64 * MB
    """Largest `json` member read at all (a longer one is dropped unread); its title and table are
    cut to their limits before `max_json_bytes` applies."""
    max_error_rate: float = 0.1
    """Share of the job's samples with any error past which the run stops, on every rank (1.0:
    never)."""
    error_rate_min_samples: int = 1000
    """Samples the job reads before `max_error_rate` is checked at logging intervals (at the end of
    an epoch and of the run it is checked whatever the count)."""

    BOUNDS = {"max_npy_bytes": AT_LEAST_1, "max_json_bytes": AT_LEAST_1, "max_json_member_bytes": AT_LEAST_1,
              "max_error_rate": SHARE, "error_rate_min_samples": AT_LEAST_1}  # fmt: skip


DataLimits = make_dataclass(
    "DataLimits", [],
    # Later bases' fields come first: CommonLimits, then the modalities in registry order.
    bases=tuple(reversed([CommonLimits, *(spec.limits for spec in REGISTRY.values() if spec.limits is not None)])),
    namespace={"__doc__": "Every limit on untrusted data: `CommonLimits` and each registered modality's.",
               "__module__": __name__, "__post_init__": lambda self: check_bounds(self, "data.limits")},
)  # fmt: skip
