"""Per-viewer rungs in the sender's fan-out, sans-I/O (``shared.rtp.sender`` with
``shared.rtp.adaptation``): a fake clock, fake connections, real feedback from the receiver's
recorder.

A two-rung ladder is sent to viewers; each viewer gets the frames of its own rung only, a
switch happens at an IDR of the new rung with the viewer's SSRC and sequence numbers
continuous, a capped viewer never gets the top rung, and probe padding is padding-only RTP
that the viewer's receiver counts for feedback and never hands to its jitter buffer.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest

from shared.control.rung_choice import RungSelectorConfig
from shared.errors import ConfigError
from shared.rtp.adaptation import MAX_PADDING, padding_sizes
from shared.rtp.feedback import TransportFeedbackRecorder
from shared.rtp.packet import RtpPacket, transport_sequence
from shared.rtp.sender import VIDEO_TRACK, BroadcastSender

FPS = 30
RATES = (1_000_000, 300_000)
START = b"\x00\x00\x00\x01"


def frame(rung: int, index: int, keyframe: bool) -> bytes:
    """An access unit whose payload names its rung (SPS/PPS/IDR on a keyframe)."""
    body = bytes([0x65 if keyframe else 0x41, rung, index & 0xFF]) + bytes(400)
    if keyframe:
        return START + bytes([0x67, rung]) + START + bytes([0x68, rung]) + START + body
    return START + body


class FakeConnection:
    backlog = 0
    transport_rtt_s = 0.02

    def __init__(self) -> None:
        self.media: list[tuple[float, bytes]] = []
        self.now = 0.0

    def send_media(
        self, flow_id: int, packets: Sequence[bytes], *, keyframe: bool, urgent: bool = False
    ) -> None:
        self.media += [(self.now, packet) for packet in packets]

    def send_rtcp(self, flow_id: int, packet: bytes) -> None:
        pass


class Run:
    """A ladder sent for ``seconds``, every viewer's packets arriving 20 ms later, feedback
    every 50 ms, keyframe requests honoured on the rung's next frame."""

    def __init__(
        self,
        caps: Sequence[int],
        initial_bps: int = 2_000_000,
        *,
        selector_config: RungSelectorConfig | None = None,
    ) -> None:
        self.sender = BroadcastSender(
            [VIDEO_TRACK],
            initial_bps=initial_bps,
            rng=random.Random(3),
            rung_rates=RATES,
            selector_config=selector_config,
        )
        self.connections = [FakeConnection() for _ in caps]
        self.recorders = [TransportFeedbackRecorder(0x5EED) for _ in caps]
        for connection, cap in zip(self.connections, caps, strict=True):
            self.sender.add(connection, 0.0, cap=cap)
        self.keyframes_due = {0, 1}
        self.keyframes_made: list[tuple[float, int]] = []
        self.now = 0.0
        self._frame = 0
        self._next_frame_at = 0.0
        self._delivered = [0] * len(caps)
        #: The path's capacity (None: uncapped): a FIFO bottleneck before the 20 ms delay.
        self.capacity_bps: float | None = None
        self._free = [0.0] * len(caps)
        #: Per viewer: (arrival µs, transport sequence) through the bottleneck, not yet arrived.
        self._in_flight: list[list[tuple[int, int]]] = [[] for _ in caps]

    def join(self) -> FakeConnection:
        """A viewer joining now (no cap)."""
        connection = FakeConnection()
        self.connections.append(connection)
        self.recorders.append(TransportFeedbackRecorder(0x5EED))
        self._delivered.append(0)
        self._free.append(0.0)
        self._in_flight.append([])
        self.sender.add(connection, self.now)
        return connection

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        step = 0.005
        while self.now < end - 1e-9:
            self.now = round(self.now + step, 6)
            now = self.now
            for connection in self.connections:
                connection.now = now
            if now >= self._next_frame_at - 1e-9:
                self._next_frame_at += 1 / FPS
                self._send_frame(now)
            self.sender.poll(now, now)
            if round(now * 1000) % 50 == 0:
                self._feedback(now)
            self.keyframes_due |= set(self.sender.take_keyframe_rungs())

    def _send_frame(self, now: float) -> None:
        self._frame += 1
        for rung in (0, 1):
            key = rung in self.keyframes_due
            if key:
                self.keyframes_made.append((now, rung))
            self.keyframes_due.discard(rung)
            self.sender.send(
                0,
                frame(rung, self._frame, key),
                pts=self._frame * 3000,
                capture_us=0,
                keyframe=key,
                now=now,
                wall_now=now,
                rung=rung,
            )

    def _feedback(self, now: float) -> None:
        for index, (connection, recorder) in enumerate(
            zip(self.connections, self.recorders, strict=True)
        ):
            for sent_at, data in connection.media[self._delivered[index] :]:
                sequence = transport_sequence(RtpPacket.parse(data))
                assert sequence is not None
                leaves = sent_at
                if self.capacity_bps is not None:
                    leaves = max(sent_at, self._free[index]) + len(data) * 8 / self.capacity_bps
                    self._free[index] = leaves
                self._in_flight[index].append((int((leaves + 0.02) * 1e6), sequence))
            self._delivered[index] = len(connection.media)
            flight = self._in_flight[index]
            while flight and flight[0][0] <= now * 1e6:
                arrival, sequence = flight.pop(0)
                recorder.on_packet(sequence, arrival)
            for packet in recorder.build():
                self.sender.on_rtcp(connection, packet.serialize(), now)


def media(connection: FakeConnection) -> list[RtpPacket]:
    return [RtpPacket.parse(data) for _, data in connection.media]


def rungs_received(connection: FakeConnection) -> list[int]:
    """The rung of every frame's first media packet, in order (payload octet 1 of a
    single-NAL packet, or of the FU/STAP's first NAL's body)."""
    out = []
    for packet in media(connection):
        if packet.payload:
            out.append(rung_of(packet.payload))
    return out


def rung_of(payload: bytes) -> int:
    nal_type = payload[0] & 0x1F
    if nal_type == 24:  # STAP-A: a 2-octet size, then the first NAL (RFC 6184 §5.7.1)
        return payload[4]
    if nal_type == 28:  # FU-A: indicator, header, then the NAL's body (§5.8)
        return payload[2]
    return payload[1]


def test_a_capped_viewer_gets_only_the_low_rung_and_lifting_the_cap_climbs_at_an_idr() -> None:
    run = Run(caps=[1, 0])
    capped, free = run.connections
    run.run(1.0)
    capped_peer = run.sender.peers[capped]
    assert capped_peer.rung == 1
    assert set(rungs_received(capped)) == {1}
    before = len(capped.media)
    # Lift the cap: the estimate (2 Mbps, loopback-clean feedback) clears 1.2 x 1 Mbps.
    run.sender.set_cap(capped, 0, run.now)
    run.run(3.0)
    assert capped_peer.rung == 0
    assert capped_peer.adaptation is not None
    assert capped_peer.adaptation.selector.switches_up == 1
    after = rungs_received(capped)[before:]
    switch = after.index(0)
    assert set(after[:switch]) == {1} and set(after[switch:]) == {0}  # one clean switch
    packets = [p for p in media(capped) if p.payload]
    assert len({p.ssrc for p in packets}) == 1
    sequences = [p.sequence_number for p in packets]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(sequences))
    first_top = next(p for p in packets[before:] if rung_of(p.payload) == 0)
    # The switch's first frame is the top rung's IDR, with its own SPS first.
    assert first_top.payload[0] & 0x1F in (7, 24)
    assert any(rung == 0 for _, rung in run.keyframes_made if _ > 1.0)
    # The uncapped viewer climbed on its own and the capped one never saw rung 0 before.
    assert run.sender.peers[free].rung == 0


def test_a_cap_lowers_a_viewer_at_the_low_rungs_idr() -> None:
    run = Run(caps=[0])
    (connection,) = run.connections
    run.run(3.0)
    peer = run.sender.peers[connection]
    assert peer.rung == 0
    before = len(rungs_received(connection))  # frames so far (padding has no payload)
    run.sender.set_cap(connection, 1, run.now)
    assert 1 in run.sender.take_keyframe_rungs()  # the low rung's IDR, asked for at once
    run.keyframes_due.add(1)
    run.run(0.2)
    assert peer.rung == 1
    assert set(rungs_received(connection)[before:][-3:]) == {1}


def test_probe_padding_is_padding_only_and_repeats_the_last_sequence_number() -> None:
    # Starting at 0.5 Mbps the estimate cannot clear the top rung without probing.
    run = Run(caps=[0], initial_bps=500_000)
    (connection,) = run.connections
    run.run(4.0)
    peer = run.sender.peers[connection]
    assert peer.adaptation is not None and peer.adaptation.probe.clusters_sent >= 1
    assert peer.rung == 0  # the probes found the headroom
    padding = [p for p in media(connection) if not p.payload]
    assert len(padding) == peer.adaptation.padding_packets > 0
    previous = None
    for packet in media(connection):
        if packet.payload:
            previous = packet
            continue
        assert previous is not None
        assert packet.padding and packet.padding[-1] == len(packet.padding) <= MAX_PADDING
        assert packet.sequence_number == previous.sequence_number
        assert packet.ssrc == previous.ssrc
        assert transport_sequence(packet) is not None


class StalledRun(Run):
    """A :class:`Run` whose shell does nothing (no poll, no frame, no feedback) between
    ``stall[0]`` and ``stall[1]``: a timer that fired late on a loaded machine."""

    def __init__(self, caps: Sequence[int], *, initial_bps: int, stall: tuple[float, float]):
        super().__init__(caps, initial_bps=initial_bps)
        self.stall = stall

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            if self.stall[0] <= self.now + 0.005 < self.stall[1]:
                self.now = round(self.now + 0.005, 6)
                continue
            super().run(0.005)


def test_a_probe_cluster_cut_by_a_stalled_shell_goes_out_whole_at_its_rate() -> None:
    """The first cluster (1 Mbps from 50 ms, a packet every 9.6 ms) is cut by an 80 ms stall
    of the shell after its third packet.  Measured across the stall it went out at 0.46 Mbps
    and failed, which backed probing off for a second; started again after the stall, it
    goes out at its rate and the viewer climbs on."""
    run = StalledRun(caps=[0], initial_bps=500_000, stall=(0.07, 0.15))
    (connection,) = run.connections
    peer = run.sender.peers[connection]
    assert peer.adaptation is not None
    probe = peer.adaptation.probe
    results = []
    for _ in range(200):
        run.run(0.005)
        if probe.last_result is not None and probe.last_result not in results:
            results.append(probe.last_result)
    assert probe.cluster_restarts == 1 and probe.clusters_unpaced == 0
    first = results[0]
    assert first.started_at >= 0.15 and first.target_bps == 1_000_000
    assert first.send_bps >= 0.95 * first.target_bps and first.estimate_bps is not None
    assert probe.probes_failed == 0 and len(results) >= 2  # the next one followed at once


@pytest.mark.parametrize("checks", [True, False])
def test_hold_checks_move_a_viewer_whose_rung_sends_under_the_cap_at_once(checks: bool) -> None:
    """Easy content: the top rung (1 Mbps) sends a fraction of its rate, so a cap of 0.6 Mbps
    builds no queue and GCC's estimate stays where the probes put it.  With hold checks the
    viewer goes down within 1.2 s of the cap (two checks, a second apart at most, the second
    0.1 s after the first) and stays down; without them nothing moves (on the real path
    only the next periodic IDR, overflowing the bottleneck's queue, would show the cap)."""
    config = None if checks else RungSelectorConfig(check_interval_s=None)
    run = Run(caps=[0], initial_bps=500_000, selector_config=config)
    (connection,) = run.connections
    peer = run.sender.peers[connection]
    adaptation = peer.adaptation
    assert adaptation is not None
    run.run(4.0)
    assert peer.rung == 0 and peer.sent_window.rate_bps(run.now) < 0.8 * RATES[0]
    run.capacity_bps = 600_000
    capped_at = run.now
    moved_at = None
    while run.now < capped_at + 4.0:
        run.run(0.005)
        if moved_at is None and peer.rung == 1:
            moved_at = run.now
    if not checks:
        assert moved_at is None and adaptation.selector.checks_short == 0
        return
    assert moved_at is not None and moved_at - capped_at < 1.2
    # The checks found it (their second cluster's queue may make GCC's own estimate fall
    # first, or the two short results move it).
    assert adaptation.selector.checks_short >= 1
    # The estimate came down to what the checks measured: no climbing straight back.
    assert peer.rung == 1 and adaptation.selector.switches_down == 1
    assert peer.estimator.estimate_bps < 0.95 * RATES[0]


def test_hold_checks_on_an_open_path_leave_the_viewer_on_its_rung() -> None:
    run = Run(caps=[0], initial_bps=500_000)
    (connection,) = run.connections
    peer = run.sender.peers[connection]
    adaptation = peer.adaptation
    assert adaptation is not None
    run.run(4.0)
    assert peer.rung == 0
    clusters, padding = adaptation.probe.clusters_sent, adaptation.padding_bytes
    run.run(6.0)
    assert peer.rung == 0 and adaptation.selector.switches == 1  # the climb only
    assert adaptation.selector.checks_short == 0
    # One check a second, each 30 ms at 1.2 Mbps: 5 packets of 1200 bytes.
    assert adaptation.probe.clusters_sent - clusters == 6
    assert adaptation.padding_bytes - padding == pytest.approx(6 * 5 * 1200, rel=0.02)


def test_a_viewer_weighs_its_path_against_what_its_rung_needs_now() -> None:
    """Content-aware needs (``RungTargets.needs``) reach the viewers' selectors: on a 0.6 Mbps
    path a still picture whose top rung needs 0.5 Mbps keeps the top rung (its checks
    carry 0.6 Mbps); once the picture moves and the rung needs its 1 Mbps again, the checks
    come back short and the viewer goes down."""
    run = Run(caps=[0], initial_bps=500_000)
    (connection,) = run.connections
    peer = run.sender.peers[connection]
    adaptation = peer.adaptation
    assert adaptation is not None
    run.run(4.0)
    assert peer.rung == 0
    run.sender.set_rung_rates([500_000, 300_000])
    assert adaptation.selector.rates == (500_000, 300_000)
    newcomer = run.sender.peers[run.join()].adaptation
    assert newcomer is not None and newcomer.selector.rates == (500_000, 300_000)
    run.capacity_bps = 600_000
    run.run(4.0)
    assert peer.rung == 0 and adaptation.selector.checks_short == 0
    run.sender.set_rung_rates(list(RATES))
    raised_at = run.now
    while peer.rung == 0 and run.now < raised_at + 3.0:
        run.run(0.005)
    assert peer.rung == 1 and run.now - raised_at < 1.5
    assert adaptation.last_reason.startswith("2 hold checks of rung 0's 1.00 Mbps")
    with pytest.raises(ConfigError, match="1 rung rates"):
        run.sender.set_rung_rates([500_000])


def test_padding_sizes_add_up_within_the_padding_limit() -> None:
    sizes = padding_sizes(1200, 20)
    assert all(0 < size <= MAX_PADDING for size in sizes)
    assert abs(sum(size + 20 for size in sizes) - 1200) < len(sizes)
    assert padding_sizes(10, 20) == [1]


def test_the_receiver_counts_padding_in_feedback_and_keeps_it_from_the_jitter_buffer() -> None:
    from shared.rtp.h264 import H264PayloadFormat
    from shared.rtp.receiver import ReceiverSession
    from shared.rtp.rtcp import RtcpNack, RtcpTransportFeedback, parse_rtcp_compound

    run = Run(caps=[0], initial_bps=500_000)
    (connection,) = run.connections
    run.run(2.0)
    session = ReceiverSession([(VIDEO_TRACK, H264PayloadFormat())], cname="ticket-1")
    padding = 0
    feedback: list[object] = []
    for at, data in connection.media:
        padding += not RtpPacket.parse(data).payload
        session.on_packet(VIDEO_TRACK.flow_id, data, at + 0.02)
        _, rtcp = session.tick(at + 0.02)
        feedback += [p for _, packet in rtcp for p in parse_rtcp_compound(packet)]
    assert padding > 0 and session.padding_received == padding
    track = session.tracks[VIDEO_TRACK.flow_id]
    assert track.buffer.packets_malformed == 0  # padding never reached the jitter buffer
    assert not any(isinstance(p, RtcpNack) for p in feedback)  # and opened no gap
    reported = {
        seq for p in feedback if isinstance(p, RtcpTransportFeedback) for seq, _ in p.arrivals()
    }
    for _, data in connection.media[:-10]:  # all but the last tick's, still pending
        assert transport_sequence(RtpPacket.parse(data)) in reported


def test_a_floor_retires_the_top_rung_for_everyone_and_lifting_it_gives_each_its_own_cap() -> None:
    """CPU pressure retires rung 0: both viewers move to rung 1 at its IDR, and a viewer that
    joins meanwhile starts there; lifted, the uncapped viewer climbs back and the one whose own
    cap (its max_quality) is rung 1 stays."""
    run = Run(caps=[0, 1])
    free, capped = run.connections
    run.run(3.0)
    assert run.sender.peers[free].rung == 0 and run.sender.peers[capped].rung == 1
    run.sender.set_floor(1, run.now)
    run.run(1.0)
    assert run.sender.peers[free].rung == 1 and run.sender.peers[capped].rung == 1
    before = len(rungs_received(free))
    late = run.join()
    run.run(2.0)
    assert set(rungs_received(free)[before:][-5:]) == {1}
    assert set(rungs_received(late)) == {1}  # never the retired rung
    run.sender.set_floor(0, run.now)
    run.run(4.0)
    assert run.sender.peers[free].rung == 0
    assert run.sender.peers[capped].rung == 1  # its own cap still holds
    with pytest.raises(ConfigError, match="floor 2"):
        run.sender.set_floor(2, run.now)
