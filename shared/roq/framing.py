"""RTP over QUIC framing (draft-ietf-avtcore-rtp-over-quic-14, "RoQ"), sans-I/O.

Theory of operation: RoQ multiplexes RTP sessions on one QUIC connection by a *flow
identifier*, a QUIC variable-length integer (RFC 9000 §16) that precedes the packets
("Multiplexing" section of the draft).

- Datagram mode ("QUIC Datagrams"): each QUIC DATAGRAM frame is ``flow id || one RTP or RTCP
  packet``.  :func:`encode_datagram` / :func:`decode_datagram`.
- Stream mode ("QUIC Streams"): a unidirectional stream opens with the flow id, then carries
  RoQ frames of ``length (varint) || packet``.  :func:`encode_stream_header`,
  :func:`encode_stream_packet`, and :class:`RoqStreamReader` to cut the byte stream apart again;
  :class:`RoqStreamDemux` keeps one reader per inbound stream, :class:`StaleFrames` decides
  which outbound frame streams to cancel with ``ROQ_FRAME_CANCELLED``.

This project puts RTCP on its own flow next to each media flow (:data:`VIDEO_RTCP_FLOW_ID`
beside :data:`VIDEO_FLOW_ID`), so a receiver dispatches on the flow id without looking inside
the packet.  RTP/RTCP multiplexing on one flow (RFC 5761, :func:`shared.rtp.packet.is_rtcp`) works too
and is what a peer may use instead.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

from shared.errors import ConfigError, ProtocolError

__all__ = [
    "ALPN",
    "AUDIO_FLOW_ID",
    "AUDIO_RTCP_FLOW_ID",
    "DEFAULT_MAX_PACKET_SIZE",
    "MAX_VARINT",
    "VIDEO_FLOW_ID",
    "VIDEO_RTCP_FLOW_ID",
    "RoqErrorCode",
    "RoqStreamDemux",
    "RoqStreamReader",
    "StaleFrames",
    "decode_datagram",
    "decode_varint",
    "encode_datagram",
    "encode_stream_header",
    "encode_stream_packet",
    "encode_varint",
]

#: The ALPN token the draft registers for RoQ ("IANA Considerations").
ALPN = "rtp-mux-quic"

#: Flow identifiers of this project.  RTCP has a flow of its own beside each media flow.
VIDEO_FLOW_ID = 0
VIDEO_RTCP_FLOW_ID = 1
AUDIO_FLOW_ID = 2
AUDIO_RTCP_FLOW_ID = 3

#: Largest value a QUIC variable-length integer holds (RFC 9000 §16).
MAX_VARINT = (1 << 62) - 1
#: Largest RTP/RTCP packet a :class:`RoqStreamReader` accepts by default.
DEFAULT_MAX_PACKET_SIZE = 65_535


class RoqErrorCode(IntEnum):
    """Application error codes for CONNECTION_CLOSE / RESET_STREAM (draft's error code registry)."""

    ROQ_NO_ERROR = 0x00
    ROQ_GENERAL_ERROR = 0x01
    ROQ_INTERNAL_ERROR = 0x02
    ROQ_PACKET_ERROR = 0x03
    ROQ_STREAM_CREATION_ERROR = 0x04
    ROQ_FRAME_CANCELLED = 0x05
    ROQ_UNKNOWN_FLOW_ID = 0x06
    ROQ_EXPECTATION_UNMET = 0x07


def encode_varint(value: int) -> bytes:
    """Encode ``value`` in the shortest QUIC variable-length integer form (RFC 9000 §16)."""
    if value < 0 or value > MAX_VARINT:
        raise ConfigError(f"{value} cannot be a QUIC variable-length integer")
    # The two high bits of the first octet give the length: 00=1, 01=2, 10=4, 11=8 octets.
    if value < 1 << 6:
        return value.to_bytes(1, "big")
    if value < 1 << 14:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 1 << 30:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


def decode_varint(data: bytes | bytearray, offset: int = 0) -> tuple[int, int]:
    """Decode a QUIC variable-length integer at ``offset``: ``(value, offset after it)``.

    Longer-than-needed encodings are accepted, as RFC 9000 §16 allows.
    """
    if not 0 <= offset < len(data):
        raise ProtocolError("variable-length integer missing")
    end = offset + (1 << (data[offset] >> 6))
    if end > len(data):
        raise ProtocolError(f"variable-length integer needs {end - offset} bytes")
    value = int.from_bytes(data[offset:end], "big") & ((1 << (8 * (end - offset) - 2)) - 1)
    return value, end


def encode_datagram(flow_id: int, packet: bytes) -> bytes:
    """A DATAGRAM payload: flow id, then one RTP or RTCP packet ("QUIC Datagrams")."""
    if not packet:
        raise ConfigError("cannot send an empty RTP/RTCP packet")
    return encode_varint(flow_id) + packet


def decode_datagram(data: bytes) -> tuple[int, bytes]:
    """Split a DATAGRAM payload into ``(flow id, packet)``."""
    flow_id, offset = decode_varint(data)
    if offset == len(data):
        raise ProtocolError(f"datagram for flow {flow_id} carries no packet")
    return flow_id, data[offset:]


def encode_stream_header(flow_id: int) -> bytes:
    """The flow id that opens a unidirectional RoQ stream ("QUIC Streams")."""
    return encode_varint(flow_id)


def encode_stream_packet(packet: bytes) -> bytes:
    """One RoQ frame on a stream: the packet's length as a varint, then the packet."""
    if not packet:
        raise ConfigError("cannot send an empty RTP/RTCP packet")
    return encode_varint(len(packet)) + packet


class RoqStreamReader:
    """Cuts one unidirectional RoQ stream into packets, however its bytes arrive.

    Feed stream data in order; the first varint is the flow id (:attr:`flow_id` once read),
    each following RoQ frame yields one packet.  A zero or oversize length raises
    :class:`ProtocolError`; the stream is then unusable and the caller closes it with
    ``ROQ_PACKET_ERROR``.
    """

    def __init__(self, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> None:
        if max_packet_size < 1:
            raise ConfigError(f"max_packet_size {max_packet_size} must be positive")
        self.max_packet_size = max_packet_size
        self._buffer = bytearray()
        self._flow_id: int | None = None

    @property
    def flow_id(self) -> int | None:
        """The stream's flow id, or ``None`` until its bytes have arrived."""
        return self._flow_id

    def feed(self, data: bytes) -> list[bytes]:
        """Add stream bytes; return every packet they complete."""
        self._buffer += data
        buffer, pos, packets = self._buffer, 0, []
        while True:
            header = _peek_varint(buffer, pos)
            if header is None:
                break
            value, body = header
            if self._flow_id is None:
                self._flow_id, pos = value, body
                continue
            if not 1 <= value <= self.max_packet_size:
                raise ProtocolError(f"RoQ frame length {value} outside 1..{self.max_packet_size}")
            if body + value > len(buffer):
                break
            packets.append(bytes(buffer[body : body + value]))
            pos = body + value
        del buffer[:pos]
        return packets

    def finish(self) -> None:
        """The stream ended (FIN): :class:`ProtocolError` if it stopped inside a frame."""
        if self._buffer:
            raise ProtocolError(f"RoQ stream ended inside a frame ({len(self._buffer)} bytes)")


def _peek_varint(data: bytearray, offset: int) -> tuple[int, int] | None:
    """Like :func:`decode_varint`, but ``None`` while the integer is still incomplete."""
    if offset >= len(data) or offset + (1 << (data[offset] >> 6)) > len(data):
        return None
    return decode_varint(data, offset)


class RoqStreamDemux:
    """The inbound unidirectional RoQ streams of one connection -> ``(flow id, packet)``.

    Each stream gets a :class:`RoqStreamReader`; at most ``max_streams`` are open at once (a
    peer opening more is refused: :meth:`accepts`).  A stream that breaks the framing raises
    :class:`ProtocolError` from :meth:`feed` and is forgotten; the caller stops it with
    ``ROQ_PACKET_ERROR`` and the connection goes on.
    """

    def __init__(self, *, max_streams: int = 64, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE):
        self.max_streams = max_streams
        self.max_packet_size = max_packet_size
        self._readers: dict[int, RoqStreamReader] = {}

    def accepts(self, stream_id: int) -> bool:
        return stream_id in self._readers or len(self._readers) < self.max_streams

    def feed(self, stream_id: int, data: bytes, end_stream: bool) -> list[tuple[int, bytes]]:
        reader = self._readers.get(stream_id)
        if reader is None:
            reader = self._readers[stream_id] = RoqStreamReader(self.max_packet_size)
        try:
            packets = reader.feed(data)
            if end_stream:
                reader.finish()
        except ProtocolError:
            del self._readers[stream_id]
            raise
        if end_stream:
            del self._readers[stream_id]
        flow_id = reader.flow_id
        return [(flow_id, packet) for packet in packets] if flow_id is not None else []

    def reset(self, stream_id: int) -> None:
        """The peer reset the stream (a cancelled frame): its partial packets are lost."""
        self._readers.pop(stream_id, None)


class StaleFrames:
    """Which outbound media frames, one stream each, to cancel (stream mode).

    A frame still partly unsent when a keyframe supersedes it, or when it is older than
    ``max_age_s``, is no longer worth sending: the draft's stream mode lets the sender reset
    its stream with ``ROQ_FRAME_CANCELLED`` rather than deliver it late and hold back the
    frames after it.  A frame whose bytes are all on the wire is left for QUIC to finish.
    """

    def __init__(self, max_age_s: float = 0.3) -> None:
        self.max_age_s = max_age_s
        self._open: list[tuple[int, float]] = []

    def opened(self, stream_id: int, now: float) -> None:
        self._open.append((stream_id, now))

    def to_cancel(self, now: float, *, keyframe: bool, state: Callable[[int], str]) -> list[int]:
        """Streams to reset now; ``state(id)`` is ``done``, ``sent`` or ``unsent``."""
        kept, cancel = [], []
        for stream_id, opened in self._open:
            current = state(stream_id)
            if current == "done":
                continue
            if current == "unsent" and (keyframe or now - opened > self.max_age_s):
                cancel.append(stream_id)
            else:
                kept.append((stream_id, opened))
        self._open = kept
        return cancel

    def unsent(self, state: Callable[[int], str]) -> int:
        return sum(1 for stream_id, _ in self._open if state(stream_id) == "unsent")
