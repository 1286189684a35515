"""H.264 encode and decode: synchronous wrappers over PyAV.

Like aiortc's codec wrappers these are plain synchronous objects; the actor that owns one
decides whether a call runs on a worker thread (PyAV releases the GIL while FFmpeg works).

Time follows PyAV: integer ``pts`` in a :data:`TIME_BASE` of 1/90000 s, the RTP video clock
(RFC 6184 §8.2.1), so the same number serves the RTP timestamp, the MP4 muxer and the decoder
without rescaling.

Output is Annex B with SPS and PPS repeated in front of every IDR, so any keyframe on its own is
a valid starting point for a viewer that joins late or lost packets, and the recorder can start
a file at any keyframe.
"""

from __future__ import annotations

import fractions
from typing import Any

import av
import msgspec
import numpy as np

from shared.errors import ConfigError, EncodingError

__all__ = [
    "TIME_BASE",
    "EncodedFrame",
    "EncoderConfig",
    "H264Decoder",
    "H264Encoder",
]

#: 90 kHz: the RTP clock for video (RFC 6184 §8.2.1) and our pts unit everywhere.
TIME_BASE = fractions.Fraction(1, 90_000)

#: Bitrates outside this range are clamped at the codec boundary (aiortc does the same).
MIN_BITRATE = 50_000
MAX_BITRATE = 50_000_000


class EncoderConfig(msgspec.Struct, frozen=True, kw_only=True):
    width: int
    height: int
    framerate: int
    #: Target bits per second.
    bitrate: int
    #: Frames between periodic IDRs.
    keyframe_interval: int
    #: FFmpeg encoder name.
    codec: str = "libx264"
    #: x264 speed preset; veryfast keeps 1080p30 within one core with decent quality.
    preset: str = "veryfast"

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise ConfigError(
                f"{self.width}x{self.height}: 4:2:0 encoding needs positive, even dimensions"
            )
        if self.bitrate <= 0:
            raise ConfigError(f"bitrate {self.bitrate} must be positive")
        if not 0 < self.framerate <= 240:
            raise ConfigError(f"frame rate {self.framerate} must be between 1 and 240")
        if self.keyframe_interval < 1:
            raise ConfigError(f"keyframe interval {self.keyframe_interval} must be >= 1 frame")


class EncodedFrame(msgspec.Struct, frozen=True, kw_only=True):
    """One access unit in Annex B form."""

    data: bytes
    pts: int
    keyframe: bool
    capture_us: int


def _clamp_bitrate(bitrate: int) -> int:
    return max(MIN_BITRATE, min(MAX_BITRATE, bitrate))


class H264Encoder:
    """Low-latency H.264 encoder: no B-frames, no lookahead, one access unit out per frame in."""

    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        self._bitrate = _clamp_bitrate(config.bitrate)
        self._keyframe_requested = False
        self.frames_encoded = 0
        self.keyframes_encoded = 0
        self._context = self._open(config)

    def _open(self, config: EncoderConfig) -> Any:
        try:
            context: Any = av.CodecContext.create(config.codec, "w")
        except (av.error.FFmpegError, ValueError) as exc:  # unknown codec name
            raise EncodingError(f"encoder {config.codec!r} is not available: {exc}") from exc
        context.width = config.width
        context.height = config.height
        context.pix_fmt = "yuv420p"
        context.time_base = TIME_BASE
        context.framerate = config.framerate
        context.bit_rate = self._bitrate
        context.gop_size = config.keyframe_interval
        kbps = self._bitrate // 1000
        context.options = {
            "preset": config.preset,
            # zerolatency: no frame-level lookahead or B-frames, sliced threads.
            "tune": "zerolatency",
            # A picture marked I becomes an IDR, so a viewer's keyframe request really resets.
            "forced-idr": "1",
            "x264-params": ":".join(
                [
                    "repeat-headers=1",  # SPS/PPS before every IDR (see module docstring)
                    "annexb=1",
                    f"keyint={config.keyframe_interval}",
                    f"min-keyint={config.keyframe_interval}",
                    "scenecut=0",
                    # A VBV of half a second keeps frame sizes near the target: CBR-like, so
                    # the network sees a steady rate instead of bursts it must queue.
                    f"vbv-maxrate={kbps}",
                    f"vbv-bufsize={max(kbps // 2, 20)}",
                ]
            ),
        }
        try:
            context.open()
        except av.error.FFmpegError as exc:
            raise EncodingError(
                f"cannot open {config.codec} at {config.width}x{config.height}: {exc}"
            ) from exc
        return context

    @property
    def bitrate(self) -> int:
        return self._bitrate

    def set_bitrate(self, bitrate: int) -> int:
        """Retarget the rate control; libx264 reconfigures in place at the next frame."""
        if bitrate <= 0:
            raise ConfigError(f"bitrate {bitrate} must be positive")
        self._bitrate = _clamp_bitrate(bitrate)
        self._context.bit_rate = self._bitrate
        return self._bitrate

    def request_keyframe(self) -> None:
        """Make the next encoded frame an IDR (a viewer's PLI, or a recording starting)."""
        self._keyframe_requested = True

    def encode(self, pixels: np.ndarray, *, pts: int, capture_us: int) -> list[EncodedFrame]:
        """Encode one yuv420p picture (a flat I420 buffer of width*height*3/2 bytes)."""
        width, height = self.config.width, self.config.height
        if pixels.size != width * height * 3 // 2:
            raise EncodingError(
                f"frame of {pixels.size} bytes does not match {width}x{height} yuv420p"
            )
        frame = av.VideoFrame.from_ndarray(pixels.reshape(height * 3 // 2, width), format="yuv420p")
        frame.pts = pts
        frame.time_base = TIME_BASE
        if self._keyframe_requested:
            frame.pict_type = av.video.frame.PictureType.I
            self._keyframe_requested = False
        try:
            packets = self._context.encode(frame)
        except av.error.FFmpegError as exc:
            raise EncodingError(f"{self.config.codec} failed on frame pts={pts}: {exc}") from exc
        out = []
        for packet in packets:
            keyframe = bool(packet.is_keyframe)
            out.append(
                EncodedFrame(
                    data=bytes(packet),
                    pts=int(packet.pts),
                    keyframe=keyframe,
                    capture_us=capture_us,
                )
            )
            self.frames_encoded += 1
            self.keyframes_encoded += keyframe
        return out

    def close(self) -> None:
        self._context = None


class H264Decoder:
    """Software H.264 decoder fed Annex B access units; counts what it could not decode."""

    def __init__(self) -> None:
        self._context = av.CodecContext.create("h264", "r")
        self.frames_decoded = 0
        self.decode_errors = 0

    def decode(self, access_unit: bytes, *, pts: int | None = None) -> list[av.VideoFrame]:
        packet = av.Packet(access_unit)
        if pts is not None:
            packet.pts = pts
            packet.time_base = TIME_BASE
        try:
            frames: list[av.VideoFrame] = list(self._context.decode(packet))
        except av.error.FFmpegError:
            # The assembler never hands us an incomplete frame, so this means corrupt input
            # from the sender; count it and let the next keyframe resynchronise.
            self.decode_errors += 1
            return []
        self.frames_decoded += len(frames)
        return frames
