"""RecorderActor: copies the encoded stream from the packet ring into a file, off the live path.

It reads the same ring the senders read, so a slow disk delays only the recording; if it falls
so far behind that the ring laps it, it resumes at the next keyframe and counts the loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from shared.errors import RecordingError
from shared.models import (
    ErrorInfo,
    RecordingConfig,
    RecordingSession,
    RecordingState,
    StreamQuality,
)
from shared.packetring import PacketRing, PacketRingReader
from shared.recording import StreamRecorder

logger = logging.getLogger(__name__)


class RecorderActor:
    def __init__(
        self, session_id: str, ring_name: str, config: RecordingConfig, quality: StreamQuality
    ) -> None:
        self._session_id = session_id
        self._ring_name = ring_name
        self._config = config
        self._quality = quality
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._state = RecordingState.RECORDING
        self._error: ErrorInfo | None = None
        self._missed = 0
        self._started_at = time.time()

    async def open(self) -> int:
        quality = self._quality
        self._recorder = StreamRecorder(
            self._config.output_path,
            width=quality.resolution.width,
            height=quality.resolution.height,
            framerate=quality.framerate,
            video_format=self._config.format,
        )
        self._ring = PacketRing.attach(self._ring_name)
        self._reader = PacketRingReader(self._ring, start="latest_keyframe")
        self._task = asyncio.create_task(self._run(), name="record")
        return os.getpid()

    def packets_ready(self, sequence: int) -> None:
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            self._write_available()
            if self._state is RecordingState.ERROR:
                return

    def _write_available(self) -> None:
        batch = self._reader.read_available()
        self._missed += batch.missed
        try:
            for packet in batch.packets:
                self._recorder.write(packet.data, pts=packet.pts, keyframe=packet.keyframe)
        except RecordingError as exc:
            logger.error("recording %s stopped: %s", self._config.output_path, exc)
            self._state = RecordingState.ERROR
            self._error = ErrorInfo(kind=type(exc).__name__, message=str(exc))
            self._recorder.close()

    async def status(self) -> RecordingSession:
        return RecordingSession(
            session_id=f"{self._session_id}-rec",
            stream_session=self._session_id,
            output_path=str(self._recorder.path),
            format=self._config.format,
            state=self._state,
            file_size=self._recorder.size_bytes,
            duration=self._recorder.duration_s,
            started_at=self._started_at,
            frames_written=self._recorder.frames_written,
            error=self._error,
        )

    async def stop(self) -> RecordingSession:
        """Write what is left in the ring, finish the file, and report it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._state is RecordingState.RECORDING:
            self._write_available()
        self._recorder.close()
        self._ring.close()
        if self._state is not RecordingState.ERROR:
            self._state = RecordingState.STOPPED
        return await self.status()
