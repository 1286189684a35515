"""ScreenCapture: a monitor, or a region of one, through mss; the cursor through XFixes.

Monitors are numbered as mss numbers them: 1, 2, ... are the monitors, 0 is the whole virtual
desktop spanning all of them; no index means the primary monitor.  A region is relative to the
chosen monitor's top-left corner and must lie inside it.

X11 does not draw the cursor into screenshots (it is a hardware overlay), so when
``capture_cursor`` is set the cursor image is fetched with XFixesGetCursorImage (libXfixes via
ctypes) and blended in.  A Wayland session without XWayland has no X server to ask, and its
screencopy needs a portal this project does not speak: that is a clear "not supported" error.

Screen capture is a *pull* source: the actor grabs on its own frame-rate schedule.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from shared.capture.pixels import I420Converter
from shared.capture.source import Pacing, SourceInfo, U8Array
from shared.errors import CaptureError, ConfigError
from shared.models import Resolution, ScreenConfig, ScreenRegion, ScreenSource

__all__ = [
    "CursorImage",
    "ScreenCapture",
    "XCursorReader",
    "capture_box",
    "composite_cursor",
    "x11_display",
]


def x11_display(env: Mapping[str, str]) -> str:
    """The X display to capture, from the environment; CaptureError when there is none.

    Wayland without XWayland (WAYLAND_DISPLAY set, DISPLAY not) is not supported.
    """
    display = env.get("DISPLAY", "")
    if display:
        return display
    if env.get("WAYLAND_DISPLAY") or env.get("XDG_SESSION_TYPE") == "wayland":
        raise CaptureError(
            "screen capture is not supported on a Wayland session without X11: run under "
            "XWayland (DISPLAY set) or log in to an X11 session"
        )
    raise CaptureError("screen capture needs a display: DISPLAY is not set")


def capture_box(
    monitors: list[dict[str, Any]], monitor_index: int | None, region: ScreenRegion | None
) -> tuple[int, dict[str, int]]:
    """(monitor index, mss box in desktop coordinates) for a monitor and optional region.

    CaptureError for a monitor that does not exist; ConfigError for a region outside it.
    """
    count = len(monitors) - 1  # monitors[0] is the whole desktop
    if monitor_index is None:
        primary = [i for i, m in enumerate(monitors[1:], 1) if m.get("is_primary")]
        monitor_index = primary[0] if primary else (1 if count >= 1 else 0)
    if not 0 <= monitor_index <= count:
        have = f"monitors 1 to {count}" if count > 1 else "only monitor 1"
        raise CaptureError(
            f"monitor {monitor_index} does not exist: this display has {have} "
            "(0 is the whole desktop)"
        )
    monitor = monitors[monitor_index]
    left, top = int(monitor["left"]), int(monitor["top"])
    width, height = int(monitor["width"]), int(monitor["height"])
    if region is None:
        return monitor_index, {"left": left, "top": top, "width": width, "height": height}
    if region.x + region.width > width or region.y + region.height > height:
        raise ConfigError(
            f"screen region {region.width}x{region.height} at {region.x},{region.y} lies outside "
            f"monitor {monitor_index} ({width}x{height})"
        )
    return monitor_index, {
        "left": left + region.x,
        "top": top + region.y,
        "width": region.width,
        "height": region.height,
    }


# --- the cursor ----------------------------------------------------------------------------------


class CursorImage(NamedTuple):
    """The cursor: its top-left corner on the desktop and premultiplied ARGB32 pixels."""

    left: int
    top: int
    argb: npt.NDArray[np.uint32]


def composite_cursor(picture: U8Array, cursor: CursorImage, box_left: int, box_top: int) -> None:
    """Blend ``cursor`` over a BGRA ``picture`` whose top-left is at (box_left, box_top).

    XFixes pixels are premultiplied by alpha, so out = cursor + picture * (1 - alpha).
    """
    height, width = picture.shape[:2]
    ch, cw = cursor.argb.shape
    x0, y0 = cursor.left - box_left, cursor.top - box_top
    # Clip the cursor to the picture.
    sx0, sy0 = max(0, -x0), max(0, -y0)
    sx1, sy1 = min(cw, width - x0), min(ch, height - y0)
    if sx0 >= sx1 or sy0 >= sy1:
        return
    argb = cursor.argb[sy0:sy1, sx0:sx1]
    alpha = ((argb >> 24) & 0xFF).astype(np.uint16)
    region = picture[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1]
    inverse = 255 - alpha
    for channel, shift in ((0, 0), (1, 8), (2, 16)):  # B, G, R in a BGRA picture
        source = ((argb >> shift) & 0xFF).astype(np.uint16)
        blended = source + (region[..., channel].astype(np.uint16) * inverse + 127) // 255
        region[..., channel] = np.minimum(blended, 255).astype(np.uint8)


class _XFixesCursorImage(ctypes.Structure):
    # XFixesCursorImage from X11/extensions/Xfixes.h (version >= 2 layout).
    _fields_ = [
        ("x", ctypes.c_short),
        ("y", ctypes.c_short),
        ("width", ctypes.c_ushort),
        ("height", ctypes.c_ushort),
        ("xhot", ctypes.c_ushort),
        ("yhot", ctypes.c_ushort),
        ("cursor_serial", ctypes.c_ulong),
        ("pixels", ctypes.POINTER(ctypes.c_ulong)),
        ("atom", ctypes.c_ulong),
        ("name", ctypes.c_char_p),
    ]


class XCursorReader:
    """Reads the X cursor image through its own display connection (libX11 + libXfixes)."""

    def __init__(self, display: str) -> None:
        x11_name = ctypes.util.find_library("X11") or "libX11.so.6"
        xfixes_name = ctypes.util.find_library("Xfixes") or "libXfixes.so.3"
        try:
            self._x11 = ctypes.CDLL(x11_name)
            self._xfixes = ctypes.CDLL(xfixes_name)
        except OSError as exc:
            raise CaptureError(
                f"drawing the cursor needs libXfixes ({exc}); install libxfixes3"
            ) from None
        self._x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
        self._x11.XOpenDisplay.restype = ctypes.c_void_p
        self._x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
        self._x11.XFree.argtypes = [ctypes.c_void_p]
        self._xfixes.XFixesQueryExtension.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_int),
            ctypes.POINTER(ctypes.c_int),
        ]
        self._xfixes.XFixesQueryExtension.restype = ctypes.c_int
        self._xfixes.XFixesGetCursorImage.argtypes = [ctypes.c_void_p]
        self._xfixes.XFixesGetCursorImage.restype = ctypes.POINTER(_XFixesCursorImage)
        self._display = self._x11.XOpenDisplay(display.encode())
        if not self._display:
            raise CaptureError(f"cannot open X display {display!r} to read the cursor")
        event_base, error_base = ctypes.c_int(), ctypes.c_int()
        if not self._xfixes.XFixesQueryExtension(
            self._display, ctypes.byref(event_base), ctypes.byref(error_base)
        ):
            self.close()
            raise CaptureError(f"X display {display!r} lacks the XFixes extension (cursor)")

    def read(self) -> CursorImage | None:
        if not self._display:
            return None
        image = self._xfixes.XFixesGetCursorImage(self._display)
        if not image:
            return None
        try:
            cursor = image.contents
            count = cursor.width * cursor.height
            if count == 0:
                return None
            # Each pixel is an unsigned long holding ARGB32 in its low 32 bits.
            longs = np.ctypeslib.as_array(cursor.pixels, shape=(count,))
            argb = (longs & 0xFFFFFFFF).astype(np.uint32).reshape(cursor.height, cursor.width)
            return CursorImage(cursor.x - cursor.xhot, cursor.y - cursor.yhot, argb)
        finally:
            self._x11.XFree(image)

    def close(self) -> None:
        if self._display:
            self._x11.XCloseDisplay(self._display)
            self._display = None


# --- the source ----------------------------------------------------------------------------------


class ScreenCapture:
    """A pull source over mss; opened on, and used from, one thread."""

    pacing: Pacing = "pull"

    def __init__(
        self,
        sct: Any,
        *,
        config: ScreenConfig,
        monitor_index: int,
        box: dict[str, int],
        output: Resolution,
        cursor: XCursorReader | None,
    ) -> None:
        self.width = output.width
        self.height = output.height
        self.config = config
        self.monitor_index = monitor_index
        self.box: Final = box
        self._sct = sct
        self._cursor = cursor
        self._converter = I420Converter(output.width, output.height)
        self._picture: U8Array | None = None

    @classmethod
    def open(
        cls, config: ScreenConfig, output: Resolution, *, env: Mapping[str, str] | None = None
    ) -> ScreenCapture:
        """Check the display, monitor and region, then open mss (errors before any frame)."""
        import os

        display: str | None = None
        if sys.platform.startswith("linux"):
            display = x11_display(os.environ if env is None else env)
        import mss
        from mss.exception import ScreenShotError

        try:
            sct = mss.MSS(display=display) if display is not None else mss.MSS()
        except ScreenShotError as exc:
            raise CaptureError(f"cannot open display {display or ''}: {exc}") from None
        try:
            monitors = list(sct.monitors)
        except ScreenShotError as exc:
            sct.close()
            raise CaptureError(f"cannot open display {display or ''}: {exc}") from None
        cursor = None
        try:
            index, box = capture_box(monitors, config.monitor_index, config.region)
            if config.capture_cursor and display is not None:
                cursor = XCursorReader(display)
        except BaseException:
            sct.close()
            raise
        return cls(
            sct,
            config=config,
            monitor_index=index,
            box=box,
            output=output,
            cursor=cursor,
        )

    def grab(self, *, timeout: float) -> int | None:
        # The server copies the pixels when it handles the request: stamp the request.
        capture_us = time.time_ns() // 1000
        shot = self._sct.grab(self.box)
        picture = np.frombuffer(shot.raw, np.uint8).reshape(shot.height, shot.width, 4)
        if self._cursor is not None:
            cursor = self._cursor.read()
            if cursor is not None:
                picture = picture.copy() if not picture.flags.writeable else picture
                composite_cursor(picture, cursor, self.box["left"], self.box["top"])
        self._picture = picture
        return capture_us

    def fill(self, out: U8Array, *, frame_number: int, capture_us: int) -> None:
        if self._picture is None:
            raise CaptureError("screen capture: fill before grab")
        self._converter.from_bgr(self._picture, out)

    def info(self) -> SourceInfo:
        region = self.config.region
        box = self.box
        return SourceInfo(
            spec=ScreenSource(monitor_index=self.monitor_index, region=region),
            kind="screen",
            description=(
                f"monitor {self.monitor_index} {box['width']}x{box['height']}"
                f"+{box['left']}+{box['top']}" + (" with cursor" if self._cursor else "")
            ),
            native_width=box["width"],
            native_height=box["height"],
            pacing=self.pacing,
        )

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None
        self._sct.close()
