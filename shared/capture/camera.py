"""CameraCapture: a camera through OpenCV's VideoCapture on the platform's native backend.

V4L2 on Linux, AVFoundation on macOS, Media Foundation on Windows.  On Linux the device node is
checked first (missing: CaptureError naming it; not openable: PermissionError with what to do),
its modes are read through V4L2 (:mod:`shared.capture.v4l2`), and :func:`choose_mode` picks the one
closest to the CaptureConfig.  Devices silently substitute what they cannot do, so after
configuring, every setting is read back and reported as :class:`AppliedCapture`.

The camera is a *push* source: ``grab`` blocks until the driver hands over a frame.  OpenCV
decodes the device format (YUYV, MJPG, ...) to BGR inside ``retrieve``; that picture is then
scaled and converted to yuv420p once, into the frame pool slot.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np

from shared.capture.optimizer import FOURCC_FOR_FORMAT, choose_mode
from shared.capture.pixels import I420Converter
from shared.capture.source import (
    AppliedCapture,
    CameraInfo,
    CameraMode,
    CaptureCapabilities,
    EndOfSource,
    Pacing,
    SourceInfo,
    U8Array,
)
from shared.errors import CaptureError, ConfigError, PermissionError
from shared.models import CameraDevice, CameraSource, CaptureConfig, Resolution

__all__ = [
    "CameraCapture",
    "applied_capture",
    "camera_target",
    "check_device_node",
    "probe_cameras",
]

logger = logging.getLogger(__name__)

_LINUX: Final = sys.platform.startswith("linux")
#: A camera that fails this many grabs in a row has gone (unplugged, driver reset).
_MAX_FAILED_GRABS: Final = 3


def _native_api() -> int:
    if _LINUX:
        return int(cv2.CAP_V4L2)
    if sys.platform == "darwin":
        return int(cv2.CAP_AVFOUNDATION)
    if sys.platform == "win32":
        return int(cv2.CAP_MSMF)
    return int(cv2.CAP_ANY)


# V4L2's exposure menu: 1 manual, 3 aperture priority (auto).  DirectShow/MSMF use 0.25/0.75.
_EXPOSURE_AUTO, _EXPOSURE_MANUAL = (3.0, 1.0) if _LINUX else (0.75, 0.25)


def camera_target(device: CameraDevice, dev_root: Path = Path("/dev")) -> str | int:
    """What to open: a device node path on Linux, else the backend's camera index."""
    if device.path:
        return device.path
    if device.index is None:
        raise ConfigError(
            "a camera needs an index (camera:N) or a device path (camera:/dev/videoN)"
        )
    if _LINUX:
        return str(dev_root / f"video{device.index}")
    return device.index


def check_device_node(path: str) -> None:
    """Fail clearly before OpenCV does it vaguely: missing node, no permission, not a device."""
    if not os.path.exists(path):
        raise CaptureError(
            f"camera {path} does not exist (`kizuna-stream cameras` lists the cameras here)"
        )
    # os.access checks the real user's rights, the ones the open below will have.
    if not os.access(path, os.R_OK | os.W_OK):
        from shared.capture.v4l2 import permission_hint

        raise PermissionError(permission_hint(path))
    if not stat.S_ISCHR(os.stat(path).st_mode):
        raise CaptureError(f"{path} is not a camera: it is not a character device")


def applied_capture(
    requested: CaptureConfig,
    *,
    width: int,
    height: int,
    framerate: float,
    pixel_format: str,
    buffer_count: int | None = None,
    auto_exposure: bool | None = None,
    auto_focus: bool | None = None,
) -> AppliedCapture:
    """What the device runs at, with the requested fields it changed listed."""
    substituted = []
    if (width, height) != (requested.resolution.width, requested.resolution.height):
        substituted.append("resolution")
    if framerate and abs(framerate - requested.framerate) > 0.5:
        substituted.append("framerate")
    if pixel_format != FOURCC_FOR_FORMAT.get(requested.pixel_format, requested.pixel_format):
        substituted.append("pixel_format")
    if buffer_count is not None and buffer_count != requested.buffer_count:
        substituted.append("buffer_count")
    if auto_exposure is not None and auto_exposure != requested.auto_exposure:
        substituted.append("auto_exposure")
    if auto_focus is not None and auto_focus != requested.auto_focus:
        substituted.append("auto_focus")
    return AppliedCapture(
        requested=requested,
        width=width,
        height=height,
        framerate=framerate,
        pixel_format=pixel_format,
        buffer_count=buffer_count,
        auto_exposure=auto_exposure,
        auto_focus=auto_focus,
        substituted=substituted,
    )


def _fourcc_text(value: float) -> str:
    code = int(value)
    if code <= 0:
        return ""
    return code.to_bytes(4, "little").decode("ascii", "replace").rstrip("\x00 ")


def _configure(
    capture: Any, config: CaptureConfig, modes: list[CameraMode], controls: list[str] | None
) -> AppliedCapture:
    """Ask the device for the mode closest to ``config``, then read back what it took.

    ``controls`` None means unknown (not Linux): try the controls and see what sticks.
    """
    choice = choose_mode(modes, config)
    if choice is not None:
        fourcc, width, height = choice.mode.pixel_format, choice.mode.width, choice.mode.height
        framerate = choice.framerate
    else:
        fourcc = FOURCC_FOR_FORMAT.get(config.pixel_format, "YUYV")
        width, height = config.resolution.width, config.resolution.height
        framerate = float(config.framerate)
    # V4L2 order matters: format and size first (they reset the rate), then the rate.
    capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*fourcc.ljust(4)[:4]))
    capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
    capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
    capture.set(cv2.CAP_PROP_FPS, framerate)
    capture.set(cv2.CAP_PROP_BUFFERSIZE, config.buffer_count)
    exposure: bool | None = None
    if controls is None or "auto_exposure" in controls:
        wanted = _EXPOSURE_AUTO if config.auto_exposure else _EXPOSURE_MANUAL
        if capture.set(cv2.CAP_PROP_AUTO_EXPOSURE, wanted):
            exposure = capture.get(cv2.CAP_PROP_AUTO_EXPOSURE) == _EXPOSURE_AUTO
    focus: bool | None = None
    if (controls is None or "auto_focus" in controls) and capture.set(
        cv2.CAP_PROP_AUTOFOCUS, 1.0 if config.auto_focus else 0.0
    ):
        focus = bool(capture.get(cv2.CAP_PROP_AUTOFOCUS))
    buffers = int(capture.get(cv2.CAP_PROP_BUFFERSIZE))
    return applied_capture(
        config,
        width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
        height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        framerate=round(float(capture.get(cv2.CAP_PROP_FPS)), 3),
        pixel_format=_fourcc_text(capture.get(cv2.CAP_PROP_FOURCC)) or fourcc,
        buffer_count=buffers if buffers > 0 else None,
        auto_exposure=exposure,
        auto_focus=focus,
    )


class CameraCapture:
    """A push source reading an opened ``cv2.VideoCapture``."""

    pacing: Pacing = "push"

    def __init__(
        self,
        capture: Any,
        *,
        device: CameraDevice,
        output: Resolution,
        applied: AppliedCapture,
        device_backed: bool,
    ) -> None:
        self.width = output.width
        self.height = output.height
        self.device = device
        self.applied = applied
        self._capture = capture
        self._device_backed = device_backed
        self._converter = I420Converter(output.width, output.height)
        self._failed_grabs = 0
        self._closed = False

    @classmethod
    def open(
        cls,
        device: CameraDevice,
        config: CaptureConfig,
        output: Resolution,
        *,
        dev_root: Path = Path("/dev"),
    ) -> CameraCapture:
        """Open a camera by index or device path (CaptureError / PermissionError up front)."""
        target = camera_target(device, dev_root)
        modes: list[CameraMode] = []
        controls: list[str] | None = None
        if isinstance(target, str):
            check_device_node(target)
            if _LINUX:
                from shared.capture.v4l2 import query_capabilities

                capabilities = query_capabilities(target, device=device)
                modes, controls = capabilities.modes, capabilities.controls
                if not device.name or device.name == target:
                    device = CameraDevice(
                        index=device.index, path=target, name=capabilities.card or target
                    )
        capture = cv2.VideoCapture(target, _native_api())
        if not capture.isOpened():
            capture.release()
            raise CaptureError(
                f"camera {target} could not be opened (in use by another program, or not a "
                "camera the platform's capture API supports)"
            )
        try:
            applied = _configure(capture, config, modes, controls)
        except BaseException:
            capture.release()
            raise
        if applied.substituted:
            logger.warning(
                "camera %s substituted %s: running %s %dx%d@%g",
                target,
                ", ".join(applied.substituted),
                applied.pixel_format,
                applied.width,
                applied.height,
                applied.framerate,
            )
        return cls(capture, device=device, output=output, applied=applied, device_backed=True)

    @classmethod
    def from_video_capture(
        cls, capture: Any, *, device: CameraDevice, config: CaptureConfig, output: Resolution
    ) -> CameraCapture:
        """Wrap an already opened VideoCapture (a video file, a network camera URL).

        Its end is the end of the source (EndOfSource), not a failure.
        """
        if not capture.isOpened():
            raise CaptureError(f"{device.name or device.path} could not be opened")
        applied = applied_capture(
            config,
            width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            framerate=round(float(capture.get(cv2.CAP_PROP_FPS)), 3),
            pixel_format=_fourcc_text(capture.get(cv2.CAP_PROP_FOURCC)),
        )
        return cls(capture, device=device, output=output, applied=applied, device_backed=False)

    def grab(self, *, timeout: float) -> int | None:
        # The V4L2 backend waits (select) until the driver has a buffer; time it on arrival.
        if self._capture.grab():
            self._failed_grabs = 0
            return time.time_ns() // 1000
        if not self._device_backed:
            raise EndOfSource(f"{self.device.name} has no more frames")
        self._failed_grabs += 1
        if self._failed_grabs >= _MAX_FAILED_GRABS:
            raise CaptureError(
                f"camera {self.device.path or self.device.index} stopped delivering frames "
                "(unplugged, or taken by another program?)"
            )
        return None

    def fill(self, out: U8Array, *, frame_number: int, capture_us: int) -> None:
        ok, picture = self._capture.retrieve()
        if not ok or picture is None:
            raise CaptureError(f"camera {self.device.name}: the grabbed frame could not be decoded")
        if picture.ndim == 2:  # a grey camera
            picture = cv2.cvtColor(picture, cv2.COLOR_GRAY2BGR)
        self._converter.from_bgr(np.asarray(picture, dtype=np.uint8), out)

    def info(self) -> SourceInfo:
        applied = self.applied
        return SourceInfo(
            spec=CameraSource(self.device),
            kind="camera",
            description=(
                f"{self.device.name or self.device.path} {applied.pixel_format} "
                f"{applied.width}x{applied.height}@{applied.framerate:g}"
            ),
            native_width=applied.width,
            native_height=applied.height,
            pacing=self.pacing,
            applied=applied,
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._capture.release()


def probe_cameras(max_index: int = 4) -> list[CameraInfo]:
    """Cameras by index where the OS offers no listing OpenCV can read (macOS, Windows).

    Only the mode each camera opens in is known there.
    """
    cameras = []
    for index in range(max_index):
        capture = cv2.VideoCapture(index, _native_api())
        try:
            if not capture.isOpened():
                continue
            device = CameraDevice(index=index, name=f"camera {index}")
            mode = CameraMode(
                pixel_format=_fourcc_text(capture.get(cv2.CAP_PROP_FOURCC)),
                width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                framerates=[round(float(capture.get(cv2.CAP_PROP_FPS)), 3)],
            )
            cameras.append(
                CameraInfo(
                    device=device, capabilities=CaptureCapabilities(device=device, modes=[mode])
                )
            )
        finally:
            capture.release()
    return cameras
