"""The quality ladder (simulcast): which rungs a stream has, and each picture scaled once per rung.

The design's QualityScaler.  A stream is captured once at its quality (rung 0) and may carry
extra rungs below it, named by the design's presets (``StreamConfig.rungs``).  Each rung is its
own H.264 stream with its own encoder, packet ring and RTP flow, so a viewer moves between rungs
at a keyframe of the rung it moves to.

Planning (:func:`plan_ladder`, pure) caps each preset by the source: a rung is never taller or
faster than rung 0.  Its width follows the source's aspect ratio (a 4:3 camera gets 640x480,
not the preset's 854x480), rounded to even for 4:2:0, and its bitrate shrinks with its pixel
rate when it was capped.  A rung that comes out the same as one above it is dropped, and the
plan says why.  Rungs are ordered from the top down, so rung ``n + 1`` is always below rung
``n``; the order given in the config does not matter.

Per frame, :class:`QualityScaler` makes each rung's picture from the source once, with
libswscale's area averaging (measured 0.3 to 0.45 ms for 720p to 480p/360p/240p, against
2.5 ms for OpenCV's INTER_AREA on the three planes), and :class:`FrameDecimator` decides from
timestamps which source frames a slower rung encodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import av
import av.video.reformatter
import msgspec
import numpy as np
import numpy.typing as npt

from shared.errors import ConfigError
from shared.models import QualityPreset, Resolution, StreamQuality

__all__ = [
    "FrameDecimator",
    "LadderPlan",
    "QualityScaler",
    "Rung",
    "plan_ladder",
]

#: The smallest bitrate a capped rung is given: below it x264 cannot keep even 240p legible.
MIN_RUNG_BITRATE: Final = 100_000
Pixels = npt.NDArray[np.uint8]

#: pts ticks per second (shared.media.codec.TIME_BASE is 1/90000).
_CLOCK: Final = 90_000


class Rung(msgspec.Struct, frozen=True, kw_only=True):
    """One rung of the ladder: an independent H.264 stream of the same source."""

    index: int
    width: int
    height: int
    framerate: int
    bitrate: int
    #: The preset it was planned from (CUSTOM for rung 0 unless the stream used a preset).
    preset: QualityPreset = QualityPreset.CUSTOM

    @property
    def pixel_rate(self) -> int:
        return self.width * self.height * self.framerate

    def quality(self, *, hardware_acceleration: bool = False) -> StreamQuality:
        return StreamQuality(
            resolution=Resolution(self.width, self.height),
            framerate=self.framerate,
            bitrate=self.bitrate,
            quality_preset=self.preset,
            hardware_acceleration=hardware_acceleration,
        )

    @classmethod
    def top(cls, quality: StreamQuality) -> Rung:
        """Rung 0: the stream's own quality."""
        return cls(
            index=0,
            width=quality.resolution.width,
            height=quality.resolution.height,
            framerate=quality.framerate,
            bitrate=quality.bitrate,
            preset=quality.quality_preset,
        )


class LadderPlan(msgspec.Struct, frozen=True, kw_only=True):
    rungs: tuple[Rung, ...]
    #: Presets left out, each with the reason.
    dropped: tuple[str, ...] = ()


def _even(value: float) -> int:
    return max(2, 2 * round(value / 2))


def plan_ladder(quality: StreamQuality, presets: Sequence[QualityPreset]) -> LadderPlan:
    """Rung 0 from ``quality``, then one rung per preset, capped by the source (module doc)."""
    top = Rung.top(quality)
    planned: list[Rung] = []
    dropped: list[str] = []
    for preset in presets:
        if preset is QualityPreset.CUSTOM:
            raise ConfigError("a ladder rung must be a named preset (low, medium, high, ultra)")
        wanted = StreamQuality.from_preset(preset)
        height = min(wanted.resolution.height, top.height)
        width = top.width if height == top.height else _even(top.width * height / top.height)
        framerate = min(wanted.framerate, top.framerate)
        bitrate = wanted.bitrate
        wanted_rate = wanted.resolution.width * wanted.resolution.height * wanted.framerate
        if width * height * framerate < wanted_rate:  # capped: fewer pixels, fewer bits
            bitrate = max(MIN_RUNG_BITRATE, bitrate * width * height * framerate // wanted_rate)
        bitrate = min(bitrate, top.bitrate)
        rung = Rung(
            index=0, width=width, height=height, framerate=framerate, bitrate=bitrate, preset=preset
        )
        same = next(
            (
                r
                for r in (top, *planned)
                if (r.width, r.height, r.framerate) == (width, height, framerate)
            ),
            None,
        )
        if same is not None:
            what = "the stream's quality" if same is top else f"preset {same.preset}"
            dropped.append(
                f"{preset}: capped by the source to {width}x{height}@{framerate}, "
                f"the same as {what}"
            )
            continue
        planned.append(rung)
    planned.sort(key=lambda r: (r.pixel_rate, r.bitrate), reverse=True)
    rungs = (top, *(msgspec.structs.replace(r, index=i) for i, r in enumerate(planned, 1)))
    return LadderPlan(rungs=rungs, dropped=tuple(dropped))


class FrameDecimator:
    """Which source frames a rung at ``framerate`` encodes, judged by their timestamps.

    Sans-I/O: a frame is admitted when its pts reaches the rung's next due time; due times
    advance by whole frame intervals, so a 15 fps rung of a 30 fps source takes every other
    frame and a jittery source does not make it drift.
    """

    def __init__(self, framerate: int) -> None:
        if framerate <= 0:
            raise ConfigError(f"frame rate {framerate} must be positive")
        self.framerate = framerate
        self._interval = _CLOCK / framerate
        self._due: float | None = None

    def admit(self, pts: int) -> bool:
        if self._due is None or pts < self._due - self._interval:  # first frame, or time reset
            self._due = pts + self._interval
            return True
        # A quarter frame of tolerance: capture jitter must not skip a frame that is due, and
        # the tolerance must stay below half a source interval, or a half-rate rung would
        # take every frame.
        if pts + self._interval / 4 < self._due:
            return False
        self._due += self._interval
        if self._due <= pts:  # a gap (the source stalled): resume from this frame
            self._due = pts + self._interval
        return True


class QualityScaler:
    """Scales a source picture to a rung's size, once per rung and frame.

    One swscale context per rung is kept (VideoReformatter caches it), so a rung pays for
    setting up the scaler only when its size changes.
    """

    def __init__(self) -> None:
        self._reformatters: dict[int, av.video.reformatter.VideoReformatter] = {}

    def picture(self, pixels: Pixels, width: int, height: int, rung: Rung) -> av.VideoFrame:
        """Rung ``rung``'s picture of the I420 ``pixels`` (``width`` x ``height``).

        Always a frame object of its own, even when no scaling is needed (it then wraps
        ``pixels`` without a copy): an encoder sets the pts and picture type of the frame it is
        given, so rungs encoding in parallel must never share one.
        """
        if pixels.size != width * height * 3 // 2:
            raise ConfigError(f"{pixels.size} bytes is not a {width}x{height} I420 picture")
        frame = av.VideoFrame.from_numpy_buffer(
            pixels.reshape(height * 3 // 2, width), format="yuv420p"
        )
        return self.scale(frame, rung)

    def scale(self, frame: av.VideoFrame, rung: Rung) -> av.VideoFrame:
        """``frame`` scaled to the rung's size; ``frame`` itself when it has that size."""
        if (frame.width, frame.height) == (rung.width, rung.height) and (
            frame.format.name == "yuv420p"
        ):
            return frame
        reformatter = self._reformatters.get(rung.index)
        if reformatter is None:
            reformatter = self._reformatters[rung.index] = av.video.reformatter.VideoReformatter()
        scaled = reformatter.reformat(
            frame,
            width=rung.width,
            height=rung.height,
            format="yuv420p",
            interpolation=av.video.reformatter.Interpolation.AREA,
        )
        scaled.pts = frame.pts
        if frame.time_base is not None:
            scaled.time_base = frame.time_base
        return scaled
