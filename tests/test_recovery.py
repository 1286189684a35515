"""Recovery on the session's real Ray cluster: each stage actor killed with SIGKILL comes back.

Capture, encoder and quality controller are restarted by Ray and re-started by the supervisor
(``actors.recovery``); a shard's port moves to a survivor and its viewer reconnects by itself;
a recording goes on in its next segment when the encoder it reads restarts.  Each test watches a
real viewer decode frames again after the kill.  A stage killed again each time it comes back
is a crash loop: the stream goes to Error with the reason.  The crash-loop rule itself is
tested with literal times in ``test_restart_policy.py``; how long recovery takes is measured by
``perf.bench_recovery``, not asserted here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import psutil
import pytest

from actors import StreamManager
from actors.shard_placement import ShardPlacer
from shared.models import (
    RecordingConfig,
    Resolution,
    StreamConfig,
    StreamQuality,
    StreamState,
)
from shared.pool.shm import list_segments, segment_name, unlink_segment
from shared.viewer.client import Viewer
from tests.conftest import shm_snapshot, stream_actors, wait_for_no_leaks
from tests.test_pipeline import REPO, eventually

pytestmark = pytest.mark.ray

QVGA = StreamQuality(resolution=Resolution(320, 240), framerate=15, bitrate=200_000)


async def pid_of(manager: StreamManager, sid: str, kind: str) -> int | None:
    """The pid the supervisor knows for the stream's ``kind`` actor (a shard: its only one)."""
    label = f"{sid}/sender-" if kind == "shard" else f"{sid}/{kind}"
    for process in (await manager.resources()).processes:
        if process.label == label or (kind == "shard" and process.label.startswith(label)):
            return process.pid
    return None


def alive(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("kind", ["capture", "encoder", "quality", "shard"])
def test_a_killed_stage_comes_back_and_the_viewer_decodes_again(
    ray_cluster: str, tmp_path: Path, kind: str
) -> None:
    async def main() -> str:
        async with StreamManager.start() as manager:
            sid = (await manager.start_camera_stream(StreamConfig(quality=QVGA))).session_id
            ticket = await manager.add_viewer(sid, "p")
            viewer = await Viewer.connect(ticket.url)
            watching = asyncio.create_task(viewer.watch(seconds=300))
            try:
                await eventually(lambda: viewer.frames_decoded, lambda n: n > 15, "first frames")
                recording = await manager.start_recording(
                    sid, RecordingConfig(output_path=str(tmp_path / "r.mp4"))
                )
                await eventually(
                    lambda: manager.get_recording_status(recording.session_id),
                    lambda s: s.frames_written > 15,
                    "the recording's first second",
                )
                pid = await pid_of(manager, sid, kind)
                assert alive(pid)
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                decoded_at_kill = viewer.frames_decoded
                new_pid = await eventually(
                    lambda: pid_of(manager, sid, kind),
                    lambda p: p is not None and p != pid and alive(p),
                    f"a new {kind} process",
                )
                assert not alive(pid)
                # Two seconds of frames decoded after the kill: the pipeline runs again.
                await eventually(
                    lambda: viewer.frames_decoded,
                    lambda n: n > decoded_at_kill + 30,
                    "frames decoded again",
                )
                session = await eventually(
                    lambda: manager.get_stream(sid),
                    lambda s: kind == "shard" or s.stats.restarts.get(kind) == 1,
                    "the restart counted",
                )
                assert session.state is StreamState.ACTIVE, session.error
                assert await pid_of(manager, sid, kind) == new_pid
                if kind == "shard":
                    # Its viewer reconnected by itself, to the address it knows, once its
                    # silence timer gave the dead connection up (not QUIC's idle timeout).
                    report = viewer.report()
                    assert report.reconnects >= 1 and report.silences >= 1
                if kind == "encoder":
                    # The recording read the dead encoder's rings: it goes on in a next segment.
                    status = await eventually(
                        lambda: manager.get_recording_status(recording.session_id),
                        lambda s: len(s.segments) >= 2 and s.frames_written > 15,
                        "the recording's next segment",
                    )
                    assert [Path(s).name for s in status.segments][:2] == ["r.mp4", "r-001.mp4"]
                final = await manager.stop_recording(recording.session_id)
                assert final.frames_written > 0
            finally:
                watching.cancel()
                await viewer.close()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_a_capture_that_dies_each_time_it_restarts_ends_in_error(ray_cluster: str) -> None:
    """A crash loop: the capture process is killed each time it comes back, as a source that
    crashes its process on opening would; after ``max_restarts`` restarts the stream is in
    Error with the reason, and no restart follows."""

    async def main() -> str:
        async with StreamManager.start() as manager:
            # One restart allowed, so the second kill is the loop: each restart is a new
            # process, the slow part of this test.
            config = StreamConfig(quality=QVGA, max_restarts=1, restart_window_s=120.0)
            sid = (await manager.start_camera_stream(config)).session_id
            killed: list[int] = []
            for _ in range(2):
                pid = await eventually(
                    lambda: pid_of(manager, sid, "capture"),
                    lambda p: p is not None and p not in killed and alive(p),
                    "a capture process to kill",
                )
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            session = await eventually(
                lambda: manager.get_stream(sid),
                lambda s: s.state is StreamState.ERROR,
                "the stream in Error",
            )
            assert session.error is not None
            assert session.error.kind == "CrashLoopError"
            assert "capture crashed 2 times within 120 s" in session.error.message
            # Nothing restarts it after the verdict: the capture actor is gone for good.
            await eventually(
                lambda: asyncio.to_thread(stream_actors, sid),
                lambda names: f"kz-{sid}-capture" not in names,
                "the capture actor gone",
            )
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def _pid(actor: object) -> int:
    return os.getpid()


def test_a_killed_supervisor_takes_its_streams_back_and_leaves_nothing_behind(
    ray_cluster: str,
) -> None:
    """The supervisor is detached and restarted by Ray; its streams' actors, detached too,
    keep serving while it is gone, and it takes them back by name: the stream answers again
    as it was left (paused, at the quality it was changed to), its stages are watched again,
    and stopping it leaves no actor or segment."""

    async def active(manager: StreamManager) -> list[str] | None:
        try:
            return [s.session_id for s in await manager.get_active_streams()]
        except Exception:  # still restarting: Ray answers "unavailable"
            return None

    async def main() -> str:
        async with StreamManager.start() as manager:
            sid = (await manager.start_camera_stream(StreamConfig(quality=QVGA))).session_id
            ticket = await manager.add_viewer(sid, "p")
            viewer = await Viewer.connect(ticket.url)
            watching = asyncio.create_task(viewer.watch(seconds=300))
            try:
                await eventually(lambda: viewer.frames_decoded, lambda n: n > 15, "first frames")
                lower = msgspec.structs.replace(QVGA, bitrate=150_000)
                assert (await manager.adjust_quality(sid, lower)).quality.bitrate == 150_000
                await manager.pause_stream(sid)
                supervisor = manager._supervisor.actor
                pid = await supervisor.__ray_call__.remote(_pid)
                os.kill(pid, signal.SIGKILL)
                await eventually(lambda: active(manager), lambda ids: ids == [sid], "adoption")
                assert await supervisor.__ray_call__.remote(_pid) != pid
                assert not alive(pid)
                session = await manager.get_stream(sid)
                # Taken back as it was left: paused, at the quality it was changed to.
                assert session.state is StreamState.PAUSED, session.error
                assert session.quality.bitrate == 150_000
                resumed = viewer.frames_decoded
                assert (await manager.resume_stream(sid)).state is StreamState.ACTIVE
                await eventually(
                    lambda: viewer.frames_decoded, lambda n: n > resumed + 30, "frames resumed"
                )
                # Its shard served the viewer throughout (SRs while paused): never cut.
                assert viewer.report().reconnects == 0
                # It watches the stream's stages again: a killed encoder is restarted.
                encoder = await pid_of(manager, sid, "encoder")
                assert alive(encoder) and encoder is not None
                os.kill(encoder, signal.SIGKILL)
                decoded = viewer.frames_decoded
                await eventually(
                    lambda: viewer.frames_decoded, lambda n: n > decoded + 30, "frames again"
                )
                restarted = await manager.get_stream(sid)
                assert restarted.stats.restarts.get("encoder") == 1
            finally:
                watching.cancel()
                await viewer.close()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_a_supervisor_killed_while_a_stream_starts_leaves_no_orphan(ray_cluster: str) -> None:
    """Killed after the stream's capture actor exists and before its quality actor does: the
    restarted supervisor finds the stream's record incomplete and removes every actor and
    segment the cut-short start made; the caller's start fails."""
    before = shm_snapshot()

    async def main() -> str:
        async with StreamManager.start() as manager:
            supervisor = manager._supervisor.actor
            pid = await supervisor.__ray_call__.remote(_pid)
            old = set(stream_actors())
            starting = asyncio.create_task(manager.start_camera_stream(StreamConfig(quality=QVGA)))
            new = await eventually(
                lambda: set(stream_actors()) - old,
                lambda names: any(n.endswith("-capture") for n in names),
                "the stream's capture actor",
                timeout=60,
            )
            assert not any(n.endswith("-quality") for n in new), "started before the kill"
            os.kill(pid, signal.SIGKILL)
            [capture] = [n for n in new if n.endswith("-capture")]
            sid = capture.removeprefix("kz-").removesuffix("-capture")
            with pytest.raises(Exception):  # noqa: B017 - Ray's error for a dead callee
                await starting
            # Back and without the stream: it removed what the start had made.
            streams = await eventually(
                lambda: _active_or_none(manager), lambda ids: ids is not None, "the restart"
            )
            assert streams == []
            await eventually(lambda: stream_actors(sid), lambda names: not names, "no orphan")
        return str(sid)

    wait_for_no_leaks(asyncio.run(main()), since=before)


async def _active_or_none(manager: StreamManager) -> list[str] | None:
    try:
        return [s.session_id for s in await manager.get_active_streams()]
    except Exception:  # still restarting
        return None


def test_a_restarted_supervisor_stops_a_remote_shard_whose_relay_is_gone(
    ray_cluster: str,
) -> None:
    """``ShardPlacer.adopt`` as a restarted supervisor runs it, for a shard on another node
    whose relay died with no one to stop it: the shard is handed back to be stopped (its
    viewers go on at their ``alt=`` endpoints), no origin or relay is kept, the next relay's
    tag is past the dead one's, and the rings the dead relay left on that node are swept.
    (Taking back live relays is the three-node ``balanced_shards`` scenario.)"""
    import ray

    sid = uuid.uuid4().hex[:10]
    ring = segment_name(sid, "n3-video")
    # Made by a process that is gone, as the rings of a killed relay are.
    script = (
        "import os; from shared.pool.packet_ring import PacketRing; "
        f"PacketRing.create({ring!r}, capacity_bytes=1 << 16); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=True, timeout=60)
    assert list_segments(f"kz_{sid}_") == [ring]
    here = ray.get_runtime_context().get_node_id()
    placer = ShardPlacer(sid, "the-streams-own-node", lambda: ["video"], dict)
    orphans = asyncio.run(
        placer.adopt(
            [f"kz-{sid}-relay-n3"],  # listed a moment ago, gone since
            {"shard-away": here, "shard-home": "the-streams-own-node"},
        )
    )
    try:
        assert orphans == {"shard-away"}
        assert placer.origin is None and placer.remote == {} and placer.users == {}
        assert placer._tags == 3
        assert list_segments(f"kz_{sid}_") == []
    finally:
        for name in list_segments(f"kz_{sid}_"):
            unlink_segment(name)
