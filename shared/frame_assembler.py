"""Receiver side: RTP packets of an H.264 stream -> complete access units, or nothing.

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
benchmark baseline.  The viewer instead runs :class:`ReceiverSession`, the whole receiving RTP
session of one connection: per track a :class:`shared.jitter_buffer.JitterBuffer` (which waits
for retransmissions within a budget) and reception statistics, plus the RTCP feedback the
sender needs.  Time is passed in there too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.bandwidth import ReceptionStats, TransportFeedbackRecorder
from shared.errors import ConfigError, ProtocolError
from shared.h264_rtp import DEFAULT_MAX_NAL_SIZE, H264Depacketizer, is_keyframe, to_annexb
from shared.jitter_buffer import BufferedFrame, JitterBuffer, PayloadFormat
from shared.rtcp import (
    RtcpNack,
    RtcpPli,
    RtcpReceiverReport,
    RtcpSenderReport,
    ntp_to_unix,
    parse_rtcp_compound,
)
from shared.rtp import RtpPacket, RtpSequenceExtender, transport_sequence
from shared.rtp_sender import MediaTrack

__all__ = ["AssembledFrame", "FrameAssembler", "ReceiverSession", "ReceiverTrack"]

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


# -- the receiving RTP session (all tracks of one connection) ---------------------------------


class ReceiverTrack:
    """One received track: jitter buffer, reception stats, and the SR's clock mapping."""

    def __init__(self, spec: MediaTrack, payload_format: PayloadFormat, budget_s: float) -> None:
        self.spec = spec
        self.buffer = JitterBuffer(payload_format, latency_budget_s=budget_s)
        self.stats: ReceptionStats | None = None
        self._sr: tuple[float, int] | None = None  # (Unix time, RTP timestamp) of the last SR
        self.last_pli = -1e9

    def on_packet(self, packet: RtpPacket, now: float) -> list[BufferedFrame]:
        if self.stats is None or self.stats.ssrc != packet.ssrc:
            self.stats = ReceptionStats(packet.ssrc, self.spec.clock_rate)
            self._sr = None
        self.stats.on_packet(packet.sequence_number, packet.timestamp, now)
        return self.buffer.push(packet, now)

    def on_sender_report(self, report: RtcpSenderReport, now: float) -> None:
        if self.stats is not None and report.ssrc == self.stats.ssrc:
            self.stats.on_sender_report(report, now)
            self._sr = (ntp_to_unix(report.ntp_timestamp), report.rtp_timestamp)

    def capture_us(self, rtp_timestamp: int) -> int | None:
        """When the sender captured this timestamp, on its wall clock (RFC 3550 §6.4.1)."""
        if self._sr is None:
            return None
        unix, base = self._sr
        ticks = (rtp_timestamp - base + 2**31) % 2**32 - 2**31
        return int((unix + ticks / self.spec.clock_rate) * 1e6)


class ReceiverSession:
    """The viewer's RTP session, sans-I/O: packets in, frames and RTCP feedback out.

    :meth:`on_packet` takes one ``(flow id, packet)`` with its arrival time; :meth:`tick`,
    called every few tens of milliseconds, gives up on what the latency budget no longer
    covers and returns the RTCP to send: NACKs (RFC 4585 §6.2.1), a PLI while a keyframe is
    needed (§6.3.1, at most every ``pli_interval_s``), transport-wide feedback every
    ``feedback_interval_s`` and receiver reports every ``report_interval_s`` (RFC 3550
    §6.4.2).  Malformed packets and unknown flow ids are counted and dropped.
    """

    def __init__(
        self,
        tracks: Sequence[tuple[MediaTrack, PayloadFormat]],
        *,
        latency_budget_s: float = 0.2,
        ssrc: int = 0x5EED,
        pli_interval_s: float = 0.3,
        feedback_interval_s: float = 0.05,
        report_interval_s: float = 0.5,
    ) -> None:
        self.ssrc = ssrc
        self.tracks = {spec.flow_id: ReceiverTrack(spec, f, latency_budget_s) for spec, f in tracks}
        self._rtcp = {t.spec.rtcp_flow_id: t for t in self.tracks.values()}
        self._intervals = (pli_interval_s, feedback_interval_s, report_interval_s)
        self._next_feedback = self._next_report = 0.0
        self.feedback = TransportFeedbackRecorder(ssrc)
        self.packets_received = 0
        self.bytes_received = 0
        self.packets_malformed = 0
        self.unknown_flows = 0
        self.keyframe_requests = 0

    def new_connection(self) -> None:
        """A new QUIC connection: a new transport-wide sequence space."""
        self.feedback = TransportFeedbackRecorder(self.ssrc)

    def on_packet(
        self, flow_id: int, data: bytes, now: float
    ) -> list[tuple[ReceiverTrack, BufferedFrame]]:
        self.packets_received += 1
        self.bytes_received += len(data)
        track = self.tracks.get(flow_id)
        if track is not None:
            try:
                packet = RtpPacket.parse(data)
            except ProtocolError:
                self.packets_malformed += 1
                return []
            sequence = transport_sequence(packet)
            if sequence is not None:
                self.feedback.on_packet(sequence, int(now * 1e6))
            return [(track, frame) for frame in track.on_packet(packet, now)]
        rtcp_track = self._rtcp.get(flow_id)
        if rtcp_track is None:
            self.unknown_flows += 1
            return []
        try:
            packets = parse_rtcp_compound(data)
        except ProtocolError:
            self.packets_malformed += 1
            return []
        for rtcp in packets:
            if isinstance(rtcp, RtcpSenderReport):
                rtcp_track.on_sender_report(rtcp, now)
        return []

    def tick(
        self, now: float, rtt_s: float = 0.0
    ) -> tuple[list[tuple[ReceiverTrack, BufferedFrame]], list[tuple[int, bytes]]]:
        """Frames released by giving up on losses, and the RTCP ``(flow id, packet)`` to send."""
        pli_interval, feedback_interval, report_interval = self._intervals
        frames: list[tuple[ReceiverTrack, BufferedFrame]] = []
        out: list[tuple[int, bytes]] = []
        for track in self.tracks.values():
            frames += [(track, frame) for frame in track.buffer.poll(now)]
            if track.stats is None:
                continue
            track.buffer.rtt_s = rtt_s
            media, flow = track.stats.ssrc, track.spec.rtcp_flow_id
            lost = track.buffer.nacks(now)
            if lost:
                out.append((flow, RtcpNack.from_sequences(self.ssrc, media, lost).serialize()))
            if track.buffer.keyframe_needed and now - track.last_pli >= pli_interval:
                track.last_pli = now
                self.keyframe_requests += 1
                out.append((flow, RtcpPli(sender_ssrc=self.ssrc, media_ssrc=media).serialize()))
        first = next(iter(self.tracks.values()))
        if now >= self._next_feedback:
            self._next_feedback = now + feedback_interval
            media = first.stats.ssrc if first.stats else 0
            for feedback in self.feedback.build(media):
                out.append((first.spec.rtcp_flow_id, feedback.serialize()))
        if now >= self._next_report:
            self._next_report = now + report_interval
            for track in self.tracks.values():
                block = track.stats.report_block(now) if track.stats else None
                if block is not None:
                    report = RtcpReceiverReport(ssrc=self.ssrc, reports=[block])
                    out.append((track.spec.rtcp_flow_id, report.serialize()))
        return frames, out
