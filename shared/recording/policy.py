"""Recording decisions, sans-I/O: timelines across pauses, file limits, pre-roll, triggers.

Everything here is pure bookkeeping with time passed in; ``shared.recording.core.RecordingCore``
combines these into one recording's decisions, so the shells only move packets and files.

Clocks: the timeline, the pre-roll and the motion trigger run on *media time*, integer
microseconds on a clock that never steps: the monotonic capture stamp every video frame and
audio packet carries (``RingPacket.monotonic_us``), or a viewer's RTP time.  Basing them on that
one clock keeps audio and video in sync across pauses and segment boundaries, and an NTP step
of the wall clock can neither stall a file nor tear a gap into it.  The wall clock is only
data here: :class:`RecordingSchedule` holds the wall-clock times a user scheduled.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable
from typing import Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from shared.errors import ConfigError

__all__ = [
    "FileLimits",
    "MotionDetector",
    "MotionTrigger",
    "PreRollBuffer",
    "RecordingSchedule",
    "ScheduleAction",
    "ScheduledRecording",
    "Timeline",
]


class Timeline:
    """Maps media time to file time so the file plays continuously across pauses.

    The first packet written is file time 0.  While paused nothing maps; on resume the gap is
    cut out: the first packet after it lands one ``resume_gap_us`` after the last one before.
    """

    def __init__(self, *, resume_gap_us: int) -> None:
        self._offset_us: int | None = None
        self._last_file_us = -1
        self._paused = False
        self._resume_pending = False
        self._gap_us = resume_gap_us

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def started(self) -> bool:
        return self._offset_us is not None

    @property
    def duration_us(self) -> int:
        return max(0, self._last_file_us + self._gap_us) if self.started else 0

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            self._resume_pending = self._offset_us is not None

    def to_file_us(self, media_us: int) -> int | None:
        """File time for a packet captured at media time ``media_us``; None while paused.

        Call only for packets that may start (or continue) the file: after a pause the caller
        must hold back until a keyframe, because the decoder needs one after the cut.
        """
        if self._paused:
            return None
        if self._offset_us is None:
            self._offset_us = media_us
        elif self._resume_pending:
            self._offset_us = media_us - (self._last_file_us + self._gap_us)
            self._resume_pending = False
        file_us = media_us - self._offset_us
        self._last_file_us = max(self._last_file_us, file_us)
        return file_us

    @property
    def needs_keyframe(self) -> bool:
        """True from the start and right after a resume: only a keyframe may come next."""
        return self._offset_us is None or self._resume_pending


class FileLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Per-file limits; a file over either is closed and the next segment opened."""

    max_bytes: int | None = None
    max_duration_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_bytes is not None and self.max_bytes < 64 * 1024:
            raise ConfigError(
                f"max file size {self.max_bytes} bytes is too small (at least 64 KiB)"
            )
        if self.max_duration_s is not None and self.max_duration_s < 1.0:
            raise ConfigError(
                f"max file duration {self.max_duration_s}s is too short (at least 1 s)"
            )

    def reached(self, *, size_bytes: int, duration_us: int) -> bool:
        """Segments can only start at a keyframe, so callers request one as soon as this turns
        true and rotate when it arrives (one frame interval later)."""
        if self.max_bytes is not None and size_bytes >= self.max_bytes:
            return True
        return self.max_duration_s is not None and duration_us >= self.max_duration_s * 1e6


class TimedPacket(Protocol):
    @property
    def media_us(self) -> int: ...

    @property
    def keyframe(self) -> bool: ...


class PreRollBuffer:
    """Keeps the last ``seconds`` of encoded video, always from a keyframe, for triggered
    recordings that must include what happened just before the trigger."""

    def __init__(self, seconds: float) -> None:
        if seconds < 0:
            raise ConfigError(f"pre-roll {seconds}s must be >= 0")
        self._span_us = int(seconds * 1e6)
        self._packets: collections.deque[TimedPacket] = collections.deque()

    def add(self, packet: TimedPacket) -> None:
        if not self._packets and not packet.keyframe:
            return  # a pre-roll must start at a keyframe to be decodable
        self._packets.append(packet)
        newest = packet.media_us
        # Drop whole GOPs from the front while the next keyframe still covers the span.
        while True:
            next_key = next((i for i, p in enumerate(self._packets) if i > 0 and p.keyframe), None)
            if next_key is None or newest - self._packets[next_key].media_us < self._span_us:
                return
            for _ in range(next_key):
                self._packets.popleft()

    def drain(self) -> list[TimedPacket]:
        packets = list(self._packets)
        self._packets.clear()
        return packets

    def __len__(self) -> int:
        return len(self._packets)


class MotionDetector:
    """Mean absolute luma difference between successive downscaled pictures, 0..255."""

    def __init__(self, *, step: int = 8) -> None:
        self._step = step
        self._previous: npt.NDArray[np.int16] | None = None

    def measure(self, luma: npt.NDArray[np.uint8]) -> float:
        small = luma[:: self._step, :: self._step].astype(np.int16)
        previous, self._previous = self._previous, small
        if previous is None or previous.shape != small.shape:
            return 0.0
        return float(np.abs(small - previous).mean())


class MotionTrigger:
    """Starts recording when motion exceeds ``threshold`` and stops ``hold_s`` after it ends
    (``now_us``: the media time of the picture measured)."""

    def __init__(self, *, threshold: float, hold_s: float) -> None:
        self._threshold = threshold
        self._hold_us = int(hold_s * 1e6)
        self._last_motion_us: int | None = None
        self.active = False

    def observe(self, motion: float, *, now_us: int) -> bool | None:
        """Returns True when recording should start, False when it should stop, else None."""
        if motion >= self._threshold:
            self._last_motion_us = now_us
            if not self.active:
                self.active = True
                return True
            return None
        if (
            self.active
            and self._last_motion_us is not None
            and now_us - self._last_motion_us >= self._hold_us
        ):
            self.active = False
            return False
        return None


class ScheduledRecording(msgspec.Struct, frozen=True, kw_only=True):
    recording_id: str
    start_at: float
    duration_s: float


class ScheduleAction(enum.Enum):
    START = "start"
    STOP = "stop"


class RecordingSchedule:
    """Scheduled recordings: start at a time, stop after a duration (any one clock; the
    supervisor runs it on the monotonic clock)."""

    def __init__(self) -> None:
        self._pending: dict[str, ScheduledRecording] = {}
        self._running: dict[str, ScheduledRecording] = {}

    def add(self, entry: ScheduledRecording, *, now: float) -> None:
        if entry.duration_s <= 0:
            raise ConfigError(f"scheduled recording duration {entry.duration_s}s must be positive")
        if entry.start_at + entry.duration_s <= now:
            raise ConfigError("scheduled recording would already be over")
        self._pending[entry.recording_id] = entry

    def cancel(self, recording_id: str) -> None:
        self._pending.pop(recording_id, None)
        self._running.pop(recording_id, None)

    def poll(self, *, now: float) -> list[tuple[ScheduleAction, ScheduledRecording]]:
        actions: list[tuple[ScheduleAction, ScheduledRecording]] = []
        for rid, entry in list(self._pending.items()):
            if now >= entry.start_at:
                del self._pending[rid]
                self._running[rid] = entry
                actions.append((ScheduleAction.START, entry))
        for rid, entry in list(self._running.items()):
            if now >= entry.start_at + entry.duration_s:
                del self._running[rid]
                actions.append((ScheduleAction.STOP, entry))
        return actions

    def next_due(self) -> float | None:
        """The wall-clock time of the next start or stop, or None if nothing is scheduled."""
        times = [e.start_at for e in self._pending.values()]
        times += [e.start_at + e.duration_s for e in self._running.values()]
        return min(times, default=None)

    def pending(self) -> Iterable[ScheduledRecording]:
        return tuple(self._pending.values())
