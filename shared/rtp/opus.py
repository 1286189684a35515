"""Opus over RTP (RFC 7587): one Opus packet per RTP packet, on a 48 kHz clock.

Theory of operation: RFC 7587 §4.2 puts exactly one Opus packet (RFC 6716 §3) in each RTP
payload, and §4.1 fixes the RTP clock at 48 kHz whatever the sampling rate inside, so the
capture's pts in 1/48000 units is the RTP timestamp less a random offset.  The marker bit is
set on the first packet after a gap in the audio (RFC 3551 §4.1: the start of a talkspurt).

:func:`check_opus_packet` applies RFC 6716 §3.4's rules (R1-R7) that need no decoding, so a
payload that could crash or confuse a decoder is dropped as malformed before it gets there.
:class:`OpusPayloadFormat` is what the viewer's jitter buffer uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.errors import ConfigError, ProtocolError

__all__ = [
    "OPUS_CLOCK_RATE",
    "OPUS_PAYLOAD_TYPE",
    "OpusDecoder",
    "OpusPayloadFormat",
    "check_opus_packet",
    "opus_frame_count",
]

#: Dynamic payload type for Opus, as browsers commonly pick it (RFC 3551 §6: 96-127).
OPUS_PAYLOAD_TYPE = 111
#: RFC 7587 §4.1: the RTP clock rate is always 48 kHz.
OPUS_CLOCK_RATE = 48_000
#: RFC 6716 §3.4 R5: at most 120 ms of audio in one packet.
_MAX_PACKET_MS = 120
#: Frame durations in ms x 10 by TOC configuration number (RFC 6716 §3.1, Table 2).
_FRAME_TENTHS_MS = [100, 200, 400, 600] * 3 + [100, 200] * 2 + [25, 50, 100, 200] * 4


def _frame_length(data: bytes, pos: int) -> tuple[int, int]:
    """RFC 6716 §3.2.1 frame length coding: (length, position after it)."""
    if pos >= len(data):
        raise ProtocolError("Opus frame length missing")
    first = data[pos]
    if first < 252:
        return first, pos + 1
    if pos + 1 >= len(data):
        raise ProtocolError("Opus two-byte frame length truncated")
    return data[pos + 1] * 4 + first, pos + 2


def opus_frame_count(packet: bytes) -> int:
    """Frames in an Opus packet (RFC 6716 §3.1 code 0-3); ProtocolError if malformed."""
    check_opus_packet(packet)
    code = packet[0] & 0x03
    return packet[1] & 0x3F if code == 3 else (1 if code == 0 else 2)


def check_opus_packet(packet: bytes) -> None:
    """Raise ProtocolError unless ``packet`` is a well-formed Opus packet (RFC 6716 §3.4)."""
    if not packet:
        raise ProtocolError("empty Opus packet")  # R1
    size, code = len(packet), packet[0] & 0x03
    if code == 1 and (size - 1) % 2:  # R3: two frames of equal size
        raise ProtocolError("Opus code 1 packet with an odd payload length")
    if code == 2:  # R4: the first frame's length fits the packet
        length, pos = _frame_length(packet, 1)
        if length > size - pos:
            raise ProtocolError("Opus code 2 first frame longer than the packet")
    if code != 3:
        return
    if size < 2:
        raise ProtocolError("Opus code 3 packet without its frame count")  # R6
    count, vbr, padded = packet[1] & 0x3F, packet[1] & 0x80, packet[1] & 0x40
    if count == 0 or count * _FRAME_TENTHS_MS[packet[0] >> 3] > _MAX_PACKET_MS * 10:
        raise ProtocolError(f"Opus code 3 packet with {count} frames")  # R5
    pos, padding = 2, 0
    while padded:  # §3.2.5: padding length bytes, 255 means 254 plus another byte
        if pos >= size:
            raise ProtocolError("Opus padding length truncated")
        value = packet[pos]
        pos += 1
        padding += 254 if value == 255 else value
        padded = value == 255
    available = size - pos - padding
    if available < 0:
        raise ProtocolError("Opus padding longer than the packet")
    if vbr:  # R7: the M-1 coded lengths fit
        total = 0
        for _ in range(count - 1):
            length, pos = _frame_length(packet, pos)
            total += length
        if total > size - pos - padding:
            raise ProtocolError("Opus VBR frame lengths exceed the packet")
    elif available % count:  # R6: CBR frames of equal size
        raise ProtocolError("Opus CBR payload does not split into equal frames")


class OpusPayloadFormat:
    """RFC 7587 as :class:`shared.rtp.jitter_buffer.JitterBuffer` needs it."""

    independent_frames = True

    def starts_frame(self, payload: bytes) -> bool:
        return True

    def assemble(self, payloads: Sequence[bytes]) -> tuple[list[bytes], bool]:
        if len(payloads) != 1:
            raise ProtocolError("an Opus frame is exactly one RTP packet (RFC 7587 §4.2)")
        check_opus_packet(payloads[0])
        return [payloads[0]], True


class OpusDecoder:
    """Opus packets -> PCM frames with PyAV (libopus, or FFmpeg's native decoder).

    There is no Opus ID header in RTP (RFC 7587 §7 signals channels in SDP); this project
    sends stereo at 48 kHz, and an Opus decoder downmixes or upmixes a mono stream itself.
    """

    def __init__(self, *, channels: int = 2) -> None:
        import av  # PyAV is a viewer-side dependency; the packet rules above need none

        context: Any = None
        for name in ("libopus", "opus"):
            try:
                context = av.CodecContext.create(name, "r")
                break
            except (av.error.FFmpegError, ValueError):
                continue
        if context is None:
            raise ConfigError("this FFmpeg build has no Opus decoder")
        context.sample_rate = OPUS_CLOCK_RATE
        context.layout = "stereo" if channels == 2 else "mono"
        self._av = av
        self._context = context
        self.frames_decoded = 0
        self.decode_errors = 0

    def decode(self, packet: bytes) -> list[Any]:
        """Decoded ``av.AudioFrame`` objects (one per packet, normally)."""
        try:
            frames: list[Any] = list(self._context.decode(self._av.Packet(packet)))
        except self._av.error.FFmpegError:
            self.decode_errors += 1
            return []
        self.frames_decoded += len(frames)
        return frames
