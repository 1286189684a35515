"""RateWindow: bytes seen over the last second (or ``window_s``), in bounded memory.

A send or receive rate over a sliding window.  Samples are summed into buckets of
``window_s / buckets`` and buckets older than the window are dropped on every insert, so
memory is at most ``buckets + 1`` entries for the life of a connection, whatever the packet
rate and whether or not anyone reads the rate; each insert and each read is O(1) amortized.
The rate is exact to within one bucket at the old end of the window.  Time is passed in
(``now``: monotonic seconds); nothing here reads a clock.
"""

from __future__ import annotations

import collections

from shared.errors import ConfigError

__all__ = ["RateWindow"]


class RateWindow:
    def __init__(self, window_s: float = 1.0, *, buckets: int = 100) -> None:
        if window_s <= 0 or buckets < 1:
            raise ConfigError("a rate window needs a positive span and at least one bucket")
        self.window_s = window_s
        self._bucket_s = window_s / buckets
        # (bucket start, bytes) oldest first; _total is their sum.
        self._buckets: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0

    def __len__(self) -> int:
        """Buckets held: never more than ``buckets + 1``."""
        return len(self._buckets)

    def add(self, now: float, size: int) -> None:
        buckets = self._buckets
        if buckets and now < buckets[-1][0] + self._bucket_s:
            start, total = buckets[-1]
            buckets[-1] = (start, total + size)
        else:
            buckets.append((now, size))
        self._total += size
        self._expire(now)

    def bytes(self, now: float) -> int:
        """Bytes added within the window before ``now``."""
        self._expire(now)
        return self._total

    def rate_bps(self, now: float) -> int:
        """Bits per second over the window before ``now``."""
        return int(self.bytes(now) * 8 / self.window_s)

    def _expire(self, now: float) -> None:
        buckets = self._buckets
        while buckets and now - buckets[0][0] > self.window_s:
            self._total -= buckets.popleft()[1]
