"""What to encode at after an encoding failure: the seed's "parameter fallback" (pure).

An encoder that fails on a frame (out of memory for its reference frames, a codec refusing
the size, a session that can no longer keep up) is tried once more at lower parameters before
the stream is declared in Error: first at half the frame rate, which keeps the picture size
viewers see, then at half the size.  Each step is a reopen at an IDR with pts running on
(``LadderEncoder.configure``).  A hardware encoder's failure never comes here: the codec layer
moves it to libx264 first (``shared.media.codec``).
"""

from __future__ import annotations

from typing import Final

import msgspec

from shared.models import Resolution, StreamQuality

__all__ = ["MAX_PARAMETER_FALLBACKS", "lower_quality"]

#: Steps down tried before the stream goes to Error.
MAX_PARAMETER_FALLBACKS: Final = 2
#: Nothing is tried below these.
MIN_FRAMERATE: Final = 10
MIN_WIDTH, MIN_HEIGHT = 160, 90


def lower_quality(quality: StreamQuality) -> StreamQuality | None:
    """The next step down from ``quality`` (None: nothing lower is worth trying).  The
    bitrate scales with the pixels per second, so a step down does not raise the bits per
    pixel."""
    if quality.framerate // 2 >= MIN_FRAMERATE:
        return msgspec.structs.replace(
            quality, framerate=quality.framerate // 2, bitrate=max(quality.bitrate // 2, 1)
        )
    width, height = quality.resolution.width // 2, quality.resolution.height // 2
    width, height = width - width % 2, height - height % 2  # yuv420p wants even edges
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        return None
    return msgspec.structs.replace(
        quality, resolution=Resolution(width, height), bitrate=max(quality.bitrate // 4, 1)
    )
