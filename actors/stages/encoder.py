"""EncoderActor: encodes the newest pooled frame once per rung, for every viewer and the recorder.

A thin shell around :class:`shared.media.ladder.LadderEncoder`, which decides everything about
a frame (its pts, scene cuts, which rungs take it, keyframes, reconfiguration, fallback).  The
actor moves frames and bytes: it reads the newest frame from the pool, runs the ladder on it,
and appends each rung's access units to that rung's packet ring, whose doorbell wakes every
reader (senders, recorders).  No Ray call is made per frame in either direction.

The frame pool's doorbell (:mod:`shared.pool.doorbell`) wakes the actor's event loop when
capture commits a frame; the actor always encodes the newest frame (latest-frame semantics: a
slow encoder drops frames, it never queues them).  The rungs of a frame are encoded in parallel on worker threads (as many as there are
cores), so the actor keeps answering keyframe requests and stats calls, and each rung's access
units go into its ring as soon as that rung is done.

Each rung has its own packet ring: rung 0 writes ``segment_name(session, "video")``, rung ``n``
writes ``segment_name(session, f"video{n}")`` (:func:`ladder_ring_names`); a reader attaches to
the ring of the rung it wants and listens to its doorbell.

Control calls that change an encoder (bitrate, configuration, hardware) wait for the frame in
flight to finish, so an encoder is only ever touched by one thread at a time; a keyframe
request only counts a request and never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import numpy as np

from shared.errors import ConfigError, ResourceError
from shared.media.codec import SessionOpener, get_encoder_capabilities, open_session
from shared.media.encode_fallback import MAX_PARAMETER_FALLBACKS, lower_quality
from shared.media.hwaccel import SOFTWARE_ENCODER, EncoderCapabilities, needs_gpu
from shared.media.ladder import LadderEncoder, LadderFrame, RungEncodeStats
from shared.media.rate_control import MAX_GAIN
from shared.media.scaler import Rung
from shared.models import QualityPreset, StreamQuality
from shared.pool.doorbell import DoorbellListener
from shared.pool.frame_pool import FramePool, FramePoolReader
from shared.pool.packet_ring import PacketRing, PacketRingReader
from shared.pool.shm import segment_name

logger = logging.getLogger(__name__)

#: Packet ring size: room for several GOPs so a briefly stalled sender or recorder catches up.
RING_SECONDS = 4.0
MIN_RING_BYTES = 8 << 20


def ladder_ring_names(session_id: str, rungs: Sequence[Rung] | int) -> list[str]:
    """The packet ring of each rung, rung 0 first (``rungs``: the planned rungs, or how many)."""
    count = rungs if isinstance(rungs, int) else len(rungs)
    if count < 1:
        raise ConfigError("a stream has at least one rung")
    return [segment_name(session_id, "video" if n == 0 else f"video{n}") for n in range(count)]


def encoder_actor_options(
    choice: EncoderCapabilities | str | bool, *, gpu_share: float
) -> dict[str, Any]:
    """Ray options for the encoder actor: a share of a GPU when the encoder needs one.

    ``choice`` is the probe's result for that node, an encoder name, or simply whether the
    stream asks for hardware acceleration (the actor then probes once placed, and needs the
    GPU visible to find NVENC: Ray hides GPUs from actors that did not ask for one).
    ``gpu_share`` is the fraction of a GPU the scheduler gave the stream
    (``StreamScheduler.gpu_share``: one encoder session's worth; 0 where it placed the
    stream on a node without a GPU, where asking for one would never schedule).
    """
    if isinstance(choice, EncoderCapabilities):
        wanted = needs_gpu(choice.chosen)
    elif isinstance(choice, str):
        wanted = needs_gpu(choice)
    else:
        wanted = choice
    return {"num_gpus": gpu_share} if wanted and gpu_share > 0 else {}


def ring_capacity(bitrate: int) -> int:
    """Bytes for a rung's ring: RING_SECONDS at the highest rate its encoder may reach, twice."""
    return max(MIN_RING_BYTES, int(bitrate * MAX_GAIN / 8 * RING_SECONDS) * 2)


class RungStats(RungEncodeStats, kw_only=True):
    """A rung's figures (:class:`RungEncodeStats`) and the packet ring it writes."""

    ring: str
    #: Readers listening to the ring's doorbell (a departed one is noticed at the next packet).
    readers: int = 0
    #: Rings a reader missed because it had stopped reading (it costs the encoder nothing).
    stalled_rings: int = 0


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
    #: Source frames taken from the pool (rung 0 may encode fewer: see its frame rate).
    frames_taken: int = 0
    #: Steps down to a lower frame rate or size after an encoding failure, and why the last.
    parameter_fallbacks: int = 0
    parameter_fallback_reason: str | None = None


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
        self._ladder_encoder: LadderEncoder | None = None
        self._rings: list[PacketRing] = []
        self._bell: DoorbellListener | None = None
        self._wakeup = asyncio.Event()
        #: Held across a frame's encode; control calls that change an encoder take it too.
        self._encoding = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._error: str | None = None
        self._parameter_fallbacks = 0
        self._parameter_fallback_reason: str | None = None

    @property
    def _ladder(self) -> LadderEncoder:
        if self._ladder_encoder is None:
            raise ConfigError(f"the encoder of stream {self._session_id} is not open")
        return self._ladder_encoder

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self) -> int:
        pool = FramePool.attach(self._pool_name)
        try:
            ladder = await asyncio.to_thread(
                LadderEncoder,
                self._quality,
                self._presets,
                keyframe_interval_s=self._keyframe_interval_s,
                codec=self._codec,
                opener=self._opener,
            )
        except BaseException:
            pool.close()
            raise
        for reason in ladder.plan.dropped:
            logger.info("stream %s: rung left out: %s", self._session_id, reason)
        names = ladder_ring_names(self._session_id, ladder.rungs)
        names[0] = self._ring_name
        self._continue_timeline(ladder)
        try:
            for rung, name in zip(ladder.rungs, names, strict=True):
                self._rings.append(
                    PacketRing.create(name, capacity_bytes=ring_capacity(rung.bitrate))
                )
        except BaseException:
            self._close_rings()
            ladder.close()
            pool.close()
            raise
        self._ladder_encoder = ladder
        self._pool = pool
        self._bell = pool.listen()
        self._bell.watch(asyncio.get_running_loop(), self._wakeup.set)
        self._reader = FramePoolReader(pool)
        self._buffer = np.empty(pool.slot_bytes, dtype=np.uint8)
        cores = len(os.sched_getaffinity(0))
        self._executor = ThreadPoolExecutor(
            max(1, min(len(self._rings), cores)), thread_name_prefix=f"encode-{self._session_id}"
        )
        self._task = asyncio.create_task(self._run(), name="encode")
        return os.getpid()

    def _continue_timeline(self, ladder: LadderEncoder) -> None:
        """After a crash (Ray restarted this actor, ``actors.recovery``) the dead encoder's
        rung-0 ring is still there: carry on from its last packet's pts.  Creating the ring
        anew below then reclaims the dead one's segment (its creator is gone)."""
        try:
            old = PacketRing.attach(self._ring_name)
        except ResourceError:
            return  # a first start: no ring yet
        try:
            packets = PacketRingReader(old, start="latest_keyframe").read_available().packets
        finally:
            old.close()
        if packets:
            last = packets[-1]
            ladder.continue_timeline(last.pts, last.monotonic_us, time.monotonic())
            logger.info("encoder of %s continues after pts %d", self._session_id, last.pts)

    async def reattach_pool(self) -> None:
        """The capture actor restarted and created the frame pool anew: read the new one
        (``actors.recovery``)."""
        async with self._encoding:
            pool = FramePool.attach(self._pool_name)
            try:
                bell = pool.listen()
            except BaseException:
                pool.close()
                raise
            if self._bell is not None:
                self._bell.close()
            self._pool.close()
            self._pool, self._bell = pool, bell
            bell.watch(asyncio.get_running_loop(), self._wakeup.set)
            self._reader = FramePoolReader(pool)
            if self._buffer.size != pool.slot_bytes:
                self._buffer = np.empty(pool.slot_bytes, dtype=np.uint8)

    async def watch(self) -> None:
        """Returns never: the supervisor keeps this call in flight, and Ray fails it the
        moment this process dies, which is how a crash is noticed at once
        (``actors.recovery``)."""
        await asyncio.Event().wait()

    def _close_rings(self) -> None:
        for ring in self._rings:
            ring.close()
            ring.unlink()
        self._rings = []

    async def stop(self) -> EncoderStats:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            # An encode still running on a worker must finish before its encoder closes.
            await asyncio.to_thread(self._executor.shutdown, True)
        stats = await self.stats()
        if self._bell is not None:
            self._bell.close()
        self._pool.close()
        self._close_rings()
        self._ladder.close()
        return stats

    # --- requests ------------------------------------------------------------------------------

    def request_keyframe(self, rung: int | None = 0) -> None:
        """An IDR on the next frame of ``rung`` (None: every rung), e.g. for a viewer's PLI."""
        self._ladder.request_keyframe(rung)

    def rung_names(self) -> list[str]:
        """Each rung's packet ring, rung 0 first."""
        return [ring.name for ring in self._rings]

    def ladder(self) -> list[Rung]:
        return self._ladder.rungs

    # --- the design's VideoCodec, per stream ------------------------------------------------

    async def set_bitrate(self, bitrate: int, rung: int = 0) -> int:
        async with self._encoding:
            return self._ladder.set_bitrate(bitrate, rung)

    async def set_paused(self, rung: int, paused: bool) -> bool:
        """Pause a rung nobody watches, or resume it with an IDR (``LadderEncoder``)."""
        async with self._encoding:
            return self._ladder.set_paused(rung, paused)

    async def configure(self, quality: StreamQuality) -> StreamQuality:
        """Make rung 0 encode at ``quality`` (see :meth:`LadderEncoder.configure`)."""
        async with self._encoding:
            return await asyncio.to_thread(self._ladder.configure, quality)

    async def enable_hardware_acceleration(self) -> bool:
        """Move every rung to the best hardware encoder that works on this node (False: none)."""
        async with self._encoding:
            return await asyncio.to_thread(self._ladder.enable_hardware_acceleration)

    async def capabilities(self, refresh: bool = False) -> EncoderCapabilities:
        """Every H.264 encoder and decoder of this node, probed for real."""
        return await asyncio.to_thread(get_encoder_capabilities, refresh=refresh)

    # --- the encode loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                took = False
                while True:
                    # A frame that arrived during the last encode is taken at once; otherwise
                    # the pool's doorbell wakes the loop at the next commit.
                    if not took or self._reader.latest_sequence() <= self._reader.last_sequence:
                        await self._wakeup.wait()
                    self._wakeup.clear()
                    took = await self._encode_latest()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.exception("encoder of %s failed", self._session_id)
                failure = f"{type(exc).__name__}: {exc}"
                if await self._lower_parameters(failure):
                    continue
                self._error = failure
            return

    async def _lower_parameters(self, failure: str) -> bool:
        """After an encoding failure, carry on at lower parameters (``encode_fallback``);
        False when no step down is left or reopening fails too (the stream goes to Error)."""
        if self._parameter_fallbacks >= MAX_PARAMETER_FALLBACKS:
            return False
        lower = lower_quality(self._ladder.quality)
        if lower is None:
            return False
        try:
            async with self._encoding:
                await asyncio.to_thread(self._ladder.configure, lower)
        except Exception as exc:
            logger.exception("encoder of %s: falling back to %s failed", self._session_id, lower)
            self._error = f"{failure}; falling back failed: {type(exc).__name__}: {exc}"
            return False
        self._parameter_fallbacks += 1
        self._parameter_fallback_reason = (
            f"{failure}; now {lower.resolution} at {lower.framerate} fps"
        )
        logger.warning("encoder of %s: %s", self._session_id, self._parameter_fallback_reason)
        return True

    async def _encode_latest(self) -> bool:
        """Encode the newest frame; False when there was none to take."""
        ladder = self._ladder
        # libx264 copies each picture into its own buffers before encode returns, and the next
        # frame is read only once every rung is done with this one, so one buffer serves every
        # frame (no 1.4 MB allocation and page faults per 720p frame).  A hardware encoder may
        # still hold the picture after returning: it gets a fresh copy each time.
        frame = self._reader.read_latest(out=None if ladder.hardware else self._buffer)
        if frame is None:
            return False
        async with self._encoding:
            job = ladder.begin(frame, time.monotonic())
            await asyncio.gather(*(self._encode_rung(job, index) for index in job.rungs))
        return True

    async def _encode_rung(self, job: LadderFrame, index: int) -> None:
        """One rung on a worker thread, then its access units into its ring at once."""
        ladder = self._ladder
        loop = asyncio.get_running_loop()
        output = await loop.run_in_executor(self._executor, ladder.encode_rung, job, index)
        ladder.record(job, output, time.monotonic())
        ring = self._rings[index]
        # Each unit carries the encoded frame's two capture stamps: the wall-clock one (the
        # encoder copies it onto the unit) as data for viewers, the monotonic one to time
        # recordings by (see shared.pool.packet_ring).
        monotonic_us = job.source.monotonic_us
        for unit in output.access_units:
            ring.append(  # rings the ring's doorbell: its readers wake
                unit.data,
                pts=unit.pts,
                capture_us=unit.capture_us,
                monotonic_us=monotonic_us,
                keyframe=unit.keyframe,
            )

    # --- stats ---------------------------------------------------------------------------------

    async def stats(self) -> EncoderStats:
        figures = self._ladder.stats(time.monotonic())
        rungs = [
            RungStats(
                ring=ring.name,
                readers=ring.readers,
                stalled_rings=ring.doorbell.coalesced if ring.doorbell else 0,
                **msgspec.structs.asdict(rung),
            )
            for rung, ring in zip(figures.rungs, self._rings, strict=True)
        ]
        top = rungs[0]
        return EncoderStats(
            pid=os.getpid(),
            frames_encoded=top.frames_encoded,
            keyframes=top.keyframes,
            frames_dropped=figures.frames_dropped,
            fps=top.fps,
            average_fps=figures.average_fps,
            bitrate=top.bitrate,
            target_bitrate=top.target_bitrate,
            encode_ms=top.encode_ms,
            error=self._error,
            codec=top.codec,
            hardware=top.hardware,
            hardware_fallbacks=sum(r.hardware_fallbacks for r in rungs),
            fallback_reason=figures.fallback_reason,
            reconfigurations=sum(r.reconfigurations for r in rungs),
            scene_cuts=figures.scene_cuts,
            keyframe_requests=figures.keyframe_requests,
            rungs=rungs,
            frames_taken=figures.frames_taken,
            parameter_fallbacks=self._parameter_fallbacks,
            parameter_fallback_reason=self._parameter_fallback_reason,
        )
