"""RTP over QUIC framing: varints (RFC 9000 §16), datagrams, and the stream reader."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ConfigError, ProtocolError
from shared.roq.framing import (
    ALPN,
    AUDIO_FLOW_ID,
    AUDIO_RTCP_FLOW_ID,
    MAX_VARINT,
    VIDEO_FLOW_ID,
    VIDEO_RTCP_FLOW_ID,
    RoqErrorCode,
    RoqStreamDemux,
    RoqStreamReader,
    StaleFrames,
    decode_datagram,
    decode_varint,
    encode_datagram,
    encode_stream_header,
    encode_stream_packet,
    encode_varint,
)

SETTINGS = settings(max_examples=300, derandomize=True, deadline=None)

# RFC 9000 Appendix A.1 sample decodings.
RFC_VECTORS = [
    ("c2197c5eff14e88c", 151288809941952652),
    ("9d7f3e7d", 494878333),
    ("7bbd", 15293),
    ("25", 37),
]


@pytest.mark.parametrize(("encoded", "value"), RFC_VECTORS)
def test_rfc9000_vectors(encoded: str, value: int) -> None:
    data = bytes.fromhex(encoded)
    assert decode_varint(data) == (value, len(data))
    assert encode_varint(value) == data


def test_non_minimal_encoding_decodes() -> None:
    assert decode_varint(bytes.fromhex("4025")) == (37, 2)
    assert decode_varint(b"\xff" + bytes.fromhex("4025"), 1) == (37, 3)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 1),
        (63, 1),
        (64, 2),
        (16383, 2),
        (16384, 4),
        ((1 << 30) - 1, 4),
        (1 << 30, 8),
        (MAX_VARINT, 8),
    ],
)
def test_minimal_lengths(value: int, size: int) -> None:
    assert len(encode_varint(value)) == size


@pytest.mark.parametrize("value", [-1, 1 << 62])
def test_unencodable_values(value: int) -> None:
    with pytest.raises(ConfigError):
        encode_varint(value)


@pytest.mark.parametrize(
    ("data", "offset"), [(b"", 0), (b"\x40", 0), (b"\xc2\x19", 0), (b"\x25", 1)]
)
def test_truncated_varints(data: bytes, offset: int) -> None:
    with pytest.raises(ProtocolError):
        decode_varint(data, offset)


@SETTINGS
@given(st.binary(max_size=5), st.integers(0, MAX_VARINT), st.binary(max_size=5))
def test_varint_round_trip(prefix: bytes, value: int, suffix: bytes) -> None:
    encoded = encode_varint(value)
    assert decode_varint(prefix + encoded + suffix, len(prefix)) == (
        value,
        len(prefix) + len(encoded),
    )


def test_constants() -> None:
    assert ALPN == "rtp-mux-quic"
    assert [int(code) for code in RoqErrorCode] == list(range(8))
    assert RoqErrorCode.ROQ_UNKNOWN_FLOW_ID.value == 0x06
    flows = {VIDEO_FLOW_ID, VIDEO_RTCP_FLOW_ID, AUDIO_FLOW_ID, AUDIO_RTCP_FLOW_ID}
    assert len(flows) == 4


def test_datagrams() -> None:
    assert encode_datagram(1, b"\x80rtp") == b"\x01\x80rtp"
    assert decode_datagram(b"\x01\x80rtp") == (1, b"\x80rtp")
    assert decode_datagram(encode_datagram(300, b"x")) == (300, b"x")
    for bad in (b"", b"\x01", b"\x41\x2c", b"\x41"):
        with pytest.raises(ProtocolError):
            decode_datagram(bad)
    with pytest.raises(ConfigError):
        encode_datagram(0, b"")


PACKETS = [b"\x80" * 5, bytes(range(200)), b"x"]
STREAM = encode_stream_header(VIDEO_FLOW_ID + 70) + b"".join(map(encode_stream_packet, PACKETS))


def test_stream_reader_byte_by_byte() -> None:
    reader = RoqStreamReader()
    assert reader.flow_id is None
    received = [packet for byte in STREAM for packet in reader.feed(bytes([byte]))]
    assert received == PACKETS
    assert reader.flow_id == 70
    reader.finish()


def test_stream_reader_all_at_once() -> None:
    reader = RoqStreamReader()
    assert reader.feed(STREAM) == PACKETS
    assert reader.feed(b"") == []


@SETTINGS
@given(st.lists(st.integers(1, len(STREAM)), max_size=20))
def test_stream_reader_any_chunking(cuts: list[int]) -> None:
    reader = RoqStreamReader()
    bounds = [0, *sorted(cuts), len(STREAM)]
    received = [p for a, b in itertools.pairwise(bounds) for p in reader.feed(STREAM[a:b])]
    assert received == PACKETS


def test_stream_reader_rejects_bad_lengths() -> None:
    reader = RoqStreamReader(max_packet_size=100)
    with pytest.raises(ProtocolError):
        reader.feed(encode_stream_header(0) + encode_stream_packet(bytes(101)))
    with pytest.raises(ProtocolError):
        RoqStreamReader().feed(b"\x00\x00")  # zero-length frame
    with pytest.raises(ConfigError):
        RoqStreamReader(max_packet_size=0)
    with pytest.raises(ConfigError):
        encode_stream_packet(b"")


def test_stream_reader_finish_inside_frame() -> None:
    reader = RoqStreamReader()
    reader.feed(STREAM[:-1])
    with pytest.raises(ProtocolError):
        reader.finish()


def test_stream_demux_streams_limits_and_bad_framing() -> None:
    demux = RoqStreamDemux(max_streams=2, max_packet_size=100)
    first = encode_stream_header(1) + encode_stream_packet(b"rtcp")
    assert demux.feed(2, first[:1], False) == []
    assert demux.feed(2, first[1:], False) == [(1, b"rtcp")]
    assert demux.feed(6, encode_stream_header(0), False) == []
    assert not demux.accepts(10) and demux.accepts(2)  # two open: a third is refused
    demux.reset(6)  # a cancelled frame
    assert demux.accepts(10)
    with pytest.raises(ProtocolError):
        demux.feed(10, encode_stream_header(0) + encode_stream_packet(bytes(101)), False)
    assert demux.accepts(14)  # the broken stream was forgotten
    with pytest.raises(ProtocolError):
        demux.feed(2, b"\x05ab", True)  # FIN inside a frame
    assert demux.feed(18, encode_stream_header(3) + encode_stream_packet(b"x"), True) == [(3, b"x")]


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 20), st.binary(max_size=30), st.booleans()), max_size=60))
def test_stream_demux_survives_any_bytes(chunks: list[tuple[int, bytes, bool]]) -> None:
    demux = RoqStreamDemux(max_streams=4, max_packet_size=64)
    for stream_id, data, fin in chunks:
        if not demux.accepts(stream_id):
            continue
        try:
            for _, packet in demux.feed(stream_id, data, fin):
                assert 1 <= len(packet) <= 64
        except ProtocolError:
            pass
        assert len(demux._readers) <= 4


def test_stale_frames_cancels_only_unsent_ones() -> None:
    stale = StaleFrames(max_age_s=0.3)
    states = {1: "sent", 5: "unsent", 9: "unsent", 13: "done"}
    for stream_id in states:
        stale.opened(stream_id, 0.0)
    assert stale.unsent(states.__getitem__) == 2
    assert stale.to_cancel(0.1, keyframe=False, state=states.__getitem__) == []
    assert stale.to_cancel(0.31, keyframe=False, state=states.__getitem__) == [5, 9]
    stale.opened(17, 0.4)
    states[17] = "unsent"
    assert stale.to_cancel(0.41, keyframe=True, state=states.__getitem__) == [17]  # superseded
    states[1] = "done"
    assert stale.to_cancel(0.5, keyframe=False, state=states.__getitem__) == []
    assert stale.unsent(states.__getitem__) == 0
