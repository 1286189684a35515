"""LatencyStats: a bounded sample of latencies with the percentiles a report needs."""

from __future__ import annotations

import collections

import numpy as np

__all__ = ["LatencyStats"]


class LatencyStats:
    def __init__(self, max_samples: int = 100_000) -> None:
        self._samples: collections.deque[float] = collections.deque(maxlen=max_samples)

    def add(self, value_ms: float) -> None:
        self._samples.append(value_ms)

    def __len__(self) -> int:
        return len(self._samples)

    def percentile(self, q: float) -> float | None:
        if not self._samples:
            return None
        return float(np.percentile(np.fromiter(self._samples, dtype=np.float64), q))

    def summary(self) -> dict[str, float | None]:
        return {"p50_ms": self.percentile(50), "p99_ms": self.percentile(99)}
