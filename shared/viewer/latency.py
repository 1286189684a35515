"""LatencyStats: a bounded sample of latencies with the percentiles a report needs.

The newest ``max_samples`` values live in one preallocated array used as a ring: adding is
O(1) and allocates nothing; a percentile is O(samples) (a partition, no copy into a new
container first), so a caller takes them at a display rate, not per sample.
"""

from __future__ import annotations

import numpy as np

from shared.errors import ConfigError

__all__ = ["LatencyStats"]


class LatencyStats:
    def __init__(self, max_samples: int = 100_000) -> None:
        if max_samples < 1:
            raise ConfigError(f"max_samples must be positive, got {max_samples}")
        self._samples = np.empty(max_samples, dtype=np.float64)
        self._count = 0  # every value ever added; the ring holds the last max_samples

    def add(self, value_ms: float) -> None:
        self._samples[self._count % len(self._samples)] = value_ms
        self._count += 1

    def __len__(self) -> int:
        return min(self._count, len(self._samples))

    def values(self) -> np.ndarray[tuple[int], np.dtype[np.float64]]:
        """The samples held (a view, not a copy: read it before the next :meth:`add`)."""
        return self._samples[: len(self)]

    def percentile(self, q: float) -> float | None:
        if not self._count:
            return None
        return float(np.percentile(self._samples[: len(self)], q))

    def summary(self) -> dict[str, float | None]:
        return {"p50_ms": self.percentile(50), "p99_ms": self.percentile(99)}
