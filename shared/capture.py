"""Capture sources behind one small interface the capture actor drives.

A source fills a yuv420p buffer (often a frame pool slot, so pixels are written once, straight
into shared memory) when asked, at the pace the caller sets.  The test pattern is the one
source every machine has; camera, screen, audio and file sources plug in here.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from shared.errors import CaptureError
from shared.models import StreamQuality, StreamSource, TestPatternSource
from shared.testpattern import TestPattern

__all__ = ["FrameSource", "open_source"]


class FrameSource(Protocol):
    width: int
    height: int

    def fill(self, out: np.ndarray, *, frame_number: int, capture_us: int) -> None:
        """Write one yuv420p picture into ``out`` (width*height*3/2 bytes)."""

    def close(self) -> None: ...


class TestPatternFrameSource:
    __test__ = False

    def __init__(self, quality: StreamQuality) -> None:
        self.width = quality.resolution.width
        self.height = quality.resolution.height
        self._pattern = TestPattern(self.width, self.height, quality.framerate)

    def fill(self, out: np.ndarray, *, frame_number: int, capture_us: int) -> None:
        self._pattern.render_into(out, frame_number, capture_us)

    def close(self) -> None:
        pass


def open_source(source: StreamSource, quality: StreamQuality) -> FrameSource:
    if isinstance(source, TestPatternSource):
        return TestPatternFrameSource(quality)
    kind = type(source).__name__.removesuffix("Source").lower()
    raise CaptureError(
        f"{kind} capture is not available in this build; use source 'test' "
        "(the capture engine adds camera, screen and file sources)"
    )
