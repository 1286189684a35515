"""RecorderActor: one recording session, copied from the packet rings into files, off the live path.

It reads the rings the senders read (video, and audio when the stream has it), so a slow disk
delays only the recording; lapped by the ring, it resumes at the next keyframe and counts the
loss.  The decisions live in ``shared.recording.policy`` (timeline across pauses, file limits,
pre-roll, motion trigger) and ``shared.recording.storage`` (segment names, quota); the files are written
by ``shared.recording.muxer.StreamRecorder``.  The design's StreamRecorder, FormatConverter,
StorageManager and RecordingScheduler meet here; scheduled recordings are started and stopped
by the supervisor.

Keyframes are requested from the encoder whenever the file needs one next: at the start, on
resume, and when a segment reaches its limits, so none of those waits for a whole GOP.  A full
disk ends the recording in the Error state with the file so far intact; the live stream is not
touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import RecordingError, ResourceError
from shared.models import (
    ErrorInfo,
    RecordingConfig,
    RecordingSession,
    RecordingState,
    StreamQuality,
    VideoFormat,
)
from shared.pool.frame_pool import FramePool, FramePoolReader
from shared.pool.packet_ring import PacketRing, PacketRingReader, RingPacket
from shared.recording.muxer import AudioTrackInfo, StreamRecorder
from shared.recording.policy import (
    FileLimits,
    MotionDetector,
    MotionTrigger,
    PreRollBuffer,
    Timeline,
)
from shared.recording.storage import StorageManager, segment_path

if TYPE_CHECKING:
    from actors.handles import EncoderHandle

logger = logging.getLogger(__name__)

#: Audio has no notifications of its own; poll the rings at least this often.
POLL_INTERVAL_S = 0.05
#: How often a motion-triggered recording looks at the picture.
MOTION_INTERVAL_S = 0.2


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
    ) -> None:
        self._id = recording_id
        self._session_id = session_id
        self._config = config
        self._quality = quality
        self._ring_names = ring_names
        self._encoder = encoder
        self._segment = first_segment
        self._first_path = Path(config.output_path)
        self._storage = StorageManager(self._first_path.parent, quota_bytes=config.quota_bytes)
        self._limits = FileLimits(max_bytes=config.max_bytes, max_duration_s=config.max_duration_s)
        self._timeline = self._new_timeline()
        self._recorder: StreamRecorder | None = None
        self._segments: list[str] = []
        self._deleted: list[str] = []
        self._state = RecordingState.RECORDING
        self._error: ErrorInfo | None = None
        self._frames = 0
        self._missed = 0
        self._rotate_pending = False
        self._started_at = time.time()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        trigger = config.trigger
        self._trigger = (
            MotionTrigger(threshold=trigger.threshold, hold_s=trigger.hold_s) if trigger else None
        )
        self._pre_roll = PreRollBuffer(trigger.pre_roll_s) if trigger else None
        self._motion = MotionDetector()
        self._armed = trigger is not None  # waiting for motion: only the pre-roll is kept
        # A scheduled recording is started ahead of time (a process takes a moment to start)
        # and writes from the first keyframe at or after ``start_at``.
        self._start_at_us = int(start_at * 1e6) if start_at is not None else None
        self._start_keyframe_requested = start_at is None

    async def open(self) -> int:
        self._storage.check_writable()
        self._video = PacketRingReader(
            # From now on, not from the ring's newest keyframe: that could be a whole GOP old,
            # and a recording starts when it is asked to (at the keyframe requested below).
            PacketRing.attach(self._ring_names["video"]),
            start="next",
        )
        self._audio: PacketRingReader | None = None
        self._audio_info: AudioTrackInfo | None = None
        if "audio" in self._ring_names:
            with contextlib.suppress(ResourceError):  # the stream may have no audio after all
                self._audio = PacketRingReader(
                    PacketRing.attach(self._ring_names["audio"]), start="next"
                )
                self._audio_info = AudioTrackInfo()
        self._frames_reader: FramePoolReader | None = None
        if self._trigger is not None:
            self._frames_reader = FramePoolReader(FramePool.attach(self._ring_names["frames"]))
        elif self._start_at_us is None:
            self._encoder.request_keyframe()
        self._task = asyncio.create_task(self._run(), name="record")
        return os.getpid()

    def packets_ready(self, sequence: int, *args: Any) -> None:
        self._wakeup.set()

    # --- control (the design's RecordingEngine) -------------------------------------------

    def pause(self) -> RecordingSession:
        if self._state is RecordingState.RECORDING:
            self._timeline.pause()
            self._state = RecordingState.PAUSED
        return self.status()

    def resume(self) -> RecordingSession:
        if self._state is RecordingState.PAUSED:
            self._timeline.resume()
            self._state = RecordingState.RECORDING
            self._encoder.request_keyframe()
        return self.status()

    def status(self) -> RecordingSession:
        recorder = self._recorder
        return RecordingSession(
            session_id=self._id,
            stream_session=self._session_id,
            output_path=self._segments[-1]
            if self._segments
            else str(segment_path(self._first_path, self._segment)),
            format=self._config.format or VideoFormat.MP4,
            state=self._state,
            file_size=recorder.size_bytes if recorder else self._last_file_size(),
            duration=self._timeline.duration_us / 1e6,
            started_at=self._started_at,
            frames_written=self._frames,
            error=self._error,
            segments=list(self._segments),
            deleted=list(self._deleted),
        )

    def _last_file_size(self) -> int:
        if not self._segments:
            return 0
        try:
            return Path(self._segments[-1]).stat().st_size
        except OSError:
            return 0

    def segment_index(self) -> int:
        return self._segment

    # --- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        next_motion = 0.0
        while self._state is not RecordingState.ERROR:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the cancel stop() sends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_INTERVAL_S):
                    await self._wakeup.wait()
            self._wakeup.clear()
            start_at_us = self._start_at_us
            if (
                not self._start_keyframe_requested
                and start_at_us
                and time.time_ns() // 1000 >= start_at_us
            ):
                self._start_keyframe_requested = True
                self._encoder.request_keyframe()
            check_motion = self._trigger is not None and time.monotonic() >= next_motion
            if check_motion:
                next_motion = time.monotonic() + MOTION_INTERVAL_S
            # Off the event loop: muxing (and WebM transcoding) must not delay status calls.
            async with self._lock:
                await asyncio.to_thread(self._step, check_motion)

    def _step(self, check_motion: bool) -> None:
        if check_motion:
            self._check_motion()
        self._write_available()

    def _new_timeline(self) -> Timeline:
        return Timeline(resume_gap_us=1_000_000 // self._quality.framerate)

    def _check_motion(self) -> None:
        assert self._trigger is not None and self._frames_reader is not None
        frame = self._frames_reader.read_latest()
        if frame is None:
            return
        luma = frame.pixels[: frame.width * frame.height].reshape(frame.height, frame.width)
        decision = self._trigger.observe(self._motion.measure(luma), now_us=frame.capture_us)
        if decision is True:
            logger.info("recording %s: motion, recording with pre-roll", self._id)
            self._armed = False
        elif decision is False:
            logger.info("recording %s: motion ended, segment closed", self._id)
            self._armed = True
            if self._recorder is not None:
                try:
                    self._close_segment()
                except RecordingError as exc:
                    self._fail(exc)
                self._segment += 1
            self._timeline = self._new_timeline()  # each motion event is its own file

    def _write_available(self) -> None:
        video = self._video.read_available()
        self._missed += video.missed
        audio = self._audio.read_available().packets if self._audio else []
        packets = sorted(
            [(p.capture_us, 0, p) for p in video.packets] + [(p.capture_us, 1, p) for p in audio],
            key=lambda item: (item[0], item[1]),
        )
        try:
            if self._armed:
                assert self._pre_roll is not None
                for _, kind, packet in packets:
                    if kind == 0:
                        self._pre_roll.add(packet)
                return
            if self._pre_roll is not None and len(self._pre_roll):
                backlog = [
                    (p.capture_us, 0, p)
                    for p in self._pre_roll.drain()
                    if isinstance(p, RingPacket)
                ]
                packets = sorted(backlog + packets, key=lambda item: (item[0], item[1]))
            for _, kind, packet in packets:
                if kind == 0:
                    self._write_video(packet)
                else:
                    self._write_audio(packet)
        except RecordingError as exc:
            self._fail(exc)

    def _write_video(self, packet: RingPacket) -> None:
        if self._timeline.paused:
            return
        if self._start_at_us is not None and packet.capture_us < self._start_at_us:
            return
        if self._timeline.needs_keyframe and not packet.keyframe:
            return  # the file (or the part after a pause) must start at a keyframe
        if self._rotate_pending and packet.keyframe:
            self._close_segment()
            self._segment += 1
            self._rotate_pending = False
            self._timeline = self._new_timeline()  # the next file starts at zero
        file_us = self._timeline.to_file_us(packet.capture_us)
        if file_us is None:
            return
        if self._recorder is None:
            self._recorder = self._open_segment()
        self._recorder.write_video(packet.data, file_us=file_us, keyframe=packet.keyframe)
        self._frames += 1
        if not self._rotate_pending and self._limits.reached(
            size_bytes=self._recorder.size_bytes, duration_us=self._recorder.duration_us
        ):
            self._rotate_pending = True
            self._encoder.request_keyframe()

    def _write_audio(self, packet: RingPacket) -> None:
        if self._recorder is None or self._timeline.paused or self._timeline.needs_keyframe:
            return
        file_us = self._timeline.to_file_us(packet.capture_us)
        if file_us is not None:
            self._recorder.write_audio(packet.data, file_us=file_us)

    def _open_segment(self) -> StreamRecorder:
        path = segment_path(self._first_path, self._segment)
        recorder = StreamRecorder(
            path,
            width=self._quality.resolution.width,
            height=self._quality.resolution.height,
            framerate=self._quality.framerate,
            video_format=self._config.format or VideoFormat.MP4,
            bitrate=self._quality.bitrate,
            audio=self._audio_info,
        )
        self._segments.append(str(path))
        return recorder

    def _close_segment(self) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is None:
            return
        recorder.close()
        deleted = self._storage.enforce_quota(keep=[recorder.path])
        self._deleted += [str(path) for path in deleted]

    def _fail(self, exc: RecordingError) -> None:
        logger.error("recording %s stopped: %s", self._id, exc)
        self._state = RecordingState.ERROR
        self._error = ErrorInfo(kind=type(exc).__name__, message=str(exc))
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            with contextlib.suppress(RecordingError):
                recorder.close()

    async def stop(self) -> RecordingSession:
        """Write what is left in the rings, finish the file, and report the recording."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        async with self._lock:
            if self._state is not RecordingState.ERROR and not self._armed:
                self._write_available()
            try:
                self._close_segment()
            except RecordingError as exc:
                self._fail(exc)
        if self._state is not RecordingState.ERROR:
            self._state = RecordingState.STOPPED
        return self.status()
