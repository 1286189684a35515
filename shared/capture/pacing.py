"""Capture timing, pure and with time passed in: pacing, thinning, rate and playback clocks.

* :class:`FramePacer` schedules a pull source (test pattern, screen) at the stream's rate.
* :class:`FrameGate` thins a push source (a camera at 60 fps in a 30 fps stream) to that rate.
* :class:`RateMeter` measures the frame rate actually achieved, for stats and the monitor.
* :class:`PlaybackClock` maps a file's media time onto the wall clock for real-time playback.

None of them reads a clock: every method takes ``now``.
"""

from __future__ import annotations

import collections
from typing import Final

from shared.errors import ConfigError

__all__ = ["FrameGate", "FramePacer", "PlaybackClock", "RateMeter"]


class FramePacer:
    """An absolute schedule for a pull source: frame n is due at ``start + n / framerate``.

    Timer jitter never accumulates; when the caller falls more than a frame behind, the
    missed frames are skipped and counted rather than burst out to catch up.
    """

    def __init__(self, framerate: float, start: float) -> None:
        if framerate <= 0:
            raise ConfigError(f"frame rate {framerate} must be positive")
        self.interval: Final = 1.0 / framerate
        self._start = start
        self.frame_number = 0
        self.skipped = 0

    def wait(self, now: float) -> float:
        """Seconds until the next frame is due (0: take it now), skipping missed frames."""
        delay = self._start + self.frame_number * self.interval - now
        if delay < -self.interval:
            behind = int(-delay / self.interval)
            self.frame_number += behind
            self.skipped += behind
            delay += behind * self.interval
        return max(0.0, delay)

    def taken(self) -> None:
        """The due frame was captured; move to the next."""
        self.frame_number += 1


class FrameGate:
    """Admits frames of a push source at most at ``framerate``, on their capture times.

    Capture times here are monotonic microseconds (the frame pool's ``monotonic_us``), not
    the wall-clock stamp: a wall clock stepped back by NTP would otherwise make every frame
    look early and close the gate until the clock caught up again.

    Frame slots are ``1 / framerate`` apart; a frame is admitted unless it comes more than 40%
    of an interval before the next slot.  So a source at the stream's rate with a few
    milliseconds of jitter loses nothing, and one at twice the rate loses every other frame.
    Each admitted frame pulls the schedule halfway to its own time, so a source a little
    faster or slower than the stream (29.97 against 30) never drifts into dropping.
    """

    def __init__(self, framerate: float) -> None:
        if framerate <= 0:
            raise ConfigError(f"frame rate {framerate} must be positive")
        self._interval_us: Final = 1_000_000 / framerate
        self._tolerance_us: Final = 0.4 * self._interval_us
        self._next_us: float | None = None
        self.admitted = 0
        self.dropped = 0

    def admit(self, monotonic_us: int) -> bool:
        """Whether the frame captured at ``monotonic_us`` goes into the stream."""
        if self._next_us is not None and monotonic_us < self._next_us - self._tolerance_us:
            self.dropped += 1
            return False
        if self._next_us is None or monotonic_us > self._next_us + self._interval_us:
            slot = float(monotonic_us)  # the first frame, or after a stall: no catching up
        else:
            slot = (self._next_us + monotonic_us) / 2
        self._next_us = slot + self._interval_us
        self.admitted += 1
        return True


class RateMeter:
    """Events per second over a sliding window, plus the average since the first event."""

    def __init__(self, window_s: float = 2.0) -> None:
        self._window = window_s
        self._times: collections.deque[float] = collections.deque()
        self._first: float | None = None
        self.count = 0

    def add(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self.count += 1
        self._times.append(now)
        while self._times and now - self._times[0] > self._window:
            self._times.popleft()

    def rate(self, now: float) -> float:
        """Rate over the window ending ``now``."""
        recent = [t for t in self._times if now - t <= self._window]
        if len(recent) < 2:
            return 0.0
        span = max(recent[-1] - recent[0], now - recent[0])
        return (len(recent) - 1) / span if span > 0 else 0.0

    def average(self, now: float) -> float:
        """Rate since the first event."""
        if self._first is None or self.count < 2 or now <= self._first:
            return 0.0
        return (self.count - 1) / (now - self._first)


class PlaybackClock:
    """Maps a file's media time (microseconds, loops included) onto the shell's monotonic clock.

    The first frame asked about fixes the origin: it is due now.  Every later one is due at
    ``origin + media_us``.  When playback falls more than ``max_lag_us`` behind (a slow
    decoder, a paused machine) the origin moves forward so playback resumes in real time
    instead of racing to catch up; ``rebases`` counts those jumps.  A file's video and audio
    share one clock so they stay in sync through rebases and loops.
    """

    def __init__(self, max_lag_us: int = 500_000) -> None:
        self._origin_us: int | None = None
        self._max_lag_us = max_lag_us
        self.rebases = 0

    def due_us(self, media_us: int, now_us: int) -> int:
        """The time (on ``now_us``'s clock) at which media time ``media_us`` is presented."""
        if self._origin_us is None:
            self._origin_us = now_us - media_us
        due = self._origin_us + media_us
        if now_us - due > self._max_lag_us:
            self._origin_us = now_us - media_us
            self.rebases += 1
            due = now_us
        return due
