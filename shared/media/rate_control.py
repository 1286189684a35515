"""Rate control for live streaming, sans-I/O: how many bits an encoder may spend, where the IDRs
go, and how many threads it gets.

Theory of operation
-------------------
*CBR-like, small VBV.*  A live stream wants a cap on the bits in any short window (the network
drains them at roughly the target rate) more than an exact average.  Every encoder is opened in
CBR mode (target = VBV max rate) with a VBV buffer of :data:`VBV_SECONDS`.

*Moving the rate live.*  Through FFmpeg's libx264 wrapper only the VBV can move after open:
FFmpeg's per-frame reconfigure passes a new ``bit_rate`` to x264, but x264 keeps the ABR target
it was opened with and, in CBR mode, turns the new bitrate into a new VBV max rate (x264
``ratecontrol.c``: "if the stream starts as CBR, keep it CBR").  The VBV max rate and buffer
must be set as the generic ``maxrate``/``bufsize`` options, not in ``x264-params``: otherwise
FFmpeg sees ``rc_max_rate == 0``, "reconfigures" the VBV off on the first frame, x264 refuses
(it only moves a VBV that is on in both), and every later bitrate change is ignored.  Measured:
with the VBV in ``x264-params`` a change does nothing; opened as here, raising ``bit_rate``
above the opened value does nothing and lowering it works.  So the encoder opens at
``ceiling * MAX_GAIN`` and every later rate is a VBV max rate at or below that; the ABR target
left above it only pushes the encoder to use what the VBV allows.

*Closing the loop.*  x264's one-pass ABR undershoots on easy content: 0.86 of target over
10 s of the test pattern with a 2 s GOP, 0.76 with a 10 s GOP (measured, libx264 veryfast
zerolatency, 640x360 at 400 kbps).  :class:`BitrateAdjuster` measures what the encoder really
produced and scales the rate it is given by a gain in ``[MIN_GAIN, MAX_GAIN]``, as WebRTC's
encoder bitrate adjuster does; with it the same runs reach 1.03 and 1.03, and 720p30 at
1.5 Mbps, 480p15 at 500 kbps and 240p30 at 200 kbps reach 0.96 to 1.02 (2 s GOP).  A halved
or doubled target is met within 11% over the GOPs after the change.  Content that cannot use
the bits (a still picture) does not wind the gain up.

*Adaptive GOP.*  :class:`SceneCutDetector` forces an IDR when the picture changes completely
(a cut), so the GOP can otherwise be long: an IDR costs 5 to 10 P-frames of bits, and a long GOP
spends them only where prediction would fail anyway.

*Threads.*  With ``tune=zerolatency`` x264 threads are slice threads: each frame is cut into
slices coded in parallel, adding no frame of delay.  :func:`encoder_threads` gives one thread per
1080p30 of pixel rate but never more than the cores minus one, since capture and the senders
need a core too.  On this project's 2-core machines that is one thread: measured at 720p,
1 thread encodes 155 fps against 130 fps for 2 and 105 for 3, because the second core is busy.
"""

from __future__ import annotations

import collections
import math
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt

from shared.errors import ConfigError

__all__ = [
    "MAX_GAIN",
    "MIN_GAIN",
    "VBV_SECONDS",
    "BitrateAdjuster",
    "SceneCutDetector",
    "encoder_threads",
    "vbv_buffer_bits",
]

#: VBV buffer, in seconds at the target rate: the largest burst (an IDR) the network must
#: absorb.  Half a second keeps IDRs readable at 720p 1.5 Mbps while bounding the queueing delay.
VBV_SECONDS: Final = 0.5
#: Bounds of the adjuster's gain; the encoder is opened at ``ceiling * MAX_GAIN``.
MIN_GAIN: Final = 0.6
MAX_GAIN: Final = 2.0
#: Where the gain starts: what x264 needs on typical content (measured 1.1 to 1.2).
INITIAL_GAIN: Final = 1.15
#: Output is measured over this window and the gain updated this often.
WINDOW_S: Final = 1.0
UPDATE_S: Final = 0.5
#: Largest change of the gain per update, up and down: an overshoot (harder content arriving
#: with the gain high) is taken back faster than an undershoot is made up.
MAX_STEP_UP: Final = 1.25
MAX_STEP_DOWN: Final = 1.5
#: How much of the error one update corrects (as an exponent of target / measured).
RESPONSE: Final = 0.7
#: Below this fraction of the target the encoder is limited by content, not by the rate:
#: raising the gain would only store up an overshoot for when the content gets harder.
CONTENT_LIMITED: Final = 0.5

#: One slice thread per this many pixels a second (1080p30).
THREAD_PIXEL_RATE: Final = 1920 * 1080 * 30
MAX_THREADS: Final = 4

#: Scene cuts are judged on a luma thumbnail this wide (area-averaged, so fine detail that
#: merely scrolls cancels out).
CUT_THUMB_WIDTH: Final = 128
#: A cut is a mean absolute luma change (0..255) above both of these: an absolute floor, and a
#: multiple of the recent average, so steady fast motion is not mistaken for cuts.  The test
#: pattern scores 6 to 15 frame to frame; a cut to another picture scores 38 to 100.
CUT_MIN_SCORE: Final = 25.0
CUT_RATIO: Final = 2.5
#: No two forced IDRs closer than this: a strobe would otherwise make every frame an IDR.
MIN_CUT_INTERVAL_S: Final = 0.5
_EMA_WEIGHT: Final = 0.1


def vbv_buffer_bits(bitrate: int) -> int:
    """The VBV buffer size for ``bitrate`` (see :data:`VBV_SECONDS`)."""
    return max(int(bitrate * VBV_SECONDS), 1)


def encoder_threads(width: int, height: int, framerate: int, cores: int) -> int:
    """Slice threads for one encoder of this size and rate on ``cores`` CPUs (see module doc)."""
    if width <= 0 or height <= 0 or framerate <= 0 or cores <= 0:
        raise ConfigError(f"cannot size threads for {width}x{height}@{framerate} on {cores} cores")
    wanted = math.ceil(width * height * framerate / THREAD_PIXEL_RATE)
    return max(1, min(wanted, cores - 1, MAX_THREADS))


class BitrateAdjuster:
    """Scales the rate given to an encoder so that what it produces matches the target.

    Feed it every access unit with :meth:`observe` (``now`` in seconds, from the stream's
    timestamps); read :attr:`encoder_bitrate` for the rate to configure.
    """

    def __init__(self, target: int, *, initial_gain: float = INITIAL_GAIN) -> None:
        if target <= 0:
            raise ConfigError(f"target bitrate {target} must be positive")
        self._target = target
        self._gain = min(max(initial_gain, MIN_GAIN), MAX_GAIN)
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._window_bytes = 0
        self._last_update: float | None = None

    @property
    def target(self) -> int:
        return self._target

    @property
    def gain(self) -> float:
        return self._gain

    @property
    def encoder_bitrate(self) -> int:
        """The rate to give the encoder now."""
        return int(self._target * self._gain)

    def set_target(self, target: int) -> None:
        """A new target; output measured under the old one no longer says anything."""
        if target <= 0:
            raise ConfigError(f"target bitrate {target} must be positive")
        if target != self._target:
            self._target = target
            self._window.clear()
            self._window_bytes = 0
            self._last_update = None

    def measured_bitrate(self) -> int:
        """Bits per second over the window (0 until it spans two access units)."""
        if len(self._window) < 2:
            return 0
        span = self._window[-1][0] - self._window[0][0]
        if span <= 0:
            return 0
        # The newest unit's bits belong to the interval after it; leave them out.
        return int((self._window_bytes - self._window[-1][1]) * 8 / span)

    def observe(self, now: float, size_bytes: int) -> None:
        """One access unit of ``size_bytes`` produced at stream time ``now`` (seconds)."""
        if self._window and now < self._window[-1][0]:
            # Time went back: a new timeline (the stream restarted); start measuring again.
            self._window.clear()
            self._window_bytes = 0
            self._last_update = None
        self._window.append((now, size_bytes))
        self._window_bytes += size_bytes
        while now - self._window[0][0] > WINDOW_S:
            self._window_bytes -= self._window.popleft()[1]
        if self._last_update is None:
            self._last_update = now
        if now - self._last_update < UPDATE_S or now - self._window[0][0] < UPDATE_S:
            return
        self._last_update = now
        measured = self.measured_bitrate()
        if measured <= 0:
            return
        error = self._target / measured
        if error > 1 and measured < CONTENT_LIMITED * self._target:
            return
        step = min(max(error**RESPONSE, 1 / MAX_STEP_DOWN), MAX_STEP_UP)
        self._gain = min(max(self._gain * step, MIN_GAIN), MAX_GAIN)


class SceneCutDetector:
    """Says when a picture is a scene cut that deserves an IDR (see module doc)."""

    def __init__(
        self,
        *,
        min_score: float = CUT_MIN_SCORE,
        ratio: float = CUT_RATIO,
        min_interval_s: float = MIN_CUT_INTERVAL_S,
    ) -> None:
        self._min_score = min_score
        self._ratio = ratio
        self._min_interval_s = min_interval_s
        self._previous: npt.NDArray[np.int16] | None = None
        self._average: float | None = None
        self._last_keyframe: float | None = None
        self.cuts = 0
        self.last_score = 0.0

    def keyframe_sent(self, now: float) -> None:
        """An IDR went out at ``now`` for another reason (periodic, requested): it counts
        toward the spacing between forced IDRs."""
        self._last_keyframe = now

    def observe(self, luma: npt.NDArray[np.uint8], now: float) -> bool:
        """Whether the picture with this luma plane (2-D), shown at ``now`` seconds, is a cut."""
        if luma.ndim != 2 or luma.shape[0] < 2 or luma.shape[1] < 2:
            raise ConfigError(f"luma plane of shape {luma.shape} is not a picture")
        height, width = luma.shape
        thumb_width = min(CUT_THUMB_WIDTH, width)
        thumb_height = max(2, round(thumb_width * height / width))
        # Every row is not needed to judge a cut: keeping four source rows per thumbnail row
        # halves the memory read at 720p (0.34 -> 0.17 ms measured), which is all this costs.
        rows = luma[:: max(1, height // (4 * thumb_height))]
        resized = cv2.resize(rows, (thumb_width, thumb_height), interpolation=cv2.INTER_AREA)
        thumb: npt.NDArray[np.int16] = resized.astype(np.int16)
        previous, self._previous = self._previous, thumb
        if previous is None or previous.shape != thumb.shape:
            return False  # the first picture, or a new size: the encoder starts with an IDR
        score = float(np.abs(thumb - previous).mean())
        self.last_score = score
        # With no history yet only the absolute floor applies.
        average = self._average if self._average is not None else 0.0
        change = score >= self._min_score and score >= self._ratio * average
        spaced = self._last_keyframe is None or now - self._last_keyframe >= self._min_interval_s
        cut = change and spaced
        if cut:
            self.cuts += 1
            self._last_keyframe = now
        if not change:
            # A cut (even one too close to the last IDR to get its own) is not motion: keep
            # it out of the average that cuts are judged against.
            self._average = (
                score
                if self._average is None
                else (1 - _EMA_WEIGHT) * self._average + _EMA_WEIGHT * score
            )
        return cut
