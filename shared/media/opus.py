"""Opus encode and decode with PyAV (libopus), in 20 ms packets on the 48 kHz RTP clock.

Timestamps follow RFC 7587 (RTP payload format for Opus): whatever rate the audio is captured
at, a packet's timestamp counts 48 kHz samples (section 4.1), so ``pts`` here is in 1/48000 s
and advances by 960 per 20 ms packet.  ``capture_us`` is the wall-clock time of the packet's
first input sample, the clock video frames are stamped on, which is what A/V sync needs.

libopus delays its output by a few milliseconds of look-ahead ("pre-skip", 312 samples at
48 kHz in the ``audio`` application).  FFmpeg shifts the packets' pts back by that much; each
packet is matched back to the input frame it encodes, so its pts and capture time are that
frame's (the RTP convention), and the decoder's output lags by the pre-skip, 6.5 ms.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Final

import av
import msgspec
import numpy as np
import numpy.typing as npt

from shared.errors import ConfigError, EncodingError

__all__ = ["FRAME_MS", "OPUS_CLOCK", "OpusDecoder", "OpusEncoder", "OpusPacket"]

#: RTP clock rate of Opus, whatever the input rate (RFC 7587 section 4.1).
OPUS_CLOCK: Final = 48_000
FRAME_MS: Final = 20
_RATES: Final = (8_000, 12_000, 16_000, 24_000, 48_000)

Pcm = npt.NDArray[np.int16]


class OpusPacket(msgspec.Struct, frozen=True, kw_only=True):
    data: bytes
    #: First sample of the packet, in 1/48000 s from the first packet of the stream.
    pts: int
    #: Wall-clock microseconds of that first sample.
    capture_us: int
    #: Length in 1/48000 s (960 for 20 ms).
    duration: int


def _layout(channels: int) -> str:
    if channels not in (1, 2):
        raise ConfigError(f"{channels} channels: Opus here takes 1 or 2")
    return "mono" if channels == 1 else "stereo"


class OpusEncoder:
    """Buffers interleaved int16 PCM into 20 ms frames and encodes each to one Opus packet."""

    def __init__(self, *, sample_rate: int, channels: int, bitrate: int) -> None:
        if sample_rate not in _RATES:
            raise ConfigError(f"Opus takes 8, 12, 16, 24 or 48 kHz, not {sample_rate} Hz")
        self.sample_rate: Final = sample_rate
        self.channels: Final = channels
        self.frame_samples: Final = sample_rate * FRAME_MS // 1000
        self._scale: Final = OPUS_CLOCK // sample_rate  # input samples -> 48 kHz ticks
        try:
            context: Any = av.CodecContext.create("libopus", "w")
        except (ValueError, av.FFmpegError) as exc:
            raise EncodingError(f"this PyAV build has no libopus encoder: {exc}") from None
        context.sample_rate = sample_rate
        context.layout = _layout(channels)
        context.format = "s16"
        context.bit_rate = bitrate
        context.time_base = Fraction(1, sample_rate)
        context.options = {"frame_duration": str(FRAME_MS), "application": "audio"}
        context.open()
        self._context = context
        self._pending = np.empty((0, channels), np.int16)
        #: Wall-clock microseconds of the first sample in ``_pending``.
        self._pending_us = 0
        self._samples = 0  # input samples handed to the codec so far
        self._frames: dict[int, int] = {}  # input pts -> capture_us, until its packet comes
        self.packets = 0

    @property
    def pre_skip(self) -> int:
        """Samples (at the input rate) the codec's output lags its input."""
        extradata = self._context.extradata or b""
        if len(extradata) >= 12 and extradata[:8] == b"OpusHead":
            # OpusHead (RFC 7845 section 5.1): pre-skip is at 48 kHz, bytes 10-11.
            return int.from_bytes(extradata[10:12], "little") // self._scale
        return 0

    def encode(self, pcm: Pcm, capture_us: int) -> list[OpusPacket]:
        """Add a block of samples (frames x channels, int16) whose first sample was captured at
        ``capture_us``; returns the packets completed so far."""
        if pcm.ndim != 2 or pcm.shape[1] != self.channels:
            raise ConfigError(f"expected PCM shaped (n, {self.channels}), got {pcm.shape}")
        buffered = len(self._pending)
        # The block's own stamp is fresher than the buffer's: derive the buffer head from it.
        self._pending_us = capture_us - buffered * 1_000_000 // self.sample_rate
        self._pending = np.concatenate([self._pending, pcm.astype(np.int16, copy=False)])
        packets: list[OpusPacket] = []
        while len(self._pending) >= self.frame_samples:
            frame_pcm = self._pending[: self.frame_samples]
            packets.extend(self._encode_frame(frame_pcm, self._pending_us))
            self._pending = self._pending[self.frame_samples :]
            self._pending_us += self.frame_samples * 1_000_000 // self.sample_rate
        return packets

    def _encode_frame(self, pcm: Pcm, capture_us: int) -> list[OpusPacket]:
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm).reshape(1, -1), format="s16", layout=_layout(self.channels)
        )
        frame.sample_rate = self.sample_rate
        frame.pts = self._samples
        frame.time_base = Fraction(1, self.sample_rate)
        self._frames[self._samples] = capture_us
        self._samples += len(pcm)
        try:
            return self._packets(self._context.encode(frame))
        except av.FFmpegError as exc:
            raise EncodingError(f"Opus encoding failed: {exc}") from None

    def _packets(self, encoded: list[Any]) -> list[OpusPacket]:
        packets = []
        skip = self.pre_skip
        for packet in encoded:
            pts = (packet.pts or 0) + skip
            capture_us = self._frames.pop(pts, None)
            if capture_us is None:  # the codec's tail padding: no input frame of its own
                continue
            packets.append(
                OpusPacket(
                    data=bytes(packet),
                    pts=pts * self._scale,
                    capture_us=capture_us,
                    duration=self.frame_samples * self._scale,
                )
            )
        self.packets += len(packets)
        return packets

    def close(self) -> None:
        self._frames.clear()


class OpusDecoder:
    """Decodes Opus packets to interleaved int16 PCM at 48 kHz (the rate Opus decodes at)."""

    def __init__(self, *, channels: int, sample_rate: int = OPUS_CLOCK) -> None:
        context: Any = av.CodecContext.create("libopus", "r")
        context.sample_rate = sample_rate
        context.layout = _layout(channels)
        context.open()
        self._context = context
        self.channels: Final = channels
        self.sample_rate: Final = sample_rate

    def decode(self, data: bytes) -> Pcm:
        """One packet's samples, shaped (n, channels)."""
        try:
            frames = self._context.decode(av.Packet(data))
        except av.FFmpegError as exc:
            raise EncodingError(f"Opus decoding failed: {exc}") from None
        blocks = [_interleaved(frame, self.channels) for frame in frames]
        if not blocks:
            return np.empty((0, self.channels), np.int16)
        return np.concatenate(blocks)


def _interleaved(frame: Any, channels: int) -> Pcm:
    """A decoded AudioFrame as (n, channels) int16, whatever sample format it came in."""
    array = frame.to_ndarray()
    # Planar comes as (channels, n), packed as (1, n * channels): both to (n, channels).
    array = array.T if frame.format.is_planar else array.reshape(-1, channels)
    if array.dtype.kind == "f":
        array = np.clip(array * 32768.0, -32768, 32767)
    return np.ascontiguousarray(array.astype(np.int16))
