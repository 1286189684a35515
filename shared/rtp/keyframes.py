"""Where the sender skips to and when it asks for a keyframe, sans-I/O.

Theory of operation
-------------------
H.264 frames after a gap cannot be decoded until the next IDR, so every skip the sender makes
lands on a keyframe, and whoever is left waiting for one makes the encoder produce it sooner
than the periodic GOP would.  Two objects hold every such decision:

- :class:`KeyframePolicy`, one per stream (the sender actor holds it):

  - :meth:`~KeyframePolicy.select` takes each batch read from the encoder's ring.  A batch
    spanning more capture time than ``stale_batch_us`` means the sender stalled (a backlog):
    live viewers are better served from the newest keyframe in it than by a burst of stale
    frames.  A reader lapped by the ring resumes at a keyframe by itself (``missed``); while
    it finds none to resume at, the policy asks the encoder for one.
  - :meth:`~KeyframePolicy.request` records that someone needs a keyframe: a viewer's PLI
    (RFC 4585 §6.3.1), a viewer that joined, one resuming after congestion, a lapped reader.
    :meth:`~KeyframePolicy.poll` says whether to ask the encoder now: requests are coalesced
    and forwarded at most once per ``request_interval_s``, since every keyframe is large and
    goes to every viewer.  :meth:`~KeyframePolicy.next_deadline` says when a held request may
    go, so the shell arms one timer for it.

- :class:`VideoAdmission`, one per viewer (:class:`shared.rtp.sender.PeerSender` holds it),
  decides which video frames that viewer is sent.  Its states, as a table:

  ==========  =======================================  ==========================================
  state       a frame is sent when                     moves to
  ==========  =======================================  ==========================================
  JOINING     it is a keyframe                         SENDING on that keyframe
  SENDING     always (unless the backlog passes max)   DRAINING when the backlog passes max
  DRAINING    never                                    RESUMING once the backlog is <= max / 2
  RESUMING    it is a keyframe                         SENDING on it; DRAINING if backlog > max/2
  ==========  =======================================  ==========================================

  Entering RESUMING wants a keyframe once (:meth:`~VideoAdmission.take_keyframe_wanted`): a
  congested viewer would otherwise wait for the next periodic one, seconds away.  A joining
  viewer's request is made when it connects (:meth:`shared.rtp.sender.BroadcastSender.add`).

Time is passed in (``now``: monotonic seconds) where a decision depends on it; capture times
are the frames' own data.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol, TypeVar

from shared.errors import ConfigError

__all__ = [
    "KEYFRAME_REQUEST_INTERVAL_S",
    "MAX_BACKLOG",
    "STALE_BATCH_US",
    "AdmissionState",
    "KeyframePolicy",
    "VideoAdmission",
]

#: A batch spanning more capture time than this is a backlog (the sender stalled).
STALE_BATCH_US = 250_000
#: Keyframe requests reach the encoder at most this often.
KEYFRAME_REQUEST_INTERVAL_S = 0.25
#: Datagrams queued for one viewer beyond which its video is dropped until a keyframe.
MAX_BACKLOG = 1200


class EncodedFrame(Protocol):
    """What :meth:`KeyframePolicy.select` reads of a frame (a ``RingPacket`` has it)."""

    @property
    def capture_us(self) -> int: ...

    @property
    def keyframe(self) -> bool: ...


FrameT = TypeVar("FrameT", bound=EncodedFrame)


class KeyframePolicy:
    """One stream's staleness and keyframe-request decisions (see the module doc)."""

    def __init__(
        self,
        *,
        request_interval_s: float = KEYFRAME_REQUEST_INTERVAL_S,
        stale_batch_us: int = STALE_BATCH_US,
    ) -> None:
        if request_interval_s < 0 or stale_batch_us <= 0:
            raise ConfigError("keyframe request interval and stale batch span must be positive")
        self.request_interval_s = request_interval_s
        self.stale_batch_us = stale_batch_us
        self._pending = False
        self._last_forwarded: float | None = None
        #: Frames read from the ring but never sent: lapped, or skipped as stale.
        self.frames_missed = 0
        #: Requests recorded (PLIs, joins, ...), and those forwarded to the encoder.
        self.requests_received = 0
        self.requests_forwarded = 0

    def select(self, frames: Sequence[FrameT], *, missed: int, video: bool) -> Sequence[FrameT]:
        """The frames of one batch read from a ring to send; ``missed`` is what the reader
        lost before them (it was lapped).  Audio (``video=False``) is sent as it comes."""
        self.frames_missed += missed
        if not video:
            return frames
        if missed and not frames:
            # Lapped, and the ring held no keyframe to resume at: without a request the
            # stream would stay dark until the next periodic keyframe.
            self.request()
            return frames
        if len(frames) < 2 or frames[-1].capture_us - frames[0].capture_us <= self.stale_batch_us:
            return frames
        for index in range(len(frames) - 1, 0, -1):
            if frames[index].keyframe:
                self.frames_missed += index
                return frames[index:]
        return frames  # no keyframe to jump to: late frames still beat a broken picture

    def request(self) -> None:
        """Someone needs a keyframe; it goes to the encoder at the next :meth:`poll` allowed."""
        self.requests_received += 1
        self._pending = True

    def next_deadline(self) -> float | None:
        """When :meth:`poll` would forward the pending request (None: nothing pending)."""
        if not self._pending:
            return None
        if self._last_forwarded is None:
            return float("-inf")
        return self._last_forwarded + self.request_interval_s

    def poll(self, now: float) -> bool:
        """True when the shell should ask the encoder for a keyframe now."""
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return False
        self._pending = False
        self._last_forwarded = now
        self.requests_forwarded += 1
        return True


class AdmissionState(enum.Enum):
    JOINING = "joining"
    SENDING = "sending"
    DRAINING = "draining"
    RESUMING = "resuming"


class VideoAdmission:
    """Which video frames one viewer is sent (the table in the module doc)."""

    def __init__(self, max_backlog: int = MAX_BACKLOG) -> None:
        if max_backlog < 1:
            raise ConfigError(f"max_backlog must be positive, got {max_backlog}")
        self.max_backlog = max_backlog
        self.state = AdmissionState.JOINING
        #: Frames refused while congested (a joining viewer's wait is not counted).
        self.frames_skipped = 0
        self._keyframe_wanted = False

    def admit(self, *, keyframe: bool, backlog: int) -> bool:
        """Whether to send this frame; ``backlog`` is what the viewer's connection has queued."""
        state = self.state
        if state is AdmissionState.JOINING:
            if not keyframe:
                return False
            state = AdmissionState.SENDING
        if backlog > self.max_backlog:
            state = AdmissionState.DRAINING
        if state is not AdmissionState.SENDING:
            if backlog > self.max_backlog // 2:
                state = AdmissionState.DRAINING
            elif not keyframe:
                if state is AdmissionState.DRAINING:
                    self._keyframe_wanted = True  # once per congestion episode
                state = AdmissionState.RESUMING
            else:
                state = AdmissionState.SENDING
        self.state = state
        if state is not AdmissionState.SENDING:
            self.frames_skipped += 1
            return False
        return True

    def take_keyframe_wanted(self) -> bool:
        """Whether this viewer began waiting for a keyframe since the last call."""
        wanted, self._keyframe_wanted = self._keyframe_wanted, False
        return wanted
