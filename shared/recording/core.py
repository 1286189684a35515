"""RecordingCore: every decision of one recording, sans-I/O, with time passed in.

Theory of operation
-------------------
A shell (``RecorderActor`` on the server, ``kizuna-stream record`` on a viewer) reads encoded
packets from wherever it gets them and feeds them here in capture order: video access units
with their keyframe flag and audio packets, each with its capture time in integer microseconds.
Every input returns the list of :class:`RecordingEvent` the shell must carry out, in order: open
a segment, write this packet at this file time, close the segment, enforce the quota, ask the
encoder for a keyframe.  The core never reads a clock or touches a file; the muxer
(``shared.recording.muxer.StreamRecorder``) is the I/O the shells drive with these events.

Time: three clocks, each for one thing.

* ``now``, the shell's monotonic clock in seconds, drives the timers only (when to ask for the
  start keyframe, when to give up waiting for a scheduled stop, when to look for motion).
* ``media_us``, a packet's capture time on a clock that never steps (the monotonic stamp the
  capture actor gives every frame and audio block, ``RingPacket.monotonic_us``; for a viewer,
  RTP time that :class:`RtpMediaClock` extends and maps), decides everything timed within the
  stream: file time, the duration limit, the pre-roll's span and the motion trigger's hold.
  An NTP step of the wall clock therefore neither stalls a file nor tears a gap into it.
* ``capture_us``, the same packet's wall-clock stamp, is compared with a scheduled
  ``start_at_us`` / ``stop_at_us`` and nothing else: a schedule is a wall-clock time, so it
  starts and stops by the stamps on the packets, and a late or busy shell still cuts at the
  same frames.  The shell passes ``wall_now`` beside ``now`` once, at construction, and the
  core places its timers for the schedule from the difference.

:meth:`RecordingCore.next_deadline` says when the shell must call
:meth:`RecordingCore.handle_timer` next, so it arms one timer instead of polling.

Phases (``paused`` is a flag beside them: a pause neither starts nor ends a recording)

===========  =================================================  ================================
phase        a video packet                                     leaves on
===========  =================================================  ================================
WAITING      scheduled start: kept from the newest keyframe     the first video packet captured
             before the start (one GOP); motion: kept in the    at/after the start (the kept
             pre-roll.  Nothing is written.                     GOP is written first), or motion
RECORDING    written once a keyframe opened the file (at the    stop, a scheduled stop, motion
             start, after a resume, at a rotation)              ending (back to WAITING), failure
FINISHED     ignored                                            -
FAILED       ignored                                            -
===========  =================================================  ================================

The rules that are easy to get wrong:

* A file starts at a keyframe, always: a decoder can show nothing before one.
* A scheduled recording covers its whole window: it starts at the newest keyframe captured at
  or before ``start_at`` (the core asks for one ``keyframe_lead_s`` ahead, so normally that is
  a frame or two early) and only falls back to the first keyframe after it when none came
  before.  A recorder that opens after its start (its process took longer to start than the
  schedule's lead) therefore still starts at ``start_at``, from the ring's history, instead of
  at the next keyframe it can ask for.
* A scheduled recording ends with the last video packet captured before ``stop_at``; the first
  one at or after it proves the ring holds nothing earlier that is still to come.
* Rotation waits for a keyframe too.  The keyframe is asked for ``keyframe_lead_s`` of file time
  before the duration limit, so it arrives within the limit; a size limit cannot be foreseen
  and is checked against the bytes the muxer reports (:meth:`RecordingCore.segment_size`).
* Audio is written only into an open file, after the video that opened it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import msgspec

from shared.errors import ConfigError
from shared.models import MotionTriggerConfig, RecordingState
from shared.recording.policy import FileLimits, MotionTrigger, PreRollBuffer, Timeline
from shared.recording.storage import segment_path

__all__ = [
    "KEYFRAME_LEAD_S",
    "MOTION_INTERVAL_S",
    "STOP_GRACE_S",
    "CloseSegment",
    "EnforceQuota",
    "Failed",
    "Finished",
    "MeasureMotion",
    "OpenSegment",
    "RecordingCore",
    "RecordingEvent",
    "RecordingPlan",
    "RequestKeyframe",
    "RtpMediaClock",
    "WriteAudio",
    "WriteVideo",
]

#: How far ahead of a cut (scheduled start, duration limit) the encoder is asked for a
#: keyframe: the request and the capture-to-encoder pipeline take a few frame intervals, and
#: the keyframe must be captured before the cut, not after it.
KEYFRAME_LEAD_S = 0.1
#: How long after a scheduled stop the core waits for the first packet past it before it ends
#: the recording anyway: a packet reaches the recorder within the encoder's latency, so a
#: longer silence means the stream stalled.
STOP_GRACE_S = 1.0
#: How often a motion-triggered recording looks at the picture.
MOTION_INTERVAL_S = 0.2


# --- configuration ------------------------------------------------------------------------


class RecordingPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What one recording is to do."""

    first_path: str
    """The first segment's path; later ones are numbered beside it (``segment_path``)."""
    first_segment: int = 0
    """Index of the first segment written (a restarted recorder continues the numbering)."""
    framerate: int = 30
    """Nominal frame rate: a frame's length, cut in at a resume and counted after the last."""
    limits: FileLimits = FileLimits()
    """Size and duration limits; a segment over one is closed at the next keyframe."""
    quota: bool = False
    """Whether the output folder has a quota to enforce after each closed segment."""
    start_at_us: int | None = None
    """Scheduled start in wall-clock microseconds, compared with the packets' ``capture_us``;
    None: at once."""
    stop_at_us: int | None = None
    """Scheduled stop in wall-clock microseconds; None: when the shell stops the recording."""
    trigger: MotionTriggerConfig | None = None
    """Record only while the picture moves (with pre-roll), instead of continuously."""
    keyframe_lead_s: float = KEYFRAME_LEAD_S
    """How far ahead of a cut the encoder is asked for a keyframe."""
    rtp_clock_rate: int = 90_000
    """The RTP clock of video fed by :meth:`RecordingCore.receive_rtp_video` (H.264: 90 kHz,
    RFC 6184 §8.2.1)."""

    def __post_init__(self) -> None:
        if self.framerate <= 0:
            raise ConfigError(f"recording frame rate {self.framerate} must be positive")
        if self.first_segment < 0:
            raise ConfigError(f"first segment {self.first_segment} must be >= 0")
        if self.keyframe_lead_s < 0:
            raise ConfigError(f"keyframe lead {self.keyframe_lead_s}s must be >= 0")
        if (
            self.start_at_us is not None
            and self.stop_at_us is not None
            and self.stop_at_us <= self.start_at_us
        ):
            raise ConfigError("a scheduled recording must stop after it starts")


# --- events: what the shell must do -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordingEvent:
    """Base class of everything the core asks its shell to do."""


@dataclass(frozen=True, slots=True)
class RequestKeyframe(RecordingEvent):
    """Ask the encoder for an IDR (a shell that cannot, such as a viewer, ignores this)."""


@dataclass(frozen=True, slots=True)
class MeasureMotion(RecordingEvent):
    """Measure the motion in the newest picture and report it with ``observe_motion``."""


@dataclass(frozen=True, slots=True)
class OpenSegment(RecordingEvent):
    """Open a new file; the next write is a keyframe at file time 0."""

    index: int
    path: str


@dataclass(frozen=True, slots=True)
class WriteVideo(RecordingEvent):
    """Write one access unit into the open file at ``file_us`` (microseconds of file time)."""

    data: bytes
    file_us: int
    keyframe: bool


@dataclass(frozen=True, slots=True)
class WriteAudio(RecordingEvent):
    """Write one audio packet into the open file at ``file_us``."""

    data: bytes
    file_us: int


@dataclass(frozen=True, slots=True)
class CloseSegment(RecordingEvent):
    """Finish the open file (flush its last fragment)."""

    index: int
    path: str


@dataclass(frozen=True, slots=True)
class EnforceQuota(RecordingEvent):
    """Delete the folder's oldest recordings beyond its quota, never ``keep``."""

    keep: str


@dataclass(frozen=True, slots=True)
class Finished(RecordingEvent):
    """The recording is over (stopped, or its scheduled stop passed); its files are closed."""


@dataclass(frozen=True, slots=True)
class Failed(RecordingEvent):
    """A write failed (disk full, ...): close what is open if it still can; nothing follows."""

    message: str


# --- the media clock ------------------------------------------------------------------------


class RtpMediaClock:
    """RTP timestamps (32 bits, wrapping: RFC 3550 §5.1) to microseconds since the first one.

    Each timestamp is taken as the nearest 32-bit neighbour of the one before (within 2**31
    ticks either way), so a wrap extends forward and a frame slightly earlier than the last
    one maps earlier instead of 2**32 ticks later.
    """

    def __init__(self, clock_rate: int = 90_000) -> None:
        if clock_rate <= 0:
            raise ConfigError(f"RTP clock rate {clock_rate} must be positive")
        self.clock_rate = clock_rate
        self._first: int | None = None
        self._last = 0
        self._extended = 0

    def to_us(self, timestamp: int) -> int:
        timestamp &= 0xFFFF_FFFF
        if self._first is None:
            self._first = self._extended = timestamp
        else:
            delta = (timestamp - self._last) & 0xFFFF_FFFF
            if delta >= 1 << 31:
                delta -= 1 << 32
            self._extended += delta
        self._last = timestamp
        return (self._extended - self._first) * 1_000_000 // self.clock_rate


# --- the core -------------------------------------------------------------------------------


class _Phase(enum.Enum):
    WAITING = "waiting"
    RECORDING = "recording"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class _Held:
    """A packet kept while waiting for a scheduled start or motion, or about to be written."""

    data: bytes
    media_us: int
    keyframe: bool
    video: bool


class RecordingCore:
    """One recording's decisions (see the theory of operation above).

    ``now`` is the shell's monotonic clock at construction; ``wall_now`` the wall clock at the
    same moment, needed only to place a scheduled start or stop on the monotonic clock.
    """

    def __init__(self, plan: RecordingPlan, *, now: float, wall_now: float | None = None) -> None:
        scheduled = plan.start_at_us is not None or plan.stop_at_us is not None
        if scheduled and wall_now is None:
            raise ConfigError("a scheduled recording needs wall_now to place its start and stop")
        self._plan = plan
        self._first_path = Path(plan.first_path)
        self._frame_us = 1_000_000 // plan.framerate
        self._lead_us = int(plan.keyframe_lead_s * 1e6)
        self._phase = _Phase.WAITING
        self._paused = False
        self._timeline = self._new_timeline()
        self._index = plan.first_segment
        self._open_path: str | None = None
        self._segment_bytes = 0
        self._rotate_pending = False
        self._held: list[_Held] = []
        self.segments: list[str] = []
        self.frames_written = 0
        self.error: str | None = None
        self._rtp_clock = RtpMediaClock(plan.rtp_clock_rate)

        def monotonic(wall_us: int) -> float:
            assert wall_now is not None
            return now + (wall_us / 1e6 - wall_now)

        # The start keyframe is asked for at once, or keyframe_lead_s before a scheduled start.
        # A motion-triggered recording asks for none: its pre-roll begins at a keyframe.
        self._keyframe_due: float | None = None
        if plan.trigger is None:
            self._keyframe_due = now
            if plan.start_at_us is not None:
                self._keyframe_due = max(now, monotonic(plan.start_at_us) - plan.keyframe_lead_s)
        self._stop_due: float | None = None
        if plan.stop_at_us is not None:
            self._stop_due = monotonic(plan.stop_at_us)
        self._trigger: MotionTrigger | None = None
        self._pre_roll: PreRollBuffer | None = None
        self._motion_due: float | None = None
        if plan.trigger is not None:
            self._trigger = MotionTrigger(
                threshold=plan.trigger.threshold, hold_s=plan.trigger.hold_s
            )
            self._pre_roll = PreRollBuffer(plan.trigger.pre_roll_s)
            self._motion_due = now
        if plan.start_at_us is None and plan.trigger is None:
            self._phase = _Phase.RECORDING

    # --- what the shell asks ----------------------------------------------------------------

    @property
    def state(self) -> RecordingState:
        if self._phase is _Phase.FAILED:
            return RecordingState.ERROR
        if self._phase is _Phase.FINISHED:
            return RecordingState.STOPPED
        return RecordingState.PAUSED if self._paused else RecordingState.RECORDING

    @property
    def done(self) -> bool:
        """Finished or failed: every later input is ignored."""
        return self._phase in (_Phase.FINISHED, _Phase.FAILED)

    @property
    def segment_index(self) -> int:
        """The segment being written, or the next one to be opened."""
        return self._index

    @property
    def segment_open(self) -> bool:
        return self._open_path is not None

    @property
    def duration_us(self) -> int:
        """Length of the current file's timeline (pauses cut out)."""
        return self._timeline.duration_us

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` next has something to do (None: nothing timed)."""
        if self.done:
            return None
        due = [t for t in (self._keyframe_due, self._motion_due) if t is not None]
        if self._stop_due is not None:
            due.append(self._stop_due + STOP_GRACE_S)
        return min(due, default=None)

    def awaiting_scheduled_stop(self, now: float) -> bool:
        """True once the scheduled stop has come but the packets up to it have not all arrived:
        a shell asked to stop then waits (at most until :meth:`next_deadline`) instead of cutting
        the last frames before the stop."""
        return not self.done and self._stop_due is not None and now >= self._stop_due

    # --- inputs -----------------------------------------------------------------------------

    def handle_timer(self, now: float) -> list[RecordingEvent]:
        if self.done:
            return []
        events: list[RecordingEvent] = []
        if self._keyframe_due is not None and now >= self._keyframe_due:
            self._keyframe_due = None
            events.append(RequestKeyframe())
        if self._motion_due is not None and now >= self._motion_due:
            self._motion_due = now + MOTION_INTERVAL_S
            events.append(MeasureMotion())
        if self._stop_due is not None and now >= self._stop_due + STOP_GRACE_S:
            events += self._finish()  # the stream stalled: end with what arrived
        return events

    def receive_video(
        self, data: bytes, *, capture_us: int, media_us: int, keyframe: bool, now: float
    ) -> list[RecordingEvent]:
        """One encoded access unit, in capture order: ``media_us`` times it in the file,
        ``capture_us`` (wall clock) places it against a schedule (module doc)."""
        if self.done:
            return []
        stop_us = self._plan.stop_at_us
        if stop_us is not None and capture_us >= stop_us:
            return self._finish()
        if self._paused:
            return []
        start_us = self._plan.start_at_us
        packet = _Held(data, media_us, keyframe, video=True)
        if self._phase is _Phase.WAITING:
            if start_us is not None and capture_us < start_us:
                if self._pre_roll is None:
                    self._hold(packet)
                return []
            if self._pre_roll is not None:
                self._pre_roll.add(packet)
                return []
            self._phase = _Phase.RECORDING
            held, self._held = self._held, []
            events = [e for h in held for e in self._write(h)]
            return events + self._write(packet)
        return self._write(packet)

    def receive_rtp_video(
        self, data: bytes, *, rtp_timestamp: int, keyframe: bool, now: float
    ) -> list[RecordingEvent]:
        """An access unit timed by its RTP timestamp instead of capture stamps (a viewer sees
        no capture stamps before the first sender report; RTP time is there from the start).

        RTP time, extended and mapped by :class:`RtpMediaClock`, is continuous: it is the media
        time, and stands in for the wall-clock stamp too, so a plan fed this way must have no
        schedule (``kizuna-stream record`` has none).
        """
        if self._plan.start_at_us is not None or self._plan.stop_at_us is not None:
            raise ConfigError("RTP time is no wall clock: a scheduled recording cannot use it")
        media_us = self._rtp_clock.to_us(rtp_timestamp)
        return self.receive_video(
            data, capture_us=media_us, media_us=media_us, keyframe=keyframe, now=now
        )

    def receive_audio(self, data: bytes, *, media_us: int, now: float) -> list[RecordingEvent]:
        """One audio packet, in capture order with the video, at media time ``media_us``.

        Audio never ends a scheduled recording: it comes through its own ring, so an audio
        packet past the stop says nothing about the video still on its way.  Nor does it start
        one (video does), so its wall-clock stamp plays no part here.
        """
        if self.done or self._paused:
            return []
        if self._phase is _Phase.WAITING:
            if self._held:
                self._held.append(_Held(data, media_us, False, video=False))
            return []
        return self._write(_Held(data, media_us, False, video=False))

    def segment_size(self, size_bytes: int) -> list[RecordingEvent]:
        """The open segment's size as the muxer counts it, after the shell's last writes."""
        if self._open_path is None or self.done:
            return []
        self._segment_bytes = size_bytes
        return self._check_limits()

    def observe_motion(self, motion: float, *, media_us: int, now: float) -> list[RecordingEvent]:
        """The motion :class:`MeasureMotion` asked for, measured in a picture captured at media
        time ``media_us`` (the clock of the video packets' ``media_us``)."""
        if self._trigger is None or self._pre_roll is None or self.done:
            return []
        decision = self._trigger.observe(motion, now_us=media_us)
        if decision is True and self._phase is _Phase.WAITING:
            self._phase = _Phase.RECORDING
            backlog = self._pre_roll.drain()
            return [e for p in backlog if isinstance(p, _Held) for e in self._write(p)]
        if decision is False and self._phase is _Phase.RECORDING:
            # Each motion event is its own file; the pre-roll starts again for the next one.
            self._phase = _Phase.WAITING
            events = self._close(next_segment=True)
            self._timeline = self._new_timeline()
            return events
        return []

    def pause(self, now: float) -> list[RecordingEvent]:
        if self.done or self._paused:
            return []
        self._paused = True
        self._timeline.pause()
        self._held.clear()  # a kept GOP cannot be joined to what comes after the pause
        return []

    def resume(self, now: float) -> list[RecordingEvent]:
        """Resume; the file continues at the next keyframe, asked for now."""
        if self.done or not self._paused:
            return []
        self._paused = False
        self._timeline.resume()
        return [RequestKeyframe()]

    def stop(self, now: float) -> list[RecordingEvent]:
        """End the recording now, with what has been received."""
        if self.done:
            return []
        return self._finish()

    def write_failed(self, message: str) -> list[RecordingEvent]:
        """The shell could not carry out an event (disk full, folder gone): the recording ends
        in error and the file so far is kept; the shell closes it if it still can."""
        if self.done:
            return []
        self._phase = _Phase.FAILED
        self._open_path = None
        self.error = message
        return [Failed(message)]

    # --- internals --------------------------------------------------------------------------

    def _new_timeline(self) -> Timeline:
        return Timeline(resume_gap_us=self._frame_us)

    def _hold(self, packet: _Held) -> None:
        """Keep the newest GOP that begins before the scheduled start."""
        if packet.keyframe:
            self._held = [packet]
        elif self._held:
            self._held.append(packet)

    def _write(self, packet: _Held) -> list[RecordingEvent]:
        if not packet.video:
            if self._open_path is None or self._timeline.needs_keyframe:
                return []
            file_us = self._timeline.to_file_us(packet.media_us)
            if file_us is None or file_us < 0:
                return []  # captured before the keyframe that opened the file
            return [WriteAudio(packet.data, file_us)]
        if self._timeline.needs_keyframe and not packet.keyframe:
            return []  # the file (or the part after a pause) must start at a keyframe
        events: list[RecordingEvent] = []
        if self._rotate_pending and packet.keyframe and self._open_path is not None:
            events += self._close(next_segment=True)
            self._timeline = self._new_timeline()  # the next file starts at zero
        file_us = self._timeline.to_file_us(packet.media_us)
        if file_us is None or file_us < 0:
            return events
        if self._open_path is None:
            path = str(segment_path(self._first_path, self._index))
            self._open_path = path
            self._segment_bytes = 0
            self.segments.append(path)
            events.append(OpenSegment(self._index, path))
        events.append(WriteVideo(packet.data, file_us, packet.keyframe))
        self.frames_written += 1
        return events + self._check_limits()

    def _check_limits(self) -> list[RecordingEvent]:
        if self._rotate_pending or self._open_path is None:
            return []
        # Ask keyframe_lead_s early for the duration limit, so the keyframe lands within it.
        if self._plan.limits.reached(
            size_bytes=self._segment_bytes, duration_us=self._timeline.duration_us + self._lead_us
        ):
            self._rotate_pending = True
            return [RequestKeyframe()]
        return []

    def _close(self, *, next_segment: bool) -> list[RecordingEvent]:
        path, self._open_path = self._open_path, None
        self._rotate_pending = False
        if path is None:
            return []
        events: list[RecordingEvent] = [CloseSegment(self._index, path)]
        if next_segment:
            self._index += 1
        if self._plan.quota:
            events.append(EnforceQuota(keep=path))
        return events

    def _finish(self) -> list[RecordingEvent]:
        events = self._close(next_segment=False)
        self._phase = _Phase.FINISHED
        self._held.clear()
        return [*events, Finished()]
