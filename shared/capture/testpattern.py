"""The synthetic test source: a moving I420 picture that carries its own timestamp.

Each frame is colour bars, a colour ramp and a band of fine detail and seeded noise, all
scrolling left by a few pixels a frame, with a chequered box bouncing over them, and the
:mod:`shared.capture.stamp` strip (frame number and capture time) across the top rows.  The encoder
gets real motion and texture to code; any viewer reads the end-to-end latency off the decoded
picture with :func:`shared.capture.stamp.read_stamp`.

Cost: the background is built once, two periods wide, so a frame is one shifted-window copy per
plane (``np.copyto`` of slices), a small box copy and the stamp; no per-pixel Python.
"""

from __future__ import annotations

import time
from typing import Final

import numpy as np

from shared.capture.source import Pacing, SourceInfo
from shared.capture.stamp import (
    STAMP_MIN_HEIGHT,
    STAMP_MIN_WIDTH,
    Stamp,
    U8Array,
    clear_stamp_chroma,
    draw_stamp,
    planes,
    stamp_rows,
)
from shared.errors import ConfigError
from shared.models import MAX_DIMENSION, MAX_FRAMERATE, StreamQuality, TestPatternSource

__all__ = ["TestPattern", "planes"]

# 75% colour bars, BT.601 limited range (Y, U, V): white, yellow, cyan, green, magenta, red, blue.
_BARS: Final = np.array(
    [
        (180, 128, 128),
        (162, 44, 142),
        (131, 156, 44),
        (112, 72, 58),
        (84, 184, 198),
        (65, 100, 212),
        (35, 212, 114),
    ],
    dtype=np.uint8,
)
_BURST_PERIODS: Final = (32, 16, 8, 6, 4, 3, 2)  # multiburst line periods, pixels
_BOX_LUMA: Final = (60, 200)  # the box's chequer, dark and light
_BOX_CHROMA: Final = (90, 190)  # (U, V): orange
_NOISE_SEED: Final = 0x4B5A  # fixed so every run renders the same frames


class TestPattern:
    """Renders frame ``n`` of the moving pattern, stamped with ``n`` and its capture time."""

    __test__ = False  # not a pytest class

    def __init__(self, width: int, height: int, framerate: int) -> None:
        """A ``width`` x ``height`` pattern at ``framerate`` frames a second.

        Dimensions must be even (4:2:0), at least 160x96 (the stamp's minimum) and at most
        8192; the rate 1 to 240.  Anything else raises :class:`ConfigError`.
        """
        if width % 2 or height % 2:
            raise ConfigError(f"test pattern {width}x{height}: I420 needs even dimensions")
        if not (STAMP_MIN_WIDTH <= width <= MAX_DIMENSION) or not (
            STAMP_MIN_HEIGHT <= height <= MAX_DIMENSION
        ):
            raise ConfigError(
                f"test pattern {width}x{height}: each edge must be between "
                f"{STAMP_MIN_WIDTH}x{STAMP_MIN_HEIGHT} and {MAX_DIMENSION}"
            )
        if not 1 <= framerate <= MAX_FRAMERATE:
            raise ConfigError(f"test pattern at {framerate} fps: the rate must be 1 to 240")
        self.width: Final = width
        self.height: Final = height
        self.framerate: Final = framerate

        self._strip_rows = stamp_rows(height, width)
        # Pixels a frame: about width / 160, even so the chroma window moves whole samples.
        self._scroll = max(2, width // 320 * 2)
        y, u, v = _background(width, height)
        # Two periods side by side: the window at any offset in [0, width) is one slice.
        self._bg_y = np.concatenate([y, y], axis=1)
        self._bg_u = np.concatenate([u, u], axis=1)
        self._bg_v = np.concatenate([v, v], axis=1)

        self._box = max(2, min(height // 5, height - self._strip_rows) // 2 * 2)
        self._box_y, self._box_u, self._box_v = _box(self._box)
        self._box_speed = (self._scroll + 2, self._scroll)  # (x, y) pixels a frame, even

    @property
    def frame_bytes(self) -> int:
        """Bytes in one I420 frame: ``width * height * 3 // 2``."""
        return self.width * self.height * 3 // 2

    def render_into(self, out: U8Array, frame_number: int, capture_us: int) -> None:
        """Fill ``out`` with frame ``frame_number``, stamped with it and ``capture_us``.

        ``out`` is a writable, contiguous 1-D uint8 array of :attr:`frame_bytes` (typically a
        view into shared memory), written as I420: planar Y, then U, then V.  The picture
        moves with ``frame_number`` (0 or more); the stamp carries it modulo 2**32.
        """
        if out.ndim != 1 or not out.flags.writeable:
            raise ConfigError("render_into needs a writable 1-D uint8 array")
        if frame_number < 0:
            raise ConfigError(f"frame number {frame_number} is negative")
        stamp = Stamp(frame_number % (1 << 32), capture_us)  # validates capture_us first
        y, u, v = planes(out, self.width, self.height)

        top, ctop = self._strip_rows, self._strip_rows // 2  # the stamp overdraws these rows
        x = frame_number * self._scroll % self.width
        cx, cw = x // 2, self.width // 2
        np.copyto(y[top:], self._bg_y[top:, x : x + self.width])
        np.copyto(u[ctop:], self._bg_u[ctop:, cx : cx + cw])
        np.copyto(v[ctop:], self._bg_v[ctop:, cx : cx + cw])

        size = self._box
        bx = _bounce(frame_number * self._box_speed[0], self.width - size)
        by = top + _bounce(frame_number * self._box_speed[1], self.height - top - size)
        np.copyto(y[by : by + size, bx : bx + size], self._box_y)
        csize, cbx, cby = size // 2, bx // 2, by // 2
        np.copyto(u[cby : cby + csize, cbx : cbx + csize], self._box_u)
        np.copyto(v[cby : cby + csize, cbx : cbx + csize], self._box_v)

        draw_stamp(y, stamp)
        clear_stamp_chroma(u, v, self.width, self.height)

    def render(self, frame_number: int, capture_us: int) -> U8Array:
        """A new I420 frame: :meth:`render_into` a fresh array."""
        out = np.empty(self.frame_bytes, dtype=np.uint8)
        self.render_into(out, frame_number, capture_us)
        return out


def _bounce(travel: int, span: int) -> int:
    """Position after ``travel`` pixels bouncing between 0 and ``span``, rounded down to even."""
    if span <= 0:
        return 0
    t = travel % (2 * span)
    return (t if t <= span else 2 * span - t) // 2 * 2


def _background(width: int, height: int) -> tuple[U8Array, U8Array, U8Array]:
    """One horizontal period (``width`` wide) of the scrolling background, as Y, U, V planes.

    Top 55%: colour bars.  Next 20%: a luma sawtooth with a U ramp across and a V ramp down.
    Bottom 25%: a multiburst (ever finer vertical lines) plus seeded noise.
    """
    cw, ch = width // 2, height // 2
    y = np.empty((height, width), dtype=np.uint8)
    u = np.empty((ch, cw), dtype=np.uint8)
    v = np.empty((ch, cw), dtype=np.uint8)
    bars_end = height * 55 // 100 // 2 * 2
    ramp_end = height * 75 // 100 // 2 * 2
    xs, cxs = np.arange(width), np.arange(cw)

    bar = _BARS[xs * len(_BARS) // width]
    cbar = _BARS[cxs * len(_BARS) // cw]
    y[:bars_end] = bar[:, 0]
    u[: bars_end // 2] = cbar[:, 1]
    v[: bars_end // 2] = cbar[:, 2]

    y[bars_end:ramp_end] = (16 + 219 * xs // width).astype(np.uint8)
    u[bars_end // 2 : ramp_end // 2] = (16 + 224 * cxs // cw).astype(np.uint8)
    ramp_rows = (ramp_end - bars_end) // 2
    v[bars_end // 2 : ramp_end // 2] = (16 + 224 * np.arange(ramp_rows) // max(1, ramp_rows))[
        :, None
    ].astype(np.uint8)

    period = np.array(_BURST_PERIODS)[xs * len(_BURST_PERIODS) // width]
    burst = 128 + 80 * np.sin(2 * np.pi * xs / period)
    noise = np.random.default_rng(_NOISE_SEED).integers(-24, 25, size=(height - ramp_end, width))
    y[ramp_end:] = np.clip(burst + noise, 16, 235).astype(np.uint8)
    u[ramp_end // 2 :] = 128
    v[ramp_end // 2 :] = 128
    return y, u, v


def _box(size: int) -> tuple[U8Array, U8Array, U8Array]:
    """The bouncing box: a chequer of ``size // 4`` squares in luma, solid orange chroma."""
    square = max(1, size // 4)
    idx = np.arange(size) // square
    chequer = (idx[:, None] + idx[None, :]) % 2
    y = np.where(chequer == 1, _BOX_LUMA[1], _BOX_LUMA[0]).astype(np.uint8)
    u = np.full((size // 2, size // 2), _BOX_CHROMA[0], dtype=np.uint8)
    v = np.full((size // 2, size // 2), _BOX_CHROMA[1], dtype=np.uint8)
    return y, u, v


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
