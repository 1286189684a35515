"""RTP packets (RFC 3550 §5.1), the RTCP messages the spine uses, and 16-bit sequence arithmetic.

Theory of operation: everything here is a pure value with ``parse(bytes)`` and ``serialize()``.
Parsing keeps every octet that a valid packet may carry (padding content, CSRCs, header
extension, SR/RR profile extensions, unknown RTCP packets), so ``parse(b).serialize() == b``
holds for any valid input; the tests check that.  Bad bytes from the network raise
:class:`ProtocolError`; field values a caller sets that cannot be encoded raise
:class:`ConfigError` at ``serialize()``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.errors import ConfigError, ProtocolError

__all__ = [
    "ONE_BYTE_PROFILE",
    "RTCP_PSFB",
    "RTCP_RR",
    "RTCP_RTPFB",
    "RTCP_SR",
    "RTP_VERSION",
    "HeaderExtension",
    "ReportBlock",
    "RtcpNack",
    "RtcpPacket",
    "RtcpPli",
    "RtcpReceiverReport",
    "RtcpSenderReport",
    "RtcpUnknown",
    "RtpPacket",
    "RtpSequenceExtender",
    "is_rtcp",
    "nack_pairs",
    "nack_sequences",
    "parse_rtcp_compound",
    "seq_diff",
    "seq_lt",
]

RTP_VERSION = 2
#: "defined by profile" value of an RFC 8285 §4.2 one-byte header extension block.
ONE_BYTE_PROFILE = 0xBEDE
RTCP_SR, RTCP_RR, RTCP_RTPFB, RTCP_PSFB = 200, 201, 205, 206
_FMT_GENERIC_NACK = 1  # RFC 4585 §6.2.1
_FMT_PLI = 1  # RFC 4585 §6.3.1

_RTP_HEADER = struct.Struct("!BBHII")
_WORD_PAIR = struct.Struct("!HH")
_RTCP_HEADER = struct.Struct("!BBH")
_SR_INFO = struct.Struct("!IQIII")
_REPORT_BLOCK = struct.Struct("!IIIIII")
_TWO_SSRC = struct.Struct("!II")


def _padding_length(data: bytes, start: int, end: int) -> int:
    """Padding octets ending ``data[start:end]`` (RFC 3550 §5.1: the last one counts them all)."""
    count = data[end - 1] if end > start else 0
    if count == 0 or count > end - start:
        raise ProtocolError(f"padding count {count} does not fit the {end - start} bytes left")
    return count


def _check_padding(padding: bytes) -> None:
    if padding and padding[-1] != len(padding):
        raise ConfigError("the last padding octet must equal the padding length")


@dataclass(slots=True)
class HeaderExtension:
    """An RTP header extension (RFC 3550 §5.3.1): a 16-bit profile value and 32-bit words."""

    profile: int
    data: bytes = b""

    @classmethod
    def one_byte(cls, elements: dict[int, bytes]) -> HeaderExtension:
        """Encode RFC 8285 §4.2 one-byte elements (ids 1-14, 1-16 bytes each), zero-padded."""
        out = bytearray()
        for ext_id, value in elements.items():
            if not 1 <= ext_id <= 14 or not 1 <= len(value) <= 16:
                raise ConfigError(f"one-byte extension {ext_id} with {len(value)} bytes")
            out.append(ext_id << 4 | (len(value) - 1))
            out += value
        out += bytes(-len(out) % 4)
        return cls(ONE_BYTE_PROFILE, bytes(out))

    def elements(self) -> dict[int, bytes]:
        """Decode RFC 8285 §4.2 one-byte elements; ``{}`` for any other profile."""
        if self.profile != ONE_BYTE_PROFILE:
            return {}
        data, pos, found = self.data, 0, {}
        while pos < len(data):
            ext_id, length = data[pos] >> 4, (data[pos] & 0x0F) + 1
            if ext_id == 0:  # a padding octet between elements
                pos += 1
                continue
            if ext_id == 15:  # reserved: stop processing the block (§4.2)
                break
            if pos + 1 + length > len(data):
                raise ProtocolError(f"one-byte extension {ext_id} runs past the block")
            found[ext_id] = data[pos + 1 : pos + 1 + length]
            pos += 1 + length
        return found


@dataclass(slots=True)
class RtpPacket:
    """One RTP packet (RFC 3550 §5.1).  The version is always 2 and is not stored."""

    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrc: list[int] = field(default_factory=list)
    extension: HeaderExtension | None = None
    padding: bytes = b""
    """Padding octets including the final count octet; empty when the P bit is clear."""

    @property
    def extensions(self) -> dict[int, bytes]:
        """RFC 8285 one-byte header extension elements by id (``{}`` when there are none)."""
        return self.extension.elements() if self.extension is not None else {}

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        """Parse one packet; :class:`ProtocolError` when it is not a valid RTP packet."""
        size = len(data)
        if size < _RTP_HEADER.size:
            raise ProtocolError(f"RTP packet of {size} bytes is shorter than its fixed header")
        first, second, seq, timestamp, ssrc = _RTP_HEADER.unpack_from(data)
        if first >> 6 != RTP_VERSION:
            raise ProtocolError(f"RTP version {first >> 6}, expected 2")
        count = first & 0x0F
        pos = _RTP_HEADER.size + 4 * count
        if pos > size:
            raise ProtocolError(f"{count} CSRCs do not fit a {size}-byte packet")
        csrc = list(struct.unpack_from(f"!{count}I", data, _RTP_HEADER.size))
        extension = None
        if first & 0x10:  # §5.3.1: profile (16 bits), length in 32-bit words (16 bits)
            if pos + 4 > size:
                raise ProtocolError("header extension is truncated")
            profile, words = _WORD_PAIR.unpack_from(data, pos)
            end = pos + 4 + 4 * words
            if end > size:
                raise ProtocolError(f"header extension of {words} words runs past the packet")
            extension = HeaderExtension(profile, data[pos + 4 : end])
            pos = end
        end = size - _padding_length(data, pos, size) if first & 0x20 else size
        return cls(
            payload_type=second & 0x7F,
            sequence_number=seq,
            timestamp=timestamp,
            ssrc=ssrc,
            payload=data[pos:end],
            marker=bool(second & 0x80),
            csrc=csrc,
            extension=extension,
            padding=data[end:],
        )

    def serialize(self) -> bytes:
        """Encode the packet; :class:`ConfigError` for a field that does not fit its width."""
        if not 0 <= self.payload_type <= 0x7F or len(self.csrc) > 15:
            raise ConfigError(f"payload type {self.payload_type} / {len(self.csrc)} CSRCs")
        _check_padding(self.padding)
        first = 0x80 | len(self.csrc)
        first |= 0x20 if self.padding else 0
        first |= 0x10 if self.extension is not None else 0
        second = self.payload_type | (0x80 if self.marker else 0)
        try:
            parts = [
                _RTP_HEADER.pack(first, second, self.sequence_number, self.timestamp, self.ssrc),
                struct.pack(f"!{len(self.csrc)}I", *self.csrc),
            ]
            if self.extension is not None:
                words, rest = divmod(len(self.extension.data), 4)
                if rest:
                    raise ConfigError("header extension data must be a whole number of words")
                parts += [_WORD_PAIR.pack(self.extension.profile, words), self.extension.data]
        except struct.error as exc:
            raise ConfigError(f"RTP header field out of range: {exc}") from exc
        parts += [self.payload, self.padding]
        return b"".join(parts)


def is_rtcp(data: bytes) -> bool:
    """RTP/RTCP demultiplexing on one flow (RFC 5761 §4): RTCP packet types are 192-223."""
    return len(data) >= 2 and 192 <= data[1] <= 223


# -- 16-bit sequence numbers (RFC 3550 Appendix A.1) ----------------------------------------


def seq_diff(a: int, b: int) -> int:
    """How far ``a`` is ahead of ``b`` modulo 2**16, in -32768..32767 (negative: behind)."""
    diff = (a - b) & 0xFFFF
    return diff - 0x10000 if diff >= 0x8000 else diff


def seq_lt(a: int, b: int) -> bool:
    """``a`` comes before ``b`` in wrap-around order (undefined at exactly half the space)."""
    return seq_diff(a, b) < 0


class RtpSequenceExtender:
    """Maps 16-bit sequence numbers onto an extended count that never wraps (RFC 3550 A.1).

    Each number is placed within half the sequence space of the highest one seen so far, so
    reordered packets get their true position.  The first number maps to itself; a packet
    older than the first one seen maps to a negative value.
    """

    __slots__ = ("_highest",)

    def __init__(self) -> None:
        self._highest: int | None = None

    @property
    def highest(self) -> int | None:
        """The highest extended sequence number returned so far."""
        return self._highest

    def extend(self, seq: int) -> int:
        if not 0 <= seq <= 0xFFFF:
            raise ConfigError(f"sequence number {seq} is not 16-bit")
        if self._highest is None:
            self._highest = seq
            return seq
        extended = self._highest + seq_diff(seq, self._highest & 0xFFFF)
        self._highest = max(self._highest, extended)
        return extended


# -- RTCP ----------------------------------------------------------------------------------


@dataclass(slots=True)
class ReportBlock:
    """One reception report block of an SR or RR (RFC 3550 §6.4.1)."""

    ssrc: int
    fraction_lost: int
    cumulative_lost: int
    """Signed 24-bit: duplicates can make it negative (RFC 3550 §6.4.1)."""
    highest_sequence: int
    jitter: int
    last_sr: int
    delay_since_last_sr: int

    @classmethod
    def parse(cls, data: bytes, offset: int) -> ReportBlock:
        ssrc, lost, highest, jitter, lsr, dlsr = _REPORT_BLOCK.unpack_from(data, offset)
        cumulative = lost & 0xFFFFFF
        cumulative -= 0x1000000 if cumulative & 0x800000 else 0
        return cls(ssrc, lost >> 24, cumulative, highest, jitter, lsr, dlsr)

    def serialize(self) -> bytes:
        if not 0 <= self.fraction_lost <= 0xFF or not -0x800000 <= self.cumulative_lost < 0x800000:
            raise ConfigError("fraction_lost or cumulative_lost out of range")
        lost = self.fraction_lost << 24 | (self.cumulative_lost & 0xFFFFFF)
        values = (self.highest_sequence, self.jitter, self.last_sr, self.delay_since_last_sr)
        try:
            return _REPORT_BLOCK.pack(self.ssrc, lost, *values)
        except struct.error as exc:
            raise ConfigError(f"report block field out of range: {exc}") from exc


@dataclass(slots=True, kw_only=True)
class RtcpPacket:
    """Base of all RTCP packets: owns the common header (RFC 3550 §6.4.1) and padding."""

    padding: bytes = b""
    """Padding octets including the final count octet (only the last packet of a compound)."""

    def _content(self) -> tuple[int, int, bytes]:
        """(count or FMT field, packet type, body after the 4-byte common header)."""
        raise NotImplementedError

    def serialize(self) -> bytes:
        """Encode the packet; :class:`ConfigError` for a field that does not fit its width."""
        try:
            count, packet_type, body = self._content()
        except struct.error as exc:
            raise ConfigError(f"RTCP field out of range: {exc}") from exc
        _check_padding(self.padding)
        size = 4 + len(body) + len(self.padding)
        if size % 4 or not 0 <= count <= 31 or size > 0x40000:
            raise ConfigError(f"RTCP packet of {size} bytes with count {count} cannot be encoded")
        first = 0x80 | (0x20 if self.padding else 0) | count
        try:
            header = _RTCP_HEADER.pack(first, packet_type, size // 4 - 1)
        except struct.error as exc:
            raise ConfigError(f"RTCP packet type {packet_type} out of range") from exc
        return header + body + self.padding


@dataclass(slots=True)
class RtcpSenderReport(RtcpPacket):
    """SR (RFC 3550 §6.4.1), PT=200."""

    ssrc: int
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: list[ReportBlock] = field(default_factory=list)
    extension: bytes = b""
    """Profile-specific extension after the report blocks, kept verbatim."""

    def _content(self) -> tuple[int, int, bytes]:
        info = (self.ntp_timestamp, self.rtp_timestamp, self.packet_count, self.octet_count)
        head = _SR_INFO.pack(self.ssrc, *info)
        blocks = b"".join(block.serialize() for block in self.reports)
        return len(self.reports), RTCP_SR, head + blocks + self.extension


@dataclass(slots=True)
class RtcpReceiverReport(RtcpPacket):
    """RR (RFC 3550 §6.4.2), PT=201."""

    ssrc: int
    reports: list[ReportBlock] = field(default_factory=list)
    extension: bytes = b""

    def _content(self) -> tuple[int, int, bytes]:
        blocks = b"".join(block.serialize() for block in self.reports)
        return len(self.reports), RTCP_RR, struct.pack("!I", self.ssrc) + blocks + self.extension


@dataclass(slots=True)
class RtcpPli(RtcpPacket):
    """Picture Loss Indication (RFC 4585 §6.3.1): PSFB, FMT=1, no FCI."""

    sender_ssrc: int
    media_ssrc: int

    def _content(self) -> tuple[int, int, bytes]:
        return _FMT_PLI, RTCP_PSFB, _TWO_SSRC.pack(self.sender_ssrc, self.media_ssrc)


@dataclass(slots=True)
class RtcpNack(RtcpPacket):
    """Generic NACK (RFC 4585 §6.2.1): RTPFB, FMT=1, FCI entries of (PID, BLP)."""

    sender_ssrc: int
    media_ssrc: int
    pairs: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def from_sequences(cls, sender_ssrc: int, media_ssrc: int, seqs: Iterable[int]) -> RtcpNack:
        return cls(sender_ssrc=sender_ssrc, media_ssrc=media_ssrc, pairs=nack_pairs(seqs))

    def sequences(self) -> list[int]:
        """Every sequence number this NACK reports lost."""
        return nack_sequences(self.pairs)

    def _content(self) -> tuple[int, int, bytes]:
        fci = b"".join(_WORD_PAIR.pack(pid, blp) for pid, blp in self.pairs)
        return (
            _FMT_GENERIC_NACK,
            RTCP_RTPFB,
            _TWO_SSRC.pack(self.sender_ssrc, self.media_ssrc) + fci,
        )


@dataclass(slots=True)
class RtcpUnknown(RtcpPacket):
    """Any other RTCP packet (SDES, BYE, APP, other feedback), kept verbatim."""

    packet_type: int
    count: int
    body: bytes

    def _content(self) -> tuple[int, int, bytes]:
        return self.count, self.packet_type, self.body


def nack_pairs(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Pack lost sequence numbers into (PID, BLP) entries (RFC 4585 §6.2.1), wrap-aware."""
    unique = set(seqs)
    if not unique:
        return []
    if any(not 0 <= seq <= 0xFFFF for seq in unique):
        raise ConfigError("NACK sequence numbers must be 16-bit")
    anchor = next(iter(unique))
    pairs: list[tuple[int, int]] = []
    for seq in sorted(unique, key=lambda s: seq_diff(s, anchor)):
        offset = seq_diff(seq, pairs[-1][0]) if pairs else 0
        if pairs and 1 <= offset <= 16:  # BLP bit i means PID + i + 1 is lost too
            pairs[-1] = (pairs[-1][0], pairs[-1][1] | 1 << (offset - 1))
        else:
            pairs.append((seq, 0))
    return pairs


def nack_sequences(pairs: Iterable[tuple[int, int]]) -> list[int]:
    """Expand (PID, BLP) entries into the sequence numbers they report lost."""
    seqs: list[int] = []
    for pid, blp in pairs:
        seqs.append(pid)
        seqs.extend((pid + bit + 1) & 0xFFFF for bit in range(16) if blp >> bit & 1)
    return seqs


def _parse_rtcp(count: int, packet_type: int, body: bytes, padding: bytes) -> RtcpPacket:
    size = len(body)
    if packet_type == RTCP_SR:
        if size < _SR_INFO.size + 24 * count:
            raise ProtocolError(f"SR with {count} report blocks truncated at {size} bytes")
        blocks = [ReportBlock.parse(body, _SR_INFO.size + 24 * i) for i in range(count)]
        extension = body[_SR_INFO.size + 24 * count :]
        ssrc, ntp, rtp_ts, packets, octets = _SR_INFO.unpack_from(body)
        return RtcpSenderReport(
            ssrc, ntp, rtp_ts, packets, octets, blocks, extension, padding=padding
        )
    if packet_type == RTCP_RR:
        if size < 4 + 24 * count:
            raise ProtocolError(f"RR with {count} report blocks truncated at {size} bytes")
        blocks = [ReportBlock.parse(body, 4 + 24 * i) for i in range(count)]
        ssrc = int.from_bytes(body[:4], "big")
        return RtcpReceiverReport(ssrc, blocks, body[4 + 24 * count :], padding=padding)
    if packet_type == RTCP_PSFB and count == _FMT_PLI:
        if size != 8:
            raise ProtocolError(f"PLI must carry exactly two SSRCs, got {size} bytes")
        sender, media = _TWO_SSRC.unpack_from(body)
        return RtcpPli(sender_ssrc=sender, media_ssrc=media, padding=padding)
    if packet_type == RTCP_RTPFB and count == _FMT_GENERIC_NACK:
        if size < 8 or size % 4:
            raise ProtocolError(f"generic NACK of {size} bytes")
        sender, media = _TWO_SSRC.unpack_from(body)
        pairs = [_WORD_PAIR.unpack_from(body, pos) for pos in range(8, size, 4)]
        return RtcpNack(sender_ssrc=sender, media_ssrc=media, pairs=pairs, padding=padding)
    return RtcpUnknown(packet_type=packet_type, count=count, body=body, padding=padding)


def parse_rtcp_compound(data: bytes) -> list[RtcpPacket]:
    """Split a compound RTCP packet (RFC 3550 §6.1) and parse each part.

    The first packet is not required to be an SR or RR, so reduced-size RTCP (RFC 5506), such
    as a lone PLI, parses too.
    """
    if not data:
        raise ProtocolError("empty RTCP packet")
    packets: list[RtcpPacket] = []
    pos, size = 0, len(data)
    while pos < size:
        if size - pos < _RTCP_HEADER.size:
            raise ProtocolError(f"RTCP header truncated at offset {pos}")
        first, packet_type, length = _RTCP_HEADER.unpack_from(data, pos)
        if first >> 6 != RTP_VERSION:
            raise ProtocolError(f"RTCP version {first >> 6}, expected 2")
        end = pos + 4 * (length + 1)
        if end > size:
            raise ProtocolError(f"RTCP packet of {end - pos} bytes truncated at {size - pos}")
        body_end = end - _padding_length(data, pos + 4, end) if first & 0x20 else end
        body, padding = data[pos + 4 : body_end], data[body_end:end]
        packets.append(_parse_rtcp(first & 0x1F, packet_type, body, padding))
        pos = end
    return packets
