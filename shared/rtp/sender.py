"""The sending side of RTP, sans-I/O: per-viewer RTP streams, feedback, and the fan-out.

Theory of operation
-------------------
A stream has tracks (:class:`MediaTrack`: video H.264 on flows 0/1 at 90 kHz, audio Opus on
flows 2/3 at 48 kHz).  Each frame is packetized once (:class:`BroadcastSender`), then every
viewer connection gets its own RTP headers from its :class:`PeerSender`: its own SSRC, sequence
numbers and timestamp offset per track (random, RFC 3550 §5.1), and one transport-wide sequence
number space across tracks (draft-holmer-rmcat-transport-wide-cc-extensions-01 §2).  Own
sequence spaces let one viewer skip frames (joining mid-GOP, or congested) without the gaps
looking like loss to it, and let NACKs be answered from that viewer's own history.

A :class:`PeerSender` answers its viewer's RTCP:

- RR (RFC 3550 §6.4.2): loss, jitter, and RTT from LSR/DLSR (§6.4.1, timed on the monotonic
  clock by :class:`SenderReportTimes`);
- generic NACK (RFC 4585 §6.2.1): resend from a bounded :class:`SendHistory`, within a
  :class:`RetransmissionBudget` (a share of what this viewer is sent), with a fresh transport-wide number (the same SSRC and sequence
  number: plain retransmission, as WebRTC does without RTX);
- PLI (RFC 4585 §6.3.1): :attr:`PeerSender.keyframe_requested`, as when a congested viewer is
  ready to resume (:class:`shared.rtp.keyframes.VideoAdmission` decides which video frames it
  is sent), or when its connection dropped stale video itself (:class:`KeyframeSignal`);
- transport-wide feedback: the :class:`BandwidthEstimator`.

It sends an SR per track (RFC 3550 §6.4.1) right after the track's first packet and then every
:data:`SR_INTERVAL_S`, mapping the RTP timestamp to the capture wall clock, which is what the
viewer needs for RTT and for lining audio up with video.

Two clocks, each for one job.  Every method takes ``now``: monotonic seconds, which time
everything here (SR timers, RTT, the NACK history, the bandwidth estimate), so an NTP step
cannot disturb them.  Where an SR is made, ``wall_now`` (Unix seconds) is passed in as well:
the SR's NTP timestamp and its RTP timestamp are wall-clock data, on the clock the frames'
capture times are on.
"""

from __future__ import annotations

import heapq
import itertools
import random
import struct
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import msgspec

from shared.control.rung_choice import RungSelectorConfig
from shared.errors import ConfigError, ProtocolError
from shared.roq.framing import AUDIO_FLOW_ID, AUDIO_RTCP_FLOW_ID, VIDEO_FLOW_ID, VIDEO_RTCP_FLOW_ID
from shared.rtp.adaptation import PeerAdaptation, padding_sizes
from shared.rtp.bandwidth import BandwidthEstimator, SenderReportTimes
from shared.rtp.h264 import (
    DEFAULT_MTU,
    H264_PAYLOAD_TYPE,
    H264Packetizer,
    ParameterSets,
    split_annexb,
)
from shared.rtp.keyframes import MAX_BACKLOG, VideoAdmission
from shared.rtp.opus import OPUS_CLOCK_RATE, OPUS_PAYLOAD_TYPE
from shared.rtp.packet import ONE_BYTE_PROFILE, TRANSPORT_CC_EXTENSION_ID, RtpStream
from shared.rtp.rate_window import RateWindow
from shared.rtp.rtcp import (
    RtcpNack,
    RtcpPli,
    RtcpReceiverReport,
    RtcpSenderReport,
    RtcpSourceDescription,
    RtcpTransportFeedback,
    ntp_timestamp,
    parse_rtcp_compound,
)
from shared.rtp.send_history import RetransmissionBudget, SendHistory

__all__ = [
    "AUDIO_TRACK",
    "DEFAULT_MTU",
    "H264_PAYLOAD_TYPE",
    "VIDEO_TRACK",
    "BroadcastSender",
    "KeyframeSignal",
    "MediaConnection",
    "MediaTrack",
    "PeerFeedback",
    "PeerSender",
    "RtpStream",
]

SR_INTERVAL_S = 0.5
#: How early an SR may go: with a frame, or with another viewer's SR, so that one pass serves
#: many viewers and the shard does not wake once per viewer per interval.  RFC 3550 §6.2
#: varies the report interval by a factor of 0.5 to 1.5 anyway.
SR_EARLY_S = 0.05
#: The shortest wait before a viewer's adaptation runs again (its probe packets are spaced
#: by at least this at 10 Mbps: 1200 bytes take 1 ms).
ADAPTATION_STEP_S = 0.001

#: The RTP header this sender writes (RFC 3550 §5.1): V=2, X=1 (no padding, no CSRCs), M and
#: PT, sequence number, timestamp, SSRC; then the RFC 8285 §4.2 one-byte extension block
#: (profile 0xBEDE, one word) holding the transport-wide sequence number element (id
#: TRANSPORT_CC_EXTENSION_ID, two octets) and one padding octet.
_HEADER = struct.Struct("!BBHIIHHBHB")
_FIRST, _PROFILE = 0x80 | 0x10, ONE_BYTE_PROFILE
#: A padding-only packet's first octet: P set as well (RFC 3550 §5.1).
_FIRST_PADDING = _FIRST | 0x20
_ELEMENT = TRANSPORT_CC_EXTENSION_ID << 4 | 1
#: What the send history keeps of a packet to resend it: the shard's payload (shared by every
#: viewer, not copied), the header's second octet (M, PT) and the RTP timestamp.
_Kept = tuple[bytes, int, int]


class MediaTrack(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    """``video`` or ``audio``."""
    flow_id: int
    rtcp_flow_id: int
    payload_type: int
    clock_rate: int


VIDEO_TRACK = MediaTrack(
    kind="video",
    flow_id=VIDEO_FLOW_ID,
    rtcp_flow_id=VIDEO_RTCP_FLOW_ID,
    payload_type=H264_PAYLOAD_TYPE,
    clock_rate=90_000,
)
AUDIO_TRACK = MediaTrack(
    kind="audio",
    flow_id=AUDIO_FLOW_ID,
    rtcp_flow_id=AUDIO_RTCP_FLOW_ID,
    payload_type=OPUS_PAYLOAD_TYPE,
    clock_rate=OPUS_CLOCK_RATE,
)


class PeerFeedback(msgspec.Struct, kw_only=True):
    """What one viewer's feedback says about its connection (per-peer sender stats)."""

    rtt_ms: float = 0.0
    loss: float = 0.0
    """Fraction lost over the last feedback interval (transport-wide feedback, else RR)."""
    jitter_ms: float = 0.0
    packets_lost: int = 0
    """Cumulative, from the video RR."""
    estimate_bps: int = 0
    acked_bps: int = 0
    usage: str = "normal"
    packets_sent: int = 0
    rtp_bytes_sent: int = 0
    frames_sent: int = 0
    frames_skipped: int = 0
    """Video frames not sent while the viewer was congested (its wait for a first keyframe is
    not counted)."""
    nacks_received: int = 0
    retransmissions: int = 0
    retransmissions_refused: int = 0
    keyframe_requests: int = 0
    rtcp_received: int = 0
    rtcp_malformed: int = 0
    cname: str | None = None
    """The viewer's CNAME from its SDES (RFC 3550 §6.5.1): the ticket it connected with."""


class PeerSender:
    """One viewer connection's RTP state and feedback handling (see the module doc)."""

    def __init__(
        self,
        tracks: Sequence[MediaTrack],
        *,
        now: float,
        initial_bps: int,
        rng: random.Random | None = None,
        max_backlog: int = MAX_BACKLOG,
        adaptation: PeerAdaptation | None = None,
    ) -> None:
        """``adaptation``: the viewer's rung and probing, for a stream of several rungs."""
        rng = rng or random.Random()
        self.tracks = list(tracks)
        self.streams = [
            RtpStream(
                ssrc=rng.getrandbits(32),
                initial_sequence=rng.getrandbits(16),
                timestamp_offset=rng.getrandbits(32),
                payload_type=track.payload_type,
                clock_rate=track.clock_rate,
            )
            for track in self.tracks
        ]
        self._by_ssrc = {stream.ssrc: index for index, stream in enumerate(self.streams)}
        self._histories: list[SendHistory[_Kept]] = [SendHistory() for _ in self.tracks]
        self._reports = [SenderReportTimes() for _ in self.tracks]
        self._next_sr = [float("inf")] * len(self.tracks)
        self._budget = RetransmissionBudget()
        self.estimator = BandwidthEstimator(initial_bps=initial_bps, now=now)
        self._transport_sequence = rng.getrandbits(16)
        self.admission = VideoAdmission(max_backlog)
        self._rtcp_rtt: float | None = None
        self._transport_rtt = 0.0
        #: A PLI came, or the viewer is ready to resume after congestion: it needs a keyframe.
        self.keyframe_requested = False
        self.feedback = PeerFeedback(estimate_bps=initial_bps)
        #: Media bytes sent to this viewer over the last second (bounded on every send).
        self.sent_window = RateWindow(1.0)
        self.adaptation = adaptation
        self._video = next(
            (index for index, track in enumerate(self.tracks) if track.kind == "video"), None
        )

    @property
    def rung(self) -> int:
        """The rung of the ladder this viewer receives (0 without adaptation)."""
        return 0 if self.adaptation is None else self.adaptation.rung

    @property
    def rtt_s(self) -> float:
        return self._rtcp_rtt if self._rtcp_rtt is not None else self._transport_rtt

    def set_transport_rtt(self, rtt_s: float) -> None:
        """QUIC's smoothed RTT (RFC 9002 §5.3): used until RTCP yields one."""
        self._transport_rtt = rtt_s
        self.estimator.on_rtt(self.rtt_s)

    def send_frame(
        self,
        track: int,
        payloads: Sequence[bytes],
        *,
        pts: int,
        capture_us: int,
        keyframe: bool,
        now: float,
        backlog: int = 0,
    ) -> list[bytes]:
        """Serialized RTP packets of one frame for this viewer; [] when it skips the frame.

        The payloads are the shard's, made once per frame; only the header is this viewer's,
        written straight into bytes (the layout :meth:`RtpPacket.serialize` gives a packet
        with the transport-wide sequence number extension, no CSRCs, no padding)."""
        if self.tracks[track].kind == "video":
            admitted = self.admission.admit(keyframe=keyframe, backlog=backlog)
            self.feedback.frames_skipped = self.admission.frames_skipped
            if self.admission.take_keyframe_wanted():
                self.keyframe_requested = True
            if not admitted:
                return []
        stream, history = self.streams[track], self._histories[track]
        first, timestamp = stream.advance(payloads, pts=pts, capture_us=capture_us)
        pack, ssrc, sent = _HEADER.pack, stream.ssrc, self._on_packet_sent
        transport, put = self._transport_sequence, history.put
        second, last = stream.payload_type, len(payloads) - 1
        out: list[bytes] = []
        size = 0
        for index, payload in enumerate(payloads):
            if index == last:
                second |= 0x80  # M on the frame's last packet (RFC 6184 §5.1, RFC 7587 §4.2)
            seq, tsn = (first + index) & 0xFFFF, (transport + index) & 0xFFFF
            data = (
                pack(_FIRST, second, seq, timestamp, ssrc, _PROFILE, 1, _ELEMENT, tsn, 0) + payload
            )
            out.append(data)
            sent(tsn, len(data), now)
            put(seq, (payload, second, timestamp), len(data), now)
            size += len(data)
        self._transport_sequence = (transport + len(out)) & 0xFFFF
        feedback = self.feedback
        feedback.packets_sent += len(out)
        feedback.rtp_bytes_sent += size
        self.sent_window.add(now, size)
        if self._next_sr[track] == float("inf"):
            self._next_sr[track] = now  # the first SR goes out with the first packets
        feedback.frames_sent += self.tracks[track].kind == "video"
        return out

    def _on_packet_sent(self, transport_sequence: int, size: int, now: float) -> None:
        self.estimator.on_packet_sent(transport_sequence, size, now)
        if self.adaptation is not None:
            self.adaptation.on_packet_sent(transport_sequence, size, now)

    def padding(self, now: float) -> list[bytes]:
        """The probe padding due now (:mod:`shared.rtp.adaptation`): padding-only packets on
        the video SSRC, repeating the last media packet's sequence number and timestamp, each
        with a fresh transport-wide sequence number; [] when none is due or before any video."""
        if self.adaptation is None or self._video is None:
            return []
        stream = self.streams[self._video]
        if stream.packets_sent == 0:
            return []  # nothing to repeat yet: the viewer has no sequence space to fit in
        sequence = (stream.next_sequence - 1) & 0xFFFF
        timestamp = stream.last_timestamp or 0
        out: list[bytes] = []
        for size in self.adaptation.probe_bytes_due(now):
            for count in padding_sizes(size, _HEADER.size):
                tsn = self._transport_sequence
                header = _HEADER.pack(
                    _FIRST_PADDING,
                    stream.payload_type,
                    sequence,
                    timestamp,
                    stream.ssrc,
                    _PROFILE,
                    1,
                    _ELEMENT,
                    tsn,
                    0,
                )
                data = header + bytes(count - 1) + bytes((count,))
                self._on_packet_sent(tsn, len(data), now)
                self._transport_sequence = (tsn + 1) & 0xFFFF
                out.append(data)
        self.feedback.packets_sent += len(out)
        self.adaptation.padding_packets += len(out)
        self.adaptation.padding_bytes += sum(map(len, out))
        return out

    def _resend(self, stream: RtpStream, sequence: int, kept: _Kept, now: float) -> bytes:
        """A kept packet again, with the same sequence number and a fresh transport-wide one
        (plain retransmission, as WebRTC does without RTX)."""
        payload, second, timestamp = kept
        tsn = self._transport_sequence
        header = (_FIRST, second, sequence, timestamp, stream.ssrc, _PROFILE, 1, _ELEMENT, tsn, 0)
        data = _HEADER.pack(*header) + payload
        self._on_packet_sent(tsn, len(data), now)
        self._transport_sequence = (tsn + 1) & 0xFFFF
        self.feedback.packets_sent += 1
        self.feedback.rtp_bytes_sent += len(data)
        return data

    def poll(self, now: float, wall_now: float, *, early_s: float = 0.0) -> list[tuple[int, bytes]]:
        """RTCP due at monotonic ``now``: ``(flow id, packet)`` sender reports, stamped with
        ``wall_now`` (Unix seconds), the capture clock their RTP timestamps map to.  An SR
        due within ``early_s`` goes now, and the next one follows a full interval after the
        time this one was due."""
        due = []
        for index, stream in enumerate(self.streams):
            deadline = self._next_sr[index]
            if now + early_s < deadline:
                continue
            timestamp = stream.timestamp_at(wall_now)
            if timestamp is not None:
                report = RtcpSenderReport(
                    ssrc=stream.ssrc,
                    ntp_timestamp=ntp_timestamp(wall_now),
                    rtp_timestamp=timestamp,
                    packet_count=stream.packets_sent & 0xFFFF_FFFF,
                    octet_count=stream.octets_sent & 0xFFFF_FFFF,
                )
                self._reports[index].on_sent(report.ntp_timestamp, now)
                due.append((self.tracks[index].rtcp_flow_id, report.serialize()))
            # A late poll does not make up for lost time with a burst of SRs.
            self._next_sr[index] = max(deadline, now) + SR_INTERVAL_S
        return due

    def next_poll(self) -> float:
        """When :meth:`poll` next has an SR to send (monotonic; inf before any media)."""
        return min(self._next_sr, default=float("inf"))

    def on_rtcp(self, data: bytes, now: float) -> list[tuple[int, bytes]]:
        """Handle one compound RTCP packet; returns retransmissions as ``(flow id, packet)``."""
        self.feedback.rtcp_received += 1
        try:
            packets = parse_rtcp_compound(data)
        except ProtocolError:
            self.feedback.rtcp_malformed += 1
            return []
        out: list[tuple[int, bytes]] = []
        transport_feedback = False
        for packet in packets:
            if isinstance(packet, RtcpReceiverReport | RtcpSenderReport):
                self._on_report(packet, now)
            elif isinstance(packet, RtcpNack):
                out += self._on_nack(packet, now)
            elif isinstance(packet, RtcpPli):
                if packet.media_ssrc in self._by_ssrc:
                    self.keyframe_requested = True
                    self.feedback.keyframe_requests += 1
            elif isinstance(packet, RtcpTransportFeedback):
                self.estimator.on_transport_feedback(packet, now)
                if self.adaptation is not None:
                    self.adaptation.on_transport_feedback(self.estimator, packet, now)
                transport_feedback = True
            elif isinstance(packet, RtcpSourceDescription):
                cname = packet.cname_of()
                if cname is not None:
                    self.feedback.cname = cname[:64]  # bounded: the viewer chooses it
        self._refresh(now)
        if transport_feedback and self.adaptation is not None:
            # Down within one feedback interval (shared.control.rung_choice).
            self.adaptation.decide(self.estimator, now, sending_bps=self.sent_window.rate_bps(now))
        return out

    def _on_report(self, report: RtcpReceiverReport | RtcpSenderReport, now: float) -> None:
        for block in report.reports:
            index = self._by_ssrc.get(block.ssrc)
            if index is None:
                continue
            rtt = self._reports[index].round_trip_time(block, now)
            if rtt is not None:
                self._rtcp_rtt = rtt
                self.estimator.on_rtt(rtt)
            if self.tracks[index].kind == "video":
                self.feedback.packets_lost = block.cumulative_lost
                self.feedback.jitter_ms = block.jitter / self.tracks[index].clock_rate * 1000
                self.estimator.on_receiver_report(block.fraction_lost / 256, now)

    def _on_nack(self, nack: RtcpNack, now: float) -> list[tuple[int, bytes]]:
        index = self._by_ssrc.get(nack.media_ssrc)
        if index is None:
            return []
        history, flow_id = self._histories[index], self.tracks[index].flow_id
        stream = self.streams[index]
        sequences = nack.sequences()
        self.feedback.nacks_received += len(sequences)
        out = []
        for sequence in sequences:
            kept = history.take_for_resend(sequence, now, self.rtt_s)
            if kept is None:
                self.feedback.retransmissions_refused += 1
                continue
            rate = max(self.estimator.estimate_bps, self.sent_window.rate_bps(now))
            if not self._budget.allow(len(kept[0]) + _HEADER.size, rate, now):
                self.feedback.retransmissions_refused += 1
                continue
            out.append((flow_id, self._resend(stream, sequence & 0xFFFF, kept, now)))
            self.feedback.retransmissions += 1
        return out

    def _refresh(self, now: float) -> None:
        feedback, estimator = self.feedback, self.estimator
        feedback.rtt_ms = self.rtt_s * 1000
        feedback.loss = estimator.loss
        feedback.estimate_bps = estimator.estimate_bps
        feedback.acked_bps = estimator.acked_bps
        feedback.usage = str(estimator.usage)


class MediaConnection(Protocol):
    """What :class:`BroadcastSender` needs from a viewer's transport connection."""

    @property
    def backlog(self) -> int:
        """Packets queued but not yet on the wire."""
        ...

    @property
    def transport_rtt_s(self) -> float: ...

    def send_media(
        self, flow_id: int, packets: Sequence[bytes], *, keyframe: bool, urgent: bool = False
    ) -> None:
        """One frame's packets (stream mode puts them on one stream, cancellable as a unit);
        ``urgent`` (retransmissions) may jump the connection's send queue."""
        ...

    def send_rtcp(self, flow_id: int, packet: bytes) -> None: ...


@runtime_checkable
class KeyframeSignal(Protocol):
    """A connection that drops video itself (``shared.roq.transport``: an age-bounded send
    queue drops stale frames up to the next keyframe) and says when its viewer needs one."""

    def take_keyframe_needed(self) -> bool: ...


class BroadcastSender:
    """Packetizes each frame once and hands every connected viewer its own RTP packets.

    With a ladder of several rungs (``rung_rates``, rung 0 the top), the video track comes in
    one variant per rung: each rung's frames are packetized once, and each viewer is sent the
    frames of its own rung, chosen by its :class:`shared.rtp.adaptation.PeerAdaptation`.  A
    viewer keeps one video SSRC, and one sequence and timestamp space, across a switch (the
    headers are its own, the timestamps come from the stream's pts, shared by the rungs), so
    to its decoder a switch is an IDR with new SPS/PPS.
    """

    def __init__(
        self,
        tracks: Sequence[MediaTrack],
        *,
        initial_bps: int,
        mtu: int = DEFAULT_MTU,
        rng: random.Random | None = None,
        rung_rates: Sequence[int] = (),
        selector_config: RungSelectorConfig | None = None,
    ) -> None:
        """``rung_rates``: each rung's bitrate, top first; fewer than two: no adaptation."""
        self.tracks = list(tracks)
        self.initial_bps = initial_bps
        self._rng = rng or random.Random()
        self._packetizer = H264Packetizer(mtu=mtu)
        self.rung_rates = [int(rate) for rate in rung_rates]
        if any(rate <= 0 for rate in self.rung_rates):
            raise ConfigError(f"rung rates must be positive, got {self.rung_rates}")
        self.selector_config = selector_config
        #: What each rung needs now (content-aware, :meth:`set_rung_rates`): the rates the
        #: viewers' rung choices use; the configured ``rung_rates`` until told otherwise.
        self.rung_needs = list(self.rung_rates)
        #: Per rung: its SPS/PPS differ from the other rungs' (another resolution).
        self._parameter_sets = [ParameterSets() for _ in range(max(len(self.rung_rates), 1))]
        self.peers: dict[MediaConnection, PeerSender] = {}
        #: The connections that drop video themselves (checked once, not per frame).
        self._signals: dict[MediaConnection, KeyframeSignal] = {}
        #: Video frames handed to the connections (audio frames are not counted).
        self.frames_sent = 0
        self.packets_sent = 0
        #: The rungs a viewer asked an IDR of since the last take.
        self._keyframe_rungs: set[int] = set()
        #: Each viewer's own cap (its ``max_quality``); what it gets is no better than the floor.
        self._caps: dict[MediaConnection, int] = {}
        #: The best rung any viewer may get: rungs above it are retired under CPU pressure
        #: (``shared.control.pressure``), 0 when none is.
        self.floor = 0
        # Adaptation deadlines (rung holds, probes), kept as the SR deadlines are.
        self._adapt_heap: list[tuple[float, int, MediaConnection]] = []
        self._adapt_due: dict[MediaConnection, float] = {}
        # SR deadlines: a heap of (deadline, tie-breaker, connection), and each connection's
        # current deadline; heap entries that no longer match are stale and skipped.
        self._sr_heap: list[tuple[float, int, MediaConnection]] = []
        self._sr_due: dict[MediaConnection, float] = {}
        self._sr_order = itertools.count()

    @property
    def adaptive(self) -> bool:
        """Viewers get rungs of their own (a ladder of two rungs or more)."""
        return len(self.rung_rates) >= 2

    def add(
        self,
        connection: MediaConnection,
        now: float,
        *,
        cap: int = 0,
        start_rung: int | None = None,
    ) -> PeerSender:
        """A new viewer; with a ladder it starts on ``start_rung`` (None: the lowest allowed,
        from where probing climbs), never above ``cap``."""
        adaptation = None
        self._caps[connection] = cap
        if self.adaptive:
            adaptation = PeerAdaptation(
                self.rung_needs,
                now=now,
                cap=max(cap, self.floor),
                start_rung=start_rung,
                config=self.selector_config,
            )
        peer = PeerSender(
            self.tracks,
            now=now,
            initial_bps=self.initial_bps,
            rng=self._rng,
            adaptation=adaptation,
        )
        self.peers[connection] = peer
        if isinstance(connection, KeyframeSignal):
            self._signals[connection] = connection
        # Start the newcomer on a fresh IDR instead of making it wait for the next periodic one.
        self._keyframe_rungs.add(peer.rung)
        self._schedule_adaptation(connection, peer, now)
        return peer

    def remove(self, connection: MediaConnection) -> PeerSender | None:
        self._signals.pop(connection, None)
        self._sr_due.pop(connection, None)
        self._adapt_due.pop(connection, None)
        self._caps.pop(connection, None)
        return self.peers.pop(connection, None)

    def take_keyframe_request(self) -> bool:
        """Whether a viewer asked for a keyframe (of any rung) since the last take."""
        return bool(self.take_keyframe_rungs())

    def take_keyframe_rungs(self) -> list[int]:
        """The rungs viewers asked an IDR of since the last take (PLIs, newcomers, switches)."""
        rungs, self._keyframe_rungs = sorted(self._keyframe_rungs), set()
        return rungs

    def set_cap(self, connection: MediaConnection, cap: int, now: float) -> None:
        """The viewer may get rungs ``cap`` and below (``cap_for(max_quality, rungs)``)."""
        self._caps[connection] = cap
        peer = self.peers.get(connection)
        if peer is None or peer.adaptation is None:
            return
        peer.adaptation.set_cap(max(cap, self.floor), peer.estimator, now)
        self._after_adaptation(connection, peer, now)

    def set_floor(self, floor: int, now: float) -> None:
        """Retire the rungs above ``floor`` for every viewer, present and future (CPU
        pressure): those on them move down at the IDR of the floor's rung; 0 restores them,
        each viewer back to its own cap."""
        if self.adaptive and not 0 <= floor < len(self.rung_rates):
            raise ConfigError(f"floor {floor} is not a rung of {len(self.rung_rates)}")
        self.floor = floor
        for connection, peer in self.peers.items():
            if peer.adaptation is not None:
                cap = max(self._caps.get(connection, 0), floor)
                peer.adaptation.set_cap(cap, peer.estimator, now)
                self._after_adaptation(connection, peer, now)

    def set_rung_rates(self, rates: Sequence[int]) -> None:
        """Each rung's need now, top first (``shared.control.rung_targets``: a still picture
        needs less than the configured rate): every viewer's selector, and every newcomer's,
        compares its estimate against these from its next feedback on."""
        needs = [int(rate) for rate in rates]
        if len(needs) != len(self.rung_rates) or any(rate <= 0 for rate in needs):
            raise ConfigError(
                f"{len(needs)} rung rates {needs} for a {len(self.rung_rates)}-rung ladder"
            )
        self.rung_needs = needs
        for peer in self.peers.values():
            if peer.adaptation is not None:
                peer.adaptation.selector.set_rates(needs)

    def set_pin(self, connection: MediaConnection, rung: int | None, now: float) -> None:
        """Pin the viewer to ``rung`` (None: unpin); the cap still wins."""
        peer = self.peers.get(connection)
        if peer is None or peer.adaptation is None:
            return
        peer.adaptation.set_pin(rung, peer.estimator, now)
        self._after_adaptation(connection, peer, now)

    def payloads(self, track: int, data: bytes, rung: int = 0) -> list[bytes]:
        """One encoded frame as RTP payloads: H.264 per RFC 6184, Opus as is (RFC 7587)."""
        if self.tracks[track].kind != "video":
            return [data]
        nal_units = self._parameter_sets[rung].complete(split_annexb(data))
        return self._packetizer.packetize(nal_units)

    def send(
        self,
        track: int,
        data: bytes,
        *,
        pts: int,
        capture_us: int,
        keyframe: bool,
        now: float,
        wall_now: float,
        rung: int = 0,
    ) -> None:
        """One encoded frame (of ``rung``, for video) to every viewer that takes it, then the
        SRs due (``now`` monotonic, ``wall_now`` Unix seconds for the SRs, see the module
        doc)."""
        if not 0 <= rung < len(self._parameter_sets):
            raise ConfigError(f"rung {rung} of a {len(self._parameter_sets)}-rung ladder")
        payloads = self.payloads(track, data, rung)
        flow_id = self.tracks[track].flow_id
        video = self.tracks[track].kind == "video"
        self.frames_sent += video and rung == 0
        for connection, peer in self.peers.items():
            if video:
                adaptation = peer.adaptation
                if adaptation is None:
                    if rung != 0:
                        continue
                elif not adaptation.takes(rung, keyframe, now):
                    continue
                elif keyframe:
                    # A switch done, or an IDR grace begun: its deadlines moved.
                    self._schedule_adaptation(connection, peer, now)
            packets = peer.send_frame(
                track,
                payloads,
                pts=pts,
                capture_us=capture_us,
                keyframe=keyframe,
                now=now,
                backlog=connection.backlog,
            )
            if packets:
                connection.send_media(flow_id, packets, keyframe=keyframe)
                self.packets_sent += len(packets)
                self._schedule(connection, peer)
            signal = self._signals.get(connection)
            if signal is not None and signal.take_keyframe_needed():
                peer.keyframe_requested = True
            self._collect_keyframe_request(peer)
        self.poll(now, wall_now)

    def on_rtcp(self, connection: MediaConnection, data: bytes, now: float) -> None:
        peer = self.peers.get(connection)
        if peer is None:
            return
        peer.set_transport_rtt(connection.transport_rtt_s)
        for flow_id, packet in peer.on_rtcp(data, now):
            connection.send_media(flow_id, [packet], keyframe=False, urgent=True)
        self._collect_keyframe_request(peer)
        if peer.adaptation is not None:
            self._after_adaptation(connection, peer, now)

    def _collect_keyframe_request(self, peer: PeerSender) -> None:
        if peer.keyframe_requested:
            peer.keyframe_requested = False
            self._keyframe_rungs.add(peer.rung)

    def _after_adaptation(self, connection: MediaConnection, peer: PeerSender, now: float) -> None:
        """After the viewer's adaptation ran: the IDR a switch needs, the padding due, and its
        next deadline."""
        assert peer.adaptation is not None
        rung = peer.adaptation.keyframe_request(now)
        if rung is not None:
            self._keyframe_rungs.add(rung)
        padding = peer.padding(now)
        if padding and self._video_flow is not None:
            connection.send_media(self._video_flow, padding, keyframe=False)
            self.packets_sent += len(padding)
        self._schedule_adaptation(connection, peer, now)

    @property
    def _video_flow(self) -> int | None:
        return next((t.flow_id for t in self.tracks if t.kind == "video"), None)

    def _schedule_adaptation(
        self, connection: MediaConnection, peer: PeerSender, now: float
    ) -> None:
        if peer.adaptation is None:
            return
        deadline = peer.adaptation.next_deadline()
        if deadline is None:
            self._adapt_due.pop(connection, None)
            return
        # A deadline the cores left at ``now`` (work they will only do later) runs a moment
        # later, not in a loop within this pass.
        deadline = max(deadline, now + ADAPTATION_STEP_S)
        if self._adapt_due.get(connection) == deadline:
            return
        self._adapt_due[connection] = deadline
        heapq.heappush(self._adapt_heap, (deadline, next(self._sr_order), connection))

    def _run_adaptation(self, now: float) -> None:
        heap, due = self._adapt_heap, self._adapt_due
        while heap and heap[0][0] <= now:
            deadline, _, connection = heapq.heappop(heap)
            if due.get(connection) != deadline:
                continue  # rescheduled or gone
            del due[connection]
            peer = self.peers[connection]
            assert peer.adaptation is not None
            peer.adaptation.on_timer(
                peer.estimator, now, sending_bps=peer.sent_window.rate_bps(now)
            )
            self._after_adaptation(connection, peer, now)

    def poll(self, now: float, wall_now: float) -> None:
        """Send the RTCP that is due (``now`` monotonic, ``wall_now`` Unix seconds): the SRs
        of the viewers whose SR is due by ``now`` + :data:`SR_EARLY_S`, found in a heap, so a
        pass costs nothing per viewer that has nothing due."""
        self._run_adaptation(now)
        heap, due, horizon = self._sr_heap, self._sr_due, now + SR_EARLY_S
        while heap and heap[0][0] <= horizon:
            deadline, _, connection = heapq.heappop(heap)
            if due.get(connection) != deadline:
                continue  # rescheduled or gone
            del due[connection]
            peer = self.peers[connection]
            for flow_id, packet in peer.poll(now, wall_now, early_s=SR_EARLY_S):
                connection.send_rtcp(flow_id, packet)
            self._schedule(connection, peer)

    def next_poll(self) -> float:
        """When :meth:`poll` next has an SR due (monotonic; inf when nothing).  That poll also
        sends the SRs due within :data:`SR_EARLY_S` after it, so timer wake-ups come at most
        one per SR_EARLY_S however many viewers there are; the viewers' adaptation deadlines
        (rung holds, probe padding) come exactly."""
        heap, due = self._sr_heap, self._sr_due
        while heap and due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        sr = heap[0][0] if heap else float("inf")
        heap, due = self._adapt_heap, self._adapt_due
        while heap and due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        return min(sr, heap[0][0]) if heap else sr

    def _schedule(self, connection: MediaConnection, peer: PeerSender) -> None:
        deadline = peer.next_poll()
        if self._sr_due.get(connection) == deadline or deadline == float("inf"):
            return
        self._sr_due[connection] = deadline
        heapq.heappush(self._sr_heap, (deadline, next(self._sr_order), connection))
