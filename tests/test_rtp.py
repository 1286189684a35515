"""RTP (RFC 3550 §5.1), RTCP SR/RR/PLI/NACK and sequence arithmetic: byte-exact round trips."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ConfigError, ProtocolError
from shared.rtp import (
    ONE_BYTE_PROFILE,
    HeaderExtension,
    ReportBlock,
    RtcpNack,
    RtcpPacket,
    RtcpPli,
    RtcpReceiverReport,
    RtcpSenderReport,
    RtcpUnknown,
    RtpPacket,
    RtpSequenceExtender,
    is_rtcp,
    nack_pairs,
    nack_sequences,
    parse_rtcp_compound,
    seq_diff,
    seq_lt,
)

SETTINGS = settings(max_examples=300, derandomize=True, deadline=None)

MINIMAL = bytes.fromhex("80 60 0001 0000000a 12345678") + b"abc"
# P, X, CC=2; M=1, PT=96; seq 65535; two CSRCs; a one-byte extension {1: AA}; 3 padding octets.
FULL = bytes.fromhex("b2 e0 ffff deadbeef 00000001 00000002 00000003 bede0001 10aa0000 0102 000003")


def test_minimal_vector() -> None:
    packet = RtpPacket.parse(MINIMAL)
    assert packet == RtpPacket(
        payload_type=96, sequence_number=1, timestamp=10, ssrc=0x12345678, payload=b"abc"
    )
    assert packet.serialize() == MINIMAL


def test_full_header_vector() -> None:
    packet = RtpPacket.parse(FULL)
    assert packet.marker and packet.payload_type == 96
    assert (packet.sequence_number, packet.timestamp, packet.ssrc) == (0xFFFF, 0xDEADBEEF, 1)
    assert packet.csrc == [2, 3]
    assert packet.extension == HeaderExtension(ONE_BYTE_PROFILE, bytes.fromhex("10aa0000"))
    assert packet.extensions == {1: b"\xaa"}
    assert packet.payload == b"\x01\x02"
    assert packet.padding == b"\x00\x00\x03"
    assert packet.serialize() == FULL


def test_one_byte_extension_helpers() -> None:
    ext = HeaderExtension.one_byte({1: b"\x01", 14: bytes(range(16))})
    assert ext.profile == ONE_BYTE_PROFILE and len(ext.data) % 4 == 0
    assert ext.elements() == {1: b"\x01", 14: bytes(range(16))}
    # Id 15 stops processing (RFC 8285 §4.2); padding octets between elements are skipped.
    assert HeaderExtension(ONE_BYTE_PROFILE, bytes.fromhex("00 10 aa f0 20 bb")).elements() == {
        1: b"\xaa"
    }
    assert HeaderExtension(0x1000, b"\x10\xaa\x00\x00").elements() == {}
    with pytest.raises(ProtocolError):
        HeaderExtension(ONE_BYTE_PROFILE, bytes.fromhex("13 aa 00 00")).elements()
    for bad in ({0: b"x"}, {15: b"x"}, {1: b""}, {1: bytes(17)}):
        with pytest.raises(ConfigError):
            HeaderExtension.one_byte(bad)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        MINIMAL[:11],
        bytes([0x40]) + MINIMAL[1:],  # version 1
        bytes([0x8F]) + MINIMAL[1:],  # 15 CSRCs claimed, none present
        bytes([0x90]) + MINIMAL[1:12] + b"\xbe\xde",  # extension header truncated
        bytes([0x90]) + MINIMAL[1:12] + b"\xbe\xde\x00\x02" + bytes(4),  # extension too long
        bytes([0xA0]) + MINIMAL[1:] + b"\x00",  # padding count 0
        bytes([0xA0]) + MINIMAL[1:] + b"\x09",  # padding count beyond the payload
        bytes([0xA0]) + MINIMAL[1:12],  # P bit and nothing after the header
    ],
)
def test_invalid_packets_raise_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        RtpPacket.parse(data)


def test_every_truncation_raises_only_protocol_error() -> None:
    for cut in range(len(FULL)):
        try:
            packet = RtpPacket.parse(FULL[:cut])
        except ProtocolError:
            continue
        assert packet.serialize() == FULL[:cut]


@pytest.mark.parametrize(
    "packet",
    [
        RtpPacket(payload_type=128, sequence_number=0, timestamp=0, ssrc=0),
        RtpPacket(payload_type=96, sequence_number=1 << 16, timestamp=0, ssrc=0),
        RtpPacket(payload_type=96, sequence_number=0, timestamp=1 << 32, ssrc=0),
        RtpPacket(payload_type=96, sequence_number=0, timestamp=0, ssrc=-1),
        RtpPacket(payload_type=96, sequence_number=0, timestamp=0, ssrc=0, csrc=[0] * 16),
        RtpPacket(payload_type=96, sequence_number=0, timestamp=0, ssrc=0, padding=b"\x00\x01"),
        RtpPacket(
            payload_type=96,
            sequence_number=0,
            timestamp=0,
            ssrc=0,
            extension=HeaderExtension(ONE_BYTE_PROFILE, b"\x10\xaa"),
        ),
    ],
)
def test_unencodable_fields_raise_config_error(packet: RtpPacket) -> None:
    with pytest.raises(ConfigError):
        packet.serialize()


u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
paddings = st.one_of(
    st.just(b""), st.binary(max_size=10).map(lambda pad: pad + bytes([len(pad) + 1]))
)
rtp_packets = st.builds(
    RtpPacket,
    payload_type=st.integers(0, 127),
    sequence_number=u16,
    timestamp=u32,
    ssrc=u32,
    payload=st.binary(max_size=64),
    marker=st.booleans(),
    csrc=st.lists(u32, max_size=15),
    extension=st.none()
    | st.builds(HeaderExtension, u16, st.binary(max_size=8).map(lambda b: b + bytes(-len(b) % 4))),
    padding=paddings,
)


@SETTINGS
@given(rtp_packets)
def test_rtp_round_trip(packet: RtpPacket) -> None:
    data = packet.serialize()
    parsed = RtpPacket.parse(data)
    assert parsed == packet
    assert parsed.serialize() == data


@SETTINGS
@given(st.binary(max_size=80))
def test_rtp_parse_arbitrary_bytes(data: bytes) -> None:
    try:
        packet = RtpPacket.parse(data)
    except ProtocolError:
        return
    assert packet.serialize() == data


def test_is_rtcp_demux() -> None:
    assert is_rtcp(RtcpPli(sender_ssrc=1, media_ssrc=2).serialize())
    assert not is_rtcp(MINIMAL)
    assert not is_rtcp(FULL)  # marker + PT 96 = 224, just above the RTCP range
    assert not is_rtcp(b"\x80")


# -- sequence numbers ----------------------------------------------------------------------


def test_seq_arithmetic_wraps() -> None:
    assert seq_diff(1, 65535) == 2 and seq_diff(65535, 1) == -2
    assert seq_lt(65535, 0) and not seq_lt(0, 65535)
    assert not seq_lt(7, 7)
    assert seq_diff(0x7FFF, 0) == 0x7FFF


def test_extender_across_wrap_with_reordering() -> None:
    extender = RtpSequenceExtender()
    seqs = [65534, 65535, 0, 1, 65535, 2, 0xFFFF & (2 + 30000)]
    assert [extender.extend(s) for s in seqs] == [65534, 65535, 65536, 65537, 65535, 65538, 95538]
    assert extender.highest == 95538
    with pytest.raises(ConfigError):
        extender.extend(1 << 16)


@SETTINGS
@given(st.integers(0, 0xFFFF), st.lists(st.integers(-500, 3000), max_size=200))
def test_extender_recovers_true_sequence(start: int, steps: list[int]) -> None:
    extender = RtpSequenceExtender()
    true_seq = start
    assert extender.extend(start) == start
    highest = start
    for step in steps:
        # Keep every packet within half the sequence space of the highest one seen.
        true_seq = max(true_seq + step, highest - 30000)
        highest = max(highest, true_seq)
        assert extender.extend(true_seq & 0xFFFF) == true_seq


# -- RTCP ----------------------------------------------------------------------------------

PLI = bytes.fromhex("81ce0002 00000001 00000002")
NACK = bytes.fromhex("81cd0003 00000001 00000002 000a0005")
RR_EMPTY = bytes.fromhex("80c90001 0000abcd")
BLOCK = ReportBlock(0x1234, 25, -3, 0x0001_0005, 17, 0xAABBCCDD, 6553)
SR = (
    bytes.fromhex("81c8000c 11111111")
    + struct.pack("!QIII", 0xE1234567_89ABCDEF, 90000, 42, 4200)
    + struct.pack("!IIIIII", 0x1234, 25 << 24 | 0xFFFFFD, 0x0001_0005, 17, 0xAABBCCDD, 6553)
)
SDES_PADDED = bytes.fromhex("a1ca0003 11111111 0103616263 000003")  # CNAME "abc", padded


def test_rtcp_vectors() -> None:
    assert parse_rtcp_compound(PLI) == [RtcpPli(sender_ssrc=1, media_ssrc=2)]
    [nack] = parse_rtcp_compound(NACK)
    assert isinstance(nack, RtcpNack) and nack.sequences() == [10, 11, 13]
    assert parse_rtcp_compound(RR_EMPTY) == [RtcpReceiverReport(ssrc=0xABCD)]
    [sr] = parse_rtcp_compound(SR)
    assert sr == RtcpSenderReport(
        ssrc=0x11111111,
        ntp_timestamp=0xE1234567_89ABCDEF,
        rtp_timestamp=90000,
        packet_count=42,
        octet_count=4200,
        reports=[BLOCK],
    )
    for data in (PLI, NACK, RR_EMPTY, SR):
        assert b"".join(p.serialize() for p in parse_rtcp_compound(data)) == data


def test_rtcp_compound_with_unknown_and_padding() -> None:
    compound = SR + NACK + SDES_PADDED
    packets = parse_rtcp_compound(compound)
    assert [type(p) for p in packets] == [RtcpSenderReport, RtcpNack, RtcpUnknown]
    sdes = packets[2]
    assert isinstance(sdes, RtcpUnknown)
    assert (sdes.packet_type, sdes.count, sdes.padding) == (202, 1, b"\x00\x00\x03")
    assert b"".join(p.serialize() for p in packets) == compound


def test_rtcp_truncations_raise_protocol_error() -> None:
    compound = SR + PLI + NACK + SDES_PADDED
    boundaries = {len(SR), len(SR + PLI), len(SR + PLI + NACK), len(compound)}
    for cut in range(len(compound)):
        if cut in boundaries:
            assert parse_rtcp_compound(compound[:cut])
            continue
        with pytest.raises(ProtocolError):
            parse_rtcp_compound(compound[:cut])


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("41ce0002 00000001 00000002"),  # version 1
        bytes.fromhex("81ce0003 00000001 00000002 00000003"),  # PLI with an FCI
        bytes.fromhex("82c80006") + bytes(24),  # SR claims two blocks, has none
        bytes.fromhex("81c90001 00000001"),  # RR claims a block, has none
        bytes.fromhex("a1ca0001 00000000"),  # padding count 0
        bytes.fromhex("a1ca0001 00000009"),  # padding count beyond the packet
    ],
)
def test_invalid_rtcp(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_rtcp_compound(data)


@pytest.mark.parametrize(
    "packet",
    [
        RtcpPli(sender_ssrc=1 << 32, media_ssrc=0),
        RtcpNack(sender_ssrc=0, media_ssrc=0, pairs=[(1 << 16, 0)]),
        RtcpReceiverReport(ssrc=-1),
        RtcpReceiverReport(ssrc=0, reports=[ReportBlock(0, 256, 0, 0, 0, 0, 0)]),
        RtcpReceiverReport(ssrc=0, reports=[ReportBlock(0, 0, 1 << 23, 0, 0, 0, 0)]),
        RtcpSenderReport(0, 1 << 64, 0, 0, 0),
        RtcpUnknown(packet_type=256, count=0, body=b""),
        RtcpUnknown(packet_type=204, count=32, body=b""),
        RtcpUnknown(packet_type=204, count=0, body=b"abc"),
        RtcpPli(sender_ssrc=0, media_ssrc=0, padding=b"\x00\x00\x00\x03"),
    ],
)
def test_unencodable_rtcp_raises_config_error(packet: RtcpPacket) -> None:
    with pytest.raises(ConfigError):
        packet.serialize()


def test_nack_pairs_wrap_and_split() -> None:
    pairs = nack_pairs([0, 65534, 5, 40, 65535, 5])
    assert pairs == [(65534, 0b1000011), (40, 0)]
    assert nack_sequences(pairs) == [65534, 65535, 0, 5, 40]
    assert nack_pairs([]) == []
    with pytest.raises(ConfigError):
        nack_pairs([70000])


@SETTINGS
@given(st.integers(0, 0xFFFF), st.sets(st.integers(0, 2000), max_size=100))
def test_nack_pairs_cover_exactly(base: int, offsets: set[int]) -> None:
    seqs = {(base + offset) & 0xFFFF for offset in offsets}
    pairs = nack_pairs(seqs)
    expanded = nack_sequences(pairs)
    assert len(expanded) == len(seqs) and set(expanded) == seqs
    packet = RtcpNack.from_sequences(1, 2, seqs)
    assert parse_rtcp_compound(packet.serialize()) == [packet]


report_blocks = st.builds(
    ReportBlock,
    u32,
    st.integers(0, 255),
    st.integers(-(1 << 23), (1 << 23) - 1),
    u32,
    u32,
    u32,
    u32,
)
words = st.binary(max_size=12).map(lambda b: b + bytes(-len(b) % 4))
rtcp_packets: st.SearchStrategy[RtcpPacket] = st.one_of(
    st.builds(
        RtcpSenderReport,
        ssrc=u32,
        ntp_timestamp=st.integers(0, (1 << 64) - 1),
        rtp_timestamp=u32,
        packet_count=u32,
        octet_count=u32,
        reports=st.lists(report_blocks, max_size=3),
        extension=words,
    ),
    st.builds(
        RtcpReceiverReport, ssrc=u32, reports=st.lists(report_blocks, max_size=3), extension=words
    ),
    st.builds(RtcpPli, sender_ssrc=u32, media_ssrc=u32),
    st.builds(RtcpNack, sender_ssrc=u32, media_ssrc=u32, pairs=st.lists(st.tuples(u16, u16))),
    st.builds(
        RtcpUnknown,
        packet_type=st.sampled_from([202, 203, 204, 207]),
        count=st.integers(0, 31),
        body=words,
    ),
)


@SETTINGS
@given(st.lists(rtcp_packets, min_size=1, max_size=4))
def test_rtcp_round_trip(packets: list[RtcpPacket]) -> None:
    data = b"".join(p.serialize() for p in packets)
    assert parse_rtcp_compound(data) == packets


@SETTINGS
@given(st.binary(max_size=80))
def test_rtcp_parse_arbitrary_bytes(data: bytes) -> None:
    try:
        packets = parse_rtcp_compound(data)
    except ProtocolError:
        return
    assert b"".join(p.serialize() for p in packets) == data
