"""Frame pool and shm segments: round trips in one process, then real writer/reader processes.

Every test uses its own segment-name prefix and fails if a segment with it outlives the test.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.errors import ConfigError, ResourceError
from shared.models import PixelFormat
from shared.pool.frame_pool import FramePool, FramePoolReader, frame_bytes
from shared.pool.shm import (
    SegmentKind,
    attach_segment,
    create_segment,
    list_segments,
    segment_name,
    sweep_stale_segments,
    unlink_segment,
)

SPAWN = mp.get_context("spawn")
ROOT = Path(__file__).resolve().parents[1]
_COUNTER = itertools.count()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A segment-name prefix no other test (or parallel run) uses; checked for leaks after."""
    value = f"kzt{os.getpid()}_{next(_COUNTER)}_"
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


def _gray_frame(sequence: int, width: int = 64, height: int = 48) -> np.ndarray:
    """A small frame whose every byte, and first 8 bytes, say which sequence it is."""
    pixels = np.full(width * height, sequence % 251, dtype=np.uint8)
    pixels[:8] = np.frombuffer(sequence.to_bytes(8, "little"), np.uint8)
    return pixels


def _is_gray_frame(pixels: np.ndarray, sequence: int) -> bool:
    return bool(np.array_equal(pixels, _gray_frame(sequence)))


# --- one process ------------------------------------------------------------------------


@pytest.mark.parametrize("pixel_format", list(PixelFormat))
def test_round_trip_every_pixel_format(prefix: str, pixel_format: PixelFormat) -> None:
    width, height = 320, 240
    size = frame_bytes(width, height, pixel_format)
    rng = np.random.default_rng(7)
    with FramePool.create(prefix + "pool", slot_bytes=size, slots=3) as pool:
        reader = FramePoolReader(FramePool.attach(prefix + "pool"))
        assert reader.read_latest() is None
        frames = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(2)]
        for index, pixels in enumerate(frames):
            sequence = pool.write(
                pixels, capture_us=1000 + index, monotonic_us=7000 + index, width=width,
                height=height, pixel_format=pixel_format,
            )  # fmt: skip
            assert sequence == index + 1
            frame = reader.read_latest()
            assert frame is not None
            assert (frame.sequence, frame.capture_us, frame.monotonic_us, frame.missed) == (
                sequence, 1000 + index, 7000 + index, 0
            )  # fmt: skip
            assert (frame.width, frame.height, frame.pixel_format) == (width, height, pixel_format)
            assert frame.pixels.dtype == np.uint8 and frame.pixels.shape == (size,)
            assert np.array_equal(frame.pixels, pixels)
        assert reader.read_latest() is None  # nothing newer
        reader.pool.close()


def test_frame_sizes_follow_the_pixel_format() -> None:
    assert frame_bytes(1280, 720, PixelFormat.YUV420P) == 1280 * 720 * 3 // 2
    assert frame_bytes(1280, 720, PixelFormat.NV12) == 1280 * 720 * 3 // 2
    assert frame_bytes(4, 2, PixelFormat.BGR24) == frame_bytes(4, 2, PixelFormat.RGB24) == 24
    assert frame_bytes(4, 2, PixelFormat.GRAY) == 8
    assert frame_bytes(3, 3, PixelFormat.YUV420P) == 9 + 2 * 4  # chroma rounds up


def test_zero_copy_writing_commits_on_exit(prefix: str) -> None:
    size = frame_bytes(64, 48, PixelFormat.NV12)
    with FramePool.create(prefix + "pool", slot_bytes=size + 100, slots=2) as pool:
        reader = FramePoolReader(pool)
        with pool.writing(
            width=64, height=48, pixel_format=PixelFormat.NV12, capture_us=5, monotonic_us=5
        ) as view:
            assert view.shape == (size,) and view.dtype == np.uint8
            view[:] = 9
            view[-1] = 10
            assert reader.read_latest() is None  # not published until the block ends
        frame = reader.read_latest()
        assert frame is not None and frame.sequence == 1 and frame.capture_us == 5
        assert frame.pixels[0] == 9 and frame.pixels[-1] == 10 and frame.pixels.size == size


def test_writing_that_raises_publishes_nothing(prefix: str) -> None:
    with FramePool.create(prefix + "pool", slot_bytes=3072, slots=2) as pool:
        reader = FramePoolReader(pool)
        with (
            pytest.raises(RuntimeError),
            pool.writing(
                width=64, height=48, pixel_format=PixelFormat.GRAY, capture_us=1, monotonic_us=1
            ),
        ):
            raise RuntimeError("render failed")
        assert pool.latest_sequence() == 0 and reader.read_latest() is None
        assert pool.write(_gray_frame(1), capture_us=2, monotonic_us=2, width=64, height=48,
                          pixel_format=PixelFormat.GRAY) == 1  # fmt: skip


def test_bad_metadata_is_a_config_error_and_leaves_the_slot_usable(prefix: str) -> None:
    with FramePool.create(prefix + "pool", slot_bytes=3072, slots=2) as pool:
        reader = FramePoolReader(pool)
        with pytest.raises(ConfigError, match="int64"):
            pool.write(_gray_frame(1), capture_us=2**70, monotonic_us=0, width=64, height=48,
                       pixel_format=PixelFormat.GRAY)  # fmt: skip
        with pytest.raises(ConfigError, match="int64"):
            pool.write(_gray_frame(1), capture_us=0, monotonic_us=2**70, width=64, height=48,
                       pixel_format=PixelFormat.GRAY)  # fmt: skip
        assert pool.latest_sequence() == 0
        for sequence in (1, 2, 3):  # slot 0 again at 3: its generation must still be even
            pool.write(_gray_frame(sequence), capture_us=sequence, monotonic_us=sequence, width=64, height=48,
                       pixel_format=PixelFormat.GRAY)  # fmt: skip
        frame = reader.read_latest()
        assert frame is not None and frame.sequence == 3 and _is_gray_frame(frame.pixels, 3)
        assert reader.stats.torn_retries == 0


def test_a_slot_being_rewritten_is_not_returned(prefix: str) -> None:
    with FramePool.create(prefix + "pool", slot_bytes=3072, slots=2) as pool:
        reader = FramePoolReader(pool)
        for sequence in (1, 2):
            pool.write(_gray_frame(sequence), capture_us=sequence, monotonic_us=sequence, width=64, height=48,
                       pixel_format=PixelFormat.GRAY)  # fmt: skip
        with pool.writing(
            width=64, height=48, pixel_format=PixelFormat.GRAY, capture_us=3, monotonic_us=3
        ):
            assert reader.read(1) is None  # slot 0 is mid-write (odd generation)
            assert reader.stats.torn_retries > 0
            latest = reader.read_latest()
            assert latest is not None and latest.sequence == 2 and latest.missed == 1
        assert reader.read(1) is None  # overwritten by 3
        frame = reader.read(3)
        assert frame is not None and frame.missed == 0


def test_read_by_sequence_and_out_buffer(prefix: str) -> None:
    with FramePool.create(prefix + "pool", slot_bytes=3072, slots=4) as pool:
        for sequence in range(1, 7):
            pool.write(_gray_frame(sequence), capture_us=sequence, monotonic_us=sequence, width=64, height=48,
                       pixel_format=PixelFormat.GRAY)  # fmt: skip
        reader = FramePoolReader(pool)
        assert reader.latest_sequence() == 6
        assert reader.read(2) is None and reader.read(7) is None and reader.read(0) is None
        out = np.zeros(4096, np.uint8)
        frame = reader.read(4, out=out)
        assert frame is not None and frame.missed == 3
        assert np.shares_memory(frame.pixels, out) and _is_gray_frame(frame.pixels, 4)
        latest = reader.read_latest()
        assert latest is not None and latest.sequence == 6 and latest.missed == 1
        with pytest.raises(ConfigError):
            reader.read(5, out=np.zeros(10, np.uint8))


def test_payload_too_big_or_wrong_size_is_a_config_error(prefix: str) -> None:
    with FramePool.create(prefix + "pool", slot_bytes=1000, slots=2) as pool:
        with pytest.raises(ConfigError, match="larger than"):
            pool.write(np.zeros(3072, np.uint8), capture_us=0, monotonic_us=0, width=64, height=48,
                       pixel_format=PixelFormat.GRAY)  # fmt: skip
        with (
            pytest.raises(ConfigError, match="larger than"),
            pool.writing(
                width=640,
                height=480,
                pixel_format=PixelFormat.YUV420P,
                capture_us=0,
                monotonic_us=0,
            ),
        ):
            pass
        with pytest.raises(ConfigError):
            pool.write(
                b"\0" * 99,
                capture_us=0,
                monotonic_us=0,
                width=10,
                height=10,
                pixel_format=PixelFormat.GRAY,
            )
        assert pool.latest_sequence() == 0


def test_attach_to_a_missing_or_wrong_segment_is_a_resource_error(prefix: str) -> None:
    with pytest.raises(ResourceError, match=prefix + "nothing"):
        FramePool.attach(prefix + "nothing")
    ring = create_segment(prefix + "ring", 4096, SegmentKind.PACKET_RING)
    try:
        with pytest.raises(ResourceError, match="packet_ring"):
            FramePool.attach(prefix + "ring")
    finally:
        ring.close()
        ring.unlink()


def test_readers_cannot_write(prefix: str) -> None:
    with FramePool.create(prefix + "pool", slot_bytes=3072, slots=2) as pool:
        attached = FramePool.attach(pool.name)
        with pytest.raises(ConfigError, match="read-only"):
            attached.write(_gray_frame(1), capture_us=0, monotonic_us=0, width=64, height=48,
                           pixel_format=PixelFormat.GRAY)  # fmt: skip
        assert not attached.writer_closed
        pool.close()
        assert attached.writer_closed  # the creator closing raises the flag readers see
        attached.close()
        attached.close()


def test_names_are_validated() -> None:
    assert segment_name("abc-1", "frames") == "kz_abc-1_frames"
    with pytest.raises(ConfigError):
        segment_name("has space", "frames")
    with pytest.raises(ConfigError):
        segment_name("a/b", "frames")
    with pytest.raises(ConfigError):
        segment_name("x" * 25, "frames")  # over 30 characters: too long for macOS
    with pytest.raises(ConfigError):
        create_segment("", 10, SegmentKind.FRAME_POOL)


def test_more_than_dev_shm_holds_is_a_resource_error(prefix: str) -> None:
    with pytest.raises(ResourceError, match="not enough shared memory"):
        FramePool.create(prefix + "huge", slot_bytes=1 << 44, slots=4)
    assert list_segments(prefix) == []


def test_creating_a_live_segment_again_is_refused(prefix: str) -> None:
    with FramePool.create(prefix + "pool", slot_bytes=64, slots=2) as pool:
        with pytest.raises(ResourceError, match=f"in use by pid {os.getpid()}"):
            FramePool.create(prefix + "pool", slot_bytes=64, slots=2)
        assert pool.latest_sequence() == 0
    assert unlink_segment(prefix + "pool") is False  # already gone: idempotent


def test_sweep_waits_for_a_headerless_segment_to_age(prefix: str) -> None:
    # A name created with shm_open but not yet initialised looks exactly like this file.
    path = Path("/dev/shm") / (prefix + "raw")
    if not path.parent.is_dir():
        pytest.skip("needs /dev/shm")
    path.write_bytes(bytes(256))
    assert sweep_stale_segments(prefix) == []
    with pytest.raises(ResourceError, match="not initialised"):
        attach_segment(prefix + "raw", SegmentKind.FRAME_POOL)
    assert sweep_stale_segments(prefix, now=time.time() + 10) == [prefix + "raw"]


# --- several processes ------------------------------------------------------------------


def _own_segment(name: str, created: Event, release: Event) -> None:
    with FramePool.create(name, slot_bytes=3072, slots=2):
        created.set()
        release.wait(60)


def test_sweep_removes_only_segments_of_dead_creators(
    prefix: str, children: list[BaseProcess]
) -> None:
    roles = ("dead", "live", "reused")
    # One release event each: a process SIGKILLed while waiting on a shared Event would wedge
    # every later set() of it.
    created = {role: SPAWN.Event() for role in roles}
    release = {role: SPAWN.Event() for role in roles}
    owners = {role: _start(children, _own_segment, prefix + role, created[role], release[role])
              for role in roles}  # fmt: skip
    for event in created.values():
        assert event.wait(30)
    for role in ("dead", "reused"):
        owners[role].kill()  # SIGKILL: no chance to unlink
        owners[role].join(10)
    assert list_segments(prefix) == [prefix + role for role in roles]

    # Creating over a dead creator's name reclaims it; a live one is refused.
    with FramePool.create(prefix + "reused", slot_bytes=64, slots=2):
        with pytest.raises(ResourceError, match=f"in use by pid {owners['live'].pid}"):
            FramePool.create(prefix + "live", slot_bytes=64, slots=2)
        assert sweep_stale_segments(prefix) == [prefix + "dead"]
        assert list_segments(prefix) == [prefix + "live", prefix + "reused"]
    release["live"].set()
    owners["live"].join(10)
    assert owners["live"].exitcode == 0
    assert list_segments(prefix) == []


def _burst_writer(name: str, bursts: Any, ready: Event) -> None:
    """Writes each burst of frames it is sent at once (None: done)."""
    with FramePool.create(name, slot_bytes=3072, slots=4) as pool:
        ready.set()
        sequence = 0
        while (count := bursts.get(timeout=60)) is not None:
            for _ in range(count):
                sequence += 1
                pool.write(_gray_frame(sequence), capture_us=sequence, monotonic_us=sequence,
                           width=64, height=48, pixel_format=PixelFormat.GRAY)  # fmt: skip


def test_writer_laps_a_slow_reader_and_missed_adds_up(
    prefix: str, children: list[BaseProcess]
) -> None:
    """A writer process runs ahead of the reader by a burst of frames at a time (sent to it
    by the test, so the outcome does not depend on either process's speed): the reader gets
    the newest frame of each burst and is told how many it missed."""
    rng = np.random.default_rng(11)
    bursts = [1, 2, 4, 5, 9, 1] + [int(n) for n in rng.integers(1, 20, 30)]
    commands, ready = SPAWN.Queue(), SPAWN.Event()
    writer = _start(children, _burst_writer, prefix + "pool", commands, ready)
    assert ready.wait(30)
    pool = FramePool.attach(prefix + "pool")
    reader = FramePoolReader(pool)
    written, missed = 0, []
    try:
        for burst in bursts:
            commands.put(burst)
            written += burst
            deadline = time.monotonic() + 60  # a hang guard only
            while pool.latest_sequence() < written:
                assert time.monotonic() < deadline and writer.is_alive(), "the writer stalled"
                time.sleep(0.001)
            frame = reader.read_latest()
            assert frame is not None and frame.sequence == written
            assert frame.capture_us == frame.monotonic_us == written
            assert _is_gray_frame(frame.pixels, written)
            missed.append(frame.missed)
            assert reader.read_latest() is None  # nothing newer until the next burst
    finally:
        commands.put(None)
        pool.close()
    writer.join(30)
    assert writer.exitcode == 0
    # Every frame of a burst but its last was missed, however far the writer lapped the pool
    # (bursts above 4 frames overwrote the reader's next frame several times over).
    assert missed == [burst - 1 for burst in bursts]
    stats = reader.stats
    assert (stats.frames_read, stats.frames_missed) == (len(bursts), sum(bursts) - len(bursts))


_VARIANTS = 7
_HD = (1280, 720)


def _hd_bodies() -> list[np.ndarray]:
    size = frame_bytes(*_HD, PixelFormat.YUV420P) - 32
    return [
        np.random.default_rng(v).integers(0, 256, size, dtype=np.uint8) for v in range(_VARIANTS)
    ]


def _digest(body: np.ndarray) -> bytes:
    return hashlib.sha256(body.data).digest()[:24]


def _hd_writer(name: str, ready: Event, stop: Event) -> None:
    """Writes 720p frames as fast as it can: sequence, digest of the body, body."""
    bodies = _hd_bodies()
    digests = [np.frombuffer(_digest(body), np.uint8) for body in bodies]
    size = frame_bytes(*_HD, PixelFormat.YUV420P)
    with FramePool.create(name, slot_bytes=size, slots=4) as pool:
        ready.set()
        sequence = 1
        while not stop.is_set():
            variant = sequence % _VARIANTS
            with pool.writing(width=_HD[0], height=_HD[1], pixel_format=PixelFormat.YUV420P,
                              capture_us=sequence, monotonic_us=2 * sequence) as view:  # fmt: skip
                view[:8] = np.frombuffer(sequence.to_bytes(8, "little"), np.uint8)
                view[8:32] = digests[variant]
                view[32:] = bodies[variant]
            sequence += 1


def _hd_reader(name: str, reads: int, progress: Any, stop: Event | None, results: Any) -> None:
    """Reads and checks frames until ``reads`` are done (or ``stop``); reports the tally."""
    digests = [_digest(body) for body in _hd_bodies()]
    pool = FramePool.attach(name)
    reader = FramePoolReader(pool)
    out = np.empty(frame_bytes(*_HD, PixelFormat.YUV420P), np.uint8)
    good = bad = 0
    while good + bad < reads and not (stop is not None and stop.is_set()):
        frame = reader.read_latest(out)
        if frame is None:
            continue
        pixels = frame.pixels
        embedded = int.from_bytes(pixels[:8].tobytes(), "little")
        digest = pixels[8:32].tobytes()
        intact = (
            embedded == frame.sequence == frame.capture_us == frame.monotonic_us // 2
            and digest == digests[frame.sequence % _VARIANTS]
            and digest == _digest(pixels[32:])
        )
        if intact:
            good += 1
        else:
            bad += 1
        progress.value = good + bad
    stats = reader.stats
    results.put((good, bad, stats.torn_retries, stats.frames_missed))
    pool.close()


def test_no_torn_frames_under_concurrent_writing(prefix: str, children: list[BaseProcess]) -> None:
    ready, stop = SPAWN.Event(), SPAWN.Event()
    results = SPAWN.Queue()
    writer = _start(children, _hd_writer, prefix + "pool", ready, stop)
    assert ready.wait(30)
    # Kept referenced: the child unpickles it after start().  No lock, so that a killed child
    # cannot leave it held.
    progress = SPAWN.Value("q", 0, lock=False)
    reader = _start(children, _hd_reader, prefix + "pool", 3000, progress, None, results)
    good, bad, torn_retries, missed = _result(results, reader)
    reader.join(10)
    stop.set()
    writer.join(30)
    print(f"\n{good} intact reads, {torn_retries} torn copies discarded, {missed} frames skipped")
    assert (good, bad) == (3000, 0)
    assert reader.exitcode == 0 and writer.exitcode == 0


def test_killing_a_reader_mid_read_affects_nobody(prefix: str, children: list[BaseProcess]) -> None:
    ready, stop = SPAWN.Event(), SPAWN.Event()
    results = SPAWN.Queue()
    writer = _start(children, _hd_writer, prefix + "pool", ready, stop)
    assert ready.wait(30)
    # No locks on the counters: the doomed reader could die holding one.
    doomed_progress = SPAWN.Value("q", 0, lock=False)
    steady_progress = SPAWN.Value("q", 0, lock=False)
    unused = SPAWN.Queue()  # kept referenced: the child unpickles it after start()
    doomed = _start(children, _hd_reader, prefix + "pool", 10**9, doomed_progress, None, unused)
    steady = _start(children, _hd_reader, prefix + "pool", 10**9, steady_progress, stop, results)
    observer = FramePool.attach(prefix + "pool")
    try:
        deadline = time.monotonic() + 60
        while min(doomed_progress.value, steady_progress.value) < 50:
            assert time.monotonic() < deadline, "readers never got going"
            time.sleep(0.01)
        doomed.kill()  # SIGKILL while it is busy copying frames out
        doomed.join(10)
        # The writer and the other reader both go on: wait until each has moved past where
        # it was at the kill (a deadline, not a nap: how far they get in a given time
        # depends on the machine's load).
        written, read = observer.latest_sequence(), steady_progress.value
        deadline = time.monotonic() + 60
        while observer.latest_sequence() <= written or steady_progress.value <= read + 50:
            assert time.monotonic() < deadline, "the writer or the reader stopped at the kill"
            time.sleep(0.01)
    finally:
        stop.set()
        observer.close()
    good, bad, _, _ = _result(results, steady)
    writer.join(30)
    steady.join(30)
    assert bad == 0 and good > 50
    assert writer.exitcode == 0 and steady.exitcode == 0
    assert list_segments(prefix) == [] and sweep_stale_segments(prefix) == []


_ATTACH_AND_READ = """
import sys
from shared.pool.frame_pool import FramePool, FramePoolReader
pool = FramePool.attach(sys.argv[1])
frame = FramePoolReader(pool).read_latest()
assert frame is not None and frame.sequence == 1
pool.close()
"""


def _run_in_fresh_interpreter(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    # A fresh interpreter (not a spawn child) has its own resource tracker, as a Ray worker does;
    # a spawn child would share ours and hide the bug.  Its tracker writes to the stderr we read.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_an_attaching_process_exiting_leaves_the_segment_alone(prefix: str) -> None:
    with FramePool.create(prefix + "pool", slot_bytes=3072, slots=2) as pool:
        pool.write(
            _gray_frame(1),
            capture_us=1,
            monotonic_us=1,
            width=64,
            height=48,
            pixel_format=PixelFormat.GRAY,
        )
        for _ in range(2):
            finished = _run_in_fresh_interpreter(_ATTACH_AND_READ, prefix + "pool")
            assert finished.returncode == 0, finished.stderr
            assert "resource_tracker" not in finished.stderr and "leaked" not in finished.stderr
            assert list_segments(prefix) == [prefix + "pool"]
    assert list_segments(prefix) == []


_PLAIN_ATTACH = """
import sys
from multiprocessing.shared_memory import SharedMemory
SharedMemory(sys.argv[1]).close()
"""


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="3.13 no longer tracks on attach")
def test_the_stdlib_bug_the_previous_test_guards_against(prefix: str) -> None:
    """Control: plain SharedMemory attach in another interpreter does unlink the segment."""
    with FramePool.create(prefix + "pool", slot_bytes=64, slots=2):
        finished = _run_in_fresh_interpreter(_PLAIN_ATTACH, prefix + "pool")
        assert "leaked shared_memory" in finished.stderr
        assert list_segments(prefix) == []
