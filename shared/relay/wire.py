"""The relay's messages and their framing on a byte stream.

A relay connection is a TCP stream.  Each message is a 4-byte big-endian length followed by
that many bytes of MessagePack (msgspec), one of the tagged Structs below:

- the receiver opens with :class:`Subscribe` (which stream, which tracks);
- the origin answers :class:`Tracks` (each track's ring shape, so the receiver can create a ring
  that holds what the origin's holds), then sends :class:`Packets` as the encoder commits them;
- either end may send :class:`Goodbye` with a reason before it closes.

Why TCP and not UDP: the receiver is a ring writer, and ring readers (the shards) already cope
with loss only at keyframe granularity.  A reliable, ordered carrier keeps every packet of a
group of pictures or none of it, and the origin's :mod:`shared.relay.uplink` bounds the delay
by dropping whole groups when the connection backs up — the one loss a decoder recovers from
without asking.

The decoder is sans-I/O: :meth:`MessageDecoder.feed` takes whatever bytes arrived and returns
the complete messages; a length over ``max_message_bytes`` or bytes that are not a message
raise :class:`~shared.errors.ProtocolError`.
"""

from __future__ import annotations

import struct
from typing import Final

import msgspec

from shared.errors import ProtocolError
from shared.pool.packet_ring import RingPacket

__all__ = [
    "Goodbye",
    "MessageDecoder",
    "Packets",
    "RelayMessage",
    "Subscribe",
    "TrackShape",
    "Tracks",
    "encode_message",
]

#: Protocol version, in :class:`Subscribe`; an origin refuses any other.
VERSION: Final = 1
_LENGTH: Final = struct.Struct(">I")
#: Default bound on one message: a batch of packets of a few frames of a high-rate rung.
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024


class Subscribe(msgspec.Struct, tag="subscribe", frozen=True, kw_only=True):
    """Receiver → origin: send me these tracks of this stream."""

    version: int
    stream: str
    #: Track names as the origin's rings are named (``video``, ``video_r1``, ``audio``...).
    tracks: list[str]
    #: Who is asking (a node id), for the origin's logs and stats.
    node: str = ""


class TrackShape(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    capacity_bytes: int
    index_slots: int


class Tracks(msgspec.Struct, tag="tracks", frozen=True, kw_only=True):
    """Origin → receiver: the tracks it will send, with their rings' shapes."""

    tracks: list[TrackShape]


class Packets(msgspec.Struct, tag="packets", frozen=True, kw_only=True):
    """Origin → receiver: packets of one track, in order.

    ``packets[i].sequence`` is the origin ring's sequence: the receiver sees a gap (and waits
    for a keyframe) when one does not follow the previous.
    """

    track: int
    packets: list[RingPacket]


class Goodbye(msgspec.Struct, tag="goodbye", frozen=True, kw_only=True):
    reason: str


RelayMessage = Subscribe | Tracks | Packets | Goodbye

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(RelayMessage)


def encode_message(message: RelayMessage) -> bytes:
    """One framed message, ready to write."""
    body = _encoder.encode(message)
    return _LENGTH.pack(len(body)) + body


class MessageDecoder:
    """Splits a byte stream into messages."""

    def __init__(self, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_message_bytes

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a message."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[RelayMessage]:
        """Append ``data``; return every message it completed, in order."""
        self._buffer += data
        messages: list[RelayMessage] = []
        offset = 0
        while len(self._buffer) - offset >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer, offset)
            if length > self._max:
                raise ProtocolError(
                    f"relay message of {length} bytes is over the {self._max}-byte limit"
                )
            end = offset + _LENGTH.size + length
            if len(self._buffer) < end:
                break
            body = bytes(self._buffer[offset + _LENGTH.size : end])
            try:
                messages.append(_decoder.decode(body))
            except msgspec.DecodeError as exc:
                raise ProtocolError(f"not a relay message: {exc}") from None
            offset = end
        del self._buffer[:offset]
        return messages
