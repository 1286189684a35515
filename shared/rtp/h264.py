"""H.264 over RTP (RFC 6184), non-interleaved mode: Annex B splitting, packetizing, depacketizing.

Theory of operation: the sender splits an encoder's Annex B access unit into NAL units
(:func:`split_annexb`) and :class:`H264Packetizer` turns them into RTP payloads: runs of small
NAL units share a STAP-A (§5.7.1), a NAL unit that fits alone travels as a single NAL unit
packet (§5.6), and a larger one is cut into FU-A fragments (§5.8).  The caller adds the RTP
header and sets the marker bit on the last payload of the access unit (§5.1).

The receiver pushes payloads in sequence order into :class:`H264Depacketizer`, which returns
NAL units as soon as they are whole.  It does not see sequence numbers, so the caller calls
:meth:`H264Depacketizer.reset` when it detects a gap; a payload that breaks the rules raises
:class:`ProtocolError` and leaves the depacketizer empty, ready for the next one.
:class:`H264PayloadFormat` is what the viewer's jitter buffer (:mod:`shared.rtp.jitter_buffer`)
uses: whole access units from a frame's payloads, and which first packet starts one.

:class:`ParameterSets` makes the sender's promise hold whatever the encoder does: SPS and PPS
travel in front of every IDR access unit, so any keyframe is a starting point on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from shared.errors import ConfigError, ProtocolError

__all__ = [
    "DEFAULT_MAX_NAL_SIZE",
    "DEFAULT_MTU",
    "H264_PAYLOAD_TYPE",
    "NAL_AUD",
    "NAL_FU_A",
    "NAL_IDR",
    "NAL_PPS",
    "NAL_SEI",
    "NAL_SPS",
    "NAL_STAP_A",
    "H264Depacketizer",
    "H264Packetizer",
    "H264PayloadFormat",
    "ParameterSets",
    "is_keyframe",
    "nal_type",
    "split_annexb",
    "to_annexb",
]

# NAL unit types (H.264 Table 7-1) and RTP packet types (RFC 6184 §5.2, Table 1).
NAL_IDR = 5
NAL_SEI = 6
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9
NAL_STAP_A = 24
NAL_FU_A = 28
#: Types 25-27 and 29 (STAP-B, MTAP16, MTAP24, FU-B) are interleaved-mode only (§5.2, Table 3).
_INTERLEAVED_ONLY = frozenset({25, 26, 27, 29})

_START_CODE = b"\x00\x00\x01"
_START_CODE_4 = b"\x00\x00\x00\x01"
#: Largest NAL unit the depacketizer assembles from FU-A fragments by default.
DEFAULT_MAX_NAL_SIZE = 4 * 1024 * 1024


def nal_type(nal: bytes) -> int:
    """The ``nal_unit_type`` field: the low five bits of the NAL header octet (RFC 6184 §1.3)."""
    if not nal:
        raise ProtocolError("empty NAL unit has no header")
    return nal[0] & 0x1F


def is_keyframe(nal_units: Iterable[bytes]) -> bool:
    """Whether an access unit holds an IDR slice, so a decoder can start from it."""
    return any(nal and nal[0] & 0x1F == NAL_IDR for nal in nal_units)


def split_annexb(access_unit: bytes) -> list[bytes]:
    """Split an H.264 Annex B byte stream into NAL units without their start codes.

    Both 3- and 4-byte start codes are accepted.  Zero octets before a start code are
    ``trailing_zero_8bits`` (Annex B.1), never NAL unit content, since a NAL unit cannot end in
    a zero octet (H.264 §7.4.1); they are dropped.  Bytes other than zeros before the first start
    code mean this is not Annex B: :class:`ConfigError`.
    """
    start = access_unit.find(_START_CODE)
    if start < 0:
        if access_unit.strip(b"\x00"):
            raise ConfigError("no Annex B start code in a non-empty access unit")
        return []
    if access_unit[:start].strip(b"\x00"):
        raise ConfigError("access unit has bytes before its first start code")
    nal_units: list[bytes] = []
    pos = start + 3
    while True:
        end = access_unit.find(_START_CODE, pos)
        nal = access_unit[pos:] if end < 0 else access_unit[pos:end]
        nal = nal.rstrip(b"\x00")
        if nal:
            nal_units.append(nal)
        if end < 0:
            return nal_units
        pos = end + 3


def to_annexb(nal_units: Iterable[bytes]) -> bytes:
    """Join NAL units into an Annex B byte stream with 4-byte start codes."""
    return _START_CODE_4.join([b"", *nal_units])


class H264Packetizer:
    """NAL units of one access unit -> RTP payloads of at most ``mtu`` bytes (RFC 6184 §5)."""

    def __init__(self, mtu: int = 1100) -> None:
        # A FU-A needs its two header octets plus at least one octet of the NAL unit.
        if mtu < 3:
            raise ConfigError(f"H.264 RTP payload size {mtu} is below the minimum of 3")
        self.mtu = mtu

    def packetize(self, nal_units: list[bytes]) -> list[bytes]:
        payloads: list[bytes] = []
        group: list[bytes] = []
        group_size = 1  # the STAP-A header octet
        for nal in nal_units:
            if not nal or not 1 <= nal[0] & 0x1F <= 23:
                raise ConfigError("NAL unit is empty or has a type that RTP cannot carry")
            if len(nal) > self.mtu:
                self._flush(group, payloads)
                group, group_size = [], 1
                self._fragment(nal, payloads)
                continue
            if group_size + 2 + len(nal) > self.mtu:
                self._flush(group, payloads)
                group, group_size = [], 1
            group.append(nal)
            group_size += 2 + len(nal)
        self._flush(group, payloads)
        return payloads

    @staticmethod
    def _flush(group: list[bytes], payloads: list[bytes]) -> None:
        if len(group) == 1:  # a single NAL unit packet (§5.6) is the NAL unit itself
            payloads.append(group[0])
        elif group:
            # §5.7: F is the OR of the F bits, NRI the maximum NRI of the aggregated units.
            forbidden = max(nal[0] & 0x80 for nal in group)
            nri = max(nal[0] & 0x60 for nal in group)
            parts = [bytes([forbidden | nri | NAL_STAP_A])]
            for nal in group:  # §5.7.1: each unit prefixed by its 16-bit size
                parts += [len(nal).to_bytes(2, "big"), nal]
            payloads.append(b"".join(parts))

    def _fragment(self, nal: bytes, payloads: list[bytes]) -> None:
        # §5.8: the FU indicator copies F and NRI; the FU header carries S, E and the type.
        # The NAL header octet itself is not sent; its type is in every FU header.
        indicator = bytes([(nal[0] & 0xE0) | NAL_FU_A])
        body = memoryview(nal)[1:]
        count = -(-len(body) // (self.mtu - 2))
        # Near-equal fragments rather than full ones plus a runt: smoother pacing.  All but the
        # last are the same size and the last is at most ``count`` octets shorter, so a
        # fragment run is one UDP GSO send (shared.roq.udp_batch: equal segments, the last
        # one may be shorter).
        size = -(-len(body) // count)
        for index in range(count):
            header = nal[0] & 0x1F
            header |= 0x80 if index == 0 else 0
            header |= 0x40 if index == count - 1 else 0
            pos = index * size
            payloads.append(b"".join((indicator, bytes([header]), body[pos : pos + size])))


class H264Depacketizer:
    """RTP payloads in sequence order -> complete NAL units (RFC 6184 §5, non-interleaved).

    Single NAL unit packets and STAP-A come out at once; an FU-A NAL unit when its fragment with
    the E bit arrives.  Any violation raises :class:`ProtocolError` and drops the partial unit.
    """

    def __init__(self, max_nal_size: int = DEFAULT_MAX_NAL_SIZE) -> None:
        if max_nal_size < 1:
            raise ConfigError(f"max_nal_size {max_nal_size} must be positive")
        self.max_nal_size = max_nal_size
        self._fragments: bytearray | None = None

    @property
    def in_fragment(self) -> bool:
        """Whether an FU-A NAL unit has started but not yet ended."""
        return self._fragments is not None

    def reset(self) -> None:
        """Drop a partially received FU-A NAL unit (call on a sequence gap)."""
        self._fragments = None

    def push(self, payload: bytes) -> list[bytes]:
        try:
            return self._push(payload)
        except ProtocolError:
            self._fragments = None
            raise

    def _push(self, payload: bytes) -> list[bytes]:
        if not payload:
            raise ProtocolError("empty H.264 RTP payload")
        kind = payload[0] & 0x1F
        if kind == NAL_FU_A:
            return self._push_fragment(payload)
        if self._fragments is not None:
            raise ProtocolError("FU-A NAL unit interrupted before its end fragment")
        if 1 <= kind <= 23:  # §5.6 single NAL unit packet
            return [payload]
        if kind == NAL_STAP_A:
            return self._split_stap_a(payload)
        if kind in _INTERLEAVED_ONLY:
            raise ProtocolError(f"packet type {kind} is not allowed in non-interleaved mode")
        raise ProtocolError(f"reserved NAL unit type {kind}")

    @staticmethod
    def _split_stap_a(payload: bytes) -> list[bytes]:
        nal_units: list[bytes] = []
        pos, size = 1, len(payload)
        while pos < size:  # §5.7.1: 16-bit NALU size, then the NAL unit
            if pos + 2 > size:
                raise ProtocolError("STAP-A ends inside a NAL unit size field")
            length = int.from_bytes(payload[pos : pos + 2], "big")
            pos += 2
            if length == 0 or pos + length > size:
                raise ProtocolError(f"STAP-A NAL unit of {length} bytes does not fit the packet")
            nal = payload[pos : pos + length]
            if not 1 <= nal[0] & 0x1F <= 23:
                raise ProtocolError(f"STAP-A carries NAL unit type {nal[0] & 0x1F}")
            nal_units.append(nal)
            pos += length
        if not nal_units:
            raise ProtocolError("STAP-A without NAL units")
        return nal_units

    def _push_fragment(self, payload: bytes) -> list[bytes]:
        if len(payload) < 3:
            raise ProtocolError("FU-A without fragment data")
        header = payload[1]
        start, end, kind = header & 0x80, header & 0x40, header & 0x1F
        if start and end:
            raise ProtocolError("FU-A with both S and E bits (§5.8 forbids one-fragment units)")
        if not 1 <= kind <= 23:
            raise ProtocolError(f"FU-A carries NAL unit type {kind}")
        if start:
            if self._fragments is not None:
                raise ProtocolError("FU-A start while the previous NAL unit is unfinished")
            # Rebuild the NAL header octet: F and NRI from the indicator, type from the header.
            self._fragments = bytearray([(payload[0] & 0xE0) | kind])
        elif self._fragments is None:
            raise ProtocolError("FU-A continuation without a start fragment")
        elif self._fragments[0] & 0x1F != kind:
            raise ProtocolError("FU-A fragment type differs from its start fragment")
        if len(self._fragments) + len(payload) - 2 > self.max_nal_size:
            raise ProtocolError(f"FU-A NAL unit grows beyond {self.max_nal_size} bytes")
        self._fragments += memoryview(payload)[2:]
        if not end:
            return []
        nal = bytes(self._fragments)
        self._fragments = None
        return [nal]


class ParameterSets:
    """Remembers the latest SPS and PPS and puts them in front of any IDR that lacks them."""

    def __init__(self) -> None:
        self.sps: bytes | None = None
        self.pps: bytes | None = None

    def complete(self, nal_units: list[bytes]) -> list[bytes]:
        types = [nal[0] & 0x1F for nal in nal_units]
        for nal, kind in zip(nal_units, types, strict=True):
            if kind == NAL_SPS:
                self.sps = nal
            elif kind == NAL_PPS:
                self.pps = nal
        if NAL_IDR not in types or self.sps is None or self.pps is None:
            return nal_units
        if NAL_SPS in types and NAL_PPS in types:
            return nal_units
        # H.264 §7.4.1.2.3: parameter sets precede the first slice; an AUD, if any, stays first.
        head = 1 if types[0] == NAL_AUD else 0
        rest = [
            nal
            for nal, kind in zip(nal_units, types, strict=True)
            if kind not in (NAL_SPS, NAL_PPS)
        ]
        return [*rest[:head], self.sps, self.pps, *rest[head:]]


def _first_nal_type(payload: bytes) -> int | None:
    """Type of the first NAL unit a payload carries (None for an FU-A continuation)."""
    if not payload:
        return None
    kind = payload[0] & 0x1F
    if kind == NAL_STAP_A:
        return payload[3] & 0x1F if len(payload) > 3 else None
    if kind == NAL_FU_A:
        return payload[1] & 0x1F if len(payload) > 1 and payload[1] & 0x80 else None
    return kind


class H264PayloadFormat:
    """RFC 6184 as :class:`shared.rtp.jitter_buffer.JitterBuffer` needs it."""

    independent_frames = False

    def __init__(self, max_nal_size: int = DEFAULT_MAX_NAL_SIZE) -> None:
        self._depacketizer = H264Depacketizer(max_nal_size)

    def starts_frame(self, payload: bytes) -> bool:
        """An access unit that begins with SPS (or an AUD) needs nothing sent before it."""
        return _first_nal_type(payload) in (NAL_SPS, NAL_AUD)

    def assemble(self, payloads: Sequence[bytes]) -> tuple[list[bytes], bool]:
        depacketizer = self._depacketizer
        depacketizer.reset()
        nal_units: list[bytes] = []
        for payload in payloads:
            nal_units += depacketizer.push(payload)
        if depacketizer.in_fragment:
            depacketizer.reset()
            raise ProtocolError("access unit ends inside an FU-A NAL unit")
        if not nal_units:
            raise ProtocolError("access unit without NAL units")
        return nal_units, is_keyframe(nal_units)


#: Dynamic payload type for H.264 (RFC 3551 §6 leaves 96-127 to signalling).
H264_PAYLOAD_TYPE = 96
#: RTP payload budget: a QUIC packet of 1200 bytes minus QUIC, DATAGRAM frame, flow id, RTP
#: header and the 8-byte transport-wide extension leaves about 1120 bytes; 1100 keeps a margin.
DEFAULT_MTU = 1100
