"""RTCP (RFC 3550 §6): SR, RR, generic NACK and PLI (RFC 4585), transport-wide feedback, stats.

Theory of operation: each packet is a pure value with ``serialize()``;
:func:`parse_rtcp_compound` splits a compound packet (§6.1) and parses each part, keeping every
octet (profile extensions, padding, unknown packet types, zero padding after transport-wide
feedback), so ``parse(b)`` serializes back to ``b`` for any valid input.  Bad bytes from the
network raise :class:`ProtocolError`; unencodable field values raise :class:`ConfigError`.

What a receiver fills reports with and what a sender computes from them (loss, jitter, RTT,
the bandwidth estimate) is in :mod:`shared.rtp.bandwidth`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.errors import ConfigError, ProtocolError

# RTCP padding follows the same rule as RTP's (RFC 3550 §6.4.1 refers back to §5.1).
from shared.rtp.packet import RTP_VERSION, _check_padding, _padding_length, seq_diff

__all__ = [
    "RTCP_PSFB",
    "RTCP_RR",
    "RTCP_RTPFB",
    "RTCP_SDES",
    "RTCP_SR",
    "SDES_CNAME",
    "ReportBlock",
    "RtcpNack",
    "RtcpPacket",
    "RtcpPli",
    "RtcpReceiverReport",
    "RtcpSenderReport",
    "RtcpSourceDescription",
    "RtcpTransportFeedback",
    "RtcpUnknown",
    "SdesChunk",
    "encode_status_chunks",
    "nack_pairs",
    "nack_sequences",
    "ntp_middle",
    "ntp_timestamp",
    "ntp_to_unix",
    "parse_rtcp_compound",
    "signed24",
]

RTCP_SR, RTCP_RR, RTCP_SDES, RTCP_RTPFB, RTCP_PSFB = 200, 201, 202, 205, 206
#: SDES item types (RFC 3550 §6.5): the end of a chunk's item list, and the canonical name.
SDES_END, SDES_CNAME = 0, 1
_FMT_GENERIC_NACK = 1  # RFC 4585 §6.2.1
_FMT_PLI = 1  # RFC 4585 §6.3.1
_FMT_TRANSPORT_CC = 15  # draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1

_WORD_PAIR = struct.Struct("!HH")
_RTCP_HEADER = struct.Struct("!BBH")
_SR_INFO = struct.Struct("!IQIII")
_REPORT_BLOCK = struct.Struct("!IIIIII")
_TWO_SSRC = struct.Struct("!II")
_TWCC_HEAD = struct.Struct("!IIHHI")

#: Seconds from the NTP epoch (1900) to the Unix epoch (1970), RFC 5905 §6.
_NTP_UNIX_OFFSET = 2_208_988_800


def ntp_timestamp(unix_s: float) -> int:
    """A 64-bit NTP timestamp (RFC 3550 §4) for a Unix time in seconds."""
    return int((unix_s + _NTP_UNIX_OFFSET) * (1 << 32)) & 0xFFFF_FFFF_FFFF_FFFF


def ntp_to_unix(ntp: int) -> float:
    return ntp / (1 << 32) - _NTP_UNIX_OFFSET


def ntp_middle(ntp: int) -> int:
    """The middle 32 bits of an NTP timestamp: what LSR echoes (RFC 3550 §6.4.1)."""
    return (ntp >> 16) & 0xFFFF_FFFF


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
class SdesChunk:
    """One source's items in an SDES packet: its SSRC and (item type, value) pairs."""

    ssrc: int
    items: list[tuple[int, bytes]] = field(default_factory=list)

    def get(self, item_type: int) -> bytes | None:
        return next((value for kind, value in self.items if kind == item_type), None)


@dataclass(slots=True)
class RtcpSourceDescription(RtcpPacket):
    """SDES (RFC 3550 §6.5), PT=202: per source, items such as its CNAME (§6.5.1).

    Every compound RTCP packet a participant sends carries its CNAME (§6.1); a viewer's CNAME
    is what ties its connection to the ticket it was given (``shared.control.registry``).
    """

    chunks: list[SdesChunk] = field(default_factory=list)

    @classmethod
    def cname(cls, ssrc: int, name: str) -> RtcpSourceDescription:
        return cls([SdesChunk(ssrc, [(SDES_CNAME, name.encode())])])

    def cname_of(self, ssrc: int | None = None) -> str | None:
        """The CNAME of ``ssrc`` (None: of the first chunk that has one), as text."""
        for chunk in self.chunks:
            if ssrc is None or chunk.ssrc == ssrc:
                value = chunk.get(SDES_CNAME)
                if value is not None:
                    return value.decode("utf-8", "replace")
        return None

    def _content(self) -> tuple[int, int, bytes]:
        body = bytearray()
        for chunk in self.chunks:
            body += struct.pack("!I", chunk.ssrc)
            for kind, value in chunk.items:
                if not 1 <= kind <= 255 or len(value) > 255:
                    raise ConfigError(f"SDES item {kind} of {len(value)} bytes cannot be encoded")
                body += bytes((kind, len(value))) + value
            # The item list ends with a null octet, padded with nulls to a 32-bit boundary.
            body += bytes(4 - len(body) % 4)
        return len(self.chunks), RTCP_SDES, bytes(body)

    @classmethod
    def _parse(cls, count: int, body: bytes, padding: bytes) -> RtcpSourceDescription:
        chunks: list[SdesChunk] = []
        pos, size = 0, len(body)
        for _ in range(count):
            if size - pos < 4:
                raise ProtocolError(f"SDES chunk truncated at offset {pos}")
            chunk = SdesChunk(int.from_bytes(body[pos : pos + 4], "big"))
            pos += 4
            while True:
                if pos >= size:
                    raise ProtocolError("SDES chunk without its terminating null item")
                kind = body[pos]
                if kind == SDES_END:
                    end = (pos // 4 + 1) * 4  # null octets up to the next word
                    if end > size or any(body[pos:end]):
                        raise ProtocolError(f"SDES chunk end at offset {pos} is not null octets")
                    pos = end
                    break
                if pos + 2 > size or pos + 2 + body[pos + 1] > size:
                    raise ProtocolError(f"SDES item {kind} truncated at offset {pos}")
                length = body[pos + 1]
                chunk.items.append((kind, bytes(body[pos + 2 : pos + 2 + length])))
                pos += 2 + length
            chunks.append(chunk)
        if pos != size:
            raise ProtocolError(f"SDES has {size - pos} bytes after its {count} chunks")
        return cls(chunks, padding=padding)


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
class RtcpTransportFeedback(RtcpPacket):
    """Transport-wide feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01 §3.1).

    RTPFB, FMT=15.  ``chunks`` are the raw 16-bit packet status chunks (kept as sent, since an
    encoder may pick run-length or vector chunks freely); ``deltas`` the receive deltas in
    250 µs ticks, one per received packet; ``reference_time`` the signed 24-bit base in
    multiples of 64 ms.  :func:`shared.rtp.feedback.build_transport_feedback` builds one from
    arrival times; :meth:`arrivals` reads them back.
    """

    sender_ssrc: int
    media_ssrc: int
    base_sequence: int
    status_count: int
    reference_time: int
    feedback_count: int
    chunks: list[int] = field(default_factory=list)
    deltas: list[int] = field(default_factory=list)
    trailing: bytes = b""
    """Zero octets after the deltas that align the packet without the P bit."""

    def statuses(self) -> list[int]:
        """Per packet: 0 not received, 1 small delta, 2 large or negative delta."""
        return _decode_chunks(self.chunks, self.status_count)

    def arrivals(self) -> list[tuple[int, int | None]]:
        """``(sequence, arrival µs or None)`` for every packet the feedback covers."""
        time_us = self.reference_time * 64_000
        deltas = iter(self.deltas)
        result: list[tuple[int, int | None]] = []
        for index, symbol in enumerate(self.statuses()):
            arrival = None
            if symbol:
                time_us += next(deltas) * 250
                arrival = time_us
            result.append(((self.base_sequence + index) & 0xFFFF, arrival))
        return result

    def _content(self) -> tuple[int, int, bytes]:
        symbols = self.statuses()
        received = [s for s in symbols if s]
        if len(received) != len(self.deltas):
            raise ConfigError(f"{len(received)} received packets but {len(self.deltas)} deltas")
        parts = [
            _TWCC_HEAD.pack(
                self.sender_ssrc,
                self.media_ssrc,
                self.base_sequence,
                self.status_count,
                (self.reference_time & 0xFFFFFF) << 8 | self.feedback_count,
            ),
            struct.pack(f"!{len(self.chunks)}H", *self.chunks),
        ]
        for symbol, delta in zip(received, self.deltas, strict=True):
            parts.append(struct.pack("!B" if symbol == 1 else "!h", delta))
        return _FMT_TRANSPORT_CC, RTCP_RTPFB, b"".join(parts) + self.trailing

    @classmethod
    def _parse(cls, body: bytes, padding: bytes) -> RtcpTransportFeedback:
        if len(body) < _TWCC_HEAD.size:
            raise ProtocolError(f"transport feedback of {len(body)} bytes")
        sender, media, base, count, word = _TWCC_HEAD.unpack_from(body)
        pos, chunks, symbols = _TWCC_HEAD.size, [], 0
        while symbols < count:
            if pos + 2 > len(body):
                raise ProtocolError("transport feedback ends inside its packet status chunks")
            chunk = int.from_bytes(body[pos : pos + 2], "big")
            chunks.append(chunk)
            symbols += _chunk_capacity(chunk)
            pos += 2
        deltas = []
        for symbol in _decode_chunks(chunks, count):
            size = 1 if symbol == 1 else 2
            if symbol == 0:
                continue
            if pos + size > len(body):
                raise ProtocolError("transport feedback ends inside its receive deltas")
            deltas.append(struct.unpack_from("!B" if size == 1 else "!h", body, pos)[0])
            pos += size
        trailing = body[pos:]
        if len(trailing) > 3 or any(trailing):
            raise ProtocolError(f"transport feedback has {len(trailing)} unexpected bytes")
        return cls(
            sender_ssrc=sender,
            media_ssrc=media,
            base_sequence=base,
            status_count=count,
            reference_time=signed24(word >> 8),
            feedback_count=word & 0xFF,
            chunks=chunks,
            deltas=deltas,
            trailing=trailing,
            padding=padding,
        )


def signed24(value: int) -> int:
    return value - 0x1000000 if value & 0x800000 else value


def _chunk_capacity(chunk: int) -> int:
    if not chunk & 0x8000:
        return chunk & 0x1FFF  # run length chunk
    return 7 if chunk & 0x4000 else 14  # status vector chunk: 2-bit or 1-bit symbols


def _decode_chunks(chunks: Iterable[int], count: int) -> list[int]:
    """Packet status symbols from chunks (§3.1.3 run length, §3.1.4 status vector)."""
    symbols: list[int] = []
    for chunk in chunks:
        if not chunk & 0x8000:
            symbols += [chunk >> 13 & 0x3] * (chunk & 0x1FFF)
        elif chunk & 0x4000:
            symbols += [chunk >> shift & 0x3 for shift in range(12, -1, -2)]
        else:
            symbols += [chunk >> shift & 0x1 for shift in range(13, -1, -1)]
    del symbols[count:]
    if len(symbols) < count:
        raise ProtocolError(f"packet status chunks describe {len(symbols)} of {count} packets")
    if 3 in symbols:
        raise ProtocolError("reserved packet status symbol 3")
    return symbols


def encode_status_chunks(symbols: list[int]) -> list[int]:
    """Greedy chunking: runs of 7+ equal symbols as run length, the rest as status vectors."""
    chunks, pos, size = [], 0, len(symbols)
    while pos < size:
        run = 1
        while pos + run < size and symbols[pos + run] == symbols[pos] and run < 0x1FFF:
            run += 1
        if run >= 7:
            chunks.append(symbols[pos] << 13 | run)
            pos += run
            continue
        window = symbols[pos : pos + 14]
        if 2 not in window:  # one-bit vector: 14 symbols (§3.1.4), zero-filled past the end
            bits = [*window, *[0] * (14 - len(window))]
            chunks.append(0x8000 | sum(bit << (13 - i) for i, bit in enumerate(bits)))
            pos += 14
        else:
            pairs = symbols[pos : pos + 7]
            pairs += [0] * (7 - len(pairs))
            chunks.append(0xC000 | sum(s << (12 - 2 * i) for i, s in enumerate(pairs)))
            pos += 7
    return chunks


@dataclass(slots=True)
class RtcpUnknown(RtcpPacket):
    """Any other RTCP packet (BYE, APP, other feedback), kept verbatim."""

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
    if packet_type == RTCP_SDES:
        return RtcpSourceDescription._parse(count, body, padding)
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
    if packet_type == RTCP_RTPFB and count == _FMT_TRANSPORT_CC:
        return RtcpTransportFeedback._parse(body, padding)
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
