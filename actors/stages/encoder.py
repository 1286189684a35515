"""EncoderActor: encodes the newest pooled frame once per rung, for every viewer and the recorder.

Capture announces each new sequence number; the actor coalesces announcements and always
encodes the newest frame (latest-frame semantics: a slow encoder drops frames, it never queues
them).  Encoding runs on worker threads so the actor keeps answering keyframe requests and
stats calls.

A stream has one rung (its quality) or a ladder of them (``StreamConfig.rungs``, planned by
:func:`shared.media.scaler.plan_ladder`).  Each rung has its own encoder and packet ring: rung 0
writes ``segment_name(session, "video")``, rung ``n`` writes ``segment_name(session,
f"video{n}")`` (:func:`ladder_ring_names`).  Per frame the source picture is scaled once per
rung, the rungs are encoded in parallel (one worker thread each, as many as there are cores),
and each access unit goes into its rung's ring; subscribers of that rung are told its sequence
number.  Rung 0 subscribers get ``packets_ready(sequence)``; subscribers of another rung, or of
every rung, get ``packets_ready(sequence, rung)``.

A scene cut in the source (``shared.media.rate_control.SceneCutDetector``) makes every rung start an
IDR on the same frame, so the rungs' switching points line up.

Control calls that change an encoder (bitrate, configuration) wait for the rung's encode in
flight to finish, so an encoder is only ever touched by one thread at a time; a keyframe request
only sets a flag and never waits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

from shared.errors import ConfigError, EncodingError
from shared.media.codec import (
    TIME_BASE,
    EncodedFrame,
    EncoderConfig,
    H264Encoder,
    SessionOpener,
    get_encoder_capabilities,
    open_session,
)
from shared.media.hwaccel import SOFTWARE_ENCODER, EncoderCapabilities, needs_gpu
from shared.media.rate_control import MAX_GAIN, SceneCutDetector
from shared.media.scaler import FrameDecimator, QualityScaler, Rung, plan_ladder
from shared.models import PixelFormat, QualityPreset, StreamQuality
from shared.pool.frame_pool import FramePool, FramePoolReader, FrameRead
from shared.pool.packet_ring import PacketRing
from shared.pool.shm import segment_name

if TYPE_CHECKING:
    from actors.handles import PacketSubscriber

logger = logging.getLogger(__name__)

#: Packet ring size: room for several GOPs so a briefly stalled sender or recorder catches up.
RING_SECONDS = 4.0
MIN_RING_BYTES = 8 << 20
#: The window the stats' fps and bitrate are measured over.
STATS_WINDOW_S = 2.0


def ladder_ring_names(session_id: str, rungs: Sequence[Rung] | int) -> list[str]:
    """The packet ring of each rung, rung 0 first (``rungs``: the planned rungs, or how many)."""
    count = rungs if isinstance(rungs, int) else len(rungs)
    if count < 1:
        raise ConfigError("a stream has at least one rung")
    return [segment_name(session_id, "video" if n == 0 else f"video{n}") for n in range(count)]


def encoder_actor_options(
    choice: EncoderCapabilities | str | bool, *, node_gpus: float
) -> dict[str, Any]:
    """Ray options for the encoder actor: a GPU when the encoder needs one.

    ``choice`` is the probe's result for that node, an encoder name, or simply whether the
    stream asks for hardware acceleration (the actor then probes once placed, and needs the
    GPU visible to find NVENC: Ray hides GPUs from actors that did not ask for one).
    ``node_gpus`` is the ``GPU`` resource of the node the stream is pinned to; without one no
    GPU is asked for, since a hard node affinity plus a GPU the node lacks never schedules.
    """
    if isinstance(choice, EncoderCapabilities):
        wanted = needs_gpu(choice.chosen)
    elif isinstance(choice, str):
        wanted = needs_gpu(choice)
    else:
        wanted = choice
    return {"num_gpus": 1} if wanted and node_gpus >= 1 else {}


def ring_capacity(bitrate: int) -> int:
    """Bytes for a rung's ring: RING_SECONDS at the highest rate its encoder may reach, twice."""
    return max(MIN_RING_BYTES, int(bitrate * MAX_GAIN / 8 * RING_SECONDS) * 2)


class RungStats(msgspec.Struct, kw_only=True):
    index: int
    width: int
    height: int
    framerate: int
    ring: str
    codec: str
    hardware: bool
    target_bitrate: int
    #: The rate the encoder is set to (target times the rate adjuster's gain).
    encoder_bitrate: int
    #: What the rung produced over the last two seconds.
    bitrate: int
    fps: float
    frames_encoded: int
    keyframes: int
    encode_ms: float
    hardware_fallbacks: int
    reconfigurations: int
    #: CPU milliseconds per frame spent scaling and encoding this rung.
    encode_cpu_ms: float = 0.0


class EncoderStats(msgspec.Struct, kw_only=True):
    """Rung 0's figures (the stream as a single-rung viewer sees it), plus every rung."""

    pid: int
    frames_encoded: int
    keyframes: int
    frames_dropped: int
    fps: float
    average_fps: float
    bitrate: int
    target_bitrate: int
    encode_ms: float
    error: str | None = None
    codec: str = SOFTWARE_ENCODER
    hardware: bool = False
    #: Switches from a failed hardware encoder to libx264, over all rungs.
    hardware_fallbacks: int = 0
    fallback_reason: str | None = None
    #: Encoder reopens for a new size, frame rate, codec or ceiling, over all rungs.
    reconfigurations: int = 0
    scene_cuts: int = 0
    keyframe_requests: int = 0
    rungs: list[RungStats] = msgspec.field(default_factory=list)


@dataclasses.dataclass
class _Rung:
    rung: Rung
    encoder: H264Encoder
    ring: PacketRing
    decimator: FrameDecimator
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    recent: collections.deque[tuple[float, int]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=600)
    )
    encode_seconds: float = 0.0
    #: CPU time the worker thread spent scaling and encoding (the rest is waiting).
    encode_cpu_seconds: float = 0.0


class EncoderActor:
    def __init__(
        self,
        session_id: str,
        quality: StreamQuality,
        keyframe_interval_s: float,
        pool_name: str,
        ring_name: str,
        rungs: tuple[QualityPreset, ...] = (),
        *,
        codec: str | None = None,
        opener: SessionOpener | None = None,
    ) -> None:
        """``codec`` pins an FFmpeg encoder (default: ``"auto"`` when the quality asks for
        hardware acceleration, else libx264); ``opener`` replaces how encoders are opened."""
        self._session_id = session_id
        self._codec = codec
        self._quality = quality
        self._keyframe_interval_s = keyframe_interval_s
        self._pool_name = pool_name
        self._ring_name = ring_name
        self._presets = tuple(rungs)
        self._opener = opener or open_session
        self._rungs: list[_Rung] = []
        #: name -> (handle, rung index, or None for every rung)
        self._subscribers: dict[str, tuple[PacketSubscriber[Any], int | None]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._scaler = QualityScaler()
        self._cuts = SceneCutDetector()
        self._dropped = 0
        self._keyframe_requests = 0
        self._origin_us: int | None = None
        self._first_frame_at = 0.0
        self._last_pts = -1
        self._error: str | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self) -> int:
        plan = plan_ladder(self._quality, self._presets)
        for reason in plan.dropped:
            logger.info("stream %s: rung left out: %s", self._session_id, reason)
        names = ladder_ring_names(self._session_id, plan.rungs)
        names[0] = self._ring_name
        codec = self._codec or ("auto" if self._quality.hardware_acceleration else SOFTWARE_ENCODER)
        self._pool = FramePool.attach(self._pool_name)
        self._reader = FramePoolReader(self._pool)
        self._buffer = np.empty(self._pool.slot_bytes, dtype=np.uint8)
        try:
            for rung, name in zip(plan.rungs, names, strict=True):
                self._rungs.append(await asyncio.to_thread(self._open_rung, rung, name, codec))
        except BaseException:
            for state in self._rungs:
                state.ring.close()
                state.ring.unlink()
                state.encoder.close()
            self._pool.close()
            raise
        cores = len(os.sched_getaffinity(0))
        self._executor = ThreadPoolExecutor(
            max(1, min(len(self._rungs), cores)), thread_name_prefix=f"encode-{self._session_id}"
        )
        self._task = asyncio.create_task(self._run(), name="encode")
        return os.getpid()

    def _open_rung(self, rung: Rung, ring_name: str, codec: str) -> _Rung:
        config = EncoderConfig(
            width=rung.width,
            height=rung.height,
            framerate=rung.framerate,
            bitrate=rung.bitrate,
            keyframe_interval=self._keyframe_frames(rung.framerate),
            codec=codec,
            # Lower rungs are small: slices would cost bits and buy no latency there.
            threads=0 if rung.index == 0 else 1,
        )
        encoder = H264Encoder(config, opener=self._opener)
        try:
            ring = PacketRing.create(ring_name, capacity_bytes=ring_capacity(rung.bitrate))
        except BaseException:
            encoder.close()
            raise
        return _Rung(
            rung=rung, encoder=encoder, ring=ring, decimator=FrameDecimator(rung.framerate)
        )

    def _keyframe_frames(self, framerate: int) -> int:
        return max(1, round(self._keyframe_interval_s * framerate))

    async def stop(self) -> EncoderStats:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            # An encode still running on a worker must finish before its encoder closes.
            await asyncio.to_thread(self._executor.shutdown, True)
        stats = await self.stats()
        self._pool.close()
        for state in self._rungs:
            state.ring.close()
            state.ring.unlink()
            state.encoder.close()
        return stats

    # --- subscribers and requests ----------------------------------------------------------

    def subscribe(self, name: str, handle: PacketSubscriber[Any], rung: int | None = 0) -> None:
        """Notify ``handle`` of new packets in ``rung``'s ring (None: every rung's)."""
        if rung is not None and not 0 <= rung < len(self._rungs):
            raise ConfigError(f"stream {self._session_id} has no rung {rung}")
        self._subscribers[name] = (handle, rung)

    def unsubscribe(self, name: str) -> None:
        self._subscribers.pop(name, None)

    def frame_ready(self, sequence: int) -> None:
        self._wakeup.set()

    def request_keyframe(self, rung: int | None = 0) -> None:
        """An IDR on the next frame of ``rung`` (None: every rung), e.g. for a viewer's PLI."""
        self._keyframe_requests += 1
        for state in self._rungs if rung is None else [self._rung(rung)]:
            state.encoder.request_keyframe()

    def rung_names(self) -> list[str]:
        """Each rung's packet ring, rung 0 first."""
        return [state.ring.name for state in self._rungs]

    def ladder(self) -> list[Rung]:
        return [state.rung for state in self._rungs]

    # --- the design's VideoCodec, per stream ------------------------------------------------

    async def set_bitrate(self, bitrate: int, rung: int = 0) -> int:
        state = self._rung(rung)
        async with state.lock:
            return state.encoder.set_bitrate(bitrate)

    async def configure(self, quality: StreamQuality) -> StreamQuality:
        """Make rung 0 encode at ``quality``.

        A bitrate at or below the current ceiling applies in place and reaches the output
        within about a second; a new size, frame rate, higher ceiling or a change of hardware
        acceleration reopens the encoder at the next frame, which is an IDR, with timestamps
        running on.  Frames in the pool keep the capture's size and are scaled to the new one;
        a frame rate above the capture's yields the capture's rate.
        """
        state = self._rungs[0]
        hardware_changed = quality.hardware_acceleration != self._quality.hardware_acceleration
        codec = "auto" if quality.hardware_acceleration else SOFTWARE_ENCODER
        async with state.lock:
            config = msgspec.structs.replace(
                state.encoder.config,
                width=quality.resolution.width,
                height=quality.resolution.height,
                framerate=quality.framerate,
                bitrate=quality.bitrate,
                max_bitrate=quality.bitrate,
                keyframe_interval=self._keyframe_frames(quality.framerate),
                codec=codec if hardware_changed else state.encoder.config.codec,
            )
            await asyncio.to_thread(state.encoder.configure_encoder, config)
            if quality.framerate != state.rung.framerate:
                state.decimator = FrameDecimator(quality.framerate)
            state.rung = Rung.top(quality)
        if hardware_changed:
            for other in self._rungs[1:]:
                async with other.lock:
                    other_config = msgspec.structs.replace(other.encoder.config, codec=codec)
                    await asyncio.to_thread(other.encoder.configure_encoder, other_config)
        self._quality = quality
        return quality

    async def enable_hardware_acceleration(self) -> bool:
        """Move every rung to the best hardware encoder that works on this node (False: none)."""
        enabled = False
        for state in self._rungs:
            async with state.lock:
                enabled = await asyncio.to_thread(state.encoder.enable_hardware_acceleration)
        if enabled:
            self._quality = msgspec.structs.replace(self._quality, hardware_acceleration=True)
        return enabled

    async def capabilities(self, refresh: bool = False) -> EncoderCapabilities:
        """Every H.264 encoder and decoder of this node, probed for real."""
        return await asyncio.to_thread(get_encoder_capabilities, refresh=refresh)

    def _rung(self, index: int) -> _Rung:
        if not 0 <= index < len(self._rungs):
            raise ConfigError(f"stream {self._session_id} has no rung {index}")
        return self._rungs[index]

    # --- the encode loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            took = False
            while True:
                # A frame that arrived during the last encode is taken at once, without
                # waiting for its announcement to come through Ray.
                if not took or self._reader.latest_sequence() <= self._reader.last_sequence:
                    await self._wakeup.wait()
                self._wakeup.clear()
                took = await self._encode_latest()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("encoder of %s failed", self._session_id)
            self._error = f"{type(exc).__name__}: {exc}"

    async def _encode_latest(self) -> bool:
        """Encode the newest frame; False when there was none to take."""
        # libx264 copies each picture into its own buffers before encode returns, and the next
        # frame is read only once every rung is done with this one, so one buffer serves every
        # frame (no 1.4 MB allocation and page faults per 720p frame).  A hardware encoder may
        # still hold the picture after returning: it gets a fresh copy each time.
        reuse = not any(state.encoder.hardware for state in self._rungs)
        frame = self._reader.read_latest(out=self._buffer if reuse else None)
        if frame is None:
            return False
        if frame.pixel_format is not PixelFormat.YUV420P:
            raise EncodingError(
                f"the frame pool holds {frame.pixel_format}; encoding needs yuv420p"
            )
        self._dropped += frame.missed
        if self._origin_us is None:
            self._origin_us = frame.capture_us
            self._first_frame_at = time.monotonic()
        # pts on the 90 kHz clock from capture time; forced monotonic in case the wall
        # clock steps backwards.
        pts = max(
            (frame.capture_us - self._origin_us) * TIME_BASE.denominator // 1_000_000,
            self._last_pts + 1,
        )
        self._last_pts = pts
        width, height = frame.width, frame.height
        seconds = pts / TIME_BASE.denominator
        cut = self._cuts.observe(frame.pixels[: width * height].reshape(height, width), seconds)
        due = [state for state in self._rungs if state.decimator.admit(pts)]
        await asyncio.gather(*(self._encode_rung(state, frame, pts, cut) for state in due))
        return True

    async def _encode_rung(self, state: _Rung, source: FrameRead, pts: int, cut: bool) -> None:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        async with state.lock:
            started = time.perf_counter()
            encoded = await loop.run_in_executor(
                self._executor, self._scale_and_encode, state, source, pts, cut
            )
            state.encode_seconds += time.perf_counter() - started
        sequence = 0
        now = time.monotonic()
        for access_unit in encoded:
            sequence = state.ring.append(
                access_unit.data,
                pts=access_unit.pts,
                capture_us=access_unit.capture_us,
                keyframe=access_unit.keyframe,
            )
            state.recent.append((now, len(access_unit.data)))
            if access_unit.keyframe and state.rung.index == 0:
                self._cuts.keyframe_sent(access_unit.pts / TIME_BASE.denominator)
        if sequence:
            self._notify(state.rung.index, sequence)

    def _scale_and_encode(
        self, state: _Rung, source: FrameRead, pts: int, cut: bool
    ) -> list[EncodedFrame]:
        """On a worker thread: this rung's picture, scaled once, then encoded."""
        started = time.thread_time()
        picture = self._scaler.picture(source.pixels, source.width, source.height, state.rung)
        encoded = state.encoder.encode_frame(
            picture, pts=pts, capture_us=source.capture_us, keyframe=cut
        )
        state.encode_cpu_seconds += time.thread_time() - started
        return encoded

    def _notify(self, index: int, sequence: int) -> None:
        for handle, rung in self._subscribers.values():
            if rung == index == 0:
                handle.packets_ready(sequence)  # the single-rung signature
            elif rung is None or rung == index:
                handle.packets_ready(sequence, index)

    # --- stats ---------------------------------------------------------------------------------

    def _rung_stats(self, state: _Rung, now: float) -> RungStats:
        window = [(t, n) for t, n in state.recent if now - t <= STATS_WINDOW_S]
        span = (window[-1][0] - window[0][0]) if len(window) > 1 else 0.0
        encoder = state.encoder
        frames = encoder.frames_encoded
        return RungStats(
            index=state.rung.index,
            width=state.rung.width,
            height=state.rung.height,
            framerate=state.rung.framerate,
            ring=state.ring.name,
            codec=encoder.codec_name,
            hardware=encoder.hardware,
            target_bitrate=encoder.bitrate,
            encoder_bitrate=encoder.encoder_bitrate,
            bitrate=int(sum(n for _, n in window[1:]) * 8 / span) if span > 0 else 0,
            fps=(len(window) - 1) / span if span > 0 else 0.0,
            frames_encoded=frames,
            keyframes=encoder.keyframes_encoded,
            encode_ms=state.encode_seconds * 1000 / frames if frames else 0.0,
            hardware_fallbacks=encoder.hardware_fallbacks,
            reconfigurations=encoder.reconfigurations,
            encode_cpu_ms=state.encode_cpu_seconds * 1000 / frames if frames else 0.0,
        )

    async def stats(self) -> EncoderStats:
        now = time.monotonic()
        rungs = [self._rung_stats(state, now) for state in self._rungs]
        top = rungs[0]
        reasons = [s.encoder.fallback_reason for s in self._rungs if s.encoder.fallback_reason]
        return EncoderStats(
            pid=os.getpid(),
            frames_encoded=top.frames_encoded,
            keyframes=top.keyframes,
            frames_dropped=self._dropped,
            fps=top.fps,
            average_fps=(top.frames_encoded - 1) / (now - self._first_frame_at)
            if top.frames_encoded > 1
            else 0.0,
            bitrate=top.bitrate,
            target_bitrate=top.target_bitrate,
            encode_ms=top.encode_ms,
            error=self._error,
            codec=top.codec,
            hardware=top.hardware,
            hardware_fallbacks=sum(r.hardware_fallbacks for r in rungs),
            fallback_reason=reasons[-1] if reasons else None,
            reconfigurations=sum(r.reconfigurations for r in rungs),
            scene_cuts=self._cuts.cuts,
            keyframe_requests=self._keyframe_requests,
            rungs=rungs,
        )
