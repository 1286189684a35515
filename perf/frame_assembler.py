"""FrameAssembler: RTP packets of an H.264 stream -> complete access units, or nothing.

Theory of operation
-------------------
Packets are grouped by RTP timestamp; one timestamp is one access unit, and the sender sets the
marker bit on its last packet (RFC 6184 §5.1).  Sequence numbers are extended to 64 bits
(RFC 3550 Appendix A.1) so that wrap-around never reorders anything.

Frames leave strictly in sequence order.  The *head* is the pending frame with the lowest
sequence number.  It is complete when its marker packet has arrived and every sequence number
from where it must start to its marker is present.  Where it must start is one past the end of
the frame before it; only for the very first frame is its lowest received packet taken on
trust.  A complete head is depacketized and delivered; an incomplete head is abandoned as soon
as a packet of a later frame arrives: reordering is tolerated inside a frame, not across frames.

An abandoned or malformed frame is counted and sets :attr:`FrameAssembler.keyframe_needed`;
from then on every frame is dropped until one holding an IDR slice arrives whole, since later
P-frames reference the lost picture.  The caller sends a PLI (RFC 4585 §6.3.1) while the flag is
set.  A frame whose marker was lost is known only to end somewhere after its last packet; the
next frame is then accepted only if exactly one packet (that marker) is missing before it.

Memory is bounded by :attr:`FrameAssembler.max_pending_frames` and ``max_pending_bytes``:
beyond either, the oldest pending frame is evicted and counted.  Nothing here reads a clock.

:class:`FrameAssembler` never waits: it is the zero-latency assembler of the in-process
benchmark baseline (``perf.bench_latency``).  The viewer runs
:class:`shared.rtp.receiver.ReceiverSession` instead, which waits for retransmissions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.errors import ConfigError, ProtocolError
from shared.rtp.h264 import DEFAULT_MAX_NAL_SIZE, H264Depacketizer, is_keyframe, to_annexb
from shared.rtp.packet import RtpPacket, RtpSequenceExtender

__all__ = ["AssembledFrame", "FrameAssembler"]

DEFAULT_MAX_PENDING_FRAMES = 32
DEFAULT_MAX_PENDING_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class AssembledFrame:
    """One complete H.264 access unit, every packet of it present."""

    rtp_timestamp: int
    nal_units: list[bytes]
    keyframe: bool
    """Whether the access unit holds an IDR slice."""
    first_sequence: int
    """Extended sequence number of the frame's first packet."""
    last_sequence: int
    """Extended sequence number of the frame's marker packet."""

    @property
    def annexb(self) -> bytes:
        """The access unit as an Annex B byte stream, ready for a decoder."""
        return to_annexb(self.nal_units)


@dataclass(slots=True)
class _PendingFrame:
    timestamp: int
    first: int
    last: int
    payloads: dict[int, bytes] = field(default_factory=dict)
    marker: int | None = None
    size: int = 0


class FrameAssembler:
    """Groups RTP packets into access units and drops what cannot be decoded (see module doc)."""

    def __init__(
        self,
        *,
        max_pending_frames: int = DEFAULT_MAX_PENDING_FRAMES,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        max_nal_size: int = DEFAULT_MAX_NAL_SIZE,
        wait_for_keyframe: bool = True,
    ) -> None:
        """``wait_for_keyframe``: drop frames until the first keyframe (a viewer joining late)."""
        if max_pending_frames < 1 or max_pending_bytes < 1:
            raise ConfigError("max_pending_frames and max_pending_bytes must be positive")
        self.max_pending_frames = max_pending_frames
        self.max_pending_bytes = max_pending_bytes
        self._depacketizer = H264Depacketizer(max_nal_size)
        self._wait_for_keyframe = wait_for_keyframe
        self._awaiting_keyframe = wait_for_keyframe
        self._ssrc: int | None = None
        self._reset_sequence_state()
        #: True from a dropped frame until the next keyframe is delivered: send a PLI.
        self.keyframe_needed = False
        self.frames_completed = 0
        self.frames_dropped = 0
        """Frames not delivered: lost packets, malformed, evicted, or waiting for a keyframe."""
        self.frames_evicted = 0
        self.packets_received = 0
        self.packets_duplicate = 0
        self.packets_late = 0
        """Packets of a frame already delivered or dropped (late, or duplicates of those)."""
        self.packets_malformed = 0
        """Empty payloads, contradicting marker bits, and frames that failed to depacketize."""
        self.gaps = 0

    def _reset_sequence_state(self) -> None:
        self._extender = RtpSequenceExtender()
        self._pending: dict[int, _PendingFrame] = {}  # by RTP timestamp
        self._seen: set[int] = set()  # extended sequence numbers held in _pending
        self._bytes = 0
        # Where the next frame begins; lower sequence numbers belong to finished frames.  None
        # until the first frame is finished.
        self._next_start: int | None = None

    @property
    def pending_frames(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def push(self, packet: RtpPacket) -> list[AssembledFrame]:
        """Add one packet; return the frames it completes, oldest first.  Never raises."""
        self.packets_received += 1
        if packet.ssrc != self._ssrc:  # a new source (sender restarted): a new sequence space
            if self._ssrc is not None:
                while self._pending:
                    self._drop(self._head())
                self._reset_sequence_state()
                self._awaiting_keyframe |= self._wait_for_keyframe
            self._ssrc = packet.ssrc
        if not packet.payload:
            self.packets_malformed += 1
            return []
        seq = self._extender.extend(packet.sequence_number)
        if self._next_start is not None and seq < self._next_start:
            self.packets_late += 1
            return []
        if seq in self._seen:
            self.packets_duplicate += 1
            return []
        frame = self._pending.get(packet.timestamp)
        if frame is None:
            frame = self._pending[packet.timestamp] = _PendingFrame(packet.timestamp, seq, seq)
        elif frame.marker is not None and (packet.marker or seq > frame.marker):
            self.packets_malformed += 1  # a second end, or a packet after the end
            return []
        frame.payloads[seq] = packet.payload
        frame.first, frame.last = min(frame.first, seq), max(frame.last, seq)
        frame.size += len(packet.payload)
        if packet.marker:
            frame.marker = seq
        self._seen.add(seq)
        self._bytes += len(packet.payload)

        delivered: list[AssembledFrame] = []
        self._drain(delivered)
        while len(self._pending) > self.max_pending_frames or self._bytes > self.max_pending_bytes:
            self.frames_evicted += 1
            self._drop(self._head())
            self._drain(delivered)
        return delivered

    def _head(self) -> _PendingFrame:
        return min(self._pending.values(), key=lambda frame: frame.first)

    def _drain(self, delivered: list[AssembledFrame]) -> None:
        while self._pending:
            head = self._head()
            if self._is_complete(head):
                self._finish(head)
                self._deliver(head, delivered)
            elif any(frame.last > head.last for frame in self._pending.values()):
                # A later frame has begun, so the head's holes are losses, not reordering.
                self.gaps += 1
                self._drop(head)
            else:
                return

    def _is_complete(self, frame: _PendingFrame) -> bool:
        if frame.marker is None or frame.last != frame.marker:
            return False
        start = frame.first if self._next_start is None else self._next_start
        return frame.first == start and len(frame.payloads) == frame.marker - start + 1

    def _finish(self, frame: _PendingFrame) -> None:
        del self._pending[frame.timestamp]
        self._seen.difference_update(frame.payloads)
        self._bytes -= frame.size
        # Without its marker, the frame still owns at least one more packet: its lost end.
        end = frame.last + (1 if frame.marker is not None else 2)
        self._next_start = end if self._next_start is None else max(self._next_start, end)

    def _drop(self, frame: _PendingFrame) -> None:
        self._finish(frame)
        self._lost_frame()

    def _lost_frame(self) -> None:
        self.frames_dropped += 1
        self._awaiting_keyframe = True
        self.keyframe_needed = True

    def _deliver(self, frame: _PendingFrame, delivered: list[AssembledFrame]) -> None:
        self._depacketizer.reset()
        nal_units: list[bytes] = []
        try:
            for seq in sorted(frame.payloads):
                nal_units += self._depacketizer.push(frame.payloads[seq])
            if self._depacketizer.in_fragment:
                raise ProtocolError("access unit ends inside an FU-A NAL unit")
        except ProtocolError:
            self._depacketizer.reset()
            self.packets_malformed += 1
            self._lost_frame()
            return
        keyframe = is_keyframe(nal_units)
        if self._awaiting_keyframe and not keyframe:
            self._lost_frame()
            return
        self._awaiting_keyframe = False
        self.keyframe_needed = False
        self.frames_completed += 1
        delivered.append(
            AssembledFrame(
                rtp_timestamp=frame.timestamp,
                nal_units=nal_units,
                keyframe=keyframe,
                first_sequence=frame.first,
                last_sequence=frame.last,
            )
        )
