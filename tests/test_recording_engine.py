"""The RecordingEngine on the session's Ray cluster: the recorder shell around RecordingCore.

The timing decisions (pause, rotation, quota, schedule, pre-roll, start at a keyframe) are
tested with literal times in ``test_recording_core.py``; these tests check that the actors
carry them out on a live stream.  They wait on conditions with deadlines, never on sleeps, and
assert only what the code guarantees: the test pattern stamps each frame's capture time into
its picture, so a file is checked frame by frame against the times the test observed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import av
import pytest

from actors import StreamManager
from shared.errors import PermissionError
from shared.models import (
    MotionTriggerConfig,
    RecordingConfig,
    RecordingSession,
    RecordingState,
    Resolution,
    StreamConfig,
    StreamQuality,
    StreamState,
    ViewerPermissions,
)
from shared.recording.core import KEYFRAME_LEAD_S
from shared.viewer.client import read_frame_stamp
from tests.conftest import stream_actors, wait_for_no_leaks
from tests.test_recording import probe

pytestmark = pytest.mark.ray

FPS = 30
QUALITY = StreamQuality(resolution=Resolution(320, 180), framerate=FPS, bitrate=400_000)
#: A GOP longer than any of these tests: every keyframe after the first is one a recorder
#: asked for, so a rotation or a resume that happens proves the request went through.
NO_PERIODIC_KEYFRAMES_S = 60.0
#: Generous: a loaded two-core machine starts Ray workers slowly.
WAIT_S = 60.0

T = TypeVar("T")


@contextlib.asynccontextmanager
async def live_stream(
    keyframe_interval_s: float = 2.0,
) -> AsyncIterator[tuple[StreamManager, str]]:
    async with StreamManager.start() as manager:
        session = await manager.start_camera_stream(
            StreamConfig(source="test", quality=QUALITY, keyframe_interval_s=keyframe_interval_s)
        )
        try:
            yield manager, session.session_id
        finally:
            await manager.stop_stream(session.session_id)
    wait_for_no_leaks(session.session_id)


async def wait_for(
    read: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str, timeout: float = WAIT_S
) -> T:
    """Poll ``read`` until ``done`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(0.1)


async def wait_status(
    manager: StreamManager, recording_id: str, done: Callable[[RecordingSession], bool], what: str
) -> RecordingSession:
    return await wait_for(lambda: manager.get_recording_status(recording_id), done, what)


async def frames_encoded(manager: StreamManager, sid: str) -> int:
    return (await manager.get_stream(sid)).stats.frames_encoded


def frames_and_duration(path: Path) -> tuple[int, float]:
    info = probe(path)
    return int(info["streams"]["video"]["nb_read_frames"]), info["duration"]


def decoded(path: Path) -> list[tuple[float, int]]:
    """(presentation time in seconds, capture time in microseconds) of every frame in the file."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            stamp = read_frame_stamp(frame)
            assert stamp is not None, f"frame at {frame.time}s of {path} has no readable stamp"
            frames.append((float(frame.time), stamp.capture_us))
    return frames


def keyframe_stamps(path: Path) -> list[int]:
    """The capture time in microseconds of every keyframe in the file, in order."""
    with av.open(str(path)) as container:
        stamps = []
        for frame in container.decode(video=0):
            if frame.key_frame:
                stamp = read_frame_stamp(frame)
                assert stamp is not None
                stamps.append(stamp.capture_us)
    return stamps


def wall_us() -> int:
    return time.time_ns() // 1000


def test_pause_and_resume_keep_one_continuous_timeline(ray_cluster: str, tmp_path: Path) -> None:
    path = tmp_path / "talk.mp4"

    async def main() -> tuple[int, int]:
        async with live_stream(NO_PERIODIC_KEYFRAMES_S) as (manager, sid):
            recording = await manager.start_recording(sid, RecordingConfig(output_path=str(path)))
            rid = recording.session_id
            await wait_status(manager, rid, lambda s: s.frames_written >= 30, "30 frames")
            paused = await manager.pause_recording(rid)
            paused_at = wall_us()
            assert paused.state is RecordingState.PAUSED
            encoded = await frames_encoded(manager, sid)
            await wait_for(
                lambda: frames_encoded(manager, sid), lambda n: n >= encoded + 60, "2 s of stream"
            )
            still = await manager.get_recording_status(rid)
            assert still.frames_written == paused.frames_written  # nothing written while paused
            resumed_at = wall_us()
            resumed = await manager.resume_recording(rid)
            assert resumed.state is RecordingState.RECORDING
            await wait_status(
                manager, rid, lambda s: s.frames_written >= paused.frames_written + 30, "more"
            )
            final = await manager.stop_recording(rid)
            assert final.state is RecordingState.STOPPED and final.segments == [str(path)]
            return paused_at, resumed_at

    paused_at, resumed_at = asyncio.run(main())
    frames = decoded(path)
    captures = [c for _, c in frames]
    assert not [c for c in captures if paused_at <= c <= resumed_at]
    # The first frame after the pause (a keyframe the recorder asked for: the stream has no
    # periodic ones) follows the last one before it by exactly one frame in the file.
    cut = next(i for i, c in enumerate(captures) if c > resumed_at)
    assert 0 < cut < len(frames)
    assert frames[cut][0] - frames[cut - 1][0] == pytest.approx(1 / FPS, abs=1e-3)


def rotated_segments(tmp_path: Path, config: RecordingConfig) -> list[str]:
    """Record until three segments were opened; every keyframe is one the recorder asked for."""

    async def main() -> list[str]:
        async with live_stream(NO_PERIODIC_KEYFRAMES_S) as (manager, sid):
            recording = await manager.start_recording(sid, config)
            await wait_status(
                manager, recording.session_id, lambda s: len(s.segments) >= 3, "3 segments"
            )
            final = await manager.stop_recording(recording.session_id)
            return final.segments

    segments = asyncio.run(main())
    assert [Path(s).name for s in segments[:3]] == ["cam.mp4", "cam-001.mp4", "cam-002.mp4"]
    for segment in segments:
        assert frames_and_duration(Path(segment))[0] > 0
    return segments


def test_duration_limit_rotates_into_numbered_segments(ray_cluster: str, tmp_path: Path) -> None:
    config = RecordingConfig(output_path=str(tmp_path / "cam.mp4"), max_duration_s=1.0)
    for segment in rotated_segments(tmp_path, config)[:-1]:
        # Full segments rotated once their limit came within KEYFRAME_LEAD_S, at the keyframe
        # the recorder then asked for (ffprobe rounds to the millisecond).
        _, duration = frames_and_duration(Path(segment))
        assert duration >= 1.0 - KEYFRAME_LEAD_S - 0.002


def test_size_limit_rotates_into_numbered_segments(ray_cluster: str, tmp_path: Path) -> None:
    config = RecordingConfig(output_path=str(tmp_path / "cam.mp4"), max_bytes=100_000)
    for segment in rotated_segments(tmp_path, config)[:-1]:
        assert Path(segment).stat().st_size >= 100_000  # rotated only once the muxer had that


def test_quota_deletes_the_oldest_segments(ray_cluster: str, tmp_path: Path) -> None:
    async def main() -> tuple[list[str], list[str]]:
        async with live_stream() as (manager, sid):
            config = RecordingConfig(
                output_path=str(tmp_path / "q.mp4"), max_duration_s=1.0, quota_bytes=150_000
            )
            recording = await manager.start_recording(sid, config)
            await wait_status(manager, recording.session_id, lambda s: bool(s.deleted), "deletes")
            final = await manager.stop_recording(recording.session_id)
            return final.segments, final.deleted

    segments, deleted = asyncio.run(main())
    assert deleted and deleted == segments[: len(deleted)]  # oldest first
    remaining = sorted(p for p in tmp_path.iterdir())
    assert all(not Path(d).exists() for d in deleted)
    # Enforced after each closed segment, never deleting the one just closed.
    assert remaining and sum(p.stat().st_size for p in remaining) <= 150_000 + max(
        p.stat().st_size for p in remaining
    )


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 384 KiB tmpfs: a real full disk, not a simulated one (full after about 8 s of the
    400 kbps stream, with well over 30 frames written before it fills)."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=384k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        message = f"cannot mount a tmpfs (needs root): {result.stderr.strip()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_ends_the_recording_in_error_but_not_the_stream(
    ray_cluster: str, tiny_disk: Path
) -> None:
    path = tiny_disk / "full.mp4"

    async def main() -> None:
        async with live_stream() as (manager, sid):
            recording = await manager.start_recording(sid, RecordingConfig(output_path=str(path)))
            status = await wait_status(
                manager, recording.session_id, lambda s: s.state is RecordingState.ERROR, "error"
            )
            assert status.error is not None and "disk full" in status.error.message
            before = await frames_encoded(manager, sid)
            await wait_for(lambda: frames_encoded(manager, sid), lambda n: n > before, "frames")
            assert (await manager.get_stream(sid)).state is StreamState.ACTIVE
            final = await manager.stop_recording(recording.session_id)
            assert final.state is RecordingState.ERROR

    asyncio.run(main())
    frames, _ = frames_and_duration(path)
    assert frames > 30  # what was written before the disk filled still plays


def test_a_killed_recorder_is_restarted_into_a_new_segment(
    ray_cluster: str, tmp_path: Path
) -> None:
    async def main() -> tuple[list[str], int]:
        async with live_stream() as (manager, sid):
            recording = await manager.start_recording(
                sid, RecordingConfig(output_path=str(tmp_path / "k.mp4"))
            )
            rid = recording.session_id
            before_kill = await wait_status(manager, rid, lambda s: s.frames_written >= 60, "2 s")
            pid = next(p.pid for p in (await manager.resources()).processes if p.label == rid)
            os.kill(pid, signal.SIGKILL)
            # While the recorder restarts, status answers with the last known state.
            await wait_status(manager, rid, lambda s: len(s.segments) >= 2, "a restart")
            await wait_status(manager, rid, lambda s: s.frames_written >= 15, "the new segment")
            final = await manager.stop_recording(rid)
            return final.segments, before_kill.frames_written

    segments, written_before_kill = asyncio.run(main())
    assert [Path(s).name for s in segments] == ["k.mp4", "k-001.mp4"]
    first_frames, _ = frames_and_duration(Path(segments[0]))
    # The kill loses at most the unfinished fragment (frag_duration 0.5 s: 15 frames) and the
    # frames handed to the muxer's thread but not yet written.
    assert first_frames >= written_before_kill - 30
    second_frames, _ = frames_and_duration(Path(segments[1]))
    assert second_frames > 0


def test_stopping_a_recording_whose_recorder_just_died_leaves_no_recorder(
    ray_cluster: str, tmp_path: Path
) -> None:
    """A stop that lands before the health round notices the death (or while it restarts
    the recorder) returns the last known status and leaves no recorder actor behind."""

    async def main() -> tuple[RecordingSession, list[str]]:
        async with live_stream() as (manager, sid):
            recording = await manager.start_recording(
                sid, RecordingConfig(output_path=str(tmp_path / "d.mp4"))
            )
            rid = recording.session_id
            await wait_status(manager, rid, lambda s: s.frames_written >= 30, "1 s written")
            pid = next(p.pid for p in (await manager.resources()).processes if p.label == rid)
            os.kill(pid, signal.SIGKILL)
            final = await manager.stop_recording(rid)
            recorders = await wait_for(
                lambda: asyncio.to_thread(stream_actors, sid),
                lambda names: not any("-rec" in name for name in names),
                "the recorder actors to go",
            )
            return final, recorders

    final, recorders = asyncio.run(main())
    assert final.state is RecordingState.STOPPED
    assert final.frames_written >= 30
    assert Path(final.segments[0]).name == "d.mp4"
    assert not any("-rec" in name for name in recorders)


def test_only_viewers_allowed_to_record_may_start_one(ray_cluster: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with live_stream() as (manager, sid):
            watcher = await manager.add_viewer(sid, "watcher")
            recorder = await manager.add_viewer(sid, "recorder", ViewerPermissions(can_record=True))
            with pytest.raises(PermissionError):
                await manager.start_recording(
                    sid,
                    RecordingConfig(output_path=str(tmp_path / "no.mp4")),
                    viewer_id=watcher.viewer_id,
                )
            allowed = await manager.start_recording(
                sid,
                RecordingConfig(output_path=str(tmp_path / "yes.mp4")),
                viewer_id=recorder.viewer_id,
            )
            await wait_status(
                manager, allowed.session_id, lambda s: s.frames_written > 0, "a frame"
            )
            await manager.stop_recording(allowed.session_id)

    asyncio.run(main())
    assert not (tmp_path / "no.mp4").exists()
    assert frames_and_duration(tmp_path / "yes.mp4")[0] > 0


def test_scheduled_recording_covers_its_window(ray_cluster: str, tmp_path: Path) -> None:
    """Scheduled 1 s ahead, less than the schedule's lead: the recorder's process may well open
    after start_at (on a fresh machine it did, and the file came out 0.6 s short)."""
    path = tmp_path / "s.mp4"
    gop_s = 2.0

    async def main() -> tuple[int, int]:
        async with live_stream(gop_s) as (manager, sid):
            start_at = time.time() + 1.0
            await manager.schedule_recording(
                sid, RecordingConfig(output_path=str(path)), start_at=start_at, duration_s=2.0
            )

            async def over() -> bool:
                recorders = [a for a in stream_actors(sid) if "-rec" in a]
                return time.time() > start_at + 2.0 and not recorders and path.exists()

            await wait_for(over, bool, "the scheduled stop and the recorder's exit")
            return int(start_at * 1e6), int((start_at + 2.0) * 1e6)

    start_us, stop_us = asyncio.run(main())
    frames = decoded(path)
    first, last = frames[0][1], frames[-1][1]
    # From the newest keyframe captured at or before start_at: the file opens on a keyframe
    # at or before start_at, and holds no later keyframe that was also at or before it.  (Not
    # "at most one GOP early" in seconds: the GOP is 60 frames, and a machine loaded enough to
    # capture at 16 fps spaced them 3.8 s apart.)
    keys = keyframe_stamps(path)
    assert keys[0] == first <= start_us
    assert all(stamp > start_us for stamp in keys[1:]), (keys, start_us)
    # To the last frame captured before stop_at (frames every 33 ms; a loaded machine may drop
    # a few between capture and encoder).
    assert stop_us - 250_000 <= last < stop_us


async def motion_recording(manager: StreamManager, sid: str, path: Path, threshold: float) -> str:
    trigger = MotionTriggerConfig(threshold=threshold, pre_roll_s=1.0, hold_s=1.0)
    recording = await manager.start_recording(
        sid, RecordingConfig(output_path=str(path), trigger=trigger)
    )
    return recording.session_id


def test_motion_starts_a_recording(ray_cluster: str, tmp_path: Path) -> None:
    path = tmp_path / "motion.mp4"

    async def main() -> None:
        async with live_stream() as (manager, sid):
            rid = await motion_recording(manager, sid, path, threshold=0.5)
            await wait_status(manager, rid, lambda s: s.frames_written > 30, "motion")
            await manager.stop_recording(rid)

    asyncio.run(main())
    assert frames_and_duration(path)[0] > 30  # the test pattern always moves


def test_no_motion_records_nothing(ray_cluster: str, tmp_path: Path) -> None:
    path = tmp_path / "motion.mp4"

    async def main() -> RecordingSession:
        async with live_stream() as (manager, sid):
            rid = await motion_recording(manager, sid, path, threshold=250.0)
            # 3 s of stream, 15 looks at the picture: the pattern never changes that much.
            encoded = await frames_encoded(manager, sid)
            await wait_for(lambda: frames_encoded(manager, sid), lambda n: n >= encoded + 90, "3 s")
            return await manager.stop_recording(rid)

    final = asyncio.run(main())
    assert final.frames_written == 0 and final.segments == []
    assert not path.exists()
