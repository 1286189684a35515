"""Which kind of stream (the design's ``StreamType``) a request makes.

The type follows from what is captured, not from which API was called: a screen source is a
Screen stream, any other video source a Camera stream, video with audio a Combined stream, and
only an explicit request for audio makes an Audio (audio-only) stream.  ``start_camera_stream``
with a screen source is therefore a Screen stream; the CLI starts every source through it.
"""

from __future__ import annotations

import msgspec

from shared.errors import ConfigError
from shared.models import (
    AudioConfig,
    ScreenConfig,
    StreamConfig,
    StreamSource,
    StreamType,
    parse_source,
    source_stream_type,
)

__all__ = ["stream_config_with_screen_audio", "stream_type_after_switch", "stream_type_of"]


def stream_config_with_screen_audio(
    config: StreamConfig, screen: ScreenConfig | None
) -> StreamConfig:
    """``config``, with the default audio input added where the screen capture asks for audio."""
    if screen is not None and screen.capture_audio and config.audio is None:
        return msgspec.structs.replace(config, audio=AudioConfig())
    return config


def stream_type_of(config: StreamConfig, *, audio_only: bool = False) -> StreamType:
    """The type of a stream started with ``config``; ConfigError for what cannot be streamed."""
    if audio_only:
        if config.audio is None:
            raise ConfigError("an audio stream needs StreamConfig.audio")
        if config.record is not None:
            raise ConfigError(
                "recording an audio-only stream is not supported yet; record a combined stream"
            )
        return StreamType.AUDIO
    if config.audio is not None:
        return StreamType.COMBINED
    return source_stream_type(parse_source(config.source))


def stream_type_after_switch(current: StreamType, source: StreamSource) -> StreamType:
    """The type of a ``current`` stream once its video source is ``source``."""
    if current is StreamType.AUDIO:
        raise ConfigError("an audio-only stream has no video source to switch")
    if current is StreamType.COMBINED:
        return current  # still video with audio, whichever the video
    return source_stream_type(source)
