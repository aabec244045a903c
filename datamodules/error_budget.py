"""The error budget: what a data worker has read, what was wrong with it, and when that is too much.

Every failure is counted by kind (`image`, `video: timeout`, `tar`, `json`, ...) and logged at a
limited rate (the first of each kind, then every `warn_every`-th). A sample counts as bad once,
however many of its fields failed; an error outside any sample (a truncated shard) counts as a
sample of its own, and a bad one. Past `max_error_rate` of bad samples, after
`error_rate_min_samples`, `DataErrorRateExceeded` stops the run with the counts per kind.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class DataErrorRateExceeded(RuntimeError):
    """Too large a share of the data is unusable: the run stops with the counts per kind."""


class ErrorBudget:
    def __init__(self, max_error_rate: float, min_samples: int, warn_every: int = 100):
        self.max_error_rate, self.min_samples, self.warn_every = max_error_rate, min_samples, warn_every
        self.samples = 0
        self.bad_samples = 0
        self.errors: Counter[str] = Counter()
        self._in_sample = False
        self._sample_is_bad = False

    @contextmanager
    def sample(self) -> Iterator[None]:
        """Count one sample; errors counted inside make it (once) a bad one."""
        self.samples += 1
        self._in_sample, self._sample_is_bad = True, False
        try:
            yield
        finally:
            self._in_sample = False

    def count(self, kind: str, key: str, error: BaseException | str) -> None:
        """Count one error of `kind` for sample or shard `key`, warn at a limited rate, then enforce
        the error rate. A sub-kind `"<kind>: <detail>"` also counts under `<kind>`, so
        `errors[modality]` counts every failure of that modality."""
        base = kind.partition(": ")[0]
        self.errors[base] += 1
        if kind != base:
            self.errors[kind] += 1
        if not self._in_sample:
            self.samples += 1
            self.bad_samples += 1
        elif not self._sample_is_bad:
            self._sample_is_bad = True
            self.bad_samples += 1
        count = self.errors[kind]
        if count == 1 or count % self.warn_every == 0:
            detail = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
            log.warning("%s: %s unusable (%.300s); %d %s errors so far", key, kind, detail, count, kind)
        self.check()

    def check(self) -> None:
        """Raise DataErrorRateExceeded when, after `min_samples` samples, more than
        `max_error_rate` of them had an error."""
        if self.samples < self.min_samples or self.bad_samples <= self.max_error_rate * self.samples:
            return
        kinds = ", ".join(f"{kind}={count}" for kind, count in sorted(self.errors.items()))
        raise DataErrorRateExceeded(
            f"{self.bad_samples} of {self.samples} samples ({self.bad_samples / self.samples:.1%}) read by this "
            f"data worker had errors, over data.limits.max_error_rate={self.max_error_rate:g} (errors: {kinds}); "
            f"fix or remove the bad shards, or raise data.limits.max_error_rate (1.0 never stops)"
        )
