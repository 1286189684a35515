"""RTP (RFC 3550 §5.1), header extensions and sequence arithmetic: byte-exact round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ConfigError, ProtocolError
from shared.rtp.packet import (
    ONE_BYTE_PROFILE,
    TRANSPORT_CC_EXTENSION_ID,
    HeaderExtension,
    RtpPacket,
    RtpSequenceExtender,
    is_rtcp,
    seq_diff,
    seq_lt,
    transport_sequence,
    with_transport_sequence,
)
from shared.rtp.rtcp import RtcpPli

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


def test_transport_wide_sequence_extension() -> None:
    packet = RtpPacket(payload_type=96, sequence_number=7, timestamp=1, ssrc=2, payload=b"x")
    assert transport_sequence(packet) is None
    data = with_transport_sequence(packet, 0x1_2345).serialize()
    # X bit, one-byte profile, one word: id 5, length 2 (L=1), 0x2345, one padding octet.
    assert data[0] == 0x90 and data[12:20] == bytes.fromhex("bede0001 51234500")
    parsed = RtpPacket.parse(data)
    assert transport_sequence(parsed) == 0x2345 and parsed.payload == b"x"
    odd = RtpPacket(
        payload_type=96,
        sequence_number=7,
        timestamp=1,
        ssrc=2,
        extension=HeaderExtension.one_byte({TRANSPORT_CC_EXTENSION_ID: b"\x01"}),
    )
    assert transport_sequence(odd) is None  # wrong length: ignored, not trusted


def test_interop_aiortc_parses_our_rtp_and_we_parse_its() -> None:
    """aiortc, an independent RTP stack, reads what we write and the other way round."""
    from aiortc import rtp as other
    from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters

    extensions = other.HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(
            headerExtensions=[
                RTCRtpHeaderExtensionParameters(
                    id=TRANSPORT_CC_EXTENSION_ID,
                    uri="http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
                )
            ]
        )
    )
    ours = with_transport_sequence(
        RtpPacket(
            payload_type=96,
            sequence_number=65535,
            timestamp=0xDEADBEEF,
            ssrc=0x12345678,
            payload=b"payload",
            marker=True,
            csrc=[1, 2],
        ),
        513,
    ).serialize()
    theirs = other.RtpPacket.parse(ours, extensions)
    assert (theirs.sequence_number, theirs.timestamp, theirs.ssrc) == (
        65535,
        0xDEADBEEF,
        0x12345678,
    )
    assert theirs.marker == 1 and theirs.csrc == [1, 2] and theirs.payload == b"payload"
    assert theirs.extensions.transport_sequence_number == 513
    theirs.extensions.transport_sequence_number = 514
    back = RtpPacket.parse(theirs.serialize(extensions))
    assert transport_sequence(back) == 514 and back.payload == b"payload" and back.csrc == [1, 2]
