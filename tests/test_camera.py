"""Cameras without a camera: device-node checks for real (missing, not a device, no permission
as an unprivileged user) and the capture loop through OpenCV's VideoCapture on a video file."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import cv2
import pytest

from actors.stages.capture import CaptureActor
from shared.capture.camera import CameraCapture, applied_capture, camera_target, check_device_node
from shared.capture.engine import CaptureEngine
from shared.capture.source import FrameSource
from shared.capture.stamp import planes, read_stamp
from shared.errors import CaptureError, PermissionError
from shared.models import (
    CameraDevice,
    CameraSource,
    CaptureConfig,
    PixelFormat,
    Resolution,
    StreamQuality,
)
from shared.pool.shm import list_segments, segment_name
from tests import media_fixtures
from tests.media_fixtures import (
    CLIP_FPS,
    FakeEncoder,
    FrameCollector,
    fresh_session_id,
    make_clip,
    run_as_nobody,
)

public_tmp = media_fixtures.public_tmp  # a fixture, shared

QVGA = StreamQuality(resolution=Resolution(320, 240), framerate=30, bitrate=300_000)


def test_a_missing_device_is_a_capture_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"camera /dev/video63 does not exist"):
        CameraCapture.open(CameraDevice(path="/dev/video63"), CaptureConfig(), QVGA.resolution)
    # By index: the node it stands for is named.
    engine = CaptureEngine(dev_root=tmp_path)
    with pytest.raises(CaptureError, match=rf"camera {tmp_path}/video0 does not exist"):
        engine.start_camera_capture(CameraDevice(index=0), CaptureConfig(), QVGA.resolution)
    with pytest.raises(CaptureError, match="video5 does not exist"):
        engine.get_capture_capabilities(CameraDevice(index=5))


def test_a_node_that_is_not_a_camera_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "video0"
    plain.write_bytes(b"")
    with pytest.raises(CaptureError, match="not a character device"):
        check_device_node(str(plain))
    # /dev/null is a character device, but answers no V4L2 query.
    with pytest.raises(CaptureError, match="/dev/null is not a V4L2 device"):
        CameraCapture.open(CameraDevice(path="/dev/null"), CaptureConfig(), QVGA.resolution)


def test_a_node_without_permission_is_a_permission_error_with_a_hint(public_tmp: Path) -> None:
    node = public_tmp / "video0"
    node.touch()
    node.chmod(0o000)
    with pytest.raises(PermissionError, match=r"no permission to open .*video0") as caught:
        run_as_nobody(check_device_node, str(node))
    assert "usermod -aG" in str(caught.value)
    # Through the engine too, before OpenCV is ever asked.
    engine = CaptureEngine(dev_root=public_tmp)
    with pytest.raises(PermissionError, match="group"):
        run_as_nobody(
            engine.start_camera_capture, CameraDevice(index=0), CaptureConfig(), QVGA.resolution
        )


def test_camera_targets() -> None:
    assert camera_target(CameraDevice(path="/dev/video2")) == "/dev/video2"
    assert camera_target(CameraDevice(index=3), Path("/dev")) == "/dev/video3"


def test_applied_settings_report_what_the_device_substituted() -> None:
    asked = CaptureConfig(
        resolution=Resolution(1280, 720),
        framerate=30,
        pixel_format=PixelFormat.YUV420P,
        buffer_count=4,
        auto_exposure=True,
        auto_focus=False,
    )
    exact = applied_capture(
        asked, width=1280, height=720, framerate=30.0, pixel_format="YU12", buffer_count=4
    )
    assert exact.substituted == []
    changed = applied_capture(
        asked,
        width=640,
        height=480,
        framerate=15.0,
        pixel_format="YUYV",
        buffer_count=2,
        auto_exposure=False,
        auto_focus=None,  # the device has no focus control: nothing to compare
    )
    assert changed.substituted == [
        "resolution",
        "framerate",
        "pixel_format",
        "buffer_count",
        "auto_exposure",
    ]
    # 29.97 for 30 is not a substitution worth reporting.
    ntsc = applied_capture(asked, width=1280, height=720, framerate=29.97, pixel_format="YU12")
    assert "framerate" not in ntsc.substituted


class FileBackedCameras(CaptureEngine):
    """An engine whose cameras are video files read by OpenCV (cv2.VideoCapture(path))."""

    def __init__(self, clip: Path) -> None:
        super().__init__()
        self.clip = clip

    def start_camera_capture(
        self, device: CameraDevice, config: CaptureConfig, output: Resolution
    ) -> FrameSource:
        capture = cv2.VideoCapture(str(self.clip), cv2.CAP_FFMPEG)
        return CameraCapture.from_video_capture(
            capture, device=device, config=config, output=output
        )


def test_the_capture_loop_through_opencv_on_a_file_backed_camera(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "camera.mp4", seconds=3.0, size=(320, 240), audio=False)
    session = fresh_session_id()
    pool = segment_name(session, "frames")
    device = CameraDevice(path=str(clip), name="file-backed camera")
    actor = CaptureActor(
        # 32 slots: a second of frames, so a reader on a loaded machine still finds frame 0.
        session,
        CameraSource(device),
        QVGA,
        pool,
        32,
        engine=FileBackedCameras(clip),
    )
    encoder = FakeEncoder()

    async def main() -> None:
        await actor.open()
        info = (await actor.stats()).source
        assert info is not None and info.kind == "camera" and info.pacing == "push"
        assert info.applied is not None
        assert (info.applied.width, info.applied.height, info.applied.framerate) == (320, 240, 10)
        assert "resolution" not in info.applied.substituted
        # Attached before capture starts and read by sequence, so the first frame is seen.
        collector = FrameCollector(pool)
        await actor.start(encoder)
        deadline = time.monotonic() + 60  # a hang guard; the clip lasts 3 s
        while not (await actor.stats()).ended:
            assert time.monotonic() < deadline, "the file-backed camera never ended"
            collector.drain_every()
            await asyncio.sleep(0.002)
        collector.drain_every()  # the last frames, if still unread
        frames = collector.frames
        announced = collector.announced
        collector.close()
        stats = await actor.stop()
        assert announced == stats.frames_captured  # the doorbell rang for the last frame
        # OpenCV decodes a file far faster than 30 fps: the gate holds the stream's rate and
        # counts what it left out.  Every frame of the clip was either written or left out.
        assert stats.frames_captured >= 1 and stats.error is None
        assert stats.frames_captured + stats.frames_decimated == 3 * CLIP_FPS
        numbers = []
        for frame in frames:
            stamp = read_stamp(planes(frame.pixels, 320, 240)[0])
            assert stamp is not None  # the clip's own frame, through BGR and back to yuv420p
            numbers.append(stamp.frame_number)
        assert numbers == sorted(numbers) and numbers[0] == 0

    asyncio.run(main())
    assert not list_segments(pool)


def test_an_unopenable_video_capture_is_a_capture_error(tmp_path: Path) -> None:
    capture = cv2.VideoCapture(str(tmp_path / "absent.mp4"), cv2.CAP_FFMPEG)
    with pytest.raises(CaptureError, match="could not be opened"):
        CameraCapture.from_video_capture(
            capture,
            device=CameraDevice(name="absent"),
            config=CaptureConfig(),
            output=QVGA.resolution,
        )
