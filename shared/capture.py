"""The capture engine: every video source behind one small interface the capture actor drives.

Theory of operation
-------------------
A source produces pictures in two steps, both called on the capture actor's one capture
thread:

* ``grab(timeout)`` takes the next picture and returns its capture time (wall-clock
  microseconds, ``time.time_ns() // 1000``, the clock audio is stamped on too), or None when
  nothing arrived within ``timeout`` seconds.  A *pull* source (test pattern, screen) takes a
  picture the moment it is asked, so the actor calls it on its own frame-rate schedule.  A
  *push* source (camera, file) blocks until the device delivers or the file's next frame is
  due in real time; the actor calls it back to back and lets a :class:`FrameGate` drop what
  exceeds the stream's rate.
* ``fill(out, ...)`` converts that picture to yuv420p at the stream's size, straight into a
  frame pool slot (``out``), so pixels are converted exactly once.

The split exists because the pool stamps a slot with its capture time before it is written:
the time must be known (``grab``) before the slot is opened (``fill``).

:class:`CaptureEngine` is the design's CaptureEngine.  Its methods are synchronous thin shells
over devices; the actor runs them on its capture thread.  Device modules (camera, screen,
file) are imported on first use, so the test pattern needs none of OpenCV, mss or PyAV's
demuxers, and a missing device library surfaces as a :class:`CaptureError` naming it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from shared.errors import CaptureError
from shared.models import (
    AudioConfig,
    CameraDevice,
    CameraSource,
    CaptureConfig,
    FileSource,
    Resolution,
    ScreenConfig,
    ScreenRegion,
    ScreenSource,
    StreamQuality,
    StreamSource,
    TestPatternSource,
)
from shared.testpattern import TestPattern

if TYPE_CHECKING:
    from shared.audio_capture import AudioSource

__all__ = [
    "AppliedCapture",
    "CameraInfo",
    "CameraMode",
    "CaptureCapabilities",
    "CaptureEngine",
    "EndOfSource",
    "FrameSource",
    "Pacing",
    "SourceInfo",
    "TestPatternFrameSource",
    "describe_source",
    "open_source",
]

Pacing = Literal["pull", "push"]
U8Array = npt.NDArray[np.uint8]


# --- data ------------------------------------------------------------------------------------


class CameraMode(msgspec.Struct, frozen=True, kw_only=True):
    """One way a camera can deliver pictures: a pixel format at a size, at some frame rates."""

    #: V4L2 fourcc as the kernel spells it (``YUYV``, ``MJPG``, ``NV12``, ...).
    pixel_format: str
    width: int
    height: int
    #: Frame rates offered at this size, highest first (empty: the driver did not say).
    framerates: list[float] = msgspec.field(default_factory=list)
    #: Compressed formats (MJPG, H264) cost a decode before conversion.
    compressed: bool = False


class CaptureCapabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What a camera can do (the design's ``get_capture_capabilities`` answer)."""

    device: CameraDevice
    driver: str = ""
    card: str = ""
    bus_info: str = ""
    modes: list[CameraMode] = msgspec.field(default_factory=list)
    #: Controls the device offers, as V4L2 names them (informational).
    controls: list[str] = msgspec.field(default_factory=list)


class CameraInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of ``list_cameras``: the device, and its capabilities or why they are unknown."""

    device: CameraDevice
    capabilities: CaptureCapabilities | None = None
    #: Why the capabilities could not be read (e.g. no permission), with a hint.
    error: str | None = None


class AppliedCapture(msgspec.Struct, frozen=True, kw_only=True):
    """What a device actually runs at, next to what was asked: devices silently substitute."""

    requested: CaptureConfig
    width: int
    height: int
    framerate: float
    #: The device's pixel format (a fourcc for cameras, an FFmpeg name for files).
    pixel_format: str
    buffer_count: int | None = None
    #: None where the device has no such control.
    auto_exposure: bool | None = None
    auto_focus: bool | None = None
    #: Requested fields the device changed (``resolution``, ``framerate``, ...).
    substituted: list[str] = msgspec.field(default_factory=list)


class SourceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The video source a capture actor is running."""

    spec: StreamSource
    kind: str
    description: str
    #: The source's own picture size, before scaling to the stream's size.
    native_width: int
    native_height: int
    pacing: Pacing
    applied: AppliedCapture | None = None


class EndOfSource(Exception):
    """Raised by ``grab`` when a finite source (a file without loop) has no more pictures."""


# --- the source interface ----------------------------------------------------------------------


class FrameSource(Protocol):
    """A video source; see the module docstring for the grab/fill contract."""

    #: Output size: the stream's resolution, the size of every ``fill``.
    width: int
    height: int
    pacing: Pacing

    def grab(self, *, timeout: float) -> int | None:
        """Take the next picture; its capture time in wall-clock microseconds, or None."""
        ...

    def fill(self, out: U8Array, *, frame_number: int, capture_us: int) -> None:
        """Write the grabbed picture as yuv420p (width*height*3/2 bytes) into ``out``."""
        ...

    def info(self) -> SourceInfo: ...

    def close(self) -> None: ...


class TestPatternFrameSource:
    """The synthetic pattern: a pull source that renders each frame on demand."""

    __test__ = False
    pacing: Pacing = "pull"

    def __init__(self, quality: StreamQuality) -> None:
        self.width = quality.resolution.width
        self.height = quality.resolution.height
        self._pattern = TestPattern(self.width, self.height, quality.framerate)

    def grab(self, *, timeout: float) -> int | None:
        return time.time_ns() // 1000

    def fill(self, out: U8Array, *, frame_number: int, capture_us: int) -> None:
        self._pattern.render_into(out, frame_number, capture_us)

    def info(self) -> SourceInfo:
        return SourceInfo(
            spec=TestPatternSource(),
            kind="test",
            description="test pattern",
            native_width=self.width,
            native_height=self.height,
            pacing=self.pacing,
        )

    def close(self) -> None:
        pass


# --- the engine ---------------------------------------------------------------------------------


def _capture_config(quality: StreamQuality, capture: CaptureConfig | None) -> CaptureConfig:
    """The device request: the caller's CaptureConfig, else the stream's size and rate."""
    if capture is not None:
        return capture
    return CaptureConfig(resolution=quality.resolution, framerate=quality.framerate)


class CaptureEngine:
    """The design's CaptureEngine: lists cameras and opens camera, screen and file sources.

    ``sysfs_root`` and ``dev_root`` locate V4L2 devices on Linux (tests point them at a tree
    built in a temporary folder).
    """

    def __init__(
        self,
        *,
        sysfs_root: Path = Path("/sys/class/video4linux"),
        dev_root: Path = Path("/dev"),
    ) -> None:
        self.sysfs_root = sysfs_root
        self.dev_root = dev_root

    def list_cameras(self) -> list[CameraInfo]:
        """Every camera on this machine with its modes; an empty list where there are none."""
        if sys.platform.startswith("linux"):
            from shared.v4l2 import list_cameras

            return list_cameras(self.sysfs_root, self.dev_root)
        from shared.camera import probe_cameras

        return probe_cameras()

    def get_capture_capabilities(self, device: CameraDevice) -> CaptureCapabilities:
        """The modes and controls of one camera (CaptureError if it is missing)."""
        from shared.camera import camera_target, check_device_node

        target = camera_target(device, self.dev_root)
        if sys.platform.startswith("linux") and isinstance(target, str):
            from shared.v4l2 import query_capabilities

            check_device_node(target)
            return query_capabilities(target, device=device)
        return CaptureCapabilities(device=device)

    def start_camera_capture(
        self, device: CameraDevice, config: CaptureConfig, output: Resolution
    ) -> FrameSource:
        """Open a camera at the mode closest to ``config``, delivering ``output``-sized frames."""
        from shared.camera import CameraCapture

        return CameraCapture.open(device, config, output, dev_root=self.dev_root)

    def start_screen_capture(
        self,
        region: ScreenRegion | None,
        config: CaptureConfig,
        output: Resolution,
        *,
        screen: ScreenConfig | None = None,
    ) -> FrameSource:
        """Open screen capture of ``region`` (of ``screen.monitor_index``), cursor as asked."""
        from shared.screen import ScreenCapture

        screen = screen or ScreenConfig()
        screen = msgspec.structs.replace(screen, region=region)
        return ScreenCapture.open(screen, output)

    def start_file_capture(
        self, source: FileSource, output: Resolution, *, audio: AudioConfig | None = None
    ) -> tuple[FrameSource, AudioSource | None]:
        """Play a media file in real time; with ``audio``, also its audio track if it has one."""
        from shared.file_source import FilePlayback

        playback = FilePlayback.open(source.path, loop=source.loop)
        video = playback.video_source(output)
        audio_source = (
            playback.audio_source(audio) if audio is not None and playback.has_audio else None
        )
        return video, audio_source

    def stop_capture(self, stream: FrameSource) -> None:
        """Release a source's device (idempotent)."""
        stream.close()

    def open_source(
        self,
        source: StreamSource,
        quality: StreamQuality,
        *,
        capture: CaptureConfig | None = None,
        screen: ScreenConfig | None = None,
    ) -> FrameSource:
        """Open the video source a stream names, delivering frames at the stream's size."""
        config = _capture_config(quality, capture)
        output = quality.resolution
        if isinstance(source, TestPatternSource):
            return TestPatternFrameSource(quality)
        if isinstance(source, CameraSource):
            return self.start_camera_capture(source.device, config, output)
        if isinstance(source, ScreenSource):
            base = screen or ScreenConfig()
            merged = msgspec.structs.replace(
                base,
                monitor_index=(
                    source.monitor_index if source.monitor_index is not None else base.monitor_index
                ),
            )
            return self.start_screen_capture(
                source.region or base.region, config, output, screen=merged
            )
        if isinstance(source, FileSource):
            video, _ = self.start_file_capture(source, output)
            return video
        raise CaptureError(f"no capture for source {source!r}")


def open_source(
    source: StreamSource,
    quality: StreamQuality,
    *,
    capture: CaptureConfig | None = None,
    screen: ScreenConfig | None = None,
) -> FrameSource:
    """Open ``source`` with a default :class:`CaptureEngine`."""
    return CaptureEngine().open_source(source, quality, capture=capture, screen=screen)


def describe_source(source: StreamSource) -> str:
    """A source as the CLI spells it."""
    if isinstance(source, TestPatternSource):
        return "test"
    if isinstance(source, CameraSource):
        device = source.device
        return f"camera:{device.path if device.path else device.index}"
    if isinstance(source, ScreenSource):
        spec = "screen"
        if source.monitor_index is not None:
            spec += f":{source.monitor_index}"
        if source.region is not None:
            r = source.region
            spec += f"@{r.x},{r.y},{r.width}x{r.height}"
        return spec
    return f"file:{source.path}"
