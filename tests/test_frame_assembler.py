"""FrameAssembler: RTP packets -> whole access units; loss drops frames until the next IDR."""

from __future__ import annotations

import random
from fractions import Fraction

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perf.frame_assembler import AssembledFrame, FrameAssembler
from shared.errors import ConfigError
from shared.rtp.h264 import H264Packetizer, split_annexb, to_annexb
from shared.rtp.packet import RtpPacket

SETTINGS = settings(max_examples=100, derandomize=True, deadline=None)
SSRC = 0x1234
SPS, PPS = b"\x67\x42\x00\x1f\xab", b"\x68\xce\x38\x80"


def idr(index: int, size: int = 400) -> list[bytes]:
    return [SPS, PPS, b"\x65" + bytes([index]) * size]


def p_frame(index: int, size: int = 250) -> list[bytes]:
    return [b"\x41" + bytes([index]) * size]


def rtp_frames(
    access_units: list[list[bytes]], *, first_seq: int = 65530, mtu: int = 100
) -> list[list[RtpPacket]]:
    """Packetize access units as a sender does: one timestamp each, marker on the last packet."""
    packetizer = H264Packetizer(mtu=mtu)
    frames, seq = [], first_seq
    for index, nal_units in enumerate(access_units):
        payloads = packetizer.packetize(nal_units)
        packets = []
        for number, payload in enumerate(payloads):
            packets.append(
                RtpPacket(
                    payload_type=96,
                    sequence_number=seq & 0xFFFF,
                    timestamp=(0xFFFFF000 + 3000 * index) & 0xFFFFFFFF,
                    ssrc=SSRC,
                    payload=payload,
                    marker=number == len(payloads) - 1,
                )
            )
            seq += 1
        frames.append(packets)
    return frames


def push_all(assembler: FrameAssembler, packets: list[RtpPacket]) -> list[AssembledFrame]:
    return [frame for packet in packets for frame in assembler.push(packet)]


GOP = [idr(0), p_frame(1), p_frame(2), p_frame(3), idr(4), p_frame(5)]


def test_in_order_delivery_across_sequence_wrap() -> None:
    frames = rtp_frames(GOP)
    assembler = FrameAssembler()
    delivered = push_all(assembler, [p for frame in frames for p in frame])
    assert [f.nal_units for f in delivered] == GOP
    assert [f.keyframe for f in delivered] == [True, False, False, False, True, False]
    assert delivered[0].first_sequence == 65530
    assert delivered[-1].last_sequence == 65530 + sum(map(len, frames)) - 1  # no wrap back
    assert delivered[1].rtp_timestamp == (0xFFFFF000 + 3000) & 0xFFFFFFFF
    assert delivered[0].annexb == to_annexb(GOP[0])
    assert assembler.frames_completed == 6 and assembler.frames_dropped == 0
    assert assembler.packets_received == sum(map(len, frames))
    assert not assembler.keyframe_needed and assembler.pending_frames == 0


def test_frame_is_delivered_on_its_marker_packet() -> None:
    [packets] = rtp_frames([idr(0)])
    assembler = FrameAssembler()
    assert push_all(assembler, packets[:-1]) == []
    assert len(assembler.push(packets[-1])) == 1


def test_loss_in_p_frame_drops_until_next_idr() -> None:
    frames = rtp_frames(GOP)
    lost = frames[2][1]  # a middle packet of the second P-frame
    assembler = FrameAssembler()
    delivered: list[AssembledFrame] = []
    needed_after: list[bool] = []
    for packet in [p for frame in frames for p in frame]:
        if packet is not lost:
            delivered += assembler.push(packet)
            needed_after.append(assembler.keyframe_needed)
    assert [f.nal_units for f in delivered] == [GOP[0], GOP[1], GOP[4], GOP[5]]
    assert assembler.gaps == 1 and assembler.frames_dropped == 2  # the damaged one and P3
    assert True in needed_after and not needed_after[-1]  # asked for a keyframe, then recovered
    assert assembler.packets_malformed == 0


def test_lost_marker_packet() -> None:
    frames = rtp_frames(GOP)
    lost = frames[1][-1]
    assembler = FrameAssembler()
    packets = [p for frame in frames for p in frame if p is not lost]
    delivered = push_all(assembler, packets)
    assert [f.nal_units for f in delivered] == [GOP[0], GOP[4], GOP[5]]
    assert not assembler.keyframe_needed


def test_keyframe_needed_stays_set_until_a_keyframe() -> None:
    frames = rtp_frames([idr(0), p_frame(1), p_frame(2), p_frame(3)])
    assembler = FrameAssembler()
    push_all(assembler, frames[0])
    push_all(assembler, frames[1][1:])  # the first packet of P1 is lost
    push_all(assembler, frames[2] + frames[3])
    assert assembler.keyframe_needed and assembler.frames_dropped == 3


def test_duplicates_are_ignored() -> None:
    frames = rtp_frames(GOP)
    assembler = FrameAssembler()
    doubled = [p for frame in frames for p in frame for _ in range(2)]
    delivered = push_all(assembler, doubled)
    assert [f.nal_units for f in delivered] == GOP
    count = sum(map(len, frames))
    # A copy right behind a marker packet arrives after its frame was delivered: "late".
    assert assembler.packets_duplicate + assembler.packets_late == count
    assert assembler.packets_late == len(frames) and assembler.frames_dropped == 0


def test_reordering_within_a_frame_is_tolerated() -> None:
    frames = rtp_frames(GOP)
    rng = random.Random(5)
    shuffled = []
    for frame in frames:
        frame = list(frame)
        rng.shuffle(frame)
        shuffled += frame
    assembler = FrameAssembler()
    delivered = push_all(assembler, shuffled)
    assert [f.nal_units for f in delivered] == GOP
    assert assembler.gaps == 0


def test_reordering_across_frames_counts_as_loss() -> None:
    frames = rtp_frames(GOP)
    packets = [p for frame in frames for p in frame]
    boundary = len(frames[0]) + len(frames[1])
    # The last packet of P1 arrives after the first packet of P2.
    packets[boundary - 1], packets[boundary] = packets[boundary], packets[boundary - 1]
    assembler = FrameAssembler()
    delivered = push_all(assembler, packets)
    assert [f.nal_units for f in delivered] == [GOP[0], GOP[4], GOP[5]]
    assert assembler.packets_late == 1


def test_joining_mid_stream_waits_for_a_keyframe() -> None:
    frames = rtp_frames(GOP)
    assembler = FrameAssembler()
    delivered = push_all(assembler, [p for frame in frames[1:] for p in frame])
    assert [f.nal_units for f in delivered] == GOP[4:]
    assert assembler.frames_dropped == 3

    relaxed = FrameAssembler(wait_for_keyframe=False)
    assert len(push_all(relaxed, [p for frame in frames[1:] for p in frame])) == 5


def test_malformed_frame_is_dropped_not_raised() -> None:
    frames = rtp_frames(GOP)
    broken = frames[1][0]
    broken.payload = b"\x7c\x01" + broken.payload[2:]  # FU-A continuation without its start
    assembler = FrameAssembler()
    delivered = push_all(assembler, [p for frame in frames for p in frame])
    assert [f.nal_units for f in delivered] == [GOP[0], GOP[4], GOP[5]]
    assert assembler.packets_malformed == 1 and assembler.gaps == 0


def test_new_ssrc_starts_a_new_sequence_space() -> None:
    frames = rtp_frames(GOP[:2])
    restarted = rtp_frames(GOP[4:], first_seq=100)
    for packet in (p for frame in restarted for p in frame):
        packet.ssrc = SSRC + 1
    assembler = FrameAssembler()
    delivered = push_all(assembler, [p for frame in frames + restarted for p in frame])
    assert [f.nal_units for f in delivered] == GOP[:2] + GOP[4:]


def test_config_errors() -> None:
    with pytest.raises(ConfigError):
        FrameAssembler(max_pending_frames=0)
    with pytest.raises(ConfigError):
        FrameAssembler(max_pending_bytes=0)


@SETTINGS
@given(
    st.lists(
        st.builds(
            RtpPacket,
            payload_type=st.just(96),
            sequence_number=st.integers(0, 0xFFFF),
            timestamp=st.integers(0, 5),
            ssrc=st.sampled_from([1, 2]),
            payload=st.binary(max_size=30),
            marker=st.booleans(),
        ),
        max_size=60,
    )
)
def test_garbage_never_raises(packets: list[RtpPacket]) -> None:
    assembler = FrameAssembler(max_pending_frames=4, max_pending_bytes=200)
    for packet in packets:
        for frame in assembler.push(packet):
            assert frame.nal_units
        assert assembler.pending_frames <= 4 and assembler.pending_bytes <= 200
    assert assembler.packets_received == len(packets)


@SETTINGS
@given(
    st.integers(0, 0xFFFF),
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 900)), min_size=1, max_size=300),
)
def test_memory_bound_under_unfinished_fu_a_flood(
    start: int, fragments: list[tuple[int, int]]
) -> None:
    assembler = FrameAssembler(max_pending_frames=3, max_pending_bytes=4000)
    for offset, (timestamp, size) in enumerate(fragments):
        fragment = RtpPacket(
            payload_type=96,
            sequence_number=(start + offset) & 0xFFFF,
            timestamp=timestamp,
            ssrc=SSRC,
            payload=bytes([0x7C, 0x85 if offset % 7 == 0 else 0x05]) + bytes(size),
        )
        assert assembler.push(fragment) == []
        assert assembler.pending_frames <= 3 and assembler.pending_bytes <= 4000
    total = sum(size + 2 for _, size in fragments)
    assert total <= 4000 or assembler.frames_dropped > 0
    assert assembler.frames_dropped >= assembler.frames_evicted


def test_one_endless_frame_is_evicted() -> None:
    assembler = FrameAssembler(max_pending_bytes=10_000)
    for seq in range(100):
        header = bytes([0x7C, 0x85 if seq == 0 else 0x05])
        packet = RtpPacket(96, seq, 0, SSRC, header + bytes(998))
        assert assembler.push(packet) == []
        assert assembler.pending_bytes <= 10_000
    # Eleven packets overflow the budget; the packet after an evicted frame without a marker is
    # taken for that frame's end and refused as late, so each cycle spans twelve packets.
    assert assembler.frames_evicted == 8 and assembler.packets_late == 8
    assert assembler.keyframe_needed


def test_real_encoder_stream_with_loss_recovers_and_decodes() -> None:
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 640, 360, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.framerate = Fraction(30)
    encoder.options = {
        "tune": "zerolatency",
        "preset": "ultrafast",
        "x264-params": "repeat-headers=1:annexb=1:keyint=4",
    }
    rng = np.random.default_rng(3)
    access_units = []
    for index in range(8):
        noise = rng.integers(0, 256, (540, 640), dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(noise, format="yuv420p")
        frame.pts = index
        access_units += [split_annexb(bytes(packet)) for packet in encoder.encode(frame)]
    assert len(access_units) == 8
    frames = rtp_frames(access_units, first_seq=65000, mtu=1100)
    lost = frames[1][3]
    assembler = FrameAssembler()
    delivered = push_all(assembler, [p for frame in frames for p in frame if p is not lost])
    # Frames 1-3 go (loss, then waiting for the IDR at 4); 0 and 4-7 decode.
    assert [f.nal_units for f in delivered] == [access_units[i] for i in (0, 4, 5, 6, 7)]
    decoder = av.CodecContext.create("h264", "r")
    pictures = []
    for assembled in delivered:
        for packet in decoder.parse(assembled.annexb):
            pictures += decoder.decode(packet)
    for packet in decoder.parse(b""):
        pictures += decoder.decode(packet)
    pictures += decoder.decode(None)
    assert len(pictures) == 5
