"""The data plane on the session's real Ray cluster: readers that die or stall cost the writer
nothing, and nothing of a stream's shared memory or doorbells outlives it.

A reader here is a Ray actor attached to a stream's video ring as a sender is (the same
``PacketRing.attach`` + ``listen`` + ``watch``), so it can be killed with SIGKILL mid-read or
told never to read, while a real viewer watches the same stream through its sender.  The
process-level versions (no Ray) are in ``test_doorbell.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import pytest
import ray

from actors import StreamManager
from actors.placement import NAMESPACE
from actors.stages.capture import CaptureStats
from actors.stages.encoder import EncoderStats
from shared.models import Resolution, StreamConfig, StreamQuality, StreamState
from shared.pool.doorbell import DoorbellListener
from shared.pool.packet_ring import PacketRing, PacketRingReader
from shared.pool.shm import segment_name
from shared.viewer.client import Viewer
from tests.conftest import doorbells, wait_for_no_leaks
from tests.test_pipeline import eventually

pytestmark = pytest.mark.ray

QVGA = StreamQuality(resolution=Resolution(320, 240), framerate=30, bitrate=300_000)


class RingReader:
    """Reads a stream's video ring as a sender does, or listens and never reads."""

    def __init__(self, ring_name: str, read: bool) -> None:
        self._ring = PacketRing.attach(ring_name)
        self._bell: DoorbellListener = self._ring.listen()
        self._reader = PacketRingReader(self._ring, start="latest_keyframe")
        self._read = read
        self.packets = 0

    async def start(self) -> int:
        if self._read:
            self._bell.watch(asyncio.get_running_loop(), self._on_ring)
        return os.getpid()

    def _on_ring(self) -> None:
        self.packets += len(self._reader.read_available().packets)

    async def count(self) -> int:
        return self.packets


def encoder_stats(sid: str) -> EncoderStats:
    encoder: Any = ray.get_actor(f"kz-{sid}-encoder", namespace=NAMESPACE)
    stats: EncoderStats = ray.get(encoder.stats.remote())
    return stats


def frames_captured(sid: str) -> int:
    capture: Any = ray.get_actor(f"kz-{sid}-capture", namespace=NAMESPACE)
    stats: CaptureStats = ray.get(capture.stats.remote())
    return stats.frames_captured


async def watching(manager: StreamManager, sid: str) -> tuple[Viewer, asyncio.Task[None]]:
    ticket = await manager.add_viewer(sid, peer_id="watcher")
    viewer = await Viewer.connect(ticket.url)

    async def consume() -> None:
        async for _ in viewer.frames():
            pass

    return viewer, asyncio.create_task(consume())


def test_a_reader_killed_mid_read_leaves_the_stream_running_and_is_let_go(
    ray_cluster: str,
) -> None:
    async def main() -> str:
        async with StreamManager.start() as manager:
            sid = (await manager.start_camera_stream(StreamConfig(quality=QVGA))).session_id
            viewer, consuming = await watching(manager, sid)
            reader: Any = (
                ray.remote(RingReader).options(num_cpus=0).remote(segment_name(sid, "video"), True)
            )
            try:
                pid = ray.get(reader.start.remote())
                # The sender and this reader listen to the ring; the reader is reading.
                await eventually(
                    lambda: encoder_stats(sid).rungs[0].readers, lambda n: n == 2, "two readers"
                )
                await eventually(
                    lambda: ray.get(reader.count.remote()), lambda n: n >= 30, "30 packets read"
                )
                os.kill(pid, signal.SIGKILL)
                before = encoder_stats(sid)
                seen = viewer.frames_decoded
                # The encoder's next packet finds the dead reader's doorbell closed: let go.
                await eventually(
                    lambda: encoder_stats(sid).rungs[0].readers, lambda n: n == 1, "one reader"
                )
                # ...and the stream goes on: the encoder encodes, the viewer decodes.
                await eventually(
                    lambda: encoder_stats(sid).frames_encoded,
                    lambda n: n >= before.frames_encoded + 60,
                    "60 more frames encoded",
                )
                await eventually(
                    lambda: viewer.frames_decoded, lambda n: n >= seen + 60, "60 more decoded"
                )
                assert encoder_stats(sid).error is None
                assert (await manager.get_stream(sid)).state is StreamState.ACTIVE
            finally:
                ray.kill(reader)
                await viewer.close()
                consuming.cancel()
            await manager.stop_stream(sid)
        return sid

    sid = asyncio.run(main())
    wait_for_no_leaks(sid)  # actors, segments and every doorbell of the stream
    assert doorbells(f"kz_{sid}_") == []


def test_a_reader_that_never_reads_does_not_slow_the_encoder(ray_cluster: str) -> None:
    async def main() -> str:
        async with StreamManager.start() as manager:
            sid = (await manager.start_camera_stream(StreamConfig(quality=QVGA))).session_id
            viewer, consuming = await watching(manager, sid)
            reader: Any = (
                ray.remote(RingReader).options(num_cpus=0).remote(segment_name(sid, "video"), False)
            )
            try:
                ray.get(reader.start.remote())
                # Its doorbell's buffer filled: from here every ring to it is skipped.
                stalled = await eventually(
                    lambda: encoder_stats(sid),
                    lambda s: s.rungs[0].readers == 2 and s.rungs[0].stalled_rings > 0,
                    "the stalled reader's rings to be skipped",
                )
                captured = frames_captured(sid)
                seen = viewer.frames_decoded
                after = await eventually(
                    lambda: encoder_stats(sid),
                    lambda s: s.frames_taken >= stalled.frames_taken + 90,
                    "90 more frames taken by the encoder",
                )
                now_captured = frames_captured(sid)
                # The encoder keeps taking what capture makes (a loaded machine may make it drop
                # a few, latest-frame semantics; a writer blocked on the stalled reader would
                # take next to none), and keeps skipping the stalled reader.
                taken = after.frames_taken - stalled.frames_taken
                assert taken >= 0.8 * (now_captured - captured) > 0
                assert after.rungs[0].stalled_rings > stalled.rungs[0].stalled_rings
                await eventually(
                    lambda: viewer.frames_decoded, lambda n: n >= seen + 60, "60 more decoded"
                )
                assert ray.get(reader.count.remote()) == 0  # it really never read
            finally:
                ray.kill(reader)
                await viewer.close()
                consuming.cancel()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))
