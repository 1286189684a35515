"""CaptureActor: runs a stream's sources and writes what they capture into shared memory.

Video: each picture is converted to yuv420p at the stream's size straight into a frame pool
slot, whose commit rings the pool's doorbell (:mod:`shared.pool.doorbell`): that wakes the
encoder, with no Ray call per frame.  Audio (when the stream has it): 20 ms Opus packets go
into the stream's audio packet ring, whose doorbell wakes the senders and recorders.

Every call into a video source happens on one capture thread (OpenCV and X11 connections are
bound to the thread that made them, and grabs block), so the actor's event loop stays free for
stats, switches and stops.  Pull sources (test pattern, screen) are paced by
:class:`FramePacer` at the stream's rate; push sources (camera, file) are read back to back and
thinned to that rate by :class:`FrameGate`.

``switch_source`` opens the new source first, so a bad one leaves the old one running; the
loop swaps it in before its next frame and asks the encoder for a keyframe, and since frames
keep the stream's size, the encoder and every viewer carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from shared.capture.audio import (
    AUDIO_RING_BYTES,
    AUDIO_RING_SLOTS,
    AudioPipeline,
    AudioSource,
    AudioStats,
    DeviceAudioSource,
)
from shared.capture.engine import CaptureEngine
from shared.capture.pacing import FrameGate, FramePacer, RateMeter
from shared.capture.source import EndOfSource, FrameSource, SourceInfo
from shared.errors import ConfigError
from shared.models import (
    AudioConfig,
    CaptureConfig,
    FileSource,
    PixelFormat,
    ScreenConfig,
    StreamQuality,
    StreamSource,
    parse_source,
)
from shared.pool.frame_pool import FramePool, frame_bytes
from shared.pool.packet_ring import PacketRing

if TYPE_CHECKING:
    from actors.handles import EncoderHandle

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Longest a push source's grab blocks before the loop looks at switches and stops again.
GRAB_TIMEOUT_S = 0.1
#: How long stop waits for a source's device to let go.
CLOSE_TIMEOUT_S = 5.0


class CaptureStats(msgspec.Struct, kw_only=True):
    pid: int
    frames_captured: int
    #: Frames a pull source missed because capture fell behind its schedule (drops).
    frames_skipped: int
    #: Frames per second written to the pool over the last two seconds.
    fps: float
    error: str | None = None
    #: Frames per second since the first frame.
    average_fps: float = 0.0
    #: Frames a push source delivered above the stream's rate, left out on purpose.
    frames_decimated: int = 0
    source: SourceInfo | None = None
    switches: int = 0
    #: A finite source (a file without loop) reached its end; no more frames will come.
    ended: bool = False
    audio: AudioStats | None = None
    #: Readers listening to the frame pool's doorbell (the encoder; a recorder's motion
    #: trigger reads the pool without listening).
    pool_readers: int = 0
    #: Times the source was lost and a ``fallback_devices`` entry took over, and why the last.
    fallbacks: int = 0
    fallback_reason: str | None = None


class CaptureActor:
    def __init__(
        self,
        session_id: str,
        source: StreamSource,
        quality: StreamQuality,
        pool_name: str,
        slots: int,
        audio: AudioConfig | None = None,
        audio_ring_name: str | None = None,
        screen: ScreenConfig | None = None,
        capture: CaptureConfig | None = None,
        video: bool = True,
        engine: CaptureEngine | None = None,
    ) -> None:
        if audio is not None and audio_ring_name is None:
            raise ConfigError("audio capture needs the name of the audio packet ring")
        if not video and audio is None:
            raise ConfigError("a capture actor needs video, audio or both")
        self._session_id = session_id
        self._source_spec = source
        self._quality = quality
        self._pool_name = pool_name
        self._slots = slots
        self._audio_config = audio
        self._audio_ring_name = audio_ring_name
        self._screen = screen
        self._capture_config = capture
        self._video = video
        self._engine = engine or CaptureEngine()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"capture-{session_id}")
        self._source: FrameSource | None = None
        self._pending: FrameSource | None = None
        self._pool: FramePool | None = None
        self._audio: AudioPipeline | None = None
        self._audio_ring: PacketRing | None = None
        self._encoder: EncoderHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pacer = FramePacer(quality.framerate, time.monotonic())
        self._gate = FrameGate(quality.framerate)
        self._decimated = 0
        self._meter = RateMeter()
        self._frames = 0
        self._switches = 0
        self._ended = False
        self._released = False
        self._error: str | None = None
        #: Cleared while the stream is paused: the loop waits on it before the next frame.
        self._live = asyncio.Event()
        self._live.set()
        #: Sources still to try when the running one is lost (``CaptureConfig``).
        self._fallbacks = list(capture.fallback_devices) if capture is not None else []
        self._fallbacks_used = 0
        self._fallback_reason: str | None = None

    async def _on_capture_thread(self, call: Callable[..., T], *args: Any) -> T:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._executor, call, *args)

    # --- opening -----------------------------------------------------------------------------

    def _open_video(self, spec: StreamSource) -> tuple[FrameSource, AudioSource | None]:
        """On the capture thread: the video source, plus a file's own audio when it has some
        and the stream wants audio from no particular device."""
        audio = self._audio_config
        if isinstance(spec, FileSource) and audio is not None and audio.device is None:
            return self._engine.start_file_capture(spec, self._quality.resolution, audio=audio)
        source = self._engine.open_source(
            spec, self._quality, capture=self._capture_config, screen=self._screen
        )
        return source, None

    def _open_audio_only(self, spec: StreamSource) -> AudioSource:
        """Audio for a stream without video: a file's track, else the input device."""
        assert self._audio_config is not None
        if isinstance(spec, FileSource) and self._audio_config.device is None:
            from shared.capture.file import FilePlayback

            playback = FilePlayback.open(spec.path, loop=spec.loop)
            if playback.has_audio:
                return playback.audio_source(self._audio_config)
        return DeviceAudioSource(self._audio_config)

    async def open(self) -> int:
        """Open the sources and create the pool and audio ring.

        Every error a user can cause (missing device, monitor or file, region outside the
        screen, no permission) surfaces here, before the stream is Active, and leaves nothing
        behind.
        """
        self._loop = asyncio.get_running_loop()
        audio_source: AudioSource | None = None
        try:
            if self._video:
                video, audio_source = await self._on_capture_thread(
                    self._open_video, self._source_spec
                )
                self._source = video
                self._check_size(video)
            if self._audio_config is not None:
                if audio_source is None and self._video:
                    audio_source = await self._on_capture_thread(
                        DeviceAudioSource, self._audio_config
                    )
                elif audio_source is None:
                    audio_source = await self._on_capture_thread(
                        self._open_audio_only, self._source_spec
                    )
                assert self._audio_ring_name is not None
                self._audio_ring = PacketRing.create(
                    self._audio_ring_name,
                    capacity_bytes=AUDIO_RING_BYTES,
                    index_slots=AUDIO_RING_SLOTS,
                )
                self._audio = AudioPipeline(
                    audio_source,
                    self._audio_ring,
                    bitrate=self._audio_config.bitrate,
                )
                audio_source = None  # the pipeline owns it now
            if self._video:
                resolution = self._quality.resolution
                self._pool = FramePool.create(
                    self._pool_name,
                    slot_bytes=frame_bytes(
                        resolution.width, resolution.height, PixelFormat.YUV420P
                    ),
                    slots=self._slots,
                )
        except BaseException:
            if audio_source is not None:
                audio_source.close()
            await self._release()
            raise
        if self._source is not None:
            info = self._source.info()
            logger.info("capture %s: %s", self._session_id, info.description)
        return os.getpid()

    def _check_size(self, source: FrameSource) -> None:
        resolution = self._quality.resolution
        if (source.width, source.height) != (resolution.width, resolution.height):
            raise ConfigError(
                f"source delivers {source.width}x{source.height}, the stream is {resolution}"
            )

    # --- running -----------------------------------------------------------------------------

    async def start(self, encoder: EncoderHandle | None = None) -> None:
        """Start capturing; ``encoder`` (None for audio-only streams) is asked for a keyframe
        when the source is switched (frames reach it through the pool's doorbell)."""
        self._encoder = encoder
        if self._video and self._source is not None:
            self._pacer = FramePacer(self._quality.framerate, time.monotonic())
            self._task = asyncio.create_task(self._run(), name="capture")
        if self._audio is not None:
            self._audio.start()

    async def _run(self) -> None:
        while True:
            try:
                await self._capture_loop()
            except EndOfSource as end:
                logger.info("capture of %s: %s", self._session_id, end)
                self._ended = True
            except Exception as exc:
                logger.exception("capture of %s failed", self._session_id)
                lost = f"{type(exc).__name__}: {exc}"
                if await self._fall_back(lost):
                    continue
            return

    async def _fall_back(self, lost: str) -> bool:
        """The running source failed (``lost`` says how): open the next of the config's
        ``fallback_devices`` in its place.  False when none is left or none opens: the error,
        with what each fallback said, is then recorded for the supervisor's health check,
        which moves the stream to Error."""
        tried: list[str] = []
        while self._fallbacks:
            spec = self._fallbacks.pop(0)
            try:
                new = await self._on_capture_thread(self._open_video_only, parse_source(spec))
                try:
                    self._check_size(new)
                except BaseException:
                    await self._on_capture_thread(new.close)
                    raise
            except Exception as exc:
                tried.append(f"{spec} ({type(exc).__name__}: {exc})")
                continue
            old, self._source = self._source, new
            if old is not None:
                await self._on_capture_thread(_close_all, [old])
            self._gate = FrameGate(self._quality.framerate)
            self._pacer = FramePacer(self._quality.framerate, time.monotonic())
            self._fallbacks_used += 1
            self._fallback_reason = f"{lost}; fell back to {spec}"
            logger.warning("capture %s: %s", self._session_id, self._fallback_reason)
            if self._encoder is not None:
                self._encoder.request_keyframe(None)  # new content: a fresh reference now
            return True
        self._error = f"{lost}; no fallback opened: {', '.join(tried)}" if tried else lost
        return False

    async def _capture_loop(self) -> None:
        while True:
            if not self._live.is_set():
                await self._live.wait()
                # The schedule restarts at the resume: the paused span is no backlog of
                # frames to skip (the skips counted so far are kept).
                skipped = self._pacer.skipped
                self._pacer = FramePacer(self._quality.framerate, time.monotonic())
                self._pacer.skipped = skipped
            await self._apply_switch()
            source = self._source
            assert source is not None
            if source.pacing == "pull":
                wait = self._pacer.wait(time.monotonic())
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue  # look for a switch again before taking the frame
                sequence = await self._on_capture_thread(
                    self._capture_one, source, self._pacer.frame_number, None
                )
                self._pacer.taken()
            else:
                sequence = await self._on_capture_thread(
                    self._capture_one, source, self._frames, self._gate
                )
            if sequence:  # the pool's doorbell has told the encoder already
                self._frames += 1
                self._meter.add(time.monotonic())

    def _capture_one(self, source: FrameSource, frame_number: int, gate: FrameGate | None) -> int:
        """On the capture thread: grab, then write into the next pool slot; its sequence, or 0."""
        assert self._pool is not None
        capture_us = source.grab(timeout=GRAB_TIMEOUT_S)
        if capture_us is None:
            return 0
        # The same moment on the monotonic clock, read as grab returns: the wall-clock stamp
        # is data for viewers, this one times the gate and the encoder's pts (NTP may step
        # the wall clock; see shared.pool.frame_pool).
        monotonic_us = time.monotonic_ns() // 1000
        if gate is not None and not gate.admit(monotonic_us):
            self._decimated += 1
            return 0
        with self._pool.writing(
            width=source.width,
            height=source.height,
            pixel_format=PixelFormat.YUV420P,
            capture_us=capture_us,
            monotonic_us=monotonic_us,
        ) as slot:
            source.fill(slot, frame_number=frame_number, capture_us=capture_us)
        return self._pool.latest_sequence()

    async def _apply_switch(self) -> None:
        new = self._pending
        if new is None:
            return
        self._pending = None
        old, self._source = self._source, new
        self._gate = FrameGate(self._quality.framerate)
        self._switches += 1
        if old is not None:
            await self._on_capture_thread(old.close)
        if self._encoder is not None:
            # The viewers' decoders need a fresh reference picture of the new content now,
            # not at the end of the GOP; on every simulcast rung (None).
            self._encoder.request_keyframe(None)
        logger.info("capture %s switched to %s", self._session_id, new.info().description)

    async def switch_source(self, source: str | StreamSource) -> SourceInfo:
        """Switch the running stream's video to ``source`` (spelled as on the command line).

        The new source is opened first: if that fails, the error is raised here and the old
        source keeps running.  Audio keeps its source.
        """
        spec = parse_source(source) if isinstance(source, str) else source
        if not self._video:
            raise ConfigError("an audio-only stream has no video source to switch")
        new: FrameSource = await self._on_capture_thread(self._open_video_only, spec)
        try:
            self._check_size(new)
        except BaseException:
            await self._on_capture_thread(new.close)
            raise
        previous, self._pending = self._pending, new
        if previous is not None:  # two switches before a frame: the first never ran
            await self._on_capture_thread(previous.close)
        if self._task is not None and self._task.done():
            # The loop had stopped (a file ended): the new source starts it again.
            self._ended = False
            self._task = asyncio.create_task(self._run(), name="capture")
        elif self._task is None:
            await self._apply_switch()
        return new.info()

    async def pause(self) -> None:
        """Stop writing frames until :meth:`resume` (the stream's Paused state).  The source
        stays open and the pool keeps its last picture, so nothing downstream is torn down:
        the encoder simply gets no new frame, and viewers keep the last one on screen.  Audio
        stops too: its device is still read (and let go) so the resume starts from now."""
        self._live.clear()
        if self._audio is not None:
            self._audio.pause()

    async def resume(self) -> None:
        """Capture again; the encoder is asked for a keyframe so every viewer (and one that
        joined while paused) has a fresh reference picture at once."""
        if self._live.is_set():
            return
        self._live.set()
        if self._audio is not None:
            self._audio.resume()
        if self._encoder is not None:
            self._encoder.request_keyframe(None)

    def _open_video_only(self, spec: StreamSource) -> FrameSource:
        return self._engine.open_source(
            spec, self._quality, capture=self._capture_config, screen=self._screen
        )

    async def watch(self) -> None:
        """Returns never: the supervisor keeps this call in flight, and Ray fails it the
        moment this process dies, which is how a crash is noticed at once
        (``actors.recovery``)."""
        await asyncio.Event().wait()

    # --- reporting and stopping --------------------------------------------------------------

    async def source_info(self) -> SourceInfo | None:
        return self._source.info() if self._source is not None else None

    async def stats(self) -> CaptureStats:
        now = time.monotonic()
        return CaptureStats(
            pid=os.getpid(),
            frames_captured=self._frames,
            frames_skipped=self._pacer.skipped,
            fps=self._meter.rate(now),
            error=self._error or (self._audio.stats().error if self._audio else None),
            average_fps=self._meter.average(now),
            frames_decimated=self._decimated,
            source=self._source.info() if self._source is not None else None,
            switches=self._switches,
            ended=self._ended,
            audio=self._audio.stats() if self._audio is not None else None,
            pool_readers=self._pool.readers if self._pool is not None else 0,
            fallbacks=self._fallbacks_used,
            fallback_reason=self._fallback_reason,
        )

    async def stop(self) -> CaptureStats:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._audio is not None:
            # Stopped before the figures are taken, so they count every packet in the ring
            # (the release below finds it stopped).
            await asyncio.to_thread(self._audio.stop)
        stats = await self.stats()
        await self._release()
        return stats

    async def _release(self) -> None:
        """Stop audio, close sources (after any grab in flight), remove shared memory."""
        if self._released:
            return
        self._released = True
        if self._audio is not None:
            audio, self._audio = self._audio, None
            await asyncio.to_thread(audio.stop)
        sources = [s for s in (self._source, self._pending) if s is not None]
        self._source = self._pending = None
        idle = True
        if self._loop is not None:
            # The capture thread runs calls in order: once this runs, no grab or fill is in
            # flight, so the pool below can be unmapped safely.
            closing = self._loop.run_in_executor(self._executor, _close_all, sources)
            try:
                await asyncio.wait_for(closing, CLOSE_TIMEOUT_S)
            except TimeoutError:
                logger.warning("capture %s: a source did not close in time", self._session_id)
                idle = False
        if self._pool is not None:
            self._pool.unlink()
            if idle:  # a grab still in flight would write into an unmapped slot
                self._pool.close()
        if self._audio_ring is not None:
            self._audio_ring.close()
            self._audio_ring.unlink()
        self._pool = None
        self._audio_ring = None
        self._executor.shutdown(wait=False)


def _close_all(sources: list[FrameSource]) -> None:
    for source in sources:
        try:
            source.close()
        except Exception:
            logger.exception("closing a capture source failed")
