"""CaptureActor: runs one source at its frame rate and writes each picture into the frame pool.

It only tells the encoder the new sequence number; the pixels stay in shared memory.  Pacing
uses an absolute schedule (frame n is due at start + n/fps) so timer jitter never accumulates;
when the actor falls more than a frame behind it skips the missed frames and counts them
rather than bursting to catch up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import msgspec

from shared.capture import FrameSource, open_source
from shared.framepool import FramePool
from shared.models import PixelFormat, StreamQuality, StreamSource

logger = logging.getLogger(__name__)


class CaptureStats(msgspec.Struct, kw_only=True):
    pid: int
    frames_captured: int
    frames_skipped: int
    fps: float
    error: str | None = None


class CaptureActor:
    def __init__(
        self,
        session_id: str,
        source: StreamSource,
        quality: StreamQuality,
        pool_name: str,
        slots: int,
    ) -> None:
        self._session_id = session_id
        self._source_spec = source
        self._quality = quality
        self._pool_name = pool_name
        self._slots = slots
        self._source: FrameSource | None = None
        self._pool: FramePool | None = None
        self._task: asyncio.Task[None] | None = None
        self._frames = 0
        self._skipped = 0
        self._started = 0.0
        self._error: str | None = None

    async def open(self) -> int:
        """Open the source and create the pool; errors surface here, before the stream is Active."""
        self._source = open_source(self._source_spec, self._quality)
        width, height = self._source.width, self._source.height
        self._pool = FramePool.create(
            self._pool_name, slot_bytes=width * height * 3 // 2, slots=self._slots
        )
        return os.getpid()

    async def start(self, encoder: Any) -> None:
        self._task = asyncio.create_task(self._run(encoder), name="capture")

    async def _run(self, encoder: Any) -> None:
        try:
            await self._capture_loop(encoder)
        except Exception as exc:
            # Recorded for the supervisor's health check, which moves the stream to Error.
            logger.exception("capture of %s failed", self._session_id)
            self._error = f"{type(exc).__name__}: {exc}"

    async def _capture_loop(self, encoder: Any) -> None:
        assert self._source is not None and self._pool is not None
        source, pool = self._source, self._pool
        interval = 1.0 / self._quality.framerate
        self._started = start = time.monotonic()
        frame_number = 0
        while True:
            delay = start + frame_number * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -interval:
                behind = int(-delay / interval)
                frame_number += behind
                self._skipped += behind
                continue
            capture_us = time.time_ns() // 1000
            with pool.writing(
                width=source.width,
                height=source.height,
                pixel_format=PixelFormat.YUV420P,
                capture_us=capture_us,
            ) as slot:
                source.fill(slot, frame_number=frame_number, capture_us=capture_us)
            encoder.frame_ready.remote(pool.latest_sequence())
            self._frames += 1
            frame_number += 1

    async def stats(self) -> CaptureStats:
        elapsed = time.monotonic() - self._started if self._started else 0.0
        return CaptureStats(
            pid=os.getpid(),
            frames_captured=self._frames,
            frames_skipped=self._skipped,
            fps=self._frames / elapsed if elapsed > 0 else 0.0,
            error=self._error,
        )

    async def stop(self) -> CaptureStats:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        stats = await self.stats()
        if self._source is not None:
            self._source.close()
        if self._pool is not None:
            self._pool.close()
            self._pool.unlink()
            self._pool = None
        return stats
