"""RTP packets (RFC 3550 §5.1), header extensions (RFC 8285) and 16-bit sequence arithmetic.

Theory of operation: everything here is a pure value with ``parse(bytes)`` and ``serialize()``.
Parsing keeps every octet that a valid packet may carry (padding content, CSRCs, header
extension), so ``parse(b).serialize() == b`` holds for any valid input; the tests check that.
Bad bytes from the network raise :class:`ProtocolError`; field values a caller sets that cannot
be encoded raise :class:`ConfigError` at ``serialize()``.  RTCP lives in :mod:`shared.rtp.rtcp`.

Header extensions this project sends (one-byte form, RFC 8285 §4.2).  There is no SDP to
negotiate ids, so they are fixed here and documented as part of the stream's profile:

- id :data:`TRANSPORT_CC_EXTENSION_ID`: the transport-wide sequence number of
  draft-holmer-rmcat-transport-wide-cc-extensions-01 §2, 16 bits, one space per QUIC connection
  across all tracks.  The viewer reports each one's arrival time in transport-wide feedback
  (:class:`shared.rtp.rtcp.RtcpTransportFeedback`), from which the sender computes per-packet delay
  variation for its bandwidth estimate (:mod:`shared.rtp.bandwidth`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from shared.errors import ConfigError, ProtocolError

__all__ = [
    "ONE_BYTE_PROFILE",
    "RTP_VERSION",
    "TRANSPORT_CC_EXTENSION_ID",
    "HeaderExtension",
    "RtpPacket",
    "RtpSequenceExtender",
    "RtpStream",
    "is_rtcp",
    "seq_diff",
    "seq_lt",
    "transport_sequence",
    "with_transport_sequence",
]

RTP_VERSION = 2
#: "defined by profile" value of an RFC 8285 §4.2 one-byte header extension block.
ONE_BYTE_PROFILE = 0xBEDE
#: RFC 8285 one-byte element id of the transport-wide sequence number (see module doc).
TRANSPORT_CC_EXTENSION_ID = 5
_TRANSPORT_CC_HEADER = bytes([TRANSPORT_CC_EXTENSION_ID << 4 | 1])

_RTP_HEADER = struct.Struct("!BBHII")
_WORD_PAIR = struct.Struct("!HH")


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


# -- sending ---------------------------------------------------------------------------------


class RtpStream:
    """One RTP stream's header state (RFC 3550 §5.1): SSRC, sequence numbers, timestamps.

    Sequence number and timestamp offset start where the caller says (random in production,
    §5.1; fixed in tests).  ``pts`` is already on the RTP clock, so the timestamp is ``pts``
    plus the offset, modulo 2**32.
    """

    def __init__(
        self,
        *,
        ssrc: int,
        initial_sequence: int,
        timestamp_offset: int,
        payload_type: int,
        clock_rate: int = 90_000,
    ) -> None:
        self.ssrc = ssrc
        self.payload_type = payload_type
        self.clock_rate = clock_rate
        self._sequence = initial_sequence & 0xFFFF
        self._offset = timestamp_offset
        self.packets_sent = 0
        self.octets_sent = 0
        self._last_timestamp: int | None = None
        self._last_capture_s = 0.0

    @property
    def next_sequence(self) -> int:
        """The sequence number the next packet takes."""
        return self._sequence

    @property
    def last_timestamp(self) -> int | None:
        """The RTP timestamp of the last frame sent (None before the first)."""
        return self._last_timestamp

    def timestamp(self, pts: int) -> int:
        return (pts + self._offset) & 0xFFFF_FFFF

    def packets(
        self, payloads: Sequence[bytes], *, pts: int, capture_us: int = 0, marker: bool = True
    ) -> list[RtpPacket]:
        """RTP packets for one frame; ``marker`` sets M on the last one (RFC 6184 §5.1)."""
        first, timestamp = self.advance(payloads, pts=pts, capture_us=capture_us)
        last = len(payloads) - 1
        return [
            RtpPacket(
                payload_type=self.payload_type,
                marker=marker and index == last,
                sequence_number=(first + index) & 0xFFFF,
                timestamp=timestamp,
                ssrc=self.ssrc,
                payload=payload,
            )
            for index, payload in enumerate(payloads)
        ]

    def advance(
        self, payloads: Sequence[bytes], *, pts: int, capture_us: int = 0
    ) -> tuple[int, int]:
        """Take sequence numbers for one frame's packets, for a caller that writes the headers
        itself: returns the first sequence number (the rest follow modulo 2**16) and the
        frame's RTP timestamp, and counts the packets and payload octets for the SR."""
        first, timestamp = self._sequence, self.timestamp(pts)
        self._sequence = (first + len(payloads)) & 0xFFFF
        self.packets_sent += len(payloads)
        self.octets_sent += sum(map(len, payloads))
        self._last_timestamp, self._last_capture_s = timestamp, capture_us / 1e6
        return first, timestamp

    def timestamp_at(self, now: float) -> int | None:
        """The RTP timestamp that ``now`` (Unix seconds) has on the capture clock, for an SR
        (RFC 3550 §6.4.1); None before the first packet."""
        if self._last_timestamp is None:
            return None
        elapsed = round((now - self._last_capture_s) * self.clock_rate)
        return (self._last_timestamp + elapsed) & 0xFFFF_FFFF


# -- transport-wide sequence numbers (draft-holmer-rmcat-transport-wide-cc-extensions-01 §2) --


def transport_sequence(packet: RtpPacket) -> int | None:
    """The packet's transport-wide sequence number, or None when it carries none."""
    value = packet.extensions.get(TRANSPORT_CC_EXTENSION_ID)
    if value is None or len(value) != 2:
        return None
    return int.from_bytes(value, "big")


def with_transport_sequence(packet: RtpPacket, sequence: int) -> RtpPacket:
    """Set the packet's transport-wide sequence number (replacing any other extension)."""
    # RFC 8285 §4.2: element header (id, length - 1), two value octets, one padding octet;
    # what HeaderExtension.one_byte() makes, built directly since it is done per packet.
    data = _TRANSPORT_CC_HEADER + (sequence & 0xFFFF).to_bytes(2, "big") + b"\x00"
    packet.extension = HeaderExtension(ONE_BYTE_PROFILE, data)
    return packet
