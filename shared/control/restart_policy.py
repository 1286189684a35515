"""When a crashed stage actor is restarted, and when its crashes are a loop (a sans-I/O core).

Theory of operation
===================

The supervisor (``actors.recovery``) learns of each crash of a stream's stage actor (capture,
encoder, quality controller, a sender shard, a recorder) and asks :meth:`RestartPolicy.crashed`
what to do, passing the time.  The answer is to restart it, or to give up: a stage that crashed
more than ``max_restarts`` times within ``window_s`` seconds is in a crash loop (a source that kills its
process as soon as it opens, a codec that segfaults on every frame), and restarting it again
would only repeat the crash forever while viewers see nothing.  The stream then goes to Error
with the reason the decision carries.

Crashes are counted per kind, so a stream whose shard died once and whose capture died once is
not in a loop; old crashes leave the window and are forgotten, so a stage that crashes once a
day is restarted every time.  :meth:`RestartPolicy.next_deadline` says when the oldest crash
still counted leaves the window (for a shell that wants to report the count going down).

The core never reads a clock: tests pass literal times.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from shared.errors import ConfigError

__all__ = ["RestartDecision", "RestartPolicy"]

#: Restarts of one kind allowed within the window; the next crash there is a crash loop.
DEFAULT_MAX_RESTARTS = 3
DEFAULT_WINDOW_S = 30.0


@dataclass(frozen=True, slots=True)
class RestartDecision:
    """What to do about one crash."""

    restart: bool
    #: Crashes of this kind within the window, this one included.
    crashes: int
    #: Why: for the log when restarting, for the stream's ErrorInfo when giving up.
    reason: str


@dataclass(slots=True)
class RestartPolicy:
    """Restart a crashed stage, up to ``max_restarts`` times within any ``window_s``."""

    max_restarts: int = DEFAULT_MAX_RESTARTS
    window_s: float = DEFAULT_WINDOW_S
    _crashes: dict[str, collections.deque[float]] = field(default_factory=dict)
    #: Restarts granted so far, per kind (never forgotten: a figure for stats).
    restarts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_restarts < 1:
            raise ConfigError(f"max_restarts {self.max_restarts} must be at least 1")
        if self.window_s <= 0:
            raise ConfigError(f"restart window {self.window_s} s must be positive")

    def crashed(self, kind: str, now: float, cause: str = "") -> RestartDecision:
        """A ``kind`` actor crashed at ``now`` (``cause``: what was seen); restart it or not."""
        history = self._crashes.setdefault(kind, collections.deque())
        self._forget(history, now)
        history.append(now)
        count = len(history)
        because = f" (last: {cause})" if cause else ""
        if count > self.max_restarts:
            return RestartDecision(
                restart=False,
                crashes=count,
                reason=(
                    f"{kind} crashed {count} times within {self.window_s:g} s{because}: a crash "
                    "loop, not restarted again"
                ),
            )
        self.restarts[kind] = self.restarts.get(kind, 0) + 1
        return RestartDecision(
            restart=True,
            crashes=count,
            reason=f"{kind} crashed{because}; restart {count} of {self.max_restarts} allowed "
            f"within {self.window_s:g} s",
        )

    def crashes(self, kind: str, now: float) -> int:
        """Crashes of ``kind`` still within the window at ``now``."""
        history = self._crashes.get(kind)
        if history is None:
            return 0
        self._forget(history, now)
        return len(history)

    def next_deadline(self) -> float | None:
        """When the oldest crash still counted leaves the window (None: none counted)."""
        oldest = [history[0] for history in self._crashes.values() if history]
        return min(oldest) + self.window_s if oldest else None

    def _forget(self, history: collections.deque[float], now: float) -> None:
        while history and history[0] <= now - self.window_s:
            history.popleft()
