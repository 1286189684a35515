"""The whole broadcast on the session's real local Ray cluster."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from actors import StreamManager
from shared.errors import (
    CaptureError,
    ConfigError,
    NetworkError,
    PermissionError,
    StreamNotFoundError,
)
from shared.models import (
    ConnectionQuality,
    Resolution,
    StreamConfig,
    StreamQuality,
    StreamState,
    ViewerPermissions,
)
from shared.pool.shm import list_segments
from shared.viewer.client import Viewer
from tests.conftest import require_tool, wait_for_no_leaks

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
SMALL = StreamQuality(resolution=Resolution(640, 360), framerate=30, bitrate=600_000)


def run_cli(
    *args: str, address: str | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "actors.cli", *args]
    if address:
        command += ["--address", address]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


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


def test_the_issue_example_starts_lists_and_stops(ray_cluster: str) -> None:
    async def main() -> str:
        async with StreamManager.start() as manager:
            session = await manager.start_camera_stream(StreamConfig(source="test", quality=SMALL))
            active = await manager.get_active_streams()
            assert [s.session_id for s in active] == [session.session_id]
            assert active[0].state is StreamState.ACTIVE
            deadline = time.monotonic() + 20  # Active means every stage is up; frames follow
            while (await manager.get_stream(session.session_id)).stats.frames_encoded == 0:
                assert time.monotonic() < deadline, "no frame encoded"
                await asyncio.sleep(0.2)
            stopped = await manager.stop_stream(session.session_id)
            assert stopped is not None and stopped.state is StreamState.STOPPED
            assert stopped.stats.frames_encoded > 0
            assert await manager.stop_stream(session.session_id) is None  # twice: a no-op
            assert await manager.get_active_streams() == []
            with pytest.raises(StreamNotFoundError):
                await manager.add_viewer(session.session_id, "late")
        return session.session_id

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
        "--record",
        str(recording),
        "--json",
        address=ray_cluster,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # exactly one JSON line for scripts
    report = json.loads(lines[0])
    assert report["resolution"] == "1280x720" and report["state"] == "stopped"
    for viewer in report["viewers"]:
        assert viewer["frames_decoded"] >= 0.5 * 30 * 6, report
        assert viewer["decode_errors"] == 0
        assert (
            viewer["latency_p50_ms"] is not None
            and viewer["latency_p99_ms"] >= viewer["latency_p50_ms"]
        )
    assert report["encoder"]["frames_encoded"] > 0 and report["encoder"]["fps"] > 0
    info = ffprobe_video(recording)
    assert info["codec_name"] == "h264" and (info["width"], info["height"]) == (1280, 720)
    frames = int(info["nb_read_frames"])
    assert abs(frames - report["recording"]["frames"]) <= 0.02 * frames
    # Never more frames than the timeline has room for; fewer only where a loaded machine made
    # the encoder drop frames (latest-frame semantics), which the report counts.
    assert 0.5 * info["duration"] * 30 <= frames <= info["duration"] * 30 * 1.02 + 1
    assert report["recording"]["size_bytes"] == recording.stat().st_size
    wait_for_no_leaks(report["session_id"])


def test_demo_without_json_shows_status_and_a_summary(ray_cluster: str) -> None:
    result = run_cli(
        "demo", "--seconds", "2", "--viewers", "1", "--size", "640x360", address=ray_cluster
    )
    assert result.returncode == 0, result.stderr
    assert "frames decoded" in result.stdout and "encoder:" in result.stdout
    status_lines = [
        line for line in result.stderr.splitlines() if "/2s]" in line and "active" in line
    ]
    assert len(status_lines) >= 2, result.stderr  # the live status line, rewritten as it runs


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "bogus"], "unknown source"),
        (["--size", "1281x720"], "even"),
        (["--fps", "0"], "frame rate"),
        (["--seconds", "0"], "--seconds must be positive"),
        (["--record", "/nonexistent/dir/x.mp4", "--seconds", "1"], "does not exist"),
    ],
)
def test_demo_bad_input_is_one_clear_line(ray_cluster: str, args: list[str], message: str) -> None:
    result = run_cli("demo", "--json", *args, address=ray_cluster)
    assert result.returncode in (1, 2), result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert json.loads(result.stdout)["error"]["message"]
    assert not list_segments("kz_")


def test_unavailable_source_fails_before_active_and_leaves_nothing(ray_cluster: str) -> None:
    async def main() -> None:
        async with StreamManager.start() as manager:
            with pytest.raises(CaptureError, match="camera /dev/video63 does not exist"):
                await manager.start_camera_stream(
                    StreamConfig(source="camera:/dev/video63", quality=SMALL)
                )
            assert await manager.get_active_streams() == []

    asyncio.run(main())
    wait_for_no_leaks()


def test_viewer_errors_port_in_use_and_permissions(ray_cluster: str) -> None:
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
            smaller = StreamQuality(resolution=Resolution(320, 180), framerate=15, bitrate=300_000)
            adjusted = await manager.adjust_quality(sid, smaller)  # reopens at an IDR, live
            assert (
                adjusted.quality.resolution == Resolution(320, 180)
                and adjusted.quality.framerate == 15
            )
            with pytest.raises(ConfigError, match="bitrate"):
                StreamQuality(resolution=Resolution(320, 180), framerate=15, bitrate=0)
            current = await manager.get_stream(sid)
            assert current.state is StreamState.ACTIVE and current.viewers == []
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
            stays, leaves = (
                await Viewer.connect(stays_ticket.url),
                await Viewer.connect(leaves_ticket.url),
            )
            watching = asyncio.create_task(stays.watch(seconds=4))
            await leaves.watch(seconds=1.5)
            await leaves.close()  # mid-stream, without telling the server anything else
            before = stays.report().frames_decoded
            report = await watching
            assert report.frames_decoded > before + 30 and report.decode_errors == 0
            statuses = {s.peer_id: s for s in await manager.get_viewer_status(sid)}
            assert statuses["leaves"].connection_quality is ConnectionQuality.DISCONNECTED
            assert statuses["stays"].connection_quality is not ConnectionQuality.DISCONNECTED
            await manager.remove_viewer(sid, leaves_ticket.viewer_id)
            await manager.remove_viewer(sid, leaves_ticket.viewer_id)  # twice: a no-op
            assert (await manager.get_stream(sid)).viewers == [stays_ticket.viewer_id]
            await stays.close()
            await manager.stop_stream(sid)
            return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_ctrl_c_during_the_demo_stops_cleanly(ray_cluster: str, tmp_path: Path) -> None:
    recording = tmp_path / "interrupted.mp4"
    command = [
        sys.executable,
        "-m",
        "actors.cli",
        "demo",
        "--seconds",
        "60",
        "--viewers",
        "1",
        "--size",
        "640x360",
        "--record",
        str(recording),
        "--json",
        "--address",
        ray_cluster,
    ]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (recording.exists() and recording.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert recording.exists(), "the stream never started"
        time.sleep(3)  # let the viewer connect and decode
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    report = json.loads(stdout)
    assert report["interrupted"] is True and report["viewers"][0]["frames_decoded"] > 0
    assert int(ffprobe_video(recording)["nb_read_frames"]) == report["recording"]["frames"]
    wait_for_no_leaks()
    assert os.path.getsize(recording) > 0


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
            deadline = time.monotonic() + 20
            current = await manager.get_stream(sid)
            while current.state is not StreamState.ERROR and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                current = await manager.get_stream(sid)
            assert current.state is StreamState.ERROR and current.error is not None
            stopped = await manager.stop_stream(sid)
            assert stopped is not None and stopped.state is StreamState.ERROR
            return sid

    wait_for_no_leaks(asyncio.run(main()))
