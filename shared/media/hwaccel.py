"""Which H.264 encoders and decoders work on this machine, found by trying each one for real.

The design's HardwareAccelerator.  A codec being compiled into FFmpeg says little: h264_nvenc is
in most builds and needs an NVIDIA driver and an NVENC unit (H100 and H200 cards have none),
h264_qsv needs an Intel media driver, h264_v4l2m2m a mem2mem device node.  So each candidate is
opened and fed a real frame (the test pattern) until it returns a packet; whatever stops it is
recorded as the reason, with FFmpeg's own log lines, which name the missing library or device.
Each probe runs on its own thread with a time limit, because a driver can hang in open.

Decoders are probed the same way: FFmpeg's h264 decoder with each hardware device type the
build knows (``cuda``, ``vaapi``, ...), and the dedicated hardware decoders (``h264_cuvid``,
``h264_qsv``), each given a real IDR to decode.

Nothing here imports Ray.  Opening an encoder is the caller's (see :mod:`shared.media.codec`, which
passes its own opener, so the probe exercises exactly the options the stream will use).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any, Final, Literal, Protocol

import av
import av.logging
import msgspec

from shared.capture.testpattern import TestPattern

__all__ = [
    "GPU_ENCODERS",
    "HARDWARE_DECODERS",
    "HARDWARE_ENCODERS",
    "SOFTWARE_DECODER",
    "SOFTWARE_ENCODER",
    "DecoderCandidate",
    "EncoderCandidate",
    "EncoderCapabilities",
    "HardwareAccelerator",
    "ProbeSession",
    "needs_gpu",
    "open_decoder_context",
    "pick_pixel_format",
]

logger = logging.getLogger(__name__)

#: Hardware H.264 encoders, best first: NVENC and Quick Sync have the lowest latency and the
#: best rate control of these; V4L2 mem2mem (SoC encoders) is the last resort.
HARDWARE_ENCODERS: Final = (
    "h264_nvenc",
    "h264_qsv",
    "h264_vaapi",
    "h264_videotoolbox",
    "h264_amf",
    "h264_v4l2m2m",
)
SOFTWARE_ENCODER: Final = "libx264"
#: Encoders that run on a discrete GPU, which Ray accounts as its ``GPU`` resource; the others
#: use an integrated or SoC block that Ray does not schedule.
GPU_ENCODERS: Final = frozenset({"h264_nvenc", "h264_amf"})
#: Dedicated hardware decoders, tried besides FFmpeg's h264 decoder with each device type.
HARDWARE_DECODERS: Final = ("h264_cuvid", "h264_qsv", "h264_v4l2m2m")
SOFTWARE_DECODER: Final = "h264"

#: Longest one candidate may take to open and encode a frame.
PROBE_TIMEOUT_S: Final = 10.0
#: The probe frame: small, but above every encoder's minimum (NVENC wants >= 145x49).
PROBE_WIDTH: Final = 320
PROBE_HEIGHT: Final = 240


class EncoderCandidate(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    hardware: bool
    #: Opened and encoded a real frame here.
    available: bool
    #: Why not, when it is not available ("" when it is).
    reason: str = ""
    #: How long the probe took.
    probe_ms: float = 0.0


class DecoderCandidate(msgspec.Struct, frozen=True, kw_only=True):
    #: ``h264`` (software), ``h264+<device>`` (FFmpeg's decoder on a hardware device) or a
    #: dedicated decoder such as ``h264_cuvid``.
    name: str
    hardware: bool
    available: bool
    reason: str = ""


class EncoderCapabilities(msgspec.Struct, frozen=True, kw_only=True):
    """The design's EncoderCapabilities: every candidate with the outcome of its probe."""

    encoders: tuple[EncoderCandidate, ...]
    #: The encoder a stream asking for hardware acceleration gets: the best hardware one that
    #: works, else libx264.
    chosen: str
    decoders: tuple[DecoderCandidate, ...] = ()
    #: The decode path a viewer asking for hardware gets.
    chosen_decoder: str = SOFTWARE_DECODER
    ffmpeg: str = ""

    @property
    def hardware_available(self) -> bool:
        return any(c.available and c.hardware for c in self.encoders)

    def candidate(self, name: str) -> EncoderCandidate | None:
        return next((c for c in self.encoders if c.name == name), None)

    def best_encoder(self, *, hardware: bool) -> str:
        """The encoder to use: the chosen one when hardware is wanted, else libx264."""
        return self.chosen if hardware else SOFTWARE_ENCODER


def needs_gpu(encoder: str) -> bool:
    """Whether an actor running ``encoder`` must hold a Ray GPU (see :data:`GPU_ENCODERS`)."""
    return encoder in GPU_ENCODERS


class ProbeSession(Protocol):
    """What the probe needs from an opened encoder."""

    def encode(
        self, frame: av.VideoFrame | None, *, keyframe: bool = False
    ) -> list[av.Packet[Any]]:
        """Encode one frame (None drains the encoder)."""
        ...

    def close(self) -> None: ...


#: Opens encoder ``name`` for ``width`` x ``height`` frames; raises on failure.
EncoderOpener = Callable[[str, int, int], ProbeSession]


def _ffmpeg_version() -> str:
    version = getattr(av, "ffmpeg_version_info", "")
    libavcodec = ".".join(str(part) for part in av.library_versions.get("libavcodec", ()))
    return f"FFmpeg {version} (libavcodec {libavcodec}), PyAV {av.__version__}"


class _StageFailed(Exception):
    """A probe step failed: ``stage`` says which (open, encode)."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(stage)
        self.stage = stage
        self.cause = cause


def _describe(exc: BaseException, logs: Sequence[Any]) -> str:
    """A one-line reason: the step, the error, and FFmpeg's log lines at error level, which
    usually name what is missing ("Cannot load libcuda.so.1")."""
    stage = ""
    if isinstance(exc, _StageFailed):
        stage, exc = f"{exc.stage} failed: ", exc.cause
    # Our own wrappers (EncodingError) carry FFmpeg's error as their cause: report that.
    while not isinstance(exc, av.error.FFmpegError) and isinstance(exc.__cause__, BaseException):
        exc = exc.__cause__
    if isinstance(exc, av.error.FFmpegError):
        message = exc.strerror or str(exc)
    else:
        message = str(exc) or type(exc).__name__
    details: list[str] = []
    for level, _name, text in logs:
        text = str(text).strip()
        if level <= av.logging.ERROR and text and text not in details:
            details.append(text)
    return f"{stage}{message}" + (f" ({'; '.join(details)})" if details else "")


def _run_limited(body: Callable[[], Any], timeout_s: float) -> tuple[Any, str]:
    """Run ``body`` on a thread of its own; (result, "") or (None, reason).

    FFmpeg's error log lines are captured on that thread and folded into the reason.  A probe
    that overruns is abandoned (a daemon thread cannot be killed, only left behind).
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        with av.logging.Capture() as logs:
            try:
                outcome["result"] = body()
            except BaseException as exc:  # any failure of a driver is an answer here
                outcome["error"] = exc
        outcome["logs"] = list(logs)

    thread = threading.Thread(target=target, name="codec-probe", daemon=True)
    previous = av.logging.get_level()
    # FFmpeg's log callback only reaches Capture while PyAV logging is on.
    if previous is None or previous < av.logging.ERROR:
        av.logging.set_level(av.logging.ERROR)
    try:
        thread.start()
        thread.join(timeout_s)
    finally:
        if previous is None or previous < av.logging.ERROR:
            av.logging.set_level(previous)
    if thread.is_alive():
        return None, f"no answer within {timeout_s:g} s (driver hung in open or encode)"
    if "error" in outcome:
        return None, _describe(outcome["error"], outcome.get("logs", ()))
    return outcome.get("result"), ""


def _probe_frame() -> av.VideoFrame:
    pixels = TestPattern(PROBE_WIDTH, PROBE_HEIGHT, 30).render(0, 0)
    frame = av.VideoFrame.from_ndarray(
        pixels.reshape(PROBE_HEIGHT * 3 // 2, PROBE_WIDTH), format="yuv420p"
    )
    frame.pts = 0
    frame.time_base = Fraction(1, 90_000)
    return frame


def _codec_in_build(name: str, mode: Literal["r", "w"]) -> bool:
    try:
        av.Codec(name, mode)
    except (av.error.FFmpegError, ValueError):  # UnknownCodecError is a ValueError
        return False
    return True


class HardwareAccelerator:
    """Probes encoders and decoders once and remembers the answer.

    ``opener`` opens an encoder the way the stream will (``shared.media.codec`` passes its own);
    ``encoders`` is the hardware candidates to try, best first.
    """

    def __init__(
        self,
        opener: EncoderOpener,
        *,
        encoders: Sequence[str] = HARDWARE_ENCODERS,
        timeout_s: float = PROBE_TIMEOUT_S,
    ) -> None:
        self._opener = opener
        self._encoders = tuple(encoders)
        self._timeout_s = timeout_s
        self._capabilities: EncoderCapabilities | None = None
        self._lock = threading.Lock()

    def capabilities(self, *, refresh: bool = False) -> EncoderCapabilities:
        with self._lock:
            if self._capabilities is None or refresh:
                self._capabilities = self._probe()
            return self._capabilities

    def enable(self) -> bool:
        """The design's ``enable_hardware_acceleration``: whether a hardware encoder works."""
        return self.capabilities().hardware_available

    def probe_encoder(self, name: str) -> EncoderCandidate:
        hardware = name != SOFTWARE_ENCODER
        started = time.perf_counter()

        def done(available: bool, reason: str = "") -> EncoderCandidate:
            return EncoderCandidate(
                name=name,
                hardware=hardware,
                available=available,
                reason=reason,
                probe_ms=round((time.perf_counter() - started) * 1000, 2),
            )

        if not _codec_in_build(name, "w"):
            return done(False, "not in this FFmpeg build")

        def attempt() -> int:
            try:
                session = self._opener(name, PROBE_WIDTH, PROBE_HEIGHT)
            except Exception as exc:
                raise _StageFailed("open", exc) from exc
            try:
                packets = session.encode(_probe_frame(), keyframe=True)
                packets += session.encode(None)  # an encoder with delay answers on drain
            except Exception as exc:
                raise _StageFailed("encode", exc) from exc
            finally:
                session.close()
            produced = sum(packet.size for packet in packets)
            if not produced:
                raise RuntimeError("opened, but produced no packet for a frame")
            return produced

        _, reason = _run_limited(attempt, self._timeout_s)
        return done(not reason, reason)

    def probe_decoders(self) -> tuple[DecoderCandidate, ...]:
        sample, sample_failure = _run_limited(self._sample_idr, self._timeout_s)
        names = [f"{SOFTWARE_DECODER}+{d}" for d in av.codec.hwaccel.hwdevices_available()]
        names += HARDWARE_DECODERS
        candidates = []
        for name in names:
            if "+" not in name and not _codec_in_build(name, "r"):
                reason = "not in this FFmpeg build"
            elif not sample:
                reason = f"no sample to decode: {sample_failure}"
            else:
                _, reason = _run_limited(
                    functools.partial(_decode_with, sample, name), self._timeout_s
                )
            candidates.append(
                DecoderCandidate(name=name, hardware=True, available=not reason, reason=reason)
            )
        candidates.append(DecoderCandidate(name=SOFTWARE_DECODER, hardware=False, available=True))
        return tuple(candidates)

    def _sample_idr(self) -> bytes:
        session = self._opener(SOFTWARE_ENCODER, PROBE_WIDTH, PROBE_HEIGHT)
        try:
            packets = session.encode(_probe_frame(), keyframe=True) + session.encode(None)
        finally:
            session.close()
        return b"".join(bytes(packet) for packet in packets)

    def _probe(self) -> EncoderCapabilities:
        encoders = [self.probe_encoder(name) for name in (*self._encoders, SOFTWARE_ENCODER)]
        for candidate in encoders:
            if not candidate.available:
                logger.info("encoder %s unavailable: %s", candidate.name, candidate.reason)
        chosen = next((c.name for c in encoders if c.available and c.hardware), SOFTWARE_ENCODER)
        decoders = self.probe_decoders()
        chosen_decoder = next(
            (d.name for d in decoders if d.available and d.hardware), SOFTWARE_DECODER
        )
        return EncoderCapabilities(
            encoders=tuple(encoders),
            chosen=chosen,
            decoders=decoders,
            chosen_decoder=chosen_decoder,
            ffmpeg=_ffmpeg_version(),
        )


def open_decoder_context(name: str) -> Any:
    """An H.264 decoder context for a decode path named as in :class:`DecoderCandidate`.

    ``h264+<device>`` must really decode on the device: FFmpeg's software fallback is turned
    off, and a context that comes up without the device is refused.
    """
    if name.startswith(f"{SOFTWARE_DECODER}+"):
        device = name.split("+", 1)[1]
        hwaccel = av.codec.hwaccel.HWAccel(device, allow_software_fallback=False)
        context = av.CodecContext.create(SOFTWARE_DECODER, "r", hwaccel=hwaccel)
        return context
    return av.CodecContext.create(name, "r")


def _decode_with(sample: bytes, name: str) -> None:
    """Decode ``sample`` (an IDR) on decode path ``name``; raises unless it really did."""
    context = open_decoder_context(name)
    frames = list(context.decode(av.Packet(sample)))
    frames += list(context.decode(None))
    if "+" in name and not context.is_hwaccel:
        device = name.split("+", 1)[1]
        raise RuntimeError(f"FFmpeg's h264 decoder has no {device} acceleration in this build")
    if not frames:
        raise RuntimeError("decoded no picture from a valid IDR")


def pick_pixel_format(name: str, preferred: Sequence[str] = ("yuv420p", "nv12")) -> str:
    """The pixel format to feed encoder ``name``: yuv420p when it takes it (no conversion),
    else nv12, else yuv420p for encoders that do not say (v4l2m2m)."""
    try:
        formats = [f.name for f in (av.Codec(name, "w").video_formats or ())]
    except (av.error.FFmpegError, ValueError):
        return preferred[0]
    for candidate in preferred:
        if candidate in formats:
            return candidate
    return preferred[0] if not formats else formats[0]
