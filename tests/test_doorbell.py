"""The doorbell beside each segment: readers wake on commits, and no reader can hurt the writer.

Real processes and real sockets, no Ray (the Ray-side faults are in ``test_data_plane.py``): a
reader killed with SIGKILL in the middle of its reads, a reader that never reads, a writer that
goes away, and nothing (segment or socket) left once the writer is gone.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import select
import signal
import time
import uuid
from collections.abc import Iterator
from multiprocessing.sharedctypes import Synchronized

import numpy as np
import pytest

from shared.errors import ResourceError
from shared.models import PixelFormat
from shared.pool.doorbell import Doorbell, DoorbellListener, doorbell_address
from shared.pool.frame_pool import FramePool, FramePoolReader, frame_bytes
from shared.pool.packet_ring import PacketRing, PacketRingReader
from shared.pool.shm import list_segments

WIDTH, HEIGHT = 64, 48
FRAME = frame_bytes(WIDTH, HEIGHT, PixelFormat.YUV420P)


def _name() -> str:
    return f"kz_t{uuid.uuid4().hex[:10]}_frames"


def _abstract_names() -> set[str]:
    """Abstract UNIX socket names bound on this host (``/proc/net/unix`` shows them as ``@…``)."""
    with open("/proc/net/unix") as table:
        lines = table.read().splitlines()[1:]
    return {line.split()[-1] for line in lines if line.split()[-1].startswith("@")}


def _wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.005)


def _write(pool: FramePool, value: int) -> int:
    return pool.write(
        np.full(FRAME, value % 256, np.uint8),
        capture_us=value,
        monotonic_us=value,
        width=WIDTH,
        height=HEIGHT,
        pixel_format=PixelFormat.YUV420P,
    )


@pytest.fixture
def pool() -> Iterator[FramePool]:
    with FramePool.create(_name(), slot_bytes=FRAME, slots=4) as created:
        yield created


def test_a_reader_hears_each_commit_with_the_newest_sequence(pool: FramePool) -> None:
    reader = FramePool.attach(pool.name)
    listener = reader.listen()
    try:
        assert listener.drain() == 0  # nothing rung yet
        _write(pool, 1)
        _write(pool, 2)
        ready, _, _ = select.select([listener], [], [], 5.0)
        assert ready == [listener]
        assert listener.drain() == 2
        assert pool.readers == 1
        # Drained: not readable again until the next commit.
        assert select.select([listener], [], [], 0)[0] == []
    finally:
        listener.close()
        reader.close()


def test_a_reader_attaching_later_hears_the_next_commit_and_starts_from_the_pool(
    pool: FramePool,
) -> None:
    for value in range(1, 6):
        _write(pool, value)
    reader = FramePool.attach(pool.name)
    listener = reader.listen()
    try:
        position = FramePoolReader(reader)
        first = position.read_latest()
        assert first is not None and first.sequence == 5  # where to start: the pool says
        _write(pool, 6)
        assert select.select([listener], [], [], 5.0)[0] == [listener]
        assert listener.drain() == 6
        assert pool.doorbell is not None and pool.doorbell.attached == 1
    finally:
        listener.close()
        reader.close()


def test_a_reader_that_never_reads_never_blocks_the_writer(pool: FramePool) -> None:
    stalled = DoorbellListener(pool.name)  # connected, and never drained
    active = DoorbellListener(pool.name)
    try:
        # Far more rings than a socket buffer holds: a blocking send would hang here.
        for value in range(1, 5001):
            _write(pool, value)
            active.drain()
        assert pool.doorbell is not None
        assert pool.doorbell.coalesced > 0  # the stalled reader's full buffer was skipped
        assert pool.readers == 2  # ...and it is still attached
        assert active.drain() == 5000
        # The stalled reader wakes to the rings queued before its buffer filled; it then reads
        # the pool itself, so what it missed costs nothing.
        assert 0 < stalled.drain() < 5000
    finally:
        stalled.close()
        active.close()


def _read_until_killed(name: str, frames_read: Synchronized[int]) -> None:
    pool = FramePool.attach(name)
    listener = pool.listen()
    position = FramePoolReader(pool)
    out = np.empty(pool.slot_bytes, np.uint8)
    while True:
        select.select([listener], [], [], 1.0)
        listener.drain()
        while position.read_latest(out) is not None:
            frames_read.value += 1


def test_a_reader_killed_mid_read_is_dropped_and_the_writer_goes_on(pool: FramePool) -> None:
    context = multiprocessing.get_context("spawn")
    frames_read = context.Value("q", 0)
    process = context.Process(target=_read_until_killed, args=(pool.name, frames_read))
    process.start()
    try:
        value = 0
        # Write until the reader is reading for real, then kill it mid-stream.
        deadline = time.monotonic() + 30
        while frames_read.value < 50:
            value += 1
            _write(pool, value)
            time.sleep(0.001)  # a frame rate the reader can follow
            assert time.monotonic() < deadline, "the reader never read"
        os.kill(process.pid, signal.SIGKILL)  # type: ignore[arg-type]
        process.join(10)
        assert process.exitcode == -signal.SIGKILL
        assert pool.doorbell is not None
        assert pool.doorbell.attached == 1
        # The writer goes on; its next ring finds the dead reader and drops it.
        for _ in range(1000):
            value += 1
            _write(pool, value)
        assert pool.readers == 0
        assert pool.doorbell.departed == 1
        assert pool.latest_sequence() == value
    finally:
        if process.is_alive():
            process.kill()
            process.join()


def test_nothing_outlives_the_writer() -> None:
    name = _name()
    pool = FramePool.create(name, slot_bytes=FRAME, slots=2)
    listener = DoorbellListener(name)
    address = "@" + doorbell_address(name)[1:].decode()
    assert address in _abstract_names()
    pool.close()
    pool.unlink()
    assert listener.drain() == 0
    assert listener.writer_gone  # the writer hung up: the reader sees end-of-file
    listener.close()
    assert name not in list_segments()
    assert address not in _abstract_names()
    with pytest.raises(ResourceError, match="no writer"):
        DoorbellListener(name)


def test_only_one_writer_holds_a_doorbell() -> None:
    name = _name()
    first = Doorbell(name)
    try:
        with pytest.raises(ResourceError, match="another live writer"):
            Doorbell(name)
    finally:
        first.close()
    Doorbell(name).close()  # free again once the first is closed


def test_a_ring_wakes_an_event_loop_and_the_reader_reads_every_packet() -> None:
    name = f"kz_t{uuid.uuid4().hex[:10]}_video"

    async def main(ring: PacketRing) -> list[int]:
        reader_ring = PacketRing.attach(name)
        listener = reader_ring.listen()
        position = PacketRingReader(reader_ring)
        woken = asyncio.Event()
        received: list[int] = []
        listener.watch(asyncio.get_running_loop(), woken.set)
        loop = asyncio.get_running_loop()
        try:
            # The writer appends from another thread, as the capture thread does.
            writing = loop.run_in_executor(None, _append_packets, ring, 200)
            while len(received) < 200:
                async with asyncio.timeout(10):
                    await woken.wait()
                woken.clear()
                received += [p.sequence for p in position.read_available().packets]
            await writing
        finally:
            listener.close()
            reader_ring.close()
        return received

    with PacketRing.create(name, capacity_bytes=1 << 20) as ring:
        assert asyncio.run(main(ring)) == list(range(1, 201))


def _append_packets(ring: PacketRing, count: int) -> None:
    for index in range(count):
        ring.append(b"x" * 100, pts=index, capture_us=0, monotonic_us=0, keyframe=index == 0)
        if index % 20 == 0:
            time.sleep(0.001)
