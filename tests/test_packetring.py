"""Packet ring: byte-exact round trips, fan-out to reader processes, lapped readers.

Every test uses its own segment-name prefix and fails if a segment with it outlives the test.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing as mp
import os
import queue
import random
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import Any

import pytest

from shared.errors import ConfigError, ResourceError
from shared.pool.packet_ring import PacketRing, PacketRingReader, RingPacket
from shared.pool.shm import list_segments, sweep_stale_segments, unlink_segment

SPAWN = mp.get_context("spawn")
_COUNTER = itertools.count()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A segment-name prefix no other test (or parallel run) uses; checked for leaks after."""
    value = f"kzr{os.getpid()}_{next(_COUNTER)}_"
    yield value
    leftovers = list_segments(value)
    for name in leftovers:
        unlink_segment(name)
    assert leftovers == [], f"test leaked shared memory segments {leftovers}"


@pytest.fixture
def children() -> Iterator[list[BaseProcess]]:
    """Processes a test starts; any still running when it ends are killed."""
    started: list[BaseProcess] = []
    yield started
    for process in started:
        if process.is_alive():
            process.kill()
        process.join(10)


def _start(children: list[BaseProcess], target: Any, *args: Any) -> BaseProcess:
    process = SPAWN.Process(target=target, args=args, daemon=True)
    process.start()
    children.append(process)
    return process


def _result(results: Any, process: BaseProcess, timeout: float = 120) -> Any:
    """The child's report, failing fast if it dies without one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=0.2)
        except queue.Empty:
            assert process.is_alive() or not results.empty(), f"child exited {process.exitcode}"
    raise AssertionError("child did not report in time")


def _payload(sequence: int, length: int) -> bytes:
    """``length`` (>= 40) bytes that prove their own integrity: sequence, digest, body."""
    body = random.Random(sequence).randbytes(length - 40)
    return sequence.to_bytes(8, "little") + hashlib.sha256(body).digest() + body


def _is_intact(packet: RingPacket) -> bool:
    data = packet.data
    return (
        int.from_bytes(data[:8], "little") == packet.sequence
        and hashlib.sha256(data[40:]).digest() == data[8:40]
        and packet.pts == packet.sequence * 3000
        and packet.capture_us == packet.sequence * 10
        and packet.monotonic_us == _MONOTONIC_ORIGIN_US + packet.sequence * 7
    )


#: Monotonic stamps unlike the wall ones, so a packet with the two swapped is not intact.
_MONOTONIC_ORIGIN_US = 2**52


def _append(ring: PacketRing, sequence: int, length: int, *, keyframe: bool) -> None:
    assert ring.append(
        _payload(sequence, length), pts=sequence * 3000, capture_us=sequence * 10,
        monotonic_us=_MONOTONIC_ORIGIN_US + sequence * 7, keyframe=keyframe, duration=3000,
    ) == sequence  # fmt: skip


# --- one process ------------------------------------------------------------------------


def test_round_trip_of_variable_sizes_with_wrap_around(prefix: str) -> None:
    rng = random.Random(3)
    capacity = 64 * 1024
    with PacketRing.create(prefix + "ring", capacity_bytes=capacity, index_slots=64) as ring:
        reader = PacketRingReader(PacketRing.attach(prefix + "ring"))
        assert reader.read_available() == reader.read_available(max_packets=3)  # nothing yet
        sent: list[bytes] = []
        sizes = [1, capacity // 4, 0, 7, capacity // 4 - 1]
        while sum(len(data) for data in sent) < 5 * capacity:
            size = sizes.pop() if sizes else rng.randint(1, capacity // 4)
            data = rng.randbytes(size)
            # bytes, bytearray and memoryview all go in.
            source = (data, bytearray(data), memoryview(data))[len(sent) % 3]
            keyframe = len(sent) % 5 == 0
            sequence = ring.append(
                source,
                pts=len(sent),
                capture_us=-len(sent),
                monotonic_us=3 * len(sent),
                keyframe=keyframe,
            )
            sent.append(data)
            assert sequence == len(sent) == ring.last_sequence()
            if rng.random() < 0.6:  # read now and then, always before being lapped
                received = reader.read_available()
                assert received.missed == 0
                for packet in received.packets:
                    index = packet.sequence - 1
                    assert packet.data == sent[index]
                    assert (packet.pts, packet.capture_us, packet.monotonic_us) == (
                        index,
                        -index,
                        3 * index,
                    )
                    assert packet.keyframe == (index % 5 == 0) and packet.duration == 0
        tail = reader.read_available()
        assert tail.missed == 0 and reader.next_sequence == len(sent) + 1
        assert reader.stats.packets_read == len(sent) and reader.stats.packets_missed == 0
        reader.ring.close()


def test_both_capture_stamps_round_trip_apart_from_each_other_and_the_flags(
    prefix: str,
) -> None:
    # (wall, monotonic) pairs: int64 extremes each way, and a wall stamp an NTP step put an
    # hour behind a monotonic one that ran on.
    stamps = [(-(2**63), 2**63 - 1), (2**63 - 1, -(2**63)), (0, -1), (-3_600_000_000, 5)]
    with PacketRing.create(prefix + "ring", capacity_bytes=1 << 16) as ring:
        reader = PacketRingReader(PacketRing.attach(prefix + "ring"))
        for index, (wall, monotonic) in enumerate(stamps):
            ring.append(
                bytes(ring.max_packet_bytes - index),
                pts=index,
                capture_us=wall,
                monotonic_us=monotonic,
                keyframe=index % 2 == 0,
            )
        packets = reader.read_available().packets
        assert [(p.capture_us, p.monotonic_us) for p in packets] == stamps
        assert [p.keyframe for p in packets] == [True, False, True, False]
        assert [len(p.data) for p in packets] == [ring.max_packet_bytes - i for i in range(4)]
        reader.ring.close()


def test_packets_that_exactly_fill_the_ring_wrap_cleanly(prefix: str) -> None:
    with PacketRing.create(prefix + "ring", capacity_bytes=4096, index_slots=8) as ring:
        reader = PacketRingReader(ring)
        for lap in range(5):
            for quarter in range(4):
                sequence = lap * 4 + quarter + 1
                _append(ring, sequence, 1024, keyframe=quarter == 0)
            batch = reader.read_available()
            assert [p.sequence for p in batch.packets] == list(range(lap * 4 + 1, lap * 4 + 5))
            assert batch.missed == 0 and all(_is_intact(p) for p in batch.packets)


def test_max_packets_limits_a_batch(prefix: str) -> None:
    with PacketRing.create(prefix + "ring", capacity_bytes=1 << 16) as ring:
        reader = PacketRingReader(ring)
        for sequence in range(1, 11):
            _append(ring, sequence, 100, keyframe=False)
        assert [p.sequence for p in reader.read_available(max_packets=4).packets] == [1, 2, 3, 4]
        assert [p.sequence for p in reader.read_available().packets] == list(range(5, 11))


def test_a_lapped_reader_counts_missed_and_resumes_at_the_oldest_keyframe(prefix: str) -> None:
    with PacketRing.create(prefix + "ring", capacity_bytes=4096, index_slots=16) as ring:
        reader = PacketRingReader(ring)
        for sequence in range(1, 101):
            _append(ring, sequence, 100 + sequence * 3 % 200, keyframe=sequence % 7 == 0)
        batch = reader.read_available()
        first = batch.packets[0]
        assert first.keyframe and first.sequence > 1
        assert [p.sequence for p in batch.packets] == list(range(first.sequence, 101))
        assert all(_is_intact(p) for p in batch.packets)
        assert batch.missed == first.sequence - 1
        # It was the oldest keyframe still present: the one before it is gone.
        assert ring._read(first.sequence - 7) is None
        assert reader.stats.resyncs == 1 and reader.stats.packets_missed == batch.missed


def test_a_lapped_reader_with_no_keyframe_left_waits_for_the_next(prefix: str) -> None:
    with PacketRing.create(prefix + "ring", capacity_bytes=4096, index_slots=16) as ring:
        reader = PacketRingReader(ring)
        for sequence in range(1, 41):
            _append(ring, sequence, 200, keyframe=sequence == 1)
        lapped = reader.read_available()
        assert lapped.packets == [] and lapped.missed == 40  # nothing decodable is left
        assert reader.read_available().missed == 0
        _append(ring, 41, 200, keyframe=False)
        _append(ring, 42, 200, keyframe=True)
        batch = reader.read_available()
        assert [p.sequence for p in batch.packets] == [42]
        assert reader.stats.packets_missed == 41 and reader.stats.packets_read == 1


def test_latest_keyframe_start(prefix: str) -> None:
    with PacketRing.create(prefix + "ring", capacity_bytes=1 << 16) as ring:
        for sequence in range(1, 21):
            _append(ring, sequence, 100, keyframe=sequence in (1, 11))
        joined = PacketRingReader(ring, start="latest_keyframe")
        batch = joined.read_available()
        assert [p.sequence for p in batch.packets] == list(range(11, 21)) and batch.missed == 0
        assert PacketRingReader(ring).read_available().packets == []  # "next": only new ones

    with PacketRing.create(prefix + "bare", capacity_bytes=1 << 16) as ring:
        _append(ring, 1, 100, keyframe=False)
        waiting = PacketRingReader(ring, start="latest_keyframe")
        _append(ring, 2, 100, keyframe=False)
        assert waiting.read_available().packets == []
        _append(ring, 3, 100, keyframe=True)
        _append(ring, 4, 100, keyframe=False)
        batch = waiting.read_available()
        assert [p.sequence for p in batch.packets] == [3, 4] and batch.missed == 0


def test_too_large_packets_and_bad_arguments_are_config_errors(prefix: str) -> None:
    with PacketRing.create(prefix + "ring", capacity_bytes=4000) as ring:
        assert ring.max_packet_bytes == 1000
        ring.append(bytes(1000), pts=0, capture_us=0, monotonic_us=0, keyframe=True)
        with pytest.raises(ConfigError, match="larger than a quarter"):
            ring.append(bytes(1001), pts=0, capture_us=0, monotonic_us=0, keyframe=True)
        assert ring.last_sequence() == 1
        attached = PacketRing.attach(prefix + "ring")
        with pytest.raises(ConfigError, match="read-only"):
            attached.append(b"x", pts=0, capture_us=0, monotonic_us=0, keyframe=False)
        with pytest.raises(ConfigError):
            PacketRingReader(attached, start="oldest")  # type: ignore[arg-type]
        attached.close()
    with pytest.raises(ConfigError):
        PacketRing.create(prefix + "tiny", capacity_bytes=16)
    with pytest.raises(ConfigError):
        PacketRing.create(prefix + "few", capacity_bytes=4096, index_slots=2)
    with pytest.raises(ResourceError, match=prefix + "none"):
        PacketRing.attach(prefix + "none")


def test_bad_metadata_is_a_config_error_and_loses_nothing(prefix: str) -> None:
    with PacketRing.create(prefix + "ring", capacity_bytes=4096, index_slots=4) as ring:
        reader = PacketRingReader(ring)
        _append(ring, 1, 100, keyframe=True)
        with pytest.raises(ConfigError, match="int64"):
            ring.append(b"x" * 100, pts=2**70, capture_us=0, monotonic_us=0, keyframe=False)
        with pytest.raises(ConfigError, match="monotonic_us"):
            ring.append(b"x" * 100, pts=0, capture_us=0, monotonic_us=2**63, keyframe=True)
        received = list(reader.read_available().packets)
        for sequence in range(2, 7):  # entry 0 is reused at 5: its generation must be even
            _append(ring, sequence, 100, keyframe=False)
            batch = reader.read_available()
            assert batch.missed == 0
            received += batch.packets
        assert [p.sequence for p in received] == list(range(1, 7))
        assert all(_is_intact(p) for p in received)


# --- several processes ------------------------------------------------------------------


def _keeping_up_reader(name: str, count: int, ready: Any, progress: Any, results: Any) -> None:
    ring = PacketRing.attach(name)
    reader = PacketRingReader(ring)
    ready.value = 1
    expected, missed, corrupt = 1, 0, 0
    deadline = time.monotonic() + 120
    while expected <= count and time.monotonic() < deadline:
        batch = reader.read_available()
        missed += batch.missed
        for packet in batch.packets:
            if packet.sequence != expected or not _is_intact(packet):
                corrupt += 1
            expected = packet.sequence + 1
        progress.value = expected - 1
        if not batch.packets:
            time.sleep(0.0005)
    results.put((expected - 1, missed, corrupt))
    ring.close()


def test_every_reader_process_gets_every_packet_in_order(
    prefix: str, children: list[BaseProcess]
) -> None:
    count, readers = 2000, 3
    rng = random.Random(5)
    with PacketRing.create(prefix + "ring", capacity_bytes=1 << 20, index_slots=128) as ring:
        # Unlocked shared counters: plain flags, and nothing a dying child could leave held.
        ready = [SPAWN.Value("q", 0, lock=False) for _ in range(readers)]
        progress = [SPAWN.Value("q", 0, lock=False) for _ in range(readers)]
        results = [SPAWN.Queue() for _ in range(readers)]
        processes = [
            _start(
                children, _keeping_up_reader, ring.name, count, ready[i], progress[i], results[i]
            )
            for i in range(readers)
        ]
        deadline = time.monotonic() + 60
        while not all(flag.value for flag in ready):
            assert time.monotonic() < deadline, "readers never attached"
            time.sleep(0.01)
        for sequence in range(1, count + 1):
            # The test's flow control (the ring has none): stay within 64 packets (<= 1 MiB,
            # half the index) of the slowest reader, so keeping up is guaranteed.
            while sequence - min(p.value for p in progress) > 64:
                assert time.monotonic() < deadline + 60, "a reader stalled"
                time.sleep(0.0005)
            _append(ring, sequence, rng.randint(40, 16 * 1024), keyframe=sequence % 30 == 1)
        reports = [_result(results[i], processes[i]) for i in range(readers)]
    assert reports == [(count, 0, 0)] * readers
    for process in processes:
        process.join(10)
        assert process.exitcode == 0


def _racing_writer(name: str, ready: Event, stop: Event) -> None:
    rng = random.Random(11)
    with PacketRing.create(name, capacity_bytes=64 * 1024, index_slots=256) as ring:
        ready.set()
        sequence = 1
        while not stop.is_set():
            _append(ring, sequence, rng.randint(40, 4000), keyframe=sequence % 10 == 1)
            sequence += 1


def test_a_lapped_reader_never_returns_overwritten_data(
    prefix: str, children: list[BaseProcess]
) -> None:
    ready, stop = SPAWN.Event(), SPAWN.Event()
    writer = _start(children, _racing_writer, prefix + "ring", ready, stop)
    assert ready.wait(30)
    ring = PacketRing.attach(prefix + "ring")
    reader = PacketRingReader(ring)
    first_expected = reader.next_sequence
    rng = random.Random(12)
    delivered = missed = gaps = 0
    previous: int | None = None
    deadline = time.monotonic() + 3
    try:
        while time.monotonic() < deadline:
            batch = reader.read_available(max_packets=rng.choice([None, 5, 50]))
            missed += batch.missed
            for packet in batch.packets:
                assert _is_intact(packet), f"packet {packet.sequence} is corrupt"
                if previous is not None and packet.sequence != previous + 1:
                    gaps += 1
                    assert packet.keyframe, "after a gap the reader must resume at a keyframe"
                assert packet.keyframe == (packet.sequence % 10 == 1)
                previous = packet.sequence
            delivered += len(batch.packets)
            time.sleep(rng.choice([0, 0, 0.0002, 0.002, 0.02]))  # sometimes far too slow
    finally:
        stop.set()
    print(f"\n{delivered} delivered, {missed} missed, {reader.stats.resyncs} resyncs")
    # Every sequence from the reader's start to its position was delivered or counted missed.
    assert delivered + missed == reader.next_sequence - first_expected
    assert missed > 0 and gaps > 0 and delivered > 100
    assert reader.stats.resyncs > 0
    ring.close()
    writer.join(30)
    assert writer.exitcode == 0
    assert list_segments(prefix) == [] and sweep_stale_segments(prefix) == []
