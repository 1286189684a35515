"""StreamRecorder: mux already-encoded H.264 access units into a file, never re-encoding.

The file is fragmented MP4 (``frag_keyframe+empty_moov``): the header is written first and
each GOP lands as its own ``moof``/``mdat`` fragment, so a recorder that dies mid-stream
leaves a playable file that ends at the last complete fragment.

A recording always starts at a keyframe; frames before the first one are skipped (counted).
The avcC box needs SPS and PPS, which the encoder repeats in front of every IDR, so they are
taken from that first keyframe.
"""

from __future__ import annotations

import fractions
import os
from pathlib import Path
from typing import Any

import av

from shared.codec import TIME_BASE
from shared.errors import RecordingError
from shared.h264_rtp import NAL_PPS, NAL_SPS, nal_type, split_annexb, to_annexb
from shared.models import VideoFormat

__all__ = ["StreamRecorder"]

_CONTAINER_OPTIONS: dict[VideoFormat, tuple[str, dict[str, str]]] = {
    VideoFormat.MP4: ("mp4", {"movflags": "frag_keyframe+empty_moov+default_base_moof"}),
    VideoFormat.MOV: ("mov", {"movflags": "frag_keyframe+empty_moov+default_base_moof"}),
}


class StreamRecorder:
    """Writes one file; ``write`` takes Annex B access units with pts in 1/90000 s."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        width: int,
        height: int,
        framerate: int,
        video_format: VideoFormat = VideoFormat.MP4,
    ) -> None:
        if video_format not in _CONTAINER_OPTIONS:
            raise RecordingError(f"format {video_format} is not supported yet (mp4 and mov are)")
        self.path = Path(path)
        parent = self.path.parent
        if not parent.is_dir():
            raise RecordingError(f"cannot record to {self.path}: folder {parent} does not exist")
        self._format = video_format
        self._width = width
        self._height = height
        self._framerate = framerate
        self._container: Any = None
        self._stream: Any = None
        self._first_pts: int | None = None
        self._last_pts = -1
        self.frames_written = 0
        self.frames_skipped = 0
        self.duration_s = 0.0

    def write(self, access_unit: bytes, *, pts: int, keyframe: bool) -> None:
        if self._container is None:
            if not keyframe:
                self.frames_skipped += 1
                return
            self._open(access_unit)
            self._first_pts = pts  # the file's timeline starts at this keyframe
        assert self._first_pts is not None
        # Timestamps restart at zero in the file; they must strictly increase for the muxer.
        relative = pts - self._first_pts
        if relative <= self._last_pts:
            self.frames_skipped += 1
            return
        packet = av.Packet(access_unit)
        packet.pts = relative
        packet.dts = relative
        packet.time_base = TIME_BASE
        packet.stream = self._stream
        packet.is_keyframe = keyframe
        try:
            self._container.mux(packet)
        except (av.error.FFmpegError, OSError) as exc:
            raise RecordingError(f"writing {self.path} failed: {exc}") from exc
        self._last_pts = relative
        self.frames_written += 1
        self.duration_s = (relative + TIME_BASE.denominator // self._framerate) * float(TIME_BASE)

    def _open(self, keyframe: bytes) -> None:
        container_format, options = _CONTAINER_OPTIONS[self._format]
        parameter_sets = [n for n in split_annexb(keyframe) if nal_type(n) in (NAL_SPS, NAL_PPS)]
        if not parameter_sets:
            raise RecordingError("first keyframe carries no SPS/PPS; cannot write the avcC box")
        try:
            container = av.open(str(self.path), "w", format=container_format, options=options)
        except (av.error.FFmpegError, OSError) as exc:
            raise RecordingError(f"cannot create {self.path}: {exc}") from exc
        stream = container.add_stream("h264", rate=self._framerate)
        stream.width = self._width
        stream.height = self._height
        stream.time_base = TIME_BASE
        stream.codec_context.framerate = fractions.Fraction(self._framerate)
        stream.codec_context.extradata = to_annexb(parameter_sets)
        self._container = container
        self._stream = stream

    @property
    def size_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def close(self) -> None:
        """Flush the last fragment and close; safe to call twice."""
        if self._container is not None:
            try:
                self._container.close()
            except (av.error.FFmpegError, OSError) as exc:
                raise RecordingError(f"finishing {self.path} failed: {exc}") from exc
            finally:
                self._container = None
