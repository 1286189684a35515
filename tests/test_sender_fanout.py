"""The sender's per-viewer work, sans-I/O: headers written straight into bytes, SRs by heap.

Each frame is packetized once; per viewer only the RTP header is written, directly as bytes.
These tests hold that fast path to the reference one (:class:`RtpPacket` with the
transport-wide sequence number extension, serialized), byte for byte, across sequence number
wrap-around, for retransmissions too; and check that SRs are found through a heap of
deadlines, coalesced, and still sent to every viewer at its interval (a fake clock throughout).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from shared.rtp.packet import RtpPacket, transport_sequence, with_transport_sequence
from shared.rtp.rtcp import RtcpNack, RtcpSenderReport, parse_rtcp_compound
from shared.rtp.sender import (
    AUDIO_TRACK,
    SR_INTERVAL_S,
    VIDEO_TRACK,
    BroadcastSender,
    PeerSender,
)

FPS = 30


def reference(
    peer: PeerSender, track: int, payloads: Sequence[bytes], first: int, transport: int, pts: int
) -> list[bytes]:
    """What the sender sent before the fast path: RtpPacket, extension, serialize()."""
    stream = peer.streams[track]
    out = []
    for index, payload in enumerate(payloads):
        packet = RtpPacket(
            payload_type=stream.payload_type,
            sequence_number=(first + index) & 0xFFFF,
            timestamp=stream.timestamp(pts),
            ssrc=stream.ssrc,
            payload=payload,
            marker=index == len(payloads) - 1,
        )
        with_transport_sequence(packet, (transport + index) & 0xFFFF)
        out.append(packet.serialize())
    return out


def test_the_headers_written_per_viewer_are_the_reference_serialization() -> None:
    peer = PeerSender([VIDEO_TRACK, AUDIO_TRACK], now=0.0, initial_bps=1_000_000, rng=None)
    first = transport = audio_first = -1
    for frame in range(40):
        now = frame / FPS
        payloads = [bytes([0x7C, frame, i]) * (1 + i * 37 % 400) for i in range(1 + frame % 7)]
        got = peer.send_frame(0, payloads, pts=frame * 3000, capture_us=0, keyframe=True, now=now)
        if frame == 0:  # the random starting points (RFC 3550 §5.1), read off the first packet
            start = RtpPacket.parse(got[0])
            first, transport = start.sequence_number, transport_sequence(start) or 0
        assert got == reference(peer, 0, payloads, first, transport, frame * 3000)
        first, transport = (first + len(payloads)) & 0xFFFF, (transport + len(payloads)) & 0xFFFF
        opus = [bytes([0xFC, frame]) * 20]
        audio = peer.send_frame(1, opus, pts=frame * 960, capture_us=0, keyframe=True, now=now)
        if frame == 0:
            audio_first = RtpPacket.parse(audio[0]).sequence_number
        assert audio == reference(peer, 1, opus, audio_first, transport, frame * 960)
        audio_first, transport = (audio_first + 1) & 0xFFFF, (transport + 1) & 0xFFFF
    sent = peer.streams[0].packets_sent + peer.streams[1].packets_sent
    assert peer.feedback.packets_sent == sent == sum(1 + f % 7 for f in range(40)) + 40


def test_sequence_numbers_wrap_in_both_spaces() -> None:
    peer = PeerSender([VIDEO_TRACK], now=0.0, initial_bps=1_000_000, rng=random.Random(2))
    peer.streams[0] = type(peer.streams[0])(
        ssrc=peer.streams[0].ssrc, initial_sequence=0xFFFE, timestamp_offset=0, payload_type=96
    )
    peer._transport_sequence = 0xFFFF
    packets = [
        RtpPacket.parse(p)
        for p in peer.send_frame(
            0, [b"\x41a", b"\x41b", b"\x41c"], pts=0, capture_us=0, keyframe=True, now=0.0
        )
    ]
    assert [p.sequence_number for p in packets] == [0xFFFE, 0xFFFF, 0]
    assert [transport_sequence(p) for p in packets] == [0xFFFF, 0, 1]
    assert [p.marker for p in packets] == [False, False, True]


def test_a_retransmission_is_the_same_packet_with_a_fresh_transport_sequence() -> None:
    peer = PeerSender([VIDEO_TRACK], now=0.0, initial_bps=2_000_000, rng=random.Random(8))
    payloads = [b"\x7c\x85" + bytes(500), b"\x7c\x45" + bytes(200)]
    sent = peer.send_frame(0, payloads, pts=3000, capture_us=0, keyframe=True, now=0.0)
    lost = RtpPacket.parse(sent[1])
    nack = RtcpNack.from_sequences(1, peer.streams[0].ssrc, [lost.sequence_number])
    ((flow_id, resent),) = peer.on_rtcp(nack.serialize(), 0.1)
    again = RtpPacket.parse(resent)
    assert flow_id == VIDEO_TRACK.flow_id and peer.feedback.retransmissions == 1
    assert (again.sequence_number, again.timestamp, again.marker, again.payload) == (
        lost.sequence_number,
        lost.timestamp,
        lost.marker,
        lost.payload,
    )
    # The last transport-wide number went to the frame's last packet, this one follows it.
    fresh = (transport_sequence(lost) or 0) + 1 & 0xFFFF
    assert transport_sequence(again) == fresh
    assert resent == with_transport_sequence(lost, fresh).serialize()


# -- SRs: a heap of deadlines, coalesced -------------------------------------------------------


class RecordingConnection:
    def __init__(self) -> None:
        self.backlog = 0
        self.transport_rtt_s = 0.02
        self.srs: list[float] = []
        self.now = 0.0

    def send_media(
        self, flow_id: int, packets: Sequence[bytes], *, keyframe: bool, urgent: bool = False
    ) -> None:
        pass

    def send_rtcp(self, flow_id: int, packet: bytes) -> None:
        (report,) = parse_rtcp_compound(packet)
        assert isinstance(report, RtcpSenderReport)
        self.srs.append(self.now)


def on_schedule(srs: list[float]) -> bool:
    """The k-th SR went within 50 ms before ``srs[0] + k * SR_INTERVAL_S``, never after."""
    return all(
        -0.05 - 1e-9 <= sent - (srs[0] + k * SR_INTERVAL_S) <= 1e-9 for k, sent in enumerate(srs)
    )


def test_every_viewer_gets_its_srs_at_the_interval_with_frames_and_without() -> None:
    sender = BroadcastSender([VIDEO_TRACK], initial_bps=1_000_000, rng=random.Random(3))
    connections = [RecordingConnection() for _ in range(40)]
    joined: dict[RecordingConnection, float] = {}
    now, frame, next_frame = 0.0, 0, 0.0
    # Viewers join over the first second, at times unrelated to the frame clock; frames stop
    # at 3 s, after which only the SR timer (next_poll) drives the sender.
    arrivals = sorted(random.Random(5).uniform(0.0, 1.0) for _ in connections)
    while now < 6.0:
        for connection in connections:
            connection.now = now
        while arrivals and arrivals[0] <= now:
            connection = connections[len(joined)]
            sender.add(connection, arrivals.pop(0))
            joined[connection] = now
        if now >= next_frame and now < 3.0:
            sender.send(
                0,
                b"\x00\x00\x00\x01\x65" + bytes(50),
                pts=frame * 3000,
                capture_us=int(now * 1e6),
                keyframe=True,
                now=now,
                wall_now=now + 1e9,
            )
            frame += 1
            next_frame = frame / FPS
        else:
            sender.poll(now, now + 1e9)
        due = sender.next_poll()
        upcoming = min(
            due,
            next_frame if now < 3.0 else float("inf"),
            arrivals[0] if arrivals else float("inf"),
        )
        assert upcoming > now
        now = upcoming
    for connection in connections:
        srs = connection.srs
        # The first SR with the first packets, then one per interval: never after its time
        # on that schedule, never more than 50 ms (SR_EARLY_S) before it, and no drift.
        assert srs[0] == pytest.approx(joined[connection], abs=1 / FPS + 1e-9)
        assert on_schedule(srs)
        assert srs[-1] > 6.0 - SR_INTERVAL_S - 1e-9  # they went on after the frames stopped


def test_one_timer_wakeup_sends_every_sr_due_soon() -> None:
    """40 viewers whose SRs fall due 12.5 ms apart, and no frames: the sender wakes far less
    often than once per viewer per interval, and every SR still goes within SR_EARLY_S of
    its time."""
    sender = BroadcastSender([VIDEO_TRACK], initial_bps=1_000_000, rng=random.Random(3))
    connections = [RecordingConnection() for _ in range(40)]
    for index, connection in enumerate(connections):
        now = index * SR_INTERVAL_S / len(connections)
        for other in connections:
            other.now = now
        sender.add(connection, now)
        # A frame (to all) starts only the newcomer's SR clock: the first SR goes with it.
        sender.send(
            0,
            b"\x00\x00\x00\x01\x65" + bytes(50),
            pts=index * 3000,
            capture_us=0,
            keyframe=True,
            now=now,
            wall_now=now + 1e9,
        )
    wakeups = 0
    while (now := sender.next_poll()) < 4.0:
        for connection in connections:
            connection.now = now
        sender.poll(now, now + 1e9)
        wakeups += 1
    # 3.5 s of 40 viewers' SRs, 280 in all, in wake-ups at least 50 ms apart.
    assert wakeups <= 3.5 / 0.05 + 1
    for index, connection in enumerate(connections):
        due = index * SR_INTERVAL_S / len(connections)
        srs = connection.srs
        assert len(srs) >= 7 and srs[0] == due and on_schedule(srs)


def test_a_viewer_that_left_gets_no_more_srs_and_holds_no_timer() -> None:
    sender = BroadcastSender([VIDEO_TRACK], initial_bps=1_000_000, rng=random.Random(3))
    staying, leaving = RecordingConnection(), RecordingConnection()
    sender.add(staying, 0.0)
    sender.add(leaving, 0.0)
    sender.send(
        0,
        b"\x00\x00\x00\x01\x65" + bytes(50),
        pts=0,
        capture_us=0,
        keyframe=True,
        now=0.0,
        wall_now=1e9,
    )
    assert len(staying.srs) == len(leaving.srs) == 1
    sender.remove(leaving)
    assert sender.next_poll() == pytest.approx(SR_INTERVAL_S)
    sender.remove(staying)
    assert sender.next_poll() == float("inf")
    sender.poll(10.0, 1e9 + 10.0)
    assert len(staying.srs) == len(leaving.srs) == 1
