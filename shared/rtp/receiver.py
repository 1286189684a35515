"""The viewer's RTP session, sans-I/O: packets in, frames and RTCP feedback out.

:class:`ReceiverSession` is the whole receiving RTP session of one connection: per track a
:class:`shared.rtp.jitter_buffer.JitterBuffer` (which waits for retransmissions within a
budget) and reception statistics (:mod:`shared.rtp.feedback`), plus the RTCP feedback the sender
needs: NACKs, PLIs, receiver reports and transport-wide feedback.  Time is passed in: ``now``
is monotonic seconds for everything timed here; the wall clock appears only as data, the SR's
NTP timestamp that maps RTP time to the sender's capture clock (:meth:`ReceiverTrack.capture_us`).

Timers follow aioquic's ``get_timer()`` / ``handle_timer(now)`` contract:
:meth:`ReceiverSession.next_deadline` is the earliest time the session next needs
:meth:`ReceiverSession.tick`, and the shell arms one timer for it, re-reading it after every
call in (a packet can bring a deadline forward to "now").  Feedback goes out as soon as its
event is known: a NACK when a gap is seen, a PLI when a frame is known lost.  RFC 4585 §3.2
lets a receiver send feedback before its next regular report, with no dithering delay in a
point-to-point session, which each viewer connection is; with RTCP carried over QUIC there is
no RTCP bandwidth share to stay under, so every event is reported at once (the Immediate
Feedback mode of §1.1).  Transport-wide feedback and receiver reports keep their intervals.
"""

from __future__ import annotations

import os
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
    RtcpSourceDescription,
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
        self.last_pli: float | None = None
        #: The shell asked for a keyframe (its decoder skipped ahead): until one is released.
        self.keyframe_requested = False
        self._keyframe_wanted_since: float | None = None

    def on_packet(self, packet: RtpPacket, now: float) -> list[BufferedFrame]:
        if self.stats is None or self.stats.ssrc != packet.ssrc:
            self.stats = ReceptionStats(packet.ssrc, self.spec.clock_rate)
            self._sr = None
        self.stats.on_packet(packet.sequence_number, packet.timestamp, now)
        return self.released(self.buffer.push(packet, now), now)

    def released(self, frames: list[BufferedFrame], now: float) -> list[BufferedFrame]:
        """Note what the buffer just released (or lost): whether a keyframe is still wanted,
        and since when, so the PLI can leave at once."""
        if any(frame.keyframe for frame in frames):
            self.keyframe_requested = False
        if not (self.buffer.keyframe_needed or self.keyframe_requested):
            self._keyframe_wanted_since = None
        elif self._keyframe_wanted_since is None:
            self._keyframe_wanted_since = now
        return frames

    def request_keyframe(self, now: float) -> None:
        self.keyframe_requested = True
        if self._keyframe_wanted_since is None:
            self._keyframe_wanted_since = now

    def pli_deadline(self, pli_interval_s: float) -> float | None:
        """When the next PLI may go (RFC 4585 §6.3.1): as soon as a keyframe is wanted, then
        at most once per ``pli_interval_s`` while it still is; None when none is wanted."""
        since = self._keyframe_wanted_since
        if since is None:
            return None
        return since if self.last_pli is None else max(since, self.last_pli + pli_interval_s)

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
    called when :meth:`next_deadline` comes, gives up on what the latency budget no longer
    covers and returns the RTCP to send: NACKs (RFC 4585 §6.2.1) as soon as a gap is seen and
    again a round trip later, a PLI as soon as a keyframe is needed (§6.3.1, then at most every
    ``pli_interval_s``), transport-wide feedback at most every ``feedback_interval_s`` while
    packets await it, and receiver reports every ``report_interval_s`` (RFC 3550 §6.4.2) once
    there is a source to report on.  Malformed packets and unknown flow ids are counted and
    dropped.
    """

    def __init__(
        self,
        tracks: Sequence[tuple[MediaTrack, PayloadFormat]],
        *,
        latency_budget_s: float = 0.2,
        ssrc: int = 0x5EED,
        cname: str | None = None,
        pli_interval_s: float = 0.3,
        feedback_interval_s: float = 0.05,
        report_interval_s: float = 0.5,
    ) -> None:
        self.ssrc = ssrc
        #: This viewer's CNAME (RFC 3550 §6.5.1), sent with every receiver report: the ticket
        #: it was given, which ties its connection to the server's viewer registry.
        self.cname = cname or f"viewer-{os.urandom(6).hex()}"
        self._sdes = RtcpSourceDescription.cname(ssrc, self.cname).serialize()
        self.tracks = {spec.flow_id: ReceiverTrack(spec, f, latency_budget_s) for spec, f in tracks}
        self._rtcp = {t.spec.rtcp_flow_id: t for t in self.tracks.values()}
        self._intervals = (pli_interval_s, feedback_interval_s, report_interval_s)
        self._next_feedback = self._next_report = 0.0
        #: When the oldest arrival not yet in transport-wide feedback came (None: none waits).
        self._feedback_since: float | None = None
        #: When the first source appeared: receiver reports are due from then on.
        self._reporting_since: float | None = None
        self.feedback = TransportFeedbackRecorder(ssrc)
        self.packets_received = 0
        self.bytes_received = 0
        self.packets_malformed = 0
        self.unknown_flows = 0
        self.keyframe_requests = 0
        #: Padding-only packets (the sender's probes), not handed to a track.
        self.padding_received = 0

    def new_connection(self) -> None:
        """A new QUIC connection: a new transport-wide sequence space."""
        self.feedback = TransportFeedbackRecorder(self.ssrc)
        self._feedback_since = None

    def request_keyframe(self, flow_id: int, now: float) -> None:
        """Ask the sender for a keyframe on this track (a PLI at the next allowed time), for
        a loss the session cannot see: the shell's decoder skipped frames to catch up."""
        self.tracks[flow_id].request_keyframe(now)

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`tick` has work (aioquic's ``get_timer()``); None: no timer.

        Re-read it after every :meth:`on_packet` and :meth:`tick`.  A time not later than
        ``now`` means "tick now": :meth:`on_packet` makes it so when a gap appears or a keyframe
        becomes needed.  After ``tick(now)`` it lies after ``now`` unless more work is really
        due then (more NACKs than one tick sends).
        """
        pli_interval = self._intervals[0]
        deadlines: list[float] = []
        for track in self.tracks.values():
            if track.stats is None:
                continue
            buffer = track.buffer.next_deadline()
            if buffer is not None:
                deadlines.append(buffer)
            pli = track.pli_deadline(pli_interval)
            if pli is not None:
                deadlines.append(pli)
        if self._feedback_since is not None:
            deadlines.append(max(self._next_feedback, self._feedback_since))
        if self._reporting_since is not None:
            deadlines.append(max(self._next_report, self._reporting_since))
        return min(deadlines, default=None)

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
                if self._feedback_since is None:
                    self._feedback_since = now
            if not packet.payload and packet.padding:
                # Padding only (RFC 3550 §5.1): the sender's bandwidth probe, which counts in
                # the transport-wide feedback above and carries no media.
                self.padding_received += 1
                return []
            if self._reporting_since is None:
                self._reporting_since = now
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
        """Frames released by giving up on losses, and the RTCP ``(flow id, packet)`` to send.

        Every comparison here is with the deadline :meth:`next_deadline` returns, so a tick at
        that time does the work it announced.
        """
        pli_interval, feedback_interval, report_interval = self._intervals
        frames: list[tuple[ReceiverTrack, BufferedFrame]] = []
        out: list[tuple[int, bytes]] = []
        for track in self.tracks.values():
            frames += [(track, frame) for frame in track.released(track.buffer.poll(now), now)]
            if track.stats is None:
                continue
            track.buffer.rtt_s = rtt_s
            media, flow = track.stats.ssrc, track.spec.rtcp_flow_id
            lost = track.buffer.nacks(now)
            if lost:
                out.append((flow, RtcpNack.from_sequences(self.ssrc, media, lost).serialize()))
            pli = track.pli_deadline(pli_interval)
            if pli is not None and now >= pli:
                track.last_pli = now
                self.keyframe_requests += 1
                out.append((flow, RtcpPli(sender_ssrc=self.ssrc, media_ssrc=media).serialize()))
        first = next(iter(self.tracks.values()))
        if self._feedback_since is not None and now >= max(
            self._next_feedback, self._feedback_since
        ):
            self._next_feedback = now + feedback_interval
            self._feedback_since = None
            media = first.stats.ssrc if first.stats else 0
            for feedback in self.feedback.build(media):
                out.append((first.spec.rtcp_flow_id, feedback.serialize()))
        if self._reporting_since is not None and now >= max(
            self._next_report, self._reporting_since
        ):
            self._next_report = now + report_interval
            for track in self.tracks.values():
                block = track.stats.report_block(now) if track.stats else None
                if block is not None:
                    report = RtcpReceiverReport(ssrc=self.ssrc, reports=[block])
                    # A compound RR carries the CNAME (RFC 3550 §6.1).
                    out.append((track.spec.rtcp_flow_id, report.serialize() + self._sdes))
        return frames, out
