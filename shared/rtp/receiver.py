"""The viewer's RTP session, sans-I/O: packets in, frames and RTCP feedback out.

:class:`ReceiverSession` is the whole receiving RTP session of one connection: per track a
:class:`shared.rtp.jitter_buffer.JitterBuffer` (which waits for retransmissions within a
budget) and reception statistics (:mod:`shared.rtp.feedback`), plus the RTCP feedback the sender
needs: NACKs, PLIs, receiver reports and transport-wide feedback.  Time is passed in: ``now``
is monotonic seconds for everything timed here; the wall clock appears only as data, the SR's
NTP timestamp that maps RTP time to the sender's capture clock (:meth:`ReceiverTrack.capture_us`).
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.errors import ProtocolError
from shared.rtp.feedback import ReceptionStats, TransportFeedbackRecorder
from shared.rtp.jitter_buffer import BufferedFrame, JitterBuffer, PayloadFormat
from shared.rtp.packet import RtpPacket, transport_sequence
from shared.rtp.rtcp import (
    RtcpNack,
    RtcpPli,
    RtcpReceiverReport,
    RtcpSenderReport,
    ntp_to_unix,
    parse_rtcp_compound,
)
from shared.rtp.sender import MediaTrack

__all__ = ["ReceiverSession", "ReceiverTrack"]


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
