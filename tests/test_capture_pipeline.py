"""The capture engine inside the real pipeline (the session's Ray cluster): file and screen
sources streamed to a viewer, a source switched under a watching viewer, bad sources refused
before Active without disturbing a running stream, and ``kizuna-stream cameras``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest

from actors import StreamManager
from actors.cli import cameras as cameras_cli
from actors.cli.cameras import format_cameras
from actors.cli.main import main as cli_main
from shared.capture.engine import CaptureEngine
from shared.capture.source import CameraInfo, CameraMode, CaptureCapabilities
from shared.errors import CaptureError, ConfigError
from shared.models import CameraDevice, Resolution, StreamConfig, StreamQuality, StreamState
from shared.viewer.client import DecodedFrame, Viewer
from tests import media_fixtures
from tests.conftest import stream_actors, wait_for_no_leaks
from tests.media_fixtures import REPO, XServer, make_clip

xvfb = media_fixtures.xvfb  # a fixture, shared

SMALL = StreamQuality(resolution=Resolution(320, 240), framerate=15, bitrate=300_000)


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "actors.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- kizuna-stream cameras -----------------------------------------------------------------------


def test_the_cameras_command_prints_what_the_engine_finds_here() -> None:
    """``kizuna-stream cameras`` as a user runs it, on this machine: exactly the engine's
    listing (none here), as JSON and as text."""
    expected = CaptureEngine().list_cameras()
    result = cli("cameras", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == msgspec.to_builtins(expected)
    text = cli("cameras")
    assert text.returncode == 0, text.stderr
    assert text.stdout.rstrip("\n") == format_cameras(expected)


def test_the_cameras_command_lists_a_sysfs_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command's own code path over a sysfs tree built here: a camera whose node is
    missing from /dev (a container without it passed in) is listed with the reason; a node
    that is no camera is left out."""
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    for name, label in (("video0", "HD Webcam"), ("video1", "Not a camera")):
        (sys_root / name).mkdir(parents=True)
        (sys_root / name / "name").write_text(label + "\n")
    dev_root.mkdir()
    (dev_root / "video1").touch()  # a plain file: no V4L2 device answers there
    monkeypatch.setattr(
        cameras_cli, "CaptureEngine", lambda: CaptureEngine(sysfs_root=sys_root, dev_root=dev_root)
    )
    node = str(dev_root / "video0")
    assert cli_main(["cameras", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {
            "device": {"index": 0, "path": node, "name": "HD Webcam"},
            "capabilities": None,
            "error": f"camera {node} does not exist",
        }
    ]
    assert cli_main(["cameras"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{node}  HD Webcam",
        f"  camera {node} does not exist",
    ]


def test_the_camera_listing_reads_well() -> None:
    webcam = CameraDevice(index=0, path="/dev/video0", name="HD Webcam")
    caps = CaptureCapabilities(
        device=webcam,
        driver="uvcvideo",
        bus_info="usb-0000:00:14.0-5",
        modes=[
            CameraMode(pixel_format="YUYV", width=640, height=480, framerates=[30, 15]),
            CameraMode(pixel_format="YUYV", width=1280, height=720, framerates=[10]),
            CameraMode(
                pixel_format="MJPG", width=1920, height=1080, framerates=[30], compressed=True
            ),
        ],
        controls=["auto_exposure"],
    )
    locked = CameraDevice(index=2, path="/dev/video2", name="Capture card")
    text = format_cameras(
        [
            CameraInfo(device=webcam, capabilities=caps),
            CameraInfo(device=locked, error="no permission to open /dev/video2: add ..."),
        ]
    )
    assert text.splitlines() == [
        "/dev/video0  HD Webcam (uvcvideo, usb-0000:00:14.0-5)",
        "  YUYV",
        "    640x480  30, 15 fps",
        "    1280x720  10 fps",
        "  MJPG (compressed)",
        "    1920x1080  30 fps",
        "  controls: auto_exposure",
        "/dev/video2  Capture card",
        "  no permission to open /dev/video2: add ...",
    ]


# --- sources through the pipeline ------------------------------------------------------------


@pytest.mark.ray
def test_a_file_streams_to_a_viewer_through_the_demo(ray_cluster: str, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=6.0)
    result = cli(
        "demo",
        "--source",
        f"file:{clip}",
        "--seconds",
        "3",
        "--viewers",
        "1",
        "--size",
        "320x240",
        "--fps",
        "15",
        "--json",
        "--address",
        ray_cluster,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["state"] == "stopped" and report["source"] == f"file:{clip}"
    # 10 fps for 3 s, less the time the viewer took to join.
    assert report["viewers"][0]["frames_decoded"] >= 10
    assert report["viewers"][0]["decode_errors"] == 0
    wait_for_no_leaks(report["session_id"])


@pytest.mark.ray
def test_switching_to_the_screen_keeps_the_viewer_watching(ray_cluster: str, xvfb: XServer) -> None:
    import ray

    xvfb.clear()
    xvfb.fill((255, 0, 0))

    async def main() -> tuple[str, list[DecodedFrame], list[DecodedFrame], int]:
        async with StreamManager.start() as manager:
            session = await manager.start_camera_stream(StreamConfig(source="test", quality=SMALL))
            sid = session.session_id
            ticket = await manager.add_viewer(sid, "watcher")
            viewer = await Viewer.connect(ticket.url)
            before: list[DecodedFrame] = []
            after: list[DecodedFrame] = []
            capture = ray.get_actor(f"kz-{sid}-capture", namespace="kizuna")

            async def consume() -> None:
                switched = False
                async for frame in viewer.frames():
                    if not switched:
                        before.append(frame)
                        if len(before) >= 10:
                            info = await capture.switch_source.remote("screen")
                            assert info.kind == "screen"
                            switched = True
                    else:
                        after.append(frame)
                        if sum(_is_red(f) for f in after) >= 10:
                            return

            await asyncio.wait_for(consume(), 60)
            report = viewer.report()
            await viewer.close()
            stats = await capture.stats.remote()
            assert stats.switches == 1 and stats.error is None
            await manager.stop_stream(sid)
            return sid, before, after, report.reconnects

    sid, before, after, reconnects = asyncio.run(main())
    assert reconnects == 0  # one connection throughout
    assert not any(_is_red(f) for f in before)  # the test pattern first ...
    assert _is_red(after[-1])  # ... then the red screen, same size, same viewer
    assert {(f.frame.width, f.frame.height) for f in before + after} == {(320, 240)}
    wait_for_no_leaks(sid)


def _is_red(decoded: DecodedFrame) -> bool:
    rgb = decoded.frame.to_ndarray(format="rgb24").astype(int)
    return bool(np.abs(rgb[60:180, 80:240] - [255, 0, 0]).max() <= 24)


@pytest.mark.ray
def test_bad_sources_fail_before_active_and_leave_a_running_stream_alone(
    ray_cluster: str, xvfb: XServer, tmp_path: Path
) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=1.0)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    bad = [
        ("screen:9", CaptureError, "monitor 9 does not exist"),
        ("screen@600,400,100x100", ConfigError, "lies outside monitor"),
        (f"file:{tmp_path / 'missing.mp4'}", CaptureError, "missing.mp4 does not exist"),
        (f"file:{truncated}", CaptureError, "truncated"),
        ("camera:/dev/video63", CaptureError, "camera /dev/video63 does not exist"),
    ]

    async def main() -> str:
        async with StreamManager.start() as manager:
            good = await manager.start_camera_stream(StreamConfig(source="test", quality=SMALL))
            sid = good.session_id
            for spec, error, message in bad:
                with pytest.raises(error, match=message):
                    await manager.start_camera_stream(StreamConfig(source=spec, quality=SMALL))
                active = await manager.get_active_streams()
                assert [s.session_id for s in active] == [sid]
                assert active[0].state is StreamState.ACTIVE
            # No actor of the failed streams is left (their shared memory: see the capture
            # actor's own tests; /dev/shm here is shared with other runs), and the good
            # stream still encodes.
            assert {name.split("-")[1] for name in stream_actors()} == {sid}
            encoded = (await manager.get_stream(sid)).stats.frames_encoded
            deadline = time.monotonic() + 30  # a hang guard: how soon is not the question
            while (await manager.get_stream(sid)).stats.frames_encoded <= encoded:
                assert time.monotonic() < deadline, "the good stream stopped encoding"
                await asyncio.sleep(0.05)
            await manager.stop_stream(sid)
            return sid

    wait_for_no_leaks(asyncio.run(main()))
