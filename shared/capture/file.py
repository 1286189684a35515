"""A media file as a live source: any file FFmpeg reads, played in real time, optionally looped.

:class:`FilePlayback` probes the file once (so a missing, unreadable or truncated file fails
before the stream is Active) and owns what its video and audio readers share: one
:class:`PlaybackClock`, which maps media time to the monotonic clock, and the loop period.
Each reader demuxes its own stream from its own container, so neither waits for the other's
packets.  Pacing runs on the monotonic clock, so an NTP step neither stalls nor races playback.
Each frame is stamped with the time it is due, turned into wall-clock microseconds (the clock
capture stamps are on) by one offset fixed when playback opens, which keeps video and audio in
sync exactly: a video frame and an audio block at the same media time get the same
``capture_us``.

Looping reopens the file and adds the period (the container's duration) to media time, so
timestamps keep rising across loops.  A decode error mid-file (a truncated tail) ends the pass
as end of file would, and is counted.
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any, Final, Literal

import av
import numpy as np

from shared.capture.audio import AudioBlock
from shared.capture.pacing import PlaybackClock
from shared.capture.pixels import I420Converter
from shared.capture.source import EndOfSource, Pacing, SourceInfo, U8Array
from shared.errors import CaptureError, PermissionError
from shared.models import AudioConfig, FileSource, Resolution

__all__ = ["FileAudioSource", "FilePlayback", "FileVideoSource"]

logger = logging.getLogger(__name__)

Kind = Literal["video", "audio"]
#: Sleep at most this long per wait, so a stop or source switch is never held up.
_MAX_WAIT_S: Final = 0.1


def _open_container(path: str) -> Any:
    """``av.open`` with the failures a user can act on turned into clear errors."""
    try:
        return av.open(path, "r")
    except builtins.FileNotFoundError:
        raise CaptureError(f"file {path} does not exist") from None
    except builtins.PermissionError:
        raise PermissionError(
            f"cannot read {path}: permission denied (check the file's mode and owner)"
        ) from None
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise CaptureError(
            f"cannot read {path}: {exc} (truncated, or not a media file FFmpeg can read)"
        ) from None


class FilePlayback:
    """One file's real-time playback, shared by its video and audio readers."""

    def __init__(
        self,
        path: str,
        *,
        loop: bool,
        has_video: bool,
        has_audio: bool,
        width: int,
        height: int,
        framerate: float,
        period_us: int | None,
        start_us: int,
        video_format: str,
    ) -> None:
        self.path = path
        self.loop = loop
        self.has_video = has_video
        self.has_audio = has_audio
        self.width = width
        self.height = height
        self.framerate = framerate
        #: Loop period: the container's duration (None: each reader uses its stream's end).
        self.period_us = period_us
        self.start_us = start_us
        self.video_format = video_format
        self._clock = PlaybackClock()
        self._lock = threading.Lock()
        #: Wall clock minus monotonic clock, fixed once: stamps are data, pacing is monotonic.
        self._wall_offset_us = time.time_ns() // 1000 - time.monotonic_ns() // 1000
        self.decode_errors = 0

    @classmethod
    def open(cls, path: str, *, loop: bool = False) -> FilePlayback:
        """Probe ``path``: it must open and its first picture (or audio frame) must decode."""
        path = os.fspath(path)
        if os.path.isdir(path):
            raise CaptureError(f"file source {path} is a folder, not a media file")
        container = _open_container(path)
        try:
            videos = container.streams.video
            audios = container.streams.audio
            if not videos and not audios:
                raise CaptureError(f"file {path} has no video or audio stream")
            stream = videos[0] if videos else audios[0]
            try:
                first = next(container.decode(stream), None)
            except av.FFmpegError as exc:
                raise CaptureError(f"cannot decode {path}: {exc} (truncated or damaged?)") from None
            if first is None:
                raise CaptureError(f"file {path} holds no decodable frames (truncated?)")
            rate = videos[0].average_rate if videos else None
            return cls(
                path,
                loop=loop,
                has_video=bool(videos),
                has_audio=bool(audios),
                width=first.width if videos else 0,
                height=first.height if videos else 0,
                framerate=float(rate) if rate else 0.0,
                period_us=int(container.duration) if container.duration else None,
                start_us=int(container.start_time or 0),
                video_format=first.format.name if videos else "",
            )
        finally:
            container.close()

    def due_us(self, media_us: int) -> int:
        """Monotonic time (µs) at which media time ``media_us`` is due (thread-safe)."""
        with self._lock:
            return self._clock.due_us(media_us, time.monotonic_ns() // 1000)

    def wall_us(self, monotonic_us: int) -> int:
        """The capture stamp (wall-clock µs) of a frame due at ``monotonic_us``."""
        return monotonic_us + self._wall_offset_us

    @property
    def rebases(self) -> int:
        return self._clock.rebases

    def video_source(self, output: Resolution) -> FileVideoSource:
        if not self.has_video:
            raise CaptureError(f"file {self.path} has no video stream")
        return FileVideoSource(self, output)

    def audio_source(self, config: AudioConfig) -> FileAudioSource:
        if not self.has_audio:
            raise CaptureError(f"file {self.path} has no audio stream")
        return FileAudioSource(self, config)


class _StreamReader:
    """Decodes one stream of the file pass after pass: (media time in µs, frame)."""

    def __init__(self, playback: FilePlayback, kind: Kind) -> None:
        self._playback = playback
        self._kind = kind
        self._container: Any = None
        self._frames: Iterator[Any] | None = None
        self.offset_us = 0
        self._end_us = 0  # end of the last frame of this pass, for files without a duration
        self.passes = 0

    def _open_pass(self) -> None:
        self._container = _open_container(self._playback.path)
        streams = (
            self._container.streams.video
            if self._kind == "video"
            else self._container.streams.audio
        )
        stream = streams[0]
        stream.thread_type = "AUTO"
        self._frames = self._container.decode(stream)

    def _end_pass(self) -> None:
        self._close_container()
        self.passes += 1
        if not self._playback.loop:
            raise EndOfSource(f"end of {self._playback.path}")
        period = self._playback.period_us or self._end_us
        if period <= 0:
            raise EndOfSource(f"{self._playback.path} has no duration to loop over")
        self.offset_us += period

    def next(self) -> tuple[int, Any]:
        while True:
            if self._frames is None:
                self._open_pass()
            assert self._frames is not None
            try:
                frame = next(self._frames)
            except StopIteration:
                self._end_pass()
                continue
            except av.FFmpegError as exc:
                # A damaged tail: end the pass here, as the end of the file would.
                self._playback.decode_errors += 1
                logger.warning(
                    "%s: %s; treating it as the end of the file", self._playback.path, exc
                )
                self._end_pass()
                continue
            if frame.time is None:
                continue
            media_us = round(frame.time * 1_000_000) - self._playback.start_us
            if self._kind == "video":
                rate = self._playback.framerate or 30.0
                length = round(1_000_000 / rate)
            else:
                length = frame.samples * 1_000_000 // frame.sample_rate
            self._end_us = max(self._end_us, media_us + length)
            return media_us + self.offset_us, frame

    def _close_container(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = None
        self._frames = None

    def close(self) -> None:
        self._close_container()


def _wait_until(due_us: int, timeout: float) -> bool:
    """Sleep until ``due_us`` (monotonic) if that is within ``timeout``; whether it is now due."""
    wait = (due_us - time.monotonic_ns() // 1000) / 1_000_000
    if wait > min(timeout, _MAX_WAIT_S):
        time.sleep(min(timeout, _MAX_WAIT_S))
        return False
    if wait > 0:
        time.sleep(wait)
    return True


class FileVideoSource:
    """The file's video, as a push source whose frames arrive when they are due."""

    pacing: Pacing = "push"

    def __init__(self, playback: FilePlayback, output: Resolution) -> None:
        self.width = output.width
        self.height = output.height
        self.playback = playback
        self._reader = _StreamReader(playback, "video")
        self._converter = I420Converter(output.width, output.height)
        self._pending: tuple[int, Any] | None = None
        self._frame: Any = None

    def grab(self, *, timeout: float) -> int | None:
        if self._pending is None:
            self._pending = self._reader.next()
        media_us, frame = self._pending
        due = self.playback.due_us(media_us)
        if not _wait_until(due, timeout):
            return None
        self._pending = None
        self._frame = frame
        return self.playback.wall_us(due)

    def fill(self, out: U8Array, *, frame_number: int, capture_us: int) -> None:
        if self._frame is None:
            raise CaptureError("file source: fill before grab")
        self._converter.from_av(self._frame, out)

    def info(self) -> SourceInfo:
        playback = self.playback
        return SourceInfo(
            spec=FileSource(path=playback.path, loop=playback.loop),
            kind="file",
            description=(
                f"{playback.path} {playback.video_format} {playback.width}x{playback.height}"
                f"@{playback.framerate:g}" + (" looped" if playback.loop else "")
            ),
            native_width=playback.width,
            native_height=playback.height,
            pacing=self.pacing,
        )

    @property
    def passes(self) -> int:
        return self._reader.passes

    def close(self) -> None:
        self._reader.close()


class FileAudioSource:
    """The file's audio, resampled to the stream's rate and layout, released when due."""

    def __init__(self, playback: FilePlayback, config: AudioConfig) -> None:
        self.sample_rate = config.sample_rate
        self.channels = config.channels
        self.description = f"{playback.path} (audio track)"
        self.playback = playback
        self._reader = _StreamReader(playback, "audio")
        self._resampler = av.AudioResampler(
            format="s16", layout="mono" if config.channels == 1 else "stereo", rate=self.sample_rate
        )
        self._pending: AudioBlock | None = None
        self.overflows = 0
        self.reanchors = 0

    def start(self) -> None:
        pass

    def _next_block(self) -> AudioBlock:
        while True:
            media_us, frame = self._reader.next()
            pcm = [
                out.to_ndarray().reshape(-1, self.channels)
                for out in self._resampler.resample(frame)
            ]
            if not pcm:
                continue
            samples = np.concatenate(pcm).astype(np.int16, copy=False)
            period = self.playback.period_us
            if self.playback.loop and period:
                # Audio tracks often run a few ms past the container's duration (codec
                # padding); cut them there, or every loop would add that much audio.
                room = (period - (media_us - self._reader.offset_us)) * self.sample_rate
                samples = samples[: max(0, room // 1_000_000)]
            if len(samples):
                return AudioBlock(samples, media_us)

    def read(self, timeout: float) -> AudioBlock | None:
        if self._pending is None:
            self._pending = self._next_block()
        block = self._pending
        due = self.playback.due_us(block.capture_us)  # capture_us holds media time until due
        if not _wait_until(due, timeout):
            return None
        self._pending = None
        return AudioBlock(block.pcm, self.playback.wall_us(due), monotonic_us=due)

    def close(self) -> None:
        self._reader.close()
