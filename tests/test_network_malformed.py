"""Hostile or broken input from the network: counted and dropped, memory bounded, others unharmed."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ProtocolError
from shared.roq.transport import RoqClient
from shared.rtp.h264 import H264Depacketizer, H264PayloadFormat
from shared.rtp.jitter_buffer import JitterBuffer, PayloadFormat
from shared.rtp.opus import OpusPayloadFormat
from shared.rtp.packet import RtpPacket
from shared.rtp.receiver import ReceiverSession
from shared.rtp.rtcp import ReportBlock, RtcpNack, RtcpPli, RtcpReceiverReport
from shared.rtp.sender import AUDIO_TRACK, VIDEO_TRACK, MediaTrack, PeerSender
from shared.viewer.client import Viewer
from tests.test_roq_loopback import Broadcast, collect, received, until

SETTINGS = settings(max_examples=300, derandomize=True, deadline=None)
TRACKS: list[tuple[MediaTrack, PayloadFormat]] = [
    (VIDEO_TRACK, H264PayloadFormat()),
    (AUDIO_TRACK, OpusPayloadFormat()),
]


def sending_peer() -> PeerSender:
    peer = PeerSender([VIDEO_TRACK], now=0.0, initial_bps=1_000_000, rng=random.Random(1))
    for index in range(400):  # fill the history: 400 frames of 3 packets
        peer.send_frame(
            0,
            [b"\x65" + bytes(1000)] * 3,
            pts=index * 3000,
            capture_us=0,
            keyframe=True,
            now=index / 30,
        )
    return peer


@SETTINGS
@given(st.binary(max_size=200))
def test_sender_survives_any_rtcp_bytes(data: bytes) -> None:
    peer = sending_peer()
    peer.on_rtcp(data, 14.0)
    assert peer.feedback.rtcp_received == 1


@SETTINGS
@given(st.integers(0, 200), st.binary(max_size=120))
def test_viewer_session_survives_any_packet_on_any_flow(flow_id: int, data: bytes) -> None:
    session = ReceiverSession(TRACKS)
    session.on_packet(flow_id, data, 1.0)
    session.tick(2.0)
    assert session.packets_received == 1
    if flow_id > 3:
        assert session.unknown_flows == 1


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFF),
            st.integers(0, 20),
            st.booleans(),
            st.binary(min_size=1, max_size=40),
        ),
        max_size=300,
    )
)
def test_jitter_buffer_memory_stays_bounded_whatever_arrives(
    packets: list[tuple[int, int, bool, bytes]],
) -> None:
    buffer = JitterBuffer(H264PayloadFormat(), max_packets=32, max_bytes=2000)
    for step, (seq, timestamp, marker, payload) in enumerate(packets):
        packet = RtpPacket(
            payload_type=96,
            sequence_number=seq,
            timestamp=timestamp,
            ssrc=1,
            payload=payload,
            marker=marker,
        )
        buffer.push(packet, step * 0.01)
        buffer.poll(step * 0.01)
        buffer.nacks(step * 0.01)
        assert buffer.pending_packets <= 32 and buffer.pending_bytes <= 2000
        assert buffer.missing <= 32


def test_fu_a_fragments_that_never_complete_are_dropped_and_forgotten() -> None:
    buffer = JitterBuffer(H264PayloadFormat(), max_packets=64, latency_budget_s=0.05)
    for seq in range(5000):  # an endless NAL unit: start, then continuations, never an end
        header = 0x85 if seq == 0 else 0x05
        packet = RtpPacket(
            payload_type=96,
            sequence_number=seq & 0xFFFF,
            timestamp=seq // 50,
            ssrc=1,
            payload=bytes([0x7C, header]) + bytes(100),
            marker=seq % 50 == 49,
        )
        assert buffer.push(packet, seq * 0.001) == []
        buffer.poll(seq * 0.001)
        assert buffer.pending_packets <= 64
    assert buffer.frames_delivered == 0 and buffer.keyframe_needed


def test_oversized_reassembly_is_refused() -> None:
    depacketizer = H264Depacketizer(max_nal_size=10_000)
    depacketizer.push(bytes([0x7C, 0x85]) + bytes(5000))
    with pytest.raises(ProtocolError, match="beyond"):
        depacketizer.push(bytes([0x7C, 0x05]) + bytes(6000))
    assert not depacketizer.in_fragment


def test_a_nack_flood_costs_a_bounded_share_of_the_rate() -> None:
    peer = sending_peer()
    ssrc = peer.streams[0].ssrc
    every = RtcpNack.from_sequences(1, ssrc, range(0, 65536, 1)).serialize()
    resent_bytes = 0
    for step in range(100):  # 100 floods of every sequence number, 10 ms apart
        resent_bytes += sum(len(p) for _, p in peer.on_rtcp(every, 14.0 + step * 0.01))
    # At most half the 1 Mbit/s estimate over 1 s, plus one 0.25 s burst.
    assert resent_bytes <= 1_000_000 / 8 * 0.5 * 1.25 + 2000
    assert peer.feedback.retransmissions_refused > 0


def test_a_hostile_client_does_not_disturb_a_viewer() -> None:
    async def main() -> tuple[list[int], Broadcast]:
        broadcast = Broadcast()
        url = await broadcast.start()
        viewer = await Viewer.connect(url, reconnect=False)
        hostile = await RoqClient.connect(url.host, url.port, fingerprint=url.fingerprint)
        seen: list[int] = []
        task = asyncio.create_task(collect(viewer, seen))
        await until(lambda: len(broadcast.server.peers) == 2, "the server to see both clients")
        rng = random.Random(9)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            for index in range(60):
                broadcast.send_one(index)
                raw.sendto(rng.randbytes(rng.randrange(1, 1300)), (url.host, url.port))
                quic = hostile._protocol._quic
                quic.send_datagram_frame(b"\xff")  # a truncated flow id varint
                hostile.send(40, b"unknown flow")  # a flow nobody declared
                hostile.send(1, b"\x81\xcd\x00\x09")  # RTCP truncated
                hostile.send(1, RtcpPli(sender_ssrc=1, media_ssrc=12345).serialize())
                hostile.send(1, RtcpNack.from_sequences(1, 0, range(0, 65536, 7)).serialize())
                hostile.send(
                    1,
                    RtcpReceiverReport(
                        ssrc=1, reports=[ReportBlock(7, 255, 99, 0, 0, 1, 1)]
                    ).serialize(),
                )
                await asyncio.sleep(1 / 30)

        def unknown() -> int:
            return sum(p.unknown_flows + p.datagrams_malformed for p in broadcast.server.peers)

        await until(lambda: unknown() > 0, "the server to count the malformed datagrams")
        await until(received(seen, 59), "frame 59 at the viewer")
        await broadcast.server.close()
        await asyncio.wait_for(task, 5)
        await viewer.close()
        await hostile.close()
        return seen, broadcast

    seen, broadcast = asyncio.run(main())
    assert seen == list(range(60))
    assert broadcast.plis <= 2  # an unknown SSRC's PLI asks for nothing


def test_receive_queue_is_bounded() -> None:
    async def main() -> tuple[int, int]:
        broadcast = Broadcast()
        url = await broadcast.start()
        client = await RoqClient.connect(
            url.host, url.port, fingerprint=url.fingerprint, max_queued=50
        )
        await until(lambda: len(broadcast.server.peers) == 1, "the server to see the client")
        for index in range(120):  # nobody reads: the queue must not grow without end
            broadcast.send_one(index)
            await asyncio.sleep(0.002)
        # 120 frames are well over 50 packets: the queue fills, then drops its oldest.
        await until(lambda: client.overflow > 0, "the client's queue to overflow")
        size = client.queued
        await broadcast.server.close()
        await client.close()
        return size, client.overflow

    size, overflow = asyncio.run(main())
    assert size == 50 and overflow > 0
