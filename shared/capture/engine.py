"""The capture engine: opens every video source by its spec, behind the ``FrameSource`` contract.

:class:`CaptureEngine` is the design's CaptureEngine.  Its methods are synchronous thin shells
over devices; the actor runs them on its capture thread.  The grab/fill contract every source
follows is described in :mod:`shared.capture.source`.  Device modules (camera, screen, file)
are imported on first use, so the test pattern needs none of OpenCV, mss or PyAV's demuxers,
and a missing device library surfaces as a :class:`CaptureError` naming it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from shared.capture.source import (
    CameraInfo,
    CaptureCapabilities,
    FrameSource,
)
from shared.capture.testpattern import TestPatternFrameSource
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

if TYPE_CHECKING:
    from shared.capture.audio import AudioSource

__all__ = ["CaptureEngine", "describe_source", "open_source"]

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
            from shared.capture.v4l2 import list_cameras

            return list_cameras(self.sysfs_root, self.dev_root)
        from shared.capture.camera import probe_cameras

        return probe_cameras()

    def get_capture_capabilities(self, device: CameraDevice) -> CaptureCapabilities:
        """The modes and controls of one camera (CaptureError if it is missing)."""
        from shared.capture.camera import camera_target, check_device_node

        target = camera_target(device, self.dev_root)
        if sys.platform.startswith("linux") and isinstance(target, str):
            from shared.capture.v4l2 import query_capabilities

            check_device_node(target)
            return query_capabilities(target, device=device)
        return CaptureCapabilities(device=device)

    def start_camera_capture(
        self, device: CameraDevice, config: CaptureConfig, output: Resolution
    ) -> FrameSource:
        """Open a camera at the mode closest to ``config``, delivering ``output``-sized frames."""
        from shared.capture.camera import CameraCapture

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
        from shared.capture.screen import ScreenCapture

        screen = screen or ScreenConfig()
        screen = msgspec.structs.replace(screen, region=region)
        return ScreenCapture.open(screen, output)

    def start_file_capture(
        self, source: FileSource, output: Resolution, *, audio: AudioConfig | None = None
    ) -> tuple[FrameSource, AudioSource | None]:
        """Play a media file in real time; with ``audio``, also its audio track if it has one."""
        from shared.capture.file import FilePlayback

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
