"""The whole broadcast on the session's real local Ray cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from actors import StreamManager
from shared.errors import (
    CaptureError,
    NetworkError,
    PermissionError,
    StreamNotFoundError,
    StreamStateError,
)
from shared.models import (
    ConnectionQuality,
    Resolution,
    StreamConfig,
    StreamQuality,
    StreamSession,
    StreamState,
    ViewerPermissions,
    ViewerStatus,
)
from shared.viewer.client import DecodedFrame, Viewer
from tests.conftest import (
    require_tool,
    shm_snapshot,
    stream_actors,
    stream_groups,
    wait_for_no_leaks,
)

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
SMALL = StreamQuality(resolution=Resolution(640, 360), framerate=30, bitrate=600_000)
#: How long a condition may take to come true on a loaded machine before the test fails.
DEADLINE_S = 30.0
#: How often a condition is looked at again while waiting (not a synchronisation: the loops
#: below end on the condition, or fail at the deadline).
POLL_S = 0.2


def run_cli(
    *args: str, address: str | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "actors.cli", *args]
    if address:
        command += ["--address", address]
    done = subprocess.run(command, cwd=REPO, capture_output=True, timeout=timeout)
    # Decoded here rather than with text=True, which would turn the status line's "\r" into
    # a newline.
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def ffprobe_video(path: Path) -> dict[str, Any]:
    ffprobe = require_tool("ffprobe")
    output = subprocess.run(
        [
            ffprobe,
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames,avg_frame_rate:format=duration",
            "-of",
            "json",
            str(path),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    data = json.loads(output)
    return {**data["streams"][0], "duration": float(data["format"]["duration"])}


async def eventually(
    read: Callable[[], Any], done: Callable[[Any], bool], what: str, timeout: float = DEADLINE_S
) -> Any:
    """Read (``read`` may be sync or async) until ``done`` holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if asyncio.iscoroutine(value):
            value = await value
        if done(value):
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout} s; last seen: {value}"
        await asyncio.sleep(POLL_S)


async def frame_where(
    viewer: Viewer, wanted: Callable[[DecodedFrame], bool], what: str
) -> DecodedFrame:
    """The first frame ``viewer`` decodes that is ``wanted``; fail at the deadline."""
    try:
        async with asyncio.timeout(DEADLINE_S):
            # Closed on the way out, so the next read of this viewer is the only one reading it.
            frames = cast(AsyncGenerator[DecodedFrame, None], viewer.frames())
            async with contextlib.aclosing(frames):
                async for decoded in frames:
                    if wanted(decoded):
                        return decoded
    except TimeoutError:
        raise AssertionError(f"no {what} within {DEADLINE_S} s") from None
    raise AssertionError(f"the stream ended before {what}")


def size(decoded: DecodedFrame) -> tuple[int, int]:
    return decoded.frame.width, decoded.frame.height


def test_the_issue_example_starts_lists_and_stops(ray_cluster: str) -> None:
    async def main() -> str:
        async with StreamManager.start() as manager:
            session = await manager.start_camera_stream(StreamConfig(source="test", quality=SMALL))
            sid = session.session_id
            active = await manager.get_active_streams()
            assert [s.session_id for s in active] == [sid]
            assert active[0].state is StreamState.ACTIVE
            # Active means every stage is up; frames follow.
            await eventually(
                lambda: manager.get_stream(sid),
                lambda s: s.stats.frames_encoded > 0,
                "a frame encoded",
            )
            # Capture and encoder hold their resources together in the stream's group.
            assert stream_groups(sid) == [f"kz-{sid}-pg"]
            stopped = await manager.stop_stream(sid)
            assert stopped is not None and stopped.state is StreamState.STOPPED
            assert stopped.stats.frames_encoded > 0 and stopped.error is None
            assert await manager.stop_stream(sid) is None  # twice: a no-op
            assert await manager.get_active_streams() == []
            with pytest.raises(StreamNotFoundError):
                await manager.add_viewer(sid, "late")
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_demo_broadcast_decodes_at_both_viewers_and_records_a_valid_mp4(
    ray_cluster: str, tmp_path: Path
) -> None:
    recording = tmp_path / "demo.mp4"
    result = run_cli(
        "demo",
        "--seconds",
        "6",
        "--viewers",
        "2",
        "--size",
        "640x360",
        "--record",
        str(recording),
        "--json",
        address=ray_cluster,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # exactly one JSON line for scripts
    report = json.loads(lines[0])
    assert report["resolution"] == "640x360" and report["state"] == "stopped"
    encoded = report["encoder"]["frames_encoded"]
    assert encoded > 0 and report["encoder"]["fps"] > 0
    assert len(report["viewers"]) == 2
    for viewer in report["viewers"]:
        # Loopback loses nothing: a viewer decodes most of what was encoded while it watched
        # (it joins a moment after the encoder starts, at a keyframe).  A ratio of the
        # encoder's own count, so a slow machine makes both smaller, not the test fail.
        assert 0.5 * encoded <= viewer["frames_decoded"] <= encoded, report
        assert viewer["decode_errors"] == 0
        # The test pattern's stamps were read back, so latency was measured.
        assert viewer["latency_p50_ms"] is not None and viewer["latency_p99_ms"] is not None
    info = ffprobe_video(recording)
    assert info["codec_name"] == "h264" and (info["width"], info["height"]) == (640, 360)
    frames = int(info["nb_read_frames"])
    assert abs(frames - report["recording"]["frames"]) <= 0.02 * frames
    # The recording starts with the stream and copies what the encoder made (a loaded machine
    # makes the encoder drop frames, latest-frame semantics, which both counts then show; the
    # encoder's count is its last poll, a few frames before the stop); never more frames than
    # the timeline has room for.
    assert frames >= 0.5 * encoded
    assert frames <= info["duration"] * 30 * 1.02 + 1
    assert report["recording"]["size_bytes"] == recording.stat().st_size
    wait_for_no_leaks(report["session_id"])


def test_demo_without_json_shows_status_and_a_summary(ray_cluster: str) -> None:
    result = run_cli(
        "demo", "--seconds", "2", "--viewers", "1", "--size", "640x360", address=ray_cluster
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"viewer \w+: \d+ frames decoded", result.stdout), result.stdout
    assert "encoder:" in result.stdout
    # One status line on stderr, rewritten in place ("\r") as the demo runs: the start-up
    # message, then at least one status (every half second, the first before the 2 s are up).
    status = re.search(
        r"starting Ray and the stream actors \.\.\. *\r\[ *\d+\.\d/2s\] \| active \| enc \d+ fr",
        result.stderr,
    )
    assert status is not None, result.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--source", "bogus"], 1, "unknown source"),
        (["--size", "1281x720"], 1, "even"),
        (["--fps", "0"], 1, "frame rate"),
        (["--seconds", "0"], 2, "--seconds must be positive"),
        (["--record", "/nonexistent/dir/x.mp4", "--seconds", "1"], 1, "does not exist"),
    ],
)
def test_demo_bad_input_is_one_clear_line(
    ray_cluster: str, args: list[str], code: int, message: str
) -> None:
    before = shm_snapshot()
    result = run_cli("demo", "--json", *args, address=ray_cluster)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert message in json.loads(result.stdout)["error"]["message"]
    # The demo joined this cluster: no stream actor of it may be left, nor shared memory.
    wait_for_no_leaks(since=before)


def test_unavailable_source_fails_before_active_and_leaves_nothing(ray_cluster: str) -> None:
    before = shm_snapshot()

    async def main() -> None:
        async with StreamManager.start() as manager:
            with pytest.raises(CaptureError, match="camera /dev/video63 does not exist"):
                await manager.start_camera_stream(
                    StreamConfig(source="camera:/dev/video63", quality=SMALL)
                )
            assert await manager.get_active_streams() == []

    asyncio.run(main())
    wait_for_no_leaks(since=before)


def test_viewer_errors_leave_nothing_and_a_quality_change_reaches_the_viewer(
    ray_cluster: str,
) -> None:
    async def main() -> str:
        async with StreamManager.start() as manager:
            session = await manager.start_camera_stream(StreamConfig(source="test", quality=SMALL))
            sid = session.session_id
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
                taken.bind(("127.0.0.1", 0))
                with pytest.raises(NetworkError, match="already in use"):
                    await manager.add_viewer(sid, "p", port=taken.getsockname()[1])
            with pytest.raises(PermissionError):
                await manager.add_viewer(sid, "p", ViewerPermissions(can_view=False))
            current = await manager.get_stream(sid)
            assert current.state is StreamState.ACTIVE and current.viewers == []
            # The sender that could not listen was stopped and killed, not left running.
            await eventually(
                lambda: [a for a in stream_actors(sid) if "-sender-" in a],
                lambda senders: senders == [],
                "the failed sender gone",
            )

            ticket = await manager.add_viewer(sid, "watcher")
            viewer = await Viewer.connect(ticket.url)
            try:
                first = await frame_where(viewer, lambda f: True, "the first frame")
                assert size(first) == (640, 360)
                smaller = StreamQuality(
                    resolution=Resolution(320, 180), framerate=15, bitrate=300_000
                )
                adjusted = await manager.adjust_quality(sid, smaller)  # an IDR, live
                assert adjusted.quality == smaller
                # The effect, not the echo: the same viewer, still connected, now decodes
                # pictures at the new size.
                await frame_where(viewer, lambda f: size(f) == (320, 180), "a 320x180 frame")
                after = await frame_where(viewer, lambda f: True, "a frame after that")
                assert size(after) == (320, 180)
                report = viewer.report()
                assert report.decode_errors == 0 and report.reconnects == 0
                assert (await manager.get_stream(sid)).quality == smaller
            finally:
                await viewer.close()
            await manager.stop_stream(sid)
            return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_a_viewer_leaving_mid_stream_does_not_disturb_the_other(ray_cluster: str) -> None:
    async def main() -> str:
        async with StreamManager.start() as manager:
            session = await manager.start_camera_stream(StreamConfig(source="test", quality=SMALL))
            sid = session.session_id
            stays_ticket = await manager.add_viewer(sid, "stays")
            leaves_ticket = await manager.add_viewer(sid, "leaves")
            stays = await Viewer.connect(stays_ticket.url)
            leaves = await Viewer.connect(leaves_ticket.url)

            async def consume(viewer: Viewer) -> None:
                async for _ in viewer.frames():
                    pass

            watching = asyncio.create_task(consume(stays))
            try:
                left = await leaves.watch(frames=15, seconds=DEADLINE_S)
                assert left.frames_decoded >= 15, left
                await leaves.close()  # mid-stream, without telling the server anything else
                before = stays.report().frames_decoded
                await eventually(
                    lambda: stays.report().frames_decoded,
                    lambda decoded: decoded >= before + 30,
                    "30 more frames at the viewer that stayed",
                )

                def by_peer(statuses: list[ViewerStatus]) -> dict[str, ConnectionQuality]:
                    return {s.peer_id: s.connection_quality for s in statuses}

                # The sender notices the connection close; the quality actor classifies the
                # viewer that stays from its feedback (it polls once a second).
                await eventually(
                    lambda: manager.get_viewer_status(sid),
                    lambda statuses: (
                        by_peer(statuses)["leaves"] is ConnectionQuality.DISCONNECTED
                        and by_peer(statuses)["stays"] is not ConnectionQuality.DISCONNECTED
                    ),
                    "the viewer that left disconnected and the other one connected",
                )
                await manager.remove_viewer(sid, leaves_ticket.viewer_id)
                await manager.remove_viewer(sid, leaves_ticket.viewer_id)  # twice: a no-op
                assert (await manager.get_stream(sid)).viewers == [stays_ticket.viewer_id]
                await eventually(
                    lambda: stream_actors(sid),
                    lambda actors: f"kz-{sid}-sender-{leaves_ticket.viewer_id}" not in actors,
                    "the removed viewer's sender gone",
                )
                # Still decoding after the removal, without errors.
                before = stays.report().frames_decoded
                await eventually(
                    lambda: stays.report().frames_decoded,
                    lambda decoded: decoded >= before + 15,
                    "15 more frames after the removal",
                )
                assert stays.report().decode_errors == 0
            finally:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
                await stays.close()
            await manager.stop_stream(sid)
            return sid

    wait_for_no_leaks(asyncio.run(main()))


class _StderrReader:
    """Reads a process's stderr on a thread, so the test can wait on what it shows."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        self._stream = process.stderr
        self._chunks: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while chunk := self._stream.read(256):
            with self._lock:
                self._chunks.append(chunk)

    def text(self) -> str:
        with self._lock:
            return "".join(self._chunks)

    def finish(self, timeout: float) -> str:
        self._thread.join(timeout)
        return self.text()


def test_ctrl_c_during_the_demo_stops_cleanly(ray_cluster: str, tmp_path: Path) -> None:
    before = shm_snapshot()
    recording = tmp_path / "interrupted.mp4"
    command = [
        sys.executable,
        "-m",
        "actors.cli",
        "demo",
        "--seconds",
        "120",
        "--viewers",
        "1",
        "--size",
        "640x360",
        "--record",
        str(recording),
        "--address",
        ray_cluster,
    ]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stderr = _StderrReader(process)
    try:
        # The status line shows what the viewer decoded: interrupt once it has decoded some.
        deadline = time.monotonic() + 120
        while not re.search(r"v1 [1-9]\d* fr", stderr.text()):
            assert process.poll() is None, stderr.text()
            assert time.monotonic() < deadline, f"the viewer decoded nothing: {stderr.text()}"
            time.sleep(POLL_S)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.stdout is not None
    stdout, errors = process.stdout.read(), stderr.finish(timeout=10)
    assert process.returncode == 130, errors  # interrupted, and it says so
    assert "Traceback" not in errors
    decoded = re.search(r"viewer \w+: (\d+) frames decoded", stdout)
    written = re.search(r"recording: .*interrupted\.mp4 \((\d+) bytes, (\d+) frames\)", stdout)
    assert decoded is not None and written is not None, stdout
    assert int(decoded[1]) > 0
    # The file was finished properly: every frame the summary counts is in it.
    assert int(written[1]) == recording.stat().st_size > 0
    assert int(ffprobe_video(recording)["nb_read_frames"]) == int(written[2])
    try:
        wait_for_no_leaks(since=before)
    except BaseException:
        print(f"the demo's stderr:\n{errors}")  # pytest shows it with the failure
        raise


def test_a_crashed_encoder_moves_the_stream_to_error_and_stop_still_cleans_up(
    ray_cluster: str,
) -> None:
    import ray

    async def main() -> str:
        async with StreamManager.start() as manager:
            session = await manager.start_camera_stream(StreamConfig(source="test", quality=SMALL))
            sid = session.session_id
            ray.kill(
                ray.get_actor(f"kz-{sid}-encoder", namespace="kizuna")
            )  # as if its process died
            current: StreamSession = await eventually(
                lambda: manager.get_stream(sid),
                lambda s: s.state is StreamState.ERROR,
                "the stream in Error",
            )
            assert current.error is not None and current.error.kind == "ActorDiedError"
            # A failed stream takes nothing new; it can still be stopped.
            with pytest.raises(StreamStateError, match="cannot add a viewer"):
                await manager.add_viewer(sid, "late")
            stopped = await manager.stop_stream(sid)
            assert stopped is not None and stopped.state is StreamState.ERROR
            assert stopped.error == current.error  # the first failure, kept through the stop
            return sid

    wait_for_no_leaks(asyncio.run(main()))
