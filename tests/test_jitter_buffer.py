"""JitterBuffer: reorder, wait for retransmissions within the budget, never deliver a broken frame."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ConfigError
from shared.rtp.h264 import H264Packetizer, H264PayloadFormat
from shared.rtp.jitter_buffer import BufferedFrame, JitterBuffer
from shared.rtp.opus import OpusPayloadFormat
from shared.rtp.packet import RtpPacket

SETTINGS = settings(max_examples=150, derandomize=True, deadline=None)
SPS, PPS = b"\x67\x42\x00\x1f\xab", b"\x68\xce\x38\x80"


def idr(index: int) -> list[bytes]:
    return [SPS, PPS, b"\x65" + bytes([index]) * 300]


def p_frame(index: int) -> list[bytes]:
    return [b"\x41" + bytes([index]) * 180]


def stream(kinds: str, *, first_seq: int = 65530, ssrc: int = 1) -> list[list[RtpPacket]]:
    """Packets per frame for a string like ``"IPPPIP"`` (mtu 100: several packets each)."""
    packetizer, frames, seq = H264Packetizer(mtu=100), [], first_seq
    for index, kind in enumerate(kinds):
        payloads = packetizer.packetize(idr(index) if kind == "I" else p_frame(index))
        packets = []
        for number, payload in enumerate(payloads):
            packets.append(
                RtpPacket(
                    payload_type=96,
                    sequence_number=seq & 0xFFFF,
                    timestamp=(0xFFFFF000 + 3000 * index) & 0xFFFFFFFF,
                    ssrc=ssrc,
                    payload=payload,
                    marker=number == len(payloads) - 1,
                )
            )
            seq += 1
        frames.append(packets)
    return frames


def index_of(frame: BufferedFrame) -> int:
    return ((frame.rtp_timestamp - 0xFFFFF000) & 0xFFFFFFFF) // 3000


def push(buffer: JitterBuffer, packets: list[RtpPacket], now: float) -> list[int]:
    return [index_of(f) for p in packets for f in buffer.push(p, now)]


def flat(frames: list[list[RtpPacket]]) -> list[RtpPacket]:
    return [p for frame in frames for p in frame]


def test_in_order_stream_is_delivered_frame_by_frame() -> None:
    frames = stream("IPPPP")
    buffer = JitterBuffer(H264PayloadFormat())
    assert push(buffer, flat(frames), 0.0) == [0, 1, 2, 3, 4]
    assert buffer.nacks(0.0) == [] and not buffer.keyframe_needed
    assert buffer.pending_packets == 0 and buffer.pending_bytes == 0


def test_reordering_across_frames_waits_and_delivers_all_in_order() -> None:
    packets = flat(stream("IPPP"))
    held = packets.pop(3)  # a packet of frame 0 arrives after frames 1-3
    buffer = JitterBuffer(H264PayloadFormat())
    assert push(buffer, packets, 0.0) == []
    assert buffer.missing == 1
    assert push(buffer, [held], 0.005) == [0, 1, 2, 3]
    assert buffer.frames_dropped == 0 and buffer.packets_recovered == 0


def test_a_lost_packet_is_nacked_then_retried_after_a_round_trip_then_recovered() -> None:
    packets = flat(stream("IPP"))
    lost = packets.pop(4)
    buffer = JitterBuffer(H264PayloadFormat(), latency_budget_s=0.2)
    buffer.rtt_s = 0.03
    push(buffer, packets, 0.0)
    assert buffer.nacks(0.0) == [lost.sequence_number]
    assert buffer.nacks(0.02) == []  # not again within 1.5 RTT
    assert buffer.nacks(0.05) == [lost.sequence_number]
    assert buffer.nacks_sent == 2
    frames = buffer.push(lost, 0.06)
    assert [index_of(f) for f in frames] == [0, 1, 2]
    assert frames[0].recovered and not frames[1].recovered
    assert buffer.packets_recovered == 1 and buffer.frames_recovered == 1


def test_no_nack_that_could_not_arrive_in_time() -> None:
    packets = flat(stream("IP"))
    packets.pop(2)
    buffer = JitterBuffer(H264PayloadFormat(), latency_budget_s=0.1)
    buffer.rtt_s = 0.5
    push(buffer, packets, 0.0)
    assert buffer.nacks(0.0) == []


def test_give_up_after_budget_then_only_a_keyframe_resumes() -> None:
    frames = stream("IPPPIPP")
    lost = frames[1].pop(1)
    buffer = JitterBuffer(H264PayloadFormat(), latency_budget_s=0.2)
    assert push(buffer, flat(frames[:4]), 0.0) == [0]
    assert buffer.poll(0.19) == [] and not buffer.keyframe_needed
    assert buffer.poll(0.2) == []  # frame 1 lost; 2 and 3 need it: dropped
    assert buffer.keyframe_needed and buffer.frames_dropped >= 1
    assert push(buffer, [lost], 0.21) == []  # too late now
    assert buffer.packets_late == 1
    assert push(buffer, flat(frames[4:]), 0.3) == [4, 5, 6]
    assert not buffer.keyframe_needed and buffer.frames_dropped == 3


def test_lost_marker_then_keyframe_is_accepted_from_its_own_start() -> None:
    frames = stream("IPIP")
    frames[1].pop()  # frame 1's marker packet: its end is unknown
    buffer = JitterBuffer(H264PayloadFormat(), latency_budget_s=0.05)
    assert push(buffer, flat(frames), 0.0) == [0]
    assert [index_of(f) for f in buffer.poll(0.05)] == [2, 3]
    assert buffer.frames_delivered == 3 and buffer.frames_dropped == 1


def test_joining_mid_frame_and_mid_gop_waits_for_a_keyframe() -> None:
    frames = stream("IPPIPP")
    buffer = JitterBuffer(H264PayloadFormat())
    packets = flat(frames)[2:]  # the first two packets of the IDR were never received
    delivered = push(buffer, packets, 0.0)
    assert delivered == [3, 4, 5]
    assert buffer.frames_dropped >= 2


def test_malformed_frame_is_dropped_and_asks_for_a_keyframe() -> None:
    frames = stream("IPPI")
    bad = frames[1][0]
    frames[1][0] = RtpPacket(
        payload_type=96,
        sequence_number=bad.sequence_number,
        timestamp=bad.timestamp,
        ssrc=bad.ssrc,
        payload=b"\x7c\x41" + bad.payload[2:],  # FU-A continuation where a start must be
    )
    buffer = JitterBuffer(H264PayloadFormat())
    assert push(buffer, flat(frames), 0.0) == [0, 3]
    assert buffer.packets_malformed == 1 and buffer.frames_dropped == 2


def test_duplicates_late_packets_and_empty_payloads_are_counted() -> None:
    frames = stream("IP")
    buffer = JitterBuffer(H264PayloadFormat())
    push(buffer, flat(frames), 0.0)
    push(buffer, [frames[1][0], frames[0][0]], 0.0)
    empty = RtpPacket(payload_type=96, sequence_number=5, timestamp=0, ssrc=1)
    buffer.push(empty, 0.0)
    assert buffer.packets_late == 2 and buffer.packets_malformed == 1


def test_new_ssrc_starts_over() -> None:
    buffer = JitterBuffer(H264PayloadFormat())
    assert push(buffer, flat(stream("IP")), 0.0) == [0, 1]
    assert push(buffer, flat(stream("IP", first_seq=100, ssrc=2)), 0.0) == [0, 1]


def test_memory_is_bounded_by_packets_and_bytes() -> None:
    buffer = JitterBuffer(H264PayloadFormat(), max_packets=64, max_bytes=5000)
    frames = stream("I" + "P" * 200)
    frames[0].pop(1)  # the head never completes
    for packet in flat(frames):
        buffer.push(packet, 0.0)
        assert buffer.pending_packets <= 64 and buffer.pending_bytes <= 5000
    assert buffer.frames_dropped > 0


def test_a_huge_sequence_jump_is_a_restart_not_a_flood_of_nacks() -> None:
    buffer = JitterBuffer(H264PayloadFormat(), max_packets=64)
    push(buffer, flat(stream("IP")), 0.0)
    push(buffer, flat(stream("IP", first_seq=30000)), 0.0)
    assert buffer.missing == 0 and len(buffer.nacks(0.0)) == 0


def test_audio_frames_are_independent() -> None:
    buffer = JitterBuffer(OpusPayloadFormat(), latency_budget_s=0.06)
    packets = [
        RtpPacket(
            payload_type=111, sequence_number=i, timestamp=960 * i, ssrc=9, payload=b"\xfc\xff\xfe"
        )
        for i in range(6)
    ]
    assert len([f for p in packets[:2] for f in buffer.push(p, 0.0)]) == 2
    assert [f.rtp_timestamp for p in packets[3:] for f in buffer.push(p, 0.01)] == []
    assert buffer.poll(0.069) == []  # noticed at 0.01: the budget runs to 0.07
    assert [f.rtp_timestamp for f in buffer.poll(0.07)] == [2880, 3840, 4800]
    assert not buffer.keyframe_needed and buffer.frames_dropped == 1


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError):
        JitterBuffer(H264PayloadFormat(), max_packets=1)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 0.3), st.floats(0.0, 0.3))
def test_any_loss_and_reordering_never_yields_a_broken_frame(
    seed: int, loss: float, reorder: float
) -> None:
    rng = random.Random(seed)
    kinds = "".join("I" if i % 10 == 0 else "P" for i in range(40))
    frames = stream(kinds, first_seq=rng.randrange(65536))
    originals = {f[0].timestamp: f for f in frames}
    packets = [p for p in flat(frames) if rng.random() >= loss]
    for i in range(len(packets) - 1):
        if rng.random() < reorder:
            packets[i], packets[i + 1] = packets[i + 1], packets[i]
    buffer = JitterBuffer(H264PayloadFormat(), latency_budget_s=0.05)
    delivered: list[BufferedFrame] = []
    for step, packet in enumerate(packets):
        now = step * 0.01
        delivered += buffer.push(packet, now) + buffer.poll(now)
    delivered += buffer.poll(1e9)
    indices = [index_of(f) for f in delivered]
    assert indices == sorted(set(indices))
    payload_format = H264PayloadFormat()
    previous = -1
    for frame in delivered:
        expected, keyframe = payload_format.assemble(
            [p.payload for p in originals[frame.rtp_timestamp]]
        )
        assert frame.units == expected and frame.keyframe == keyframe
        index = index_of(frame)
        # Skipping a frame is only allowed onto a keyframe.
        assert index == previous + 1 or keyframe
        previous = index
    assert buffer.pending_packets == 0 or buffer.keyframe_needed or buffer.missing == 0
