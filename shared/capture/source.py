"""What every capture source shares: the grab/fill contract and the data that describes sources.

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

Every source module imports its types from here, and nothing here imports a source, so the
capture package has no import cycle.
"""

from __future__ import annotations

from typing import Literal, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from shared.models import CameraDevice, CaptureConfig, StreamSource

__all__ = [
    "AppliedCapture",
    "CameraInfo",
    "CameraMode",
    "CaptureCapabilities",
    "EndOfSource",
    "FrameSource",
    "Pacing",
    "SourceInfo",
    "U8Array",
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
