"""RTCP (RFC 3550 §6, RFC 4585, transport-wide feedback): byte-exact round trips, statistics."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ConfigError, ProtocolError
from shared.rtp.bandwidth import SenderReportTimes
from shared.rtp.feedback import ReceptionStats, build_transport_feedback
from shared.rtp.rtcp import (
    ReportBlock,
    RtcpNack,
    RtcpPacket,
    RtcpPli,
    RtcpReceiverReport,
    RtcpSenderReport,
    RtcpSourceDescription,
    RtcpTransportFeedback,
    RtcpUnknown,
    SdesChunk,
    nack_pairs,
    nack_sequences,
    ntp_middle,
    ntp_timestamp,
    parse_rtcp_compound,
)

SETTINGS = settings(max_examples=300, derandomize=True, deadline=None)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


PLI = bytes.fromhex("81ce0002 00000001 00000002")
NACK = bytes.fromhex("81cd0003 00000001 00000002 000a0005")
RR_EMPTY = bytes.fromhex("80c90001 0000abcd")
BLOCK = ReportBlock(0x1234, 25, -3, 0x0001_0005, 17, 0xAABBCCDD, 6553)
SR = (
    bytes.fromhex("81c8000c 11111111")
    + struct.pack("!QIII", 0xE1234567_89ABCDEF, 90000, 42, 4200)
    + struct.pack("!IIIIII", 0x1234, 25 << 24 | 0xFFFFFD, 0x0001_0005, 17, 0xAABBCCDD, 6553)
)
# SDES with CNAME "abc": the item list's null terminator and its word alignment (RFC 3550
# §6.5), then 4 octets of RTCP padding.
SDES_PADDED = bytes.fromhex("a1ca0004 11111111 0103616263 000000 00000004")


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


def test_rtcp_compound_with_sdes_and_padding() -> None:
    compound = SR + NACK + SDES_PADDED
    packets = parse_rtcp_compound(compound)
    assert [type(p) for p in packets] == [RtcpSenderReport, RtcpNack, RtcpSourceDescription]
    sdes = packets[2]
    assert isinstance(sdes, RtcpSourceDescription)
    assert sdes.cname_of(0x11111111) == "abc" and sdes.cname_of(0x22) is None
    assert sdes.padding == b"\x00\x00\x00\x04"
    assert b"".join(p.serialize() for p in packets) == compound


def test_sdes_cname_round_trips_and_bad_chunks_are_protocol_errors() -> None:
    for name in ("", "v", "viewer-1234", "x" * 255):
        data = RtcpSourceDescription.cname(0x5EED, name).serialize()
        assert len(data) % 4 == 0
        [parsed] = parse_rtcp_compound(data)
        assert isinstance(parsed, RtcpSourceDescription) and parsed.cname_of(0x5EED) == name
    with pytest.raises(ConfigError):
        RtcpSourceDescription.cname(1, "x" * 256).serialize()
    # An item running past its packet, and a chunk without its terminating null item.
    for body in ("00000001 0109616263", "00000001 01036162"):
        raw = bytes.fromhex(body)
        raw += bytes(-len(raw) % 4)
        header = bytes((0x81, 202)) + (len(raw) // 4).to_bytes(2, "big")
        with pytest.raises(ProtocolError):
            parse_rtcp_compound(header + raw)


def test_rtcp_compound_with_unknown_packet_types() -> None:
    bye = bytes.fromhex("81cb0001 11111111")
    packets = parse_rtcp_compound(SR + bye)
    assert isinstance(packets[1], RtcpUnknown) and packets[1].packet_type == 203
    assert b"".join(p.serialize() for p in packets) == SR + bye


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
        RtcpSourceDescription,
        chunks=st.lists(
            st.builds(
                SdesChunk,
                ssrc=u32,
                items=st.lists(st.tuples(st.integers(1, 255), st.binary(max_size=20)), max_size=3),
            ),
            max_size=3,
        ),
    ),
    st.builds(
        RtcpUnknown,
        packet_type=st.sampled_from([203, 204, 207]),
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


# -- transport-wide feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1) -------

# Packets 100..102: received 1 ms after the 64 ms reference, lost, received 2 ms earlier (a
# negative delta needs the 2-bit "large" symbol).  Padded to a word with the P bit.
TWCC = bytes.fromhex("afcd0006 00000001 00000002 0064 0003 000001 07 d200 04 fff8 000003")


def test_transport_feedback_vector() -> None:
    [feedback] = parse_rtcp_compound(TWCC)
    assert isinstance(feedback, RtcpTransportFeedback)
    assert (feedback.base_sequence, feedback.status_count, feedback.reference_time) == (100, 3, 1)
    assert feedback.feedback_count == 7 and feedback.statuses() == [1, 0, 2]
    assert feedback.arrivals() == [(100, 65_000), (101, None), (102, 63_000)]
    assert feedback.serialize() == TWCC
    built = build_transport_feedback(
        sender_ssrc=1,
        media_ssrc=2,
        base_sequence=100,
        arrivals_us=[65_000, None, 63_000],
        feedback_count=7,
    )
    assert built.serialize() == TWCC


def test_transport_feedback_run_length_and_one_bit_chunks() -> None:
    arrivals: list[int | None] = [1_000_000 + 1000 * i for i in range(20)]
    arrivals += [None] * 9 + [2_000_000]
    feedback = build_transport_feedback(
        sender_ssrc=1, media_ssrc=2, base_sequence=65530, arrivals_us=arrivals, feedback_count=0
    )
    # 20 small deltas in a run, 9 lost in a run, one large delta in a 2-bit vector.
    assert [c >> 13 for c in feedback.chunks[:2]] == [1, 0]
    assert [c & 0x1FFF for c in feedback.chunks[:2]] == [20, 9]
    [parsed] = parse_rtcp_compound(feedback.serialize())
    assert parsed == feedback
    times = dict(parsed.arrivals())
    assert times[(65530 + 29) & 0xFFFF] == 2_000_000 and times[(65530 + 25) & 0xFFFF] is None


@SETTINGS
@given(
    u16,
    st.lists(st.one_of(st.none(), st.integers(0, 30_000)), min_size=1, max_size=300),
    st.integers(0, 10**9),
)
def test_transport_feedback_round_trip(base: int, steps: list[int | None], start: int) -> None:
    arrivals: list[int | None] = []
    time_us = start
    for step in steps:
        if step is not None:
            time_us += step - 5000  # some arrive earlier than the one before: negative deltas
        arrivals.append(None if step is None else time_us)
    if all(a is None for a in arrivals):
        arrivals[0] = start
    feedback = build_transport_feedback(
        sender_ssrc=9, media_ssrc=8, base_sequence=base, arrivals_us=arrivals, feedback_count=3
    )
    data = feedback.serialize()
    assert len(data) % 4 == 0
    [parsed] = parse_rtcp_compound(data)
    assert parsed == feedback and parsed.serialize() == data
    decoded = parsed.arrivals()
    assert [seq for seq, _ in decoded] == [(base + i) & 0xFFFF for i in range(len(arrivals))]
    for (_, got), want in zip(decoded, arrivals, strict=True):
        assert (got is None) == (want is None)
        if got is not None and want is not None:
            # Quantized to 250 µs ticks, accumulated without drift.
            assert abs(got - want) <= 125 + (want - want // 64_000 * 64_000 < 0)


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("8fcd0004 00000001 00000002 0064 0003 000001 07"),  # no chunks
        bytes.fromhex("8fcd0005 00000001 00000002 0064 0003 000001 07 d200 0400"),  # no delta
        bytes.fromhex("8fcd0005 00000001 00000002 0064 0001 000001 07 f000 0000"),  # symbol 3
        bytes.fromhex("8fcd0005 00000001 00000002 0064 0001 000001 07 2001 04 0001"),  # junk
    ],
)
def test_invalid_transport_feedback(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_rtcp_compound(data)


# -- reception statistics and RTT (RFC 3550 A.3, A.8, §6.4.1) ---------------------------------


def test_reception_stats_loss_jitter_and_lsr() -> None:
    stats = ReceptionStats(ssrc=5, clock_rate=90_000)
    assert stats.report_block(0.0) is None
    # 10 packets, 3000 ticks (1/30 s) apart, arriving with alternating 0/2 ms extra delay;
    # seq 3 and 4 are lost, seq 65535 -> 8 wraps.
    for index, seq in enumerate([65531, 65532, 65533, 65536, 65537, 65538, 65539, 65540]):
        arrival = 100.0 + (seq - 65531) / 30 + (0.002 if index % 2 else 0.0)
        stats.on_packet(seq & 0xFFFF, (seq - 65531) * 3000, arrival)
    sr = RtcpSenderReport(
        ssrc=5, ntp_timestamp=ntp_timestamp(1000.5), rtp_timestamp=0, packet_count=0, octet_count=0
    )
    stats.on_sender_report(sr, 101.0)
    block = stats.report_block(101.25)
    assert block is not None
    assert block.highest_sequence == 65540 and block.cumulative_lost == 2
    assert block.fraction_lost == 2 * 256 // 10
    assert block.last_sr == ntp_middle(sr.ntp_timestamp)
    assert block.delay_since_last_sr == 65536 // 4
    # Each transit change is 2 ms = 180 ticks: J moves 1/16 of the way each time.
    assert 60 < block.jitter < 180 and stats.jitter_s == pytest.approx(
        block.jitter / 90_000, abs=1e-4
    )
    # The sender sent the SR at 7.0 on its monotonic clock (wall 1000.5, the SR's data) and
    # gets the block at 7.0 + 0.25 + 0.040.
    sent = SenderReportTimes()
    sent.on_sent(sr.ntp_timestamp, 7.0)
    assert sent.round_trip_time(block, 7.29) == pytest.approx(0.040, abs=1e-4)
    assert stats.report_block(102.0) is not None and stats.fraction_lost == 0.0  # new interval


def test_round_trip_time_without_a_known_sr_is_unknown() -> None:
    sent = SenderReportTimes()
    assert sent.round_trip_time(ReportBlock(1, 0, 0, 0, 0, 0, 0), 5.0) is None  # LSR = 0
    sent.on_sent(ntp_timestamp(1000.5), 3.0)
    other = ntp_middle(ntp_timestamp(2000.0))
    assert sent.round_trip_time(ReportBlock(1, 0, 0, 0, 0, other, 0), 5.0) is None


def test_round_trip_time_is_immune_to_a_wall_clock_step() -> None:
    # SRs at monotonic 10.0 and 10.5; between them NTP steps the wall clock back an hour.
    sent = SenderReportTimes()
    first, second = ntp_timestamp(1_700_000_000.0), ntp_timestamp(1_699_996_400.5)
    sent.on_sent(first, 10.0)
    sent.on_sent(second, 10.5)
    # Each echo arrives 30 ms of network plus 0.1 s held at the receiver after its SR.
    for ntp, sent_at in ((first, 10.0), (second, 10.5)):
        block = ReportBlock(1, 0, 0, 0, 0, ntp_middle(ntp), 65536 // 10)
        assert sent.round_trip_time(block, sent_at + 0.13) == pytest.approx(0.030, abs=1e-4)


def test_sender_report_times_are_bounded_and_a_negative_rtt_is_zero() -> None:
    sent = SenderReportTimes(max_reports=4)
    for index in range(100):
        sent.on_sent(ntp_timestamp(1000.0 + index), float(index))
    assert len(sent) == 4
    oldest = ReportBlock(1, 0, 0, 0, 0, ntp_middle(ntp_timestamp(1095.0)), 0)
    assert sent.round_trip_time(oldest, 100.0) is None  # forgotten
    newest = ReportBlock(1, 0, 0, 0, 0, ntp_middle(ntp_timestamp(1099.0)), 65536)
    assert sent.round_trip_time(newest, 99.9) == 0.0  # DLSR rounding past the arrival


# -- interop: aiortc's RTCP parser and serializer ------------------------------------------


def test_interop_aiortc_reads_our_rtcp_and_we_read_its() -> None:
    from aiortc import rtp as other

    ours = (
        SR
        + RtcpNack.from_sequences(7, 9, [100, 101, 117, 300]).serialize()
        + RtcpPli(sender_ssrc=7, media_ssrc=9).serialize()
        + RtcpReceiverReport(ssrc=7, reports=[BLOCK]).serialize()
    )
    sr, nack, pli, rr = other.RtcpPacket.parse(ours)
    assert isinstance(sr, other.RtcpSrPacket) and sr.ssrc == 0x11111111
    assert (
        sr.sender_info.ntp_timestamp == 0xE1234567_89ABCDEF
        and sr.sender_info.rtp_timestamp == 90000
    )
    assert isinstance(nack, other.RtcpRtpfbPacket) and nack.fmt == 1
    assert sorted(nack.lost) == [100, 101, 117, 300]
    assert isinstance(pli, other.RtcpPsfbPacket) and (pli.fmt, pli.media_ssrc) == (1, 9)
    assert isinstance(rr, other.RtcpRrPacket)
    [info] = rr.reports
    assert (info.ssrc, info.fraction_lost, info.packets_lost, info.jitter) == (0x1234, 25, -3, 17)
    assert (info.lsr, info.dlsr) == (0xAABBCCDD, 6553)
    # And back: what aiortc serializes parses here to the same values.
    theirs = b"".join(p.__bytes__() for p in (sr, nack, pli, rr))
    parsed = parse_rtcp_compound(theirs)
    assert parsed[0] == parse_rtcp_compound(SR)[0]
    assert isinstance(parsed[1], RtcpNack) and sorted(parsed[1].sequences()) == [100, 101, 117, 300]
    assert parsed[2] == RtcpPli(sender_ssrc=7, media_ssrc=9)
    assert parsed[3] == RtcpReceiverReport(ssrc=7, reports=[BLOCK])
