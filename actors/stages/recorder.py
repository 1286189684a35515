"""RecorderActor: one recording session, copied from the packet rings into files, off the live path.

It reads the rings the senders read (video, and audio when the stream has it), so a slow disk
delays only the recording; lapped by the ring, it resumes at the next keyframe and counts the
loss.  It is a thin shell around ``shared.recording.core.RecordingCore``, which makes every
decision (start at a keyframe, scheduled start and stop, pre-roll and motion, pause, rotation,
quota, failure) with the time passed in: the actor feeds it packets and the time, carries out
the events it returns with ``shared.recording.muxer.StreamRecorder`` and
``shared.recording.storage.StorageManager``, and sleeps until a ring's doorbell rings
(:mod:`shared.pool.doorbell`) or the core's next deadline comes: one timer, no polling.  The design's StreamRecorder, FormatConverter, StorageManager and
RecordingScheduler meet here; scheduled recordings are started and stopped by the supervisor.

Muxing (and WebM transcoding) runs in a worker thread so status calls are answered meanwhile;
the core itself is only touched on the event loop.  A full disk ends the recording in the
Error state with the file so far intact; the live stream is not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import RecordingError, ResourceError
from shared.models import (
    ErrorInfo,
    RecordingConfig,
    RecordingSession,
    StreamQuality,
    VideoFormat,
)
from shared.pool.doorbell import DoorbellListener
from shared.pool.frame_pool import FramePool, FramePoolReader
from shared.pool.packet_ring import PacketRing, PacketRingReader
from shared.recording.core import (
    STOP_GRACE_S,
    CloseSegment,
    EnforceQuota,
    Failed,
    Finished,
    MeasureMotion,
    OpenSegment,
    RecordingCore,
    RecordingEvent,
    RecordingPlan,
    RequestKeyframe,
    WriteAudio,
    WriteVideo,
)
from shared.recording.muxer import AudioTrackInfo, StreamRecorder
from shared.recording.policy import FileLimits, MotionDetector
from shared.recording.storage import StorageManager, segment_path

if TYPE_CHECKING:
    from actors.handles import EncoderHandle

logger = logging.getLogger(__name__)


class RecorderActor:
    def __init__(
        self,
        recording_id: str,
        session_id: str,
        config: RecordingConfig,
        quality: StreamQuality,
        ring_names: dict[str, str],
        encoder: EncoderHandle,
        first_segment: int = 0,
        start_at: float | None = None,
        stop_at: float | None = None,
    ) -> None:
        self._id = recording_id
        self._session_id = session_id
        self._config = config
        self._quality = quality
        self._ring_names = ring_names
        self._encoder = encoder
        self._first_path = Path(config.output_path)
        self._storage = StorageManager(self._first_path.parent, quota_bytes=config.quota_bytes)
        plan = RecordingPlan(
            first_path=config.output_path,
            first_segment=first_segment,
            framerate=quality.framerate,
            limits=FileLimits(max_bytes=config.max_bytes, max_duration_s=config.max_duration_s),
            quota=config.quota_bytes is not None,
            start_at_us=int(start_at * 1e6) if start_at is not None else None,
            stop_at_us=int(stop_at * 1e6) if stop_at is not None else None,
            trigger=config.trigger,
        )
        self._scheduled = start_at is not None
        # The schedule is wall-clock time, placed on the core's monotonic timers through
        # wall_now; packets are timed by their monotonic stamps (shared.recording.core).
        self._core = RecordingCore(plan, now=time.monotonic(), wall_now=time.time())
        self._recorder: StreamRecorder | None = None
        self._deleted: list[str] = []
        self._error: ErrorInfo | None = None
        self._missed = 0
        self._started_at = time.time()
        self._motion = MotionDetector()
        self._wakeup = asyncio.Event()
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        #: Events for the muxer, carried out in order by the next step's worker thread.
        self._io: list[RecordingEvent] = []
        self._bells: list[DoorbellListener] = []
        self._mapped: list[PacketRing | FramePool] = []

    async def open(self) -> int:
        self._storage.check_writable()
        # A scheduled recording reads from the ring's newest keyframe: the core keeps the GOP
        # that begins before start_at, so a recorder whose process started after its start time
        # still records from it.  Otherwise from now on: the ring's newest keyframe could be a
        # whole GOP old, and a recording starts when it is asked to (at a requested keyframe).
        # Each ring is listened to before its reader takes its position, so nothing committed
        # after that position goes unheard.
        loop = asyncio.get_running_loop()
        try:
            video_ring = self._attach(self._ring_names["video"])
            self._video = PacketRingReader(
                video_ring, start="latest_keyframe" if self._scheduled else "next"
            )
            self._audio: PacketRingReader | None = None
            self._audio_info: AudioTrackInfo | None = None
            if "audio" in self._ring_names:
                with contextlib.suppress(ResourceError):  # the stream may have no audio after all
                    self._audio = PacketRingReader(
                        self._attach(self._ring_names["audio"]), start="next"
                    )
                    self._audio_info = AudioTrackInfo()
            self._frames_reader: FramePoolReader | None = None
            if self._config.trigger is not None:
                pool = FramePool.attach(self._ring_names["frames"])
                self._mapped.append(pool)
                self._frames_reader = FramePoolReader(pool)
        except BaseException:
            self._release()
            raise
        for bell in self._bells:
            bell.watch(loop, self._wakeup.set)
        self._task = asyncio.create_task(self._run(), name="record")
        return os.getpid()

    def _attach(self, name: str) -> PacketRing:
        ring = PacketRing.attach(name)
        self._mapped.append(ring)
        self._bells.append(ring.listen())
        return ring

    def _release(self) -> None:
        """Hang up the doorbells and unmap every segment (idempotent)."""
        for bell in self._bells:
            bell.close()
        for segment in self._mapped:
            segment.close()
        self._bells, self._mapped = [], []

    # --- control (the design's RecordingEngine) -------------------------------------------

    def pause(self) -> RecordingSession:
        self._dispatch(self._core.pause(time.monotonic()))
        return self.status()

    def resume(self) -> RecordingSession:
        self._dispatch(self._core.resume(time.monotonic()))
        return self.status()

    def status(self) -> RecordingSession:
        recorder = self._recorder
        segments = self._core.segments
        return RecordingSession(
            session_id=self._id,
            stream_session=self._session_id,
            output_path=segments[-1]
            if segments
            else str(segment_path(self._first_path, self._core.segment_index)),
            format=self._config.format or VideoFormat.MP4,
            state=self._core.state,
            file_size=recorder.size_bytes if recorder else self._last_file_size(),
            duration=self._core.duration_us / 1e6,
            started_at=self._started_at,
            frames_written=self._core.frames_written,
            error=self._error,
            segments=list(segments),
            deleted=list(self._deleted),
        )

    def _last_file_size(self) -> int:
        if not self._core.segments:
            return 0
        try:
            return Path(self._core.segments[-1]).stat().st_size
        except OSError:
            return 0

    def segment_index(self) -> int:
        return self._core.segment_index

    # --- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._core.done:
            # Sleep until a doorbell rings (new packets) or the core's next deadline.
            wait = None
            deadline = self._core.next_deadline()
            if deadline is not None:
                wait = max(0.0, deadline - time.monotonic())
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancel stop() sends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wakeup.wait()
            self._wakeup.clear()
            async with self._lock:
                await self._step()
        self._done.set()

    async def _step(self) -> None:
        now = time.monotonic()
        deadline = self._core.next_deadline()
        if deadline is not None and now >= deadline:
            self._dispatch(self._core.handle_timer(now))
        self._read_rings(now)
        await self._flush()

    def _read_rings(self, now: float) -> None:
        """Feed every packet the rings hold to the core, video and audio in capture order.

        The order and the file time come from the monotonic stamps (an NTP step of the wall
        clock must not reorder or stall the file); the wall-clock stamp only places a video
        packet against a schedule.
        """
        video = self._video.read_available()
        self._missed += video.missed
        audio = self._audio.read_available().packets if self._audio else []
        packets = sorted(
            [(p.monotonic_us, 0, p) for p in video.packets]
            + [(p.monotonic_us, 1, p) for p in audio],
            key=lambda item: (item[0], item[1]),
        )
        core = self._core
        for media_us, kind, packet in packets:
            if kind == 0:
                events = core.receive_video(
                    packet.data,
                    capture_us=packet.capture_us,
                    media_us=media_us,
                    keyframe=packet.keyframe,
                    now=now,
                )
            else:
                events = core.receive_audio(packet.data, media_us=media_us, now=now)
            self._dispatch(events)

    def _dispatch(self, events: list[RecordingEvent]) -> None:
        """Carry out what needs no file at once; queue the rest for the muxer's thread."""
        for event in events:
            if isinstance(event, RequestKeyframe):
                self._encoder.request_keyframe()
            elif isinstance(event, MeasureMotion):
                self._measure_motion()
            else:
                self._io.append(event)

    def _measure_motion(self) -> None:
        assert self._frames_reader is not None
        frame = self._frames_reader.read_latest()
        if frame is None:
            return
        luma = frame.pixels[: frame.width * frame.height].reshape(frame.height, frame.width)
        motion = self._motion.measure(luma)
        was_open = self._core.segment_open
        # The pool's monotonic stamp: the clock the video packets' media time is on.
        self._dispatch(
            self._core.observe_motion(motion, media_us=frame.monotonic_us, now=time.monotonic())
        )
        if self._core.segment_open and not was_open:
            logger.info("recording %s: motion, recording with pre-roll", self._id)
        elif was_open and not self._core.segment_open:
            logger.info("recording %s: motion ended, segment closed", self._id)

    async def _flush(self) -> None:
        """Carry out the queued file events off the event loop, then report the muxed size."""
        while self._io:
            events, self._io = self._io, []
            try:
                size = await asyncio.to_thread(self._apply, events)
            except RecordingError as exc:
                logger.error("recording %s stopped: %s", self._id, exc)
                self._error = ErrorInfo(kind=type(exc).__name__, message=str(exc))
                self._dispatch(self._core.write_failed(str(exc)))
                continue
            if size is not None:
                self._dispatch(self._core.segment_size(size))

    def _apply(self, events: list[RecordingEvent]) -> int | None:
        """Runs in a worker thread; returns the open segment's muxed size afterwards."""
        for event in events:
            if isinstance(event, WriteVideo):
                assert self._recorder is not None
                self._recorder.write_video(
                    event.data, file_us=event.file_us, keyframe=event.keyframe
                )
            elif isinstance(event, WriteAudio):
                assert self._recorder is not None
                self._recorder.write_audio(event.data, file_us=event.file_us)
            elif isinstance(event, OpenSegment):
                self._recorder = self._open_segment(event.path)
            elif isinstance(event, CloseSegment):
                recorder, self._recorder = self._recorder, None
                if recorder is not None:
                    recorder.close()
            elif isinstance(event, EnforceQuota):
                deleted = self._storage.enforce_quota(keep=[Path(event.keep)])
                self._deleted += [str(path) for path in deleted]
            elif isinstance(event, Failed):
                # The error is already reported; the file so far is kept if it still closes.
                recorder, self._recorder = self._recorder, None
                if recorder is not None:
                    with contextlib.suppress(RecordingError):
                        recorder.close()
            elif not isinstance(event, Finished):
                raise AssertionError(f"recorder cannot carry out {event!r}")
        return self._recorder.size_bytes if self._recorder is not None else None

    def _open_segment(self, path: str) -> StreamRecorder:
        return StreamRecorder(
            path,
            width=self._quality.resolution.width,
            height=self._quality.resolution.height,
            framerate=self._quality.framerate,
            video_format=self._config.format or VideoFormat.MP4,
            bitrate=self._quality.bitrate,
            audio=self._audio_info,
        )

    async def stop(self) -> RecordingSession:
        """Write what is left in the rings, finish the file, and report the recording."""
        if self._task is not None:
            if self._core.awaiting_scheduled_stop(time.monotonic()):
                # The schedule's stop: the last frames before stop_at may still be in the
                # encoder.  The core ends the recording on the first packet past stop_at, or at
                # its own deadline STOP_GRACE_S later; the margin only bounds a stuck loop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STOP_GRACE_S + 1.0):
                        await self._done.wait()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        async with self._lock:
            now = time.monotonic()
            if not self._core.done:
                self._read_rings(now)
            self._dispatch(self._core.stop(now))
            await self._flush()
            self._release()
        return self.status()
