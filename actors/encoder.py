"""EncoderActor: encodes the newest pooled frame once, for every viewer and the recorder.

Capture announces each new sequence number; the actor coalesces announcements and always
encodes the newest frame (latest-frame semantics: a slow encoder drops frames, it never queues
them).  Encoding runs on a worker thread so the actor keeps answering keyframe requests and
stats calls.  Each access unit goes into the packet ring, and subscribers (senders, recorder)
are told its sequence number.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from typing import Any

import msgspec
import numpy as np

from shared.codec import TIME_BASE, EncoderConfig, H264Encoder
from shared.framepool import FramePool, FramePoolReader
from shared.models import StreamQuality
from shared.packetring import PacketRing

logger = logging.getLogger(__name__)

#: Packet ring size: room for several GOPs so a briefly stalled sender or recorder catches up.
RING_SECONDS = 4.0
MIN_RING_BYTES = 8 << 20


class EncoderStats(msgspec.Struct, kw_only=True):
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


class EncoderActor:
    def __init__(
        self,
        session_id: str,
        quality: StreamQuality,
        keyframe_interval_s: float,
        pool_name: str,
        ring_name: str,
    ) -> None:
        self._session_id = session_id
        self._quality = quality
        self._keyframe_interval_s = keyframe_interval_s
        self._pool_name = pool_name
        self._ring_name = ring_name
        self._subscribers: dict[str, Any] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dropped = 0
        self._encode_seconds = 0.0
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=300)
        self._origin_us: int | None = None
        self._first_frame_at = 0.0
        self._last_pts = -1
        self._error: str | None = None

    async def open(self) -> int:
        quality = self._quality
        self._pool = FramePool.attach(self._pool_name)
        self._reader = FramePoolReader(self._pool)
        width, height = quality.resolution.width, quality.resolution.height
        self._buffer = np.empty(width * height * 3 // 2, dtype=np.uint8)
        self._encoder = H264Encoder(
            EncoderConfig(
                width=width,
                height=height,
                framerate=quality.framerate,
                bitrate=quality.bitrate,
                keyframe_interval=max(1, round(self._keyframe_interval_s * quality.framerate)),
            )
        )
        ring_bytes = max(MIN_RING_BYTES, int(quality.bitrate / 8 * RING_SECONDS) * 2)
        self._ring = PacketRing.create(self._ring_name, capacity_bytes=ring_bytes)
        self._task = asyncio.create_task(self._run(), name="encode")
        return os.getpid()

    def subscribe(self, name: str, handle: Any) -> None:
        self._subscribers[name] = handle

    def unsubscribe(self, name: str) -> None:
        self._subscribers.pop(name, None)

    def frame_ready(self, sequence: int) -> None:
        self._wakeup.set()

    def request_keyframe(self) -> None:
        self._encoder.request_keyframe()

    def set_bitrate(self, bitrate: int) -> int:
        return self._encoder.set_bitrate(bitrate)

    async def _run(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                await self._encode_latest()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("encoder of %s failed", self._session_id)
            self._error = f"{type(exc).__name__}: {exc}"

    async def _encode_latest(self) -> None:
        frame = self._reader.read_latest(out=self._buffer)
        if frame is None:
            return
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
        started = time.perf_counter()
        encoded = await asyncio.to_thread(
            self._encoder.encode, frame.pixels, pts=pts, capture_us=frame.capture_us
        )
        self._encode_seconds += time.perf_counter() - started
        sequence = 0
        for access_unit in encoded:
            sequence = self._ring.append(
                access_unit.data,
                pts=access_unit.pts,
                capture_us=access_unit.capture_us,
                keyframe=access_unit.keyframe,
            )
            self._recent.append((time.monotonic(), len(access_unit.data)))
        if sequence:
            for handle in self._subscribers.values():
                handle.packets_ready.remote(sequence)

    async def stats(self) -> EncoderStats:
        now = time.monotonic()
        window = [(t, n) for t, n in self._recent if now - t <= 2.0]
        span = (window[-1][0] - window[0][0]) if len(window) > 1 else 0.0
        frames = self._encoder.frames_encoded
        return EncoderStats(
            pid=os.getpid(),
            frames_encoded=frames,
            keyframes=self._encoder.keyframes_encoded,
            frames_dropped=self._dropped,
            fps=(len(window) - 1) / span if span > 0 else 0.0,
            average_fps=(frames - 1) / (now - self._first_frame_at) if frames > 1 else 0.0,
            bitrate=int(sum(n for _, n in window[1:]) * 8 / span) if span > 0 else 0,
            target_bitrate=self._encoder.bitrate,
            encode_ms=self._encode_seconds * 1000 / frames if frames else 0.0,
            error=self._error,
        )

    async def stop(self) -> EncoderStats:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        stats = await self.stats()
        self._pool.close()
        self._ring.close()
        self._ring.unlink()
        self._encoder.close()
        return stats
