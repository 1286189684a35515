"""The sending side's media queue for RoQ datagram mode, bounded by age, sans-I/O.

Theory of operation
-------------------
A congested viewer must not build seconds of delay: live media that has waited longer than its
latency budget is worth less than the media behind it.  So the queue between the RTP sender and
QUIC (:class:`MediaQueue`, one per connection) is bounded by *age*, not count, as libwebrtc's
pacer bounds its queue by expected queue time.  Its shell (``shared.roq.transport``) hands
datagrams to QUIC only as fast as QUIC sends them, so nearly all waiting happens here, where it
is measured and cut.

- :meth:`~MediaQueue.push` takes one frame: ``(now, flow id, datagrams, keyframe, kind)``.
  Each frame gets a deadline, ``now + budget``; the queue stays in push order (frames and the
  datagrams inside them), which is also deadline order.
- :meth:`~MediaQueue.pop` first drops what is stale (``now >= deadline``), then returns the
  oldest datagrams.  A frame may leave in parts; a part still queued at its deadline is dropped
  like a whole frame (the viewer cannot use a frame with holes).
- What a drop costs depends on the track.  An Opus frame stands alone (RFC 7587: each packet
  decodes by itself), so a stale audio frame is just dropped.  An H.264 P-frame references the
  frames before it, so once a video frame is dropped every later video frame of that flow is
  dropped too, queued or yet to come, until a keyframe (IDR) restarts the chain (RFC 6184 §8.4:
  a decoder cannot use frames after a gap).
- The flow then waits for a keyframe, and nobody would make one before the next periodic IDR,
  seconds away.  :meth:`~MediaQueue.take_keyframe_needed` asks for one, once per gap, when the
  queue has drained to half its budget: a viewer still congested would only let the IDR go
  stale too (and an IDR costs every viewer of the shared encoder), as
  :class:`shared.rtp.keyframes.VideoAdmission` waits for its backlog to halve.
- A repair (a NACKed packet resent, RFC 4585 §6.2.1) skips this queue: the shell puts it ahead
  of all media.  :meth:`~MediaQueue.repairs` refuses the repairs of packets this queue dropped,
  and every repair on a flow that waits for a keyframe: the viewer's NACKs for the gap would
  otherwise resend stale media past the budget, at the worst moment.  Packets are RTP, their
  sequence number at octets 2-3 of the fixed header (RFC 3550 §5.1).
- :meth:`~MediaQueue.next_deadline` says when the oldest frame goes stale, so the shell arms one
  timer to drop it even while nothing is sent.

Time is passed in (``now``: monotonic seconds); nothing here reads a clock.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from shared.errors import ConfigError

__all__ = ["AUDIO", "MEDIA_LATENCY_BUDGET_S", "VIDEO", "MediaQueue"]

#: How long media may wait to be sent before it is dropped (datagram mode), or before its
#: still-unsent stream is cancelled (stream mode).  Longer than a few frames, so a short burst
#: (a keyframe) goes through whole; far shorter than a viewer's patience.
MEDIA_LATENCY_BUDGET_S = 0.3
#: Sequence numbers of dropped packets remembered per connection, to refuse their repairs
#: (more than a :class:`shared.rtp.send_history.SendHistory` holds).
EXPIRED_MEMORY = 4096

#: Track kinds, as :class:`shared.rtp.sender.MediaTrack` names them.
VIDEO, AUDIO = "video", "audio"
_KINDS = (VIDEO, AUDIO)


class _Frame:
    __slots__ = ("datagrams", "deadline", "flow_id", "keyframe", "next", "video")

    def __init__(
        self, deadline: float, flow_id: int, datagrams: list[bytes], keyframe: bool, video: bool
    ) -> None:
        self.deadline, self.flow_id, self.datagrams = deadline, flow_id, datagrams
        self.keyframe, self.video = keyframe, video
        #: Index of the first datagram not yet popped.
        self.next = 0


class MediaQueue:
    """One connection's media waiting for QUIC, bounded by age (see the module doc)."""

    def __init__(self, budget_s: float = MEDIA_LATENCY_BUDGET_S) -> None:
        if not budget_s > 0:
            raise ConfigError(f"media latency budget must be positive, got {budget_s}")
        self.budget_s = budget_s
        self._frames: collections.deque[_Frame] = collections.deque()
        self._datagrams = 0
        self._bytes = 0
        #: Video flows that lost a frame and wait for a keyframe; True once one was asked for.
        self._gaps: dict[int, bool] = {}
        self._expired: dict[tuple[int, int], None] = {}  # an ordered set, oldest first
        self._keyframe_needed = False
        #: Frames dropped: stale ones, and the video frames after them up to a keyframe.
        self.frames_expired = 0
        #: Their datagrams' bytes (what was queued of them and never handed to QUIC).
        self.bytes_expired = 0
        #: Repairs refused because the packet or its frame was dropped here.
        self.repairs_refused = 0

    def __len__(self) -> int:
        """Datagrams waiting."""
        return self._datagrams

    @property
    def queued_bytes(self) -> int:
        """Bytes of the datagrams waiting."""
        return self._bytes

    def push(
        self, now: float, flow_id: int, datagrams: Sequence[bytes], *, keyframe: bool, kind: str
    ) -> bool:
        """Queue one frame's datagrams; False when it is dropped at once (a video flow
        waiting for a keyframe)."""
        if kind not in _KINDS:
            raise ConfigError(f"track kind must be one of {_KINDS}, got {kind!r}")
        if not datagrams:
            return True
        self.expire(now)
        video = kind == VIDEO
        if video and flow_id in self._gaps:
            if not keyframe:
                self._drop(flow_id, datagrams)
                self._ask_for_keyframe(flow_id, now)
                return False
            del self._gaps[flow_id]  # the chain restarts here
        # Deadlines stay in push order even if a caller's clock stepped back.
        deadline = now + self.budget_s
        if self._frames and deadline < self._frames[-1].deadline:
            deadline = self._frames[-1].deadline
        self._frames.append(_Frame(deadline, flow_id, list(datagrams), keyframe, video))
        self._datagrams += len(datagrams)
        self._bytes += sum(map(len, datagrams))
        return True

    def expire(self, now: float) -> None:
        """Drop every frame whose deadline has come, and the video frames that depend on it."""
        frames, gap = self._frames, False
        while frames and frames[0].deadline <= now:
            frame = frames.popleft()
            self._discard(frame)
            gap |= frame.video
        if gap:
            self._drop_dependents()

    def pop(self, now: float, limit: int) -> list[bytes]:
        """Up to ``limit`` datagrams to hand to QUIC now, oldest first, after :meth:`expire`."""
        self.expire(now)
        out: list[bytes] = []
        frames = self._frames
        while frames and len(out) < limit:
            frame = frames[0]
            take = frame.datagrams[frame.next : frame.next + limit - len(out)]
            frame.next += len(take)
            out += take
            if frame.next == len(frame.datagrams):
                frames.popleft()
        self._datagrams -= len(out)
        self._bytes -= sum(map(len, out))
        return out

    def next_deadline(self) -> float | None:
        """When the oldest frame goes stale (None: nothing queued)."""
        return self._frames[0].deadline if self._frames else None

    def repairs(self, flow_id: int, datagrams: Sequence[bytes]) -> list[bytes]:
        """The repairs worth sending: not of a packet dropped here, not on a broken chain."""
        if flow_id in self._gaps:
            self.repairs_refused += len(datagrams)
            return []
        kept = [d for d in datagrams if (flow_id, _rtp_sequence(d)) not in self._expired]
        self.repairs_refused += len(datagrams) - len(kept)
        return kept

    def take_keyframe_needed(self) -> bool:
        """Whether a video flow began waiting for a keyframe it can use since the last call."""
        needed, self._keyframe_needed = self._keyframe_needed, False
        return needed

    def clear(self) -> None:
        """Forget everything queued (the connection closed); nothing is counted as dropped."""
        self._frames.clear()
        self._datagrams = self._bytes = 0

    # -- drops ---------------------------------------------------------------------------------

    def _discard(self, frame: _Frame) -> None:
        """A queued frame is dropped: its unsent datagrams leave the queue, its flow breaks."""
        rest = frame.datagrams[frame.next :]
        self._datagrams -= len(rest)
        self._bytes -= sum(map(len, rest))
        self._drop(frame.flow_id, rest)
        if frame.video:
            self._gaps.setdefault(frame.flow_id, False)

    def _drop(self, flow_id: int, datagrams: Sequence[bytes]) -> None:
        self.frames_expired += 1
        self.bytes_expired += sum(map(len, datagrams))
        expired = self._expired
        for datagram in datagrams:
            sequence = _rtp_sequence(datagram)
            if sequence is not None:
                expired[(flow_id, sequence)] = None
        while len(expired) > EXPIRED_MEMORY:
            del expired[next(iter(expired))]

    def _drop_dependents(self) -> None:
        """Drop queued video frames behind a gap on their flow, up to the flow's keyframe."""
        kept: collections.deque[_Frame] = collections.deque()
        for frame in self._frames:
            if frame.video and frame.flow_id in self._gaps:
                if frame.keyframe:
                    del self._gaps[frame.flow_id]
                else:
                    self._discard(frame)
                    continue
            kept.append(frame)
        self._frames = kept

    def _ask_for_keyframe(self, flow_id: int, now: float) -> None:
        """Once per gap, when the queue has drained to half its budget (the module doc)."""
        if self._gaps[flow_id]:
            return
        oldest = self._frames[0].deadline - self.budget_s if self._frames else now
        if now - oldest <= self.budget_s / 2:
            self._gaps[flow_id] = True
            self._keyframe_needed = True


def _rtp_sequence(datagram: bytes) -> int | None:
    """The RTP sequence number in a RoQ datagram (flow id varint, then the packet), or None
    when the packet is not RTP version 2 (RFC 3550 §5.1)."""
    start = 1 << (datagram[0] >> 6) if datagram else 0
    if len(datagram) < start + 4 or datagram[start] >> 6 != 2:
        return None
    return int.from_bytes(datagram[start + 2 : start + 4], "big")
