"""H.264 encode and decode: synchronous wrappers over PyAV (the design's VideoCodec).

Like aiortc's codec wrappers these are plain synchronous objects; the actor that owns one
decides whether a call runs on a worker thread (PyAV releases the GIL while FFmpeg works).

Time follows PyAV: integer ``pts`` in a :data:`TIME_BASE` of 1/90000 s, the RTP video clock
(RFC 6184 §8.2.1), so the same number serves the RTP timestamp, the MP4 muxer and the decoder
without rescaling.

Output is Annex B with SPS and PPS repeated in front of every IDR, so any keyframe on its own is
a valid starting point for a viewer that joins late or lost packets, and the recorder can start
a file at any keyframe.

Theory of operation
-------------------
:class:`H264Encoder` owns one *session* (an opened FFmpeg encoder, :class:`FFmpegSession`) and
replaces it when it must:

- ``configure`` with a new size, frame rate, codec or a bitrate above the opened ceiling marks
  the session stale; the next frame opens a new one, which starts with an IDR.  Timestamps come
  from the caller, so they run on unchanged across the switch.
- A hardware session that fails mid-stream is closed and the same frame is encoded again by a
  fresh libx264 session (an IDR), so viewers lose nothing and resynchronise at once; the switch
  is counted in ``hardware_fallbacks`` and its reason kept in ``fallback_reason``.
- A bitrate change at or below the ceiling is applied in place (see :mod:`shared.media.rate_control`
  for what libx264 can and cannot change live, and the loop that keeps the output on target).

Sessions come from an *opener* (``open_session`` by default), which tests replace to inject a
runtime failure into a real encoder.
"""

from __future__ import annotations

import fractions
import logging
import os
from collections.abc import Callable
from typing import Any, Final, Protocol

import av
import av.video.reformatter
import msgspec
import numpy as np

from shared.errors import ConfigError, EncodingError
from shared.media.hwaccel import (
    HARDWARE_ENCODERS,
    SOFTWARE_DECODER,
    SOFTWARE_ENCODER,
    EncoderCapabilities,
    HardwareAccelerator,
    open_decoder_context,
    pick_pixel_format,
)
from shared.media.rate_control import MAX_GAIN, BitrateAdjuster, encoder_threads, vbv_buffer_bits
from shared.rtp.h264 import NAL_IDR, NAL_PPS, NAL_SPS, split_annexb

__all__ = [
    "MAX_BITRATE",
    "MIN_BITRATE",
    "QP2LAMBDA",
    "TIME_BASE",
    "EncodedFrame",
    "EncoderConfig",
    "EncoderConfigError",
    "EncoderSession",
    "FFmpegSession",
    "H264Decoder",
    "H264Encoder",
    "SessionOpener",
    "get_encoder_capabilities",
    "open_session",
    "packet_qp",
]

logger = logging.getLogger(__name__)

#: 90 kHz: the RTP clock for video (RFC 6184 §8.2.1) and our pts unit everywhere.
TIME_BASE = fractions.Fraction(1, 90_000)

#: Bitrates outside this range are clamped at the codec boundary (aiortc does the same).
MIN_BITRATE = 50_000
MAX_BITRATE = 50_000_000

#: Low-latency settings per hardware encoder (FFmpeg private options): no B-frames, no
#: lookahead or output delay, constant bitrate, a requested I-frame is an IDR.  A table rather
#: than code per encoder: each is configured the same way, only the option names differ.
HARDWARE_OPTIONS: Final[dict[str, dict[str, str]]] = {
    "h264_nvenc": {
        "preset": "p1",
        "tune": "ull",
        "zerolatency": "1",
        "delay": "0",
        "rc": "cbr",
        "forced-idr": "1",
    },
    "h264_qsv": {"preset": "veryfast", "look_ahead": "0", "async_depth": "1", "forced_idr": "1"},
    "h264_vaapi": {"rc_mode": "CBR"},
    "h264_videotoolbox": {"realtime": "1", "allow_sw": "0"},
    "h264_amf": {"usage": "ultralowlatency", "rc": "cbr"},
    "h264_v4l2m2m": {},
}


class EncoderConfigError(EncodingError, ConfigError):
    """An encoder configuration that cannot work: both an EncodingError (the design's type for
    encoder failures) and a ConfigError (a bad argument, also a ValueError)."""


class EncoderConfig(msgspec.Struct, frozen=True, kw_only=True):
    width: int
    height: int
    framerate: int
    #: Target bits per second.
    bitrate: int
    #: Frames between periodic IDRs.
    keyframe_interval: int
    #: FFmpeg encoder name, or ``"auto"``: the best hardware encoder that works here, else
    #: libx264 (see :mod:`shared.media.hwaccel`).
    codec: str = SOFTWARE_ENCODER
    #: x264 speed preset; veryfast keeps 1080p30 within one core with decent quality.
    preset: str = "veryfast"
    #: Highest target the encoder may be raised to in place (default: ``bitrate``); above it
    #: the encoder is reopened, which costs an IDR.
    max_bitrate: int | None = None
    #: Encoder threads; 0 picks them from the picture size, rate and cores.
    threads: int = 0
    #: Switch to libx264 when a hardware encoder fails to open or fails mid-stream.
    fallback: bool = True

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise EncoderConfigError(
                f"{self.width}x{self.height}: 4:2:0 encoding needs positive, even dimensions"
            )
        if self.bitrate <= 0:
            raise EncoderConfigError(f"bitrate {self.bitrate} must be positive")
        if self.max_bitrate is not None and self.max_bitrate < self.bitrate:
            raise EncoderConfigError(
                f"max_bitrate {self.max_bitrate} is below the bitrate {self.bitrate}"
            )
        if not 0 < self.framerate <= 240:
            raise EncoderConfigError(f"frame rate {self.framerate} must be between 1 and 240")
        if self.keyframe_interval < 1:
            raise EncoderConfigError(
                f"keyframe interval {self.keyframe_interval} must be >= 1 frame"
            )
        if self.threads < 0:
            raise EncoderConfigError(f"threads {self.threads} must be >= 0 (0: automatic)")
        if not self.codec:
            raise EncoderConfigError("codec must name an FFmpeg encoder or be 'auto'")


class EncodedFrame(msgspec.Struct, frozen=True, kw_only=True):
    """One access unit in Annex B form."""

    data: bytes
    pts: int
    keyframe: bool
    capture_us: int
    #: The frame's quantiser as the encoder reports it (:func:`packet_qp`), None when it does
    #: not: with the bytes, how hard the picture was to code at the rate it was given.
    qp: float | None = None


#: FFmpeg's ``FF_QP2LAMBDA``: the quality in its encoder stats is the QP times this.
QP2LAMBDA: Final = 118
#: A packet's ``AV_PKT_DATA_QUALITY_STATS``: int32 quality, uint8 picture type, uint8 error
#: count, then error sums (libavcodec/packet.h).
_QUALITY_STATS: Final = "quality_stats"


def packet_qp(packet: av.Packet[Any]) -> float | None:
    """The QP an encoder reports for ``packet``, else None.

    libx264 and NVENC attach ``AV_PKT_DATA_QUALITY_STATS`` to every packet (FFmpeg's
    ``ff_side_data_set_encoder_stats``, from x264's ``i_qpplus1 - 1`` for the frame), whose
    first field is the frame's QP x :data:`QP2LAMBDA`.  An encoder that does not report it
    (some hardware encoders) gives None: the QP is unknown.  (QP 0 is real: x264 reaches it
    refining a still picture it has bits to spare for.)
    """
    if not packet.has_sidedata(_QUALITY_STATS):
        return None
    data = bytes(packet.get_sidedata(_QUALITY_STATS))
    if len(data) < 4:
        return None
    quality = int.from_bytes(data[:4], "little", signed=True)
    return quality / QP2LAMBDA if quality >= 0 else None


def _clamp_bitrate(bitrate: int) -> int:
    return max(MIN_BITRATE, min(MAX_BITRATE, bitrate))


# --- sessions: one opened FFmpeg encoder ----------------------------------------------------


class EncoderSession(Protocol):
    """One opened encoder.  ``encode(None)`` drains it (after which it takes no more frames)."""

    name: str
    hardware: bool

    def encode(
        self, frame: av.VideoFrame | None, *, keyframe: bool = False
    ) -> list[av.Packet[Any]]:
        """Encode one yuv420p frame; ``keyframe`` makes it an IDR."""
        ...

    def set_bitrate(self, bitrate: int) -> None:
        """Retarget rate control in place, from the next frame."""
        ...

    def close(self) -> None: ...


#: ``opener(config, codec_name, bitrate, peak)`` opens a session; raises EncodingError.
#: ``bitrate`` is the rate to start at, ``peak`` the highest it will ever be set to in place.
SessionOpener = Callable[[EncoderConfig, str, int, int], EncoderSession]


class FFmpegSession:
    """An FFmpeg encoder opened for low latency, fed yuv420p frames."""

    def __init__(self, config: EncoderConfig, name: str, bitrate: int, peak: int) -> None:
        self.name = name
        self.hardware = name != SOFTWARE_ENCODER
        self._pix_fmt = pick_pixel_format(name)
        self._reformatter = av.video.reformatter.VideoReformatter()
        # The last parameter sets seen, for encoders that only send them with the first IDR.
        self._parameter_sets: list[bytes] = []
        try:
            context: Any = av.CodecContext.create(name, "w")
        except (av.error.FFmpegError, ValueError) as exc:  # unknown codec name
            raise EncodingError(f"encoder {name!r} is not available: {exc}") from exc
        threads = config.threads or encoder_threads(
            config.width, config.height, config.framerate, _cores()
        )
        context.width = config.width
        context.height = config.height
        context.pix_fmt = self._pix_fmt
        context.time_base = TIME_BASE
        context.framerate = config.framerate
        context.gop_size = config.keyframe_interval
        context.max_b_frames = 0
        context.thread_count = threads
        if threads > 1:
            context.thread_type = "SLICE"  # frame threads would add a frame of delay per thread
        # Opened in CBR mode at the peak so every later rate is an in-place VBV change (see
        # shared.media.rate_control); "maxrate"/"bufsize" are the generic AVCodecContext options, so
        # FFmpeg's per-frame reconfigure sees the same VBV x264 was opened with.
        context.bit_rate = peak
        # The buffer is sized at the ceiling (peak / MAX_GAIN): it cannot move in place either.
        options = {"maxrate": str(peak), "bufsize": str(vbv_buffer_bits(int(peak / MAX_GAIN)))}
        if self.hardware:
            options |= HARDWARE_OPTIONS.get(name, {})
        else:
            keyint = config.keyframe_interval
            options |= {
                "preset": config.preset,
                # zerolatency: no frame-level lookahead or B-frames, sliced threads.
                "tune": "zerolatency",
                # A picture marked I becomes an IDR, so a viewer's keyframe request really resets.
                "forced-idr": "1",
                "x264-params": ":".join(
                    [
                        "repeat-headers=1",  # SPS/PPS before every IDR (see module docstring)
                        "annexb=1",
                        f"keyint={keyint}",
                        f"min-keyint={keyint}",
                        # Scene cuts are found by shared.media.rate_control for every encoder alike.
                        "scenecut=0",
                    ]
                ),
            }
        context.options = options
        try:
            context.open()
        except av.error.FFmpegError as exc:
            raise EncodingError(
                f"cannot open {name} at {config.width}x{config.height}: {exc}"
            ) from exc
        self._context: Any = context
        self._bitrate = -1
        self.set_bitrate(bitrate)

    def set_bitrate(self, bitrate: int) -> None:
        if bitrate != self._bitrate:
            self._bitrate = bitrate
            self._context.bit_rate = bitrate

    def encode(
        self, frame: av.VideoFrame | None, *, keyframe: bool = False
    ) -> list[av.Packet[Any]]:
        if frame is not None:
            if frame.format.name != self._pix_fmt:
                converted = self._reformatter.reformat(frame, format=self._pix_fmt)
                converted.pts = frame.pts
                if frame.time_base is not None:
                    converted.time_base = frame.time_base
                frame = converted
            # NONE lets the encoder choose; I (with forced-idr) makes this frame an IDR.
            frame.pict_type = (
                av.video.frame.PictureType.I if keyframe else av.video.frame.PictureType.NONE
            )
        packets: list[av.Packet[Any]] = list(self._context.encode(frame))
        return packets

    def parameter_sets(self, data: bytes, keyframe: bool) -> bytes:
        """``data`` with SPS/PPS in front if it is an IDR without them (some hardware encoders
        send them only once); the sets seen last are remembered for that."""
        if not self.hardware:
            return data  # libx264 repeats them itself (repeat-headers)
        nal_units = split_annexb(data)
        types = [nal[0] & 0x1F for nal in nal_units]
        if NAL_SPS in types:
            self._parameter_sets = [
                n for n, t in zip(nal_units, types, strict=True) if t in (NAL_SPS, NAL_PPS)
            ]
            return data
        if keyframe and NAL_IDR in types and self._parameter_sets:
            return b"".join(b"\x00\x00\x00\x01" + n for n in self._parameter_sets) + data
        return data

    def close(self) -> None:
        self._context = None


def open_session(config: EncoderConfig, name: str, bitrate: int, peak: int) -> FFmpegSession:
    return FFmpegSession(config, name, bitrate, peak)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --- capabilities ----------------------------------------------------------------------------


class _ProbeSession:
    """A session opened the way a stream opens one, for the probe (frames at 30 fps)."""

    def __init__(self, name: str, width: int, height: int) -> None:
        config = EncoderConfig(
            width=width, height=height, framerate=30, bitrate=500_000, keyframe_interval=30
        )
        self._session = open_session(config, name, 500_000, 500_000)

    def encode(
        self, frame: av.VideoFrame | None, *, keyframe: bool = False
    ) -> list[av.Packet[Any]]:
        return self._session.encode(frame, keyframe=keyframe)

    def close(self) -> None:
        self._session.close()


_accelerator = HardwareAccelerator(_ProbeSession)


def get_encoder_capabilities(*, refresh: bool = False) -> EncoderCapabilities:
    """Every H.264 encoder and decoder of this FFmpeg build, probed for real on this machine
    (once per process unless ``refresh``)."""
    return _accelerator.capabilities(refresh=refresh)


# --- encoder ---------------------------------------------------------------------------------


class H264Encoder:
    """Low-latency H.264 encoder: no B-frames, no lookahead, one access unit out per frame in."""

    def __init__(
        self,
        config: EncoderConfig,
        *,
        opener: SessionOpener = open_session,
        accelerator: HardwareAccelerator | None = None,
    ) -> None:
        self.config = config
        self._opener = opener
        self._accelerator = accelerator or _accelerator
        target = _clamp_bitrate(config.bitrate)
        self._ceiling = max(_clamp_bitrate(config.max_bitrate or target), target)
        self._adjuster = BitrateAdjuster(target)
        # Requests counted, not flagged: one arriving from another thread while a frame is being
        # encoded then still marks the next frame, instead of being cleared with this one.
        self._keyframe_requests = 0
        self._keyframe_requests_served = 0
        #: Why the session must be replaced before the next frame (None: it need not be).
        self._reopen: str | None = None
        #: The encoder the next session should be (None: the current one).
        self._switch_to: str | None = None
        self.frames_encoded = 0
        self.keyframes_encoded = 0
        self.hardware_fallbacks = 0
        self.reconfigurations = 0
        self.fallback_reason: str | None = None
        self._session = self._open(self._resolve(config.codec))

    # -- the design's VideoCodec -----------------------------------------------------------

    def get_encoder_capabilities(self) -> EncoderCapabilities:
        return self._accelerator.capabilities()

    def enable_hardware_acceleration(self) -> bool:
        """Move to the best hardware encoder that works here, from the next frame (an IDR).
        False, and nothing changes, when there is none."""
        capabilities = self.get_encoder_capabilities()
        if not capabilities.hardware_available:
            return False
        if self._session.name != capabilities.chosen:
            self._switch_to = capabilities.chosen
            self._reopen = f"hardware acceleration enabled: {capabilities.chosen}"
        return True

    def configure_encoder(self, config: EncoderConfig) -> bool:
        """Apply a new configuration; True when it takes a new session (at the next frame, an
        IDR), False when it was applied in place (a bitrate at or below the ceiling)."""
        previous = self.config
        self.config = config
        target = _clamp_bitrate(config.bitrate)
        ceiling = _clamp_bitrate(config.max_bitrate or target)
        structural = (
            (config.width, config.height, config.framerate)
            != (previous.width, previous.height, previous.framerate)
            or (config.keyframe_interval, config.preset, config.threads)
            != (previous.keyframe_interval, previous.preset, previous.threads)
            or config.codec != previous.codec
            or max(ceiling, target) > self._ceiling
        )
        self._adjuster.set_target(target)
        if config.codec != previous.codec:
            self._switch_to = self._resolve(config.codec)
        if structural:
            self._ceiling = max(ceiling, target)
            self._reopen = "reconfigured"
            return True
        self._apply_rate()
        return False

    configure = configure_encoder

    def encode_frame(
        self, frame: av.VideoFrame, *, pts: int, capture_us: int, keyframe: bool = False
    ) -> list[EncodedFrame]:
        """Encode one yuv420p picture of the configured size; ``keyframe`` forces an IDR."""
        if self._reopen is not None:
            self._replace_session()
        width, height = self.config.width, self.config.height
        if (frame.width, frame.height) != (width, height):
            raise EncodingError(
                f"frame of {frame.width}x{frame.height} does not match the encoder's "
                f"{width}x{height}; scale it first (shared.media.scaler.QualityScaler)"
            )
        frame.pts = pts
        frame.time_base = TIME_BASE
        requests = self._keyframe_requests
        force = keyframe or requests != self._keyframe_requests_served
        self._keyframe_requests_served = requests
        packets = self._encode(frame, force, pts)
        out = []
        for packet in packets:
            is_keyframe = bool(packet.is_keyframe)
            data = bytes(packet)
            if isinstance(self._session, FFmpegSession):
                data = self._session.parameter_sets(data, is_keyframe)
            packet_pts = int(packet.pts) if packet.pts is not None else pts
            out.append(
                EncodedFrame(
                    data=data,
                    pts=packet_pts,
                    keyframe=is_keyframe,
                    capture_us=capture_us,
                    qp=packet_qp(packet),
                )
            )
            self.frames_encoded += 1
            self.keyframes_encoded += is_keyframe
            self._adjuster.observe(
                packet_pts * TIME_BASE.numerator / TIME_BASE.denominator, len(data)
            )
        self._apply_rate()
        return out

    def encode(
        self, pixels: np.ndarray, *, pts: int, capture_us: int, keyframe: bool = False
    ) -> list[EncodedFrame]:
        """Encode one yuv420p picture given as a flat I420 buffer of width*height*3/2 bytes.

        The buffer must not change until this returns.
        """
        width, height = self.config.width, self.config.height
        if pixels.size != width * height * 3 // 2:
            raise EncodingError(
                f"frame of {pixels.size} bytes does not match {width}x{height} yuv420p"
            )
        shaped = np.ascontiguousarray(pixels).reshape(height * 3 // 2, width)
        # libx264 copies the picture before encode returns, so wrapping the caller's buffer is
        # safe; a hardware encoder may hold on to it after returning, so it gets a copy.
        frame = (
            av.VideoFrame.from_ndarray(shaped, format="yuv420p")
            if self.hardware
            else av.VideoFrame.from_numpy_buffer(shaped, format="yuv420p")
        )
        return self.encode_frame(frame, pts=pts, capture_us=capture_us, keyframe=keyframe)

    # -- control ---------------------------------------------------------------------------

    @property
    def bitrate(self) -> int:
        """The target bitrate."""
        return self._adjuster.target

    @property
    def encoder_bitrate(self) -> int:
        """The rate the encoder is configured with now (target times the adjuster's gain)."""
        return min(self._adjuster.encoder_bitrate, self._peak())

    @property
    def measured_bitrate(self) -> int:
        """What the encoder produced over the last two seconds of stream time."""
        return self._adjuster.measured_bitrate()

    @property
    def codec_name(self) -> str:
        return self._session.name

    @property
    def hardware(self) -> bool:
        return self._session.hardware

    def set_bitrate(self, bitrate: int) -> int:
        """Retarget the rate control; returns the bitrate applied (clamped).

        At or below the ceiling it applies in place from the next frame; above it the encoder
        reopens at the next frame (an IDR) with the new bitrate as its ceiling.
        """
        if bitrate <= 0:
            raise EncoderConfigError(f"bitrate {bitrate} must be positive")
        applied = _clamp_bitrate(bitrate)
        ceiling = self.config.max_bitrate
        self.config = msgspec.structs.replace(
            self.config, bitrate=applied, max_bitrate=max(applied, ceiling) if ceiling else None
        )
        self._adjuster.set_target(applied)
        if applied > self._ceiling:
            self._ceiling = applied
            self._reopen = f"bitrate {applied} above the ceiling"
        else:
            self._apply_rate()
        return applied

    def request_keyframe(self) -> None:
        """Make the next encoded frame an IDR (a viewer's PLI, or a recording starting)."""
        self._keyframe_requests += 1

    def close(self) -> None:
        self._session.close()

    # -- internals -------------------------------------------------------------------------

    def _peak(self) -> int:
        return int(self._ceiling * MAX_GAIN)

    def _resolve(self, codec: str) -> str:
        if codec == "auto":
            return self.get_encoder_capabilities().chosen
        return codec

    def _open(self, name: str) -> EncoderSession:
        config = self.config
        rate = min(self._adjuster.encoder_bitrate, self._peak())
        try:
            return self._opener(config, name, rate, self._peak())
        except EncodingError as exc:
            if name not in HARDWARE_ENCODERS or not config.fallback:
                raise
            self._fell_back(f"{name} did not open: {exc}")
        return self._opener(config, SOFTWARE_ENCODER, rate, self._peak())

    def _fell_back(self, reason: str) -> None:
        logger.warning("falling back to %s: %s", SOFTWARE_ENCODER, reason)
        self.hardware_fallbacks += 1
        self.fallback_reason = reason

    def _replace_session(self) -> None:
        reason, self._reopen = self._reopen, None
        name, self._switch_to = self._switch_to or self._session.name, None
        logger.info("reopening the encoder (%s) as %s", reason, name)
        self._session.close()
        self._session = self._open(name)
        self.reconfigurations += 1

    def _encode(self, frame: av.VideoFrame, keyframe: bool, pts: int) -> list[av.Packet[Any]]:
        session = self._session
        try:
            return session.encode(frame, keyframe=keyframe)
        except av.error.FFmpegError as exc:
            if not (session.hardware and self.config.fallback):
                raise EncodingError(f"{session.name} failed on frame pts={pts}: {exc}") from exc
            self._fell_back(f"{session.name} failed mid-stream at pts={pts}: {exc}")
        session.close()
        self._session = self._open(SOFTWARE_ENCODER)
        # The same frame again, from the new session: an IDR, so viewers resume right here.
        try:
            return self._session.encode(frame, keyframe=True)
        except av.error.FFmpegError as exc:
            raise EncodingError(f"{SOFTWARE_ENCODER} failed on frame pts={pts}: {exc}") from exc

    def _apply_rate(self) -> None:
        self._session.set_bitrate(self.encoder_bitrate)


# --- decoder ---------------------------------------------------------------------------------


class H264Decoder:
    """H.264 decoder fed Annex B access units; counts what it could not decode.

    ``hardware=True`` decodes on the best hardware path the probe found (software when there is
    none); a name picks one path (``"h264+cuda"``, ``"h264_cuvid"``).  A hardware decoder that
    fails is replaced by the software one, which resynchronises at the next keyframe.
    """

    def __init__(
        self, *, hardware: bool | str = False, capabilities: EncoderCapabilities | None = None
    ) -> None:
        path = SOFTWARE_DECODER
        if hardware is True:
            path = (capabilities or get_encoder_capabilities()).chosen_decoder
        elif isinstance(hardware, str) and hardware:
            path = hardware
        self.frames_decoded = 0
        self.decode_errors = 0
        self.hardware_fallbacks = 0
        self.fallback_reason: str | None = None
        self.path = SOFTWARE_DECODER
        self._context: Any = av.CodecContext.create(SOFTWARE_DECODER, "r")
        if path != SOFTWARE_DECODER:
            try:
                self._context = open_decoder_context(path)
                self.path = path
            except (av.error.FFmpegError, ValueError) as exc:
                self._fell_back(f"{path} did not open: {exc}")

    @property
    def hardware(self) -> bool:
        return self.path != SOFTWARE_DECODER

    def decode(self, access_unit: bytes, *, pts: int | None = None) -> list[av.VideoFrame]:
        packet = av.Packet(access_unit)
        if pts is not None:
            packet.pts = pts
            packet.time_base = TIME_BASE
        try:
            frames: list[av.VideoFrame] = list(self._context.decode(packet))
        except av.error.FFmpegError as exc:
            if self.hardware:
                self._fell_back(f"{self.path} failed: {exc}")
                self.path = SOFTWARE_DECODER
                self._context = av.CodecContext.create(SOFTWARE_DECODER, "r")
                return self.decode(access_unit, pts=pts)
            # The assembler never hands us an incomplete frame, so this means corrupt input
            # from the sender; count it and let the next keyframe resynchronise.
            self.decode_errors += 1
            return []
        self.frames_decoded += len(frames)
        return frames

    decode_frame = decode

    def _fell_back(self, reason: str) -> None:
        logger.warning("decoding in software: %s", reason)
        self.hardware_fallbacks += 1
        self.fallback_reason = reason
