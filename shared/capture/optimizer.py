"""CaptureOptimizer: which camera mode to open, chosen without touching a device.

:func:`choose_mode` picks the camera mode closest to the requested quality, preferring formats
that are cheap to convert to yuv420p.  The timing decisions of capture live in
:mod:`shared.capture.pacing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple

from shared.capture.source import CameraMode
from shared.models import CaptureConfig, PixelFormat

__all__ = ["FOURCC_FOR_FORMAT", "ModeChoice", "choose_mode"]

#: The V4L2 fourcc for each pixel format a CaptureConfig can ask for.
FOURCC_FOR_FORMAT: Final = {
    PixelFormat.YUV420P: "YU12",
    PixelFormat.NV12: "NV12",
    PixelFormat.BGR24: "BGR3",
    PixelFormat.RGB24: "RGB3",
    PixelFormat.GRAY: "GREY",
}

#: Cost of turning a device format into yuv420p, cheapest first; unknown formats rank after
#: these, compressed ones last (a JPEG decode per frame).
_FORMAT_COST: Final = ("YU12", "NV12", "YV12", "YUYV", "UYVY", "BGR3", "RGB3", "GREY")


class ModeChoice(NamedTuple):
    mode: CameraMode
    framerate: float


def _format_cost(mode: CameraMode, wanted: str) -> int:
    if mode.pixel_format == wanted:
        return -1
    if mode.compressed:
        return len(_FORMAT_COST) + 1
    try:
        return _FORMAT_COST.index(mode.pixel_format)
    except ValueError:
        return len(_FORMAT_COST)


def choose_mode(modes: Sequence[CameraMode], config: CaptureConfig) -> ModeChoice | None:
    """The mode (and rate) closest to ``config``; None when the device listed no modes.

    In order of importance: a frame rate at least the requested one (a stream that stutters
    is worse than a soft one); a size covering the request (downscaling loses less than
    upscaling), else the largest; the smallest such size (less to convert); the closest aspect
    ratio; the closest rate; the cheapest pixel format to convert, the requested one first.
    So a 720p30 request on a USB 2 webcam that offers YUYV 720p only at 10 fps gets MJPG
    720p30, and 640x480 YUYV at 30 fps beats a 4K mode.
    """
    want_w, want_h = config.resolution.width, config.resolution.height
    want_fps = float(config.framerate)
    want_area = want_w * want_h
    wanted_fourcc = FOURCC_FOR_FORMAT.get(config.pixel_format, "")
    best: tuple[tuple[float, ...], ModeChoice] | None = None
    for mode in modes:
        rates = mode.framerates or [want_fps]
        covers = mode.width >= want_w and mode.height >= want_h
        area = mode.width * mode.height
        size_cost = area - want_area if covers else want_area - area
        aspect_cost = abs(mode.width * want_h - want_w * mode.height) / (mode.height * want_h)
        for fps in rates:
            fast_enough = fps >= want_fps - 0.5
            # Above the request costs a little (the gate drops frames); below costs more.
            rate_cost = (fps - want_fps) if fast_enough else 4 * (want_fps - fps)
            key = (
                0.0 if fast_enough else 1.0,
                0.0 if covers else 1.0,
                float(size_cost),
                round(aspect_cost, 3),
                rate_cost,
                float(_format_cost(mode, wanted_fourcc)),
            )
            if best is None or key < best[0]:
                best = (key, ModeChoice(mode, fps))
    return best[1] if best is not None else None
