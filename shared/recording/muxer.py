"""StreamRecorder: one recording file, written from the already-encoded stream.

| format | video                        | audio (when the stream has it) |
|--------|------------------------------|--------------------------------|
| mp4    | H.264 copied                 | Opus copied                    |
| mov    | H.264 copied                 | AAC (QuickTime has no Opus)    |
| avi    | H.264 copied                 | MP3                            |
| webm   | VP9, transcoded              | Opus copied                    |

MP4 and MOV are fragmented (``empty_moov``), with a fragment at least every half second and
every packet flushed to the file, so a recorder killed mid-stream leaves a file that plays up to
the last complete fragment.  WebM is transcoded because WebM carries no H.264; that runs in the
recorder's own process, off the live path.

Callers pass file time (microseconds from the start of this file, already rebased across pauses
by ``shared.recording.policy.Timeline``); the recorder converts it into each stream's time base.
A file must start with a keyframe: callers only open it on one.
"""

from __future__ import annotations

import errno
import fractions
import os
from pathlib import Path
from typing import Any

import av
import msgspec

from shared.errors import ConfigError, RecordingError
from shared.media.codec import TIME_BASE
from shared.models import VideoFormat
from shared.rtp.h264 import NAL_PPS, NAL_SPS, nal_type, split_annexb, to_annexb

__all__ = ["AudioTrackInfo", "StreamRecorder", "opus_head"]

AUDIO_TIME_BASE = fractions.Fraction(1, 48_000)

_CONTAINERS: dict[VideoFormat, tuple[str, dict[str, str]]] = {
    # frag_duration is in microseconds; flush_packets pushes each packet to the file at once.
    VideoFormat.MP4: (
        "mp4",
        {
            "movflags": "frag_keyframe+empty_moov+default_base_moof",
            "frag_duration": "500000",
            "flush_packets": "1",
        },
    ),
    VideoFormat.MOV: (
        "mov",
        {
            "movflags": "frag_keyframe+empty_moov+default_base_moof",
            "frag_duration": "500000",
            "flush_packets": "1",
        },
    ),
    VideoFormat.AVI: ("avi", {"flush_packets": "1"}),
    VideoFormat.WEBM: ("webm", {"flush_packets": "1"}),
}

#: Audio codec written per format; "copy" keeps the stream's Opus packets as they are.
_AUDIO_CODEC: dict[VideoFormat, str] = {
    VideoFormat.MP4: "copy",
    VideoFormat.MOV: "aac",
    VideoFormat.AVI: "libmp3lame",
    VideoFormat.WEBM: "copy",
}


class AudioTrackInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The stream's audio as the capture actor encodes it: Opus at 48 kHz."""

    channels: int = 2
    sample_rate: int = 48_000


def opus_head(channels: int, sample_rate: int, pre_skip: int = 312) -> bytes:
    """The Opus identification header (RFC 7845 §5.1) that MP4 and WebM need as extradata."""
    return (
        b"OpusHead"
        + bytes([1, channels])
        + pre_skip.to_bytes(2, "little")
        + sample_rate.to_bytes(4, "little")
        + (0).to_bytes(2, "little")  # output gain
        + bytes([0])  # channel mapping family 0: mono or stereo
    )


def _disk_error(exc: BaseException, path: Path) -> RecordingError:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return RecordingError(f"disk full while writing {path}; the file so far is kept")
    return RecordingError(f"writing {path} failed: {exc}")


class StreamRecorder:
    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        width: int,
        height: int,
        framerate: int,
        video_format: VideoFormat = VideoFormat.MP4,
        bitrate: int = 1_500_000,
        audio: AudioTrackInfo | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise RecordingError(
                f"cannot record to {self.path}: folder {self.path.parent} does not exist"
            )
        if video_format not in _CONTAINERS:
            raise ConfigError(f"unknown recording format {video_format!r}")
        self.format = video_format
        self._width, self._height, self._framerate, self._bitrate = (
            width,
            height,
            framerate,
            bitrate,
        )
        self._audio_info = audio
        self._container: Any = None
        self._video: Any = None
        self._audio: Any = None
        self._transcoder: _VideoTranscoder | None = None
        self._audio_transcoder: _AudioTranscoder | None = None
        self._last_video_pts = -1
        self._last_audio_pts = -1
        self.frames_written = 0
        self.audio_packets_written = 0
        # Bytes handed to the muxer: the file on disk lags by up to one unfinished fragment.
        self._bytes_muxed = 0
        self.duration_us = 0

    @property
    def is_open(self) -> bool:
        return self._container is not None

    def write_video(self, access_unit: bytes, *, file_us: int, keyframe: bool) -> None:
        if self._container is None:
            if not keyframe:
                raise RecordingError("a recording must start at a keyframe")
            self._open(access_unit)
        pts = file_us * TIME_BASE.denominator // 1_000_000
        if pts <= self._last_video_pts:
            return  # duplicate or out-of-order timestamp: the muxer would reject it
        self._last_video_pts = pts
        if self._transcoder is not None:
            packets = self._transcoder.transcode(access_unit, pts)
        else:
            packet = av.Packet(access_unit)
            packet.pts = packet.dts = pts
            packet.time_base = TIME_BASE
            packet.is_keyframe = keyframe
            packets = [packet]
        for packet in packets:
            packet.stream = self._video
            self._mux(packet)
        self.frames_written += 1
        self.duration_us = max(self.duration_us, file_us + 1_000_000 // self._framerate)

    def write_audio(self, opus_packet: bytes, *, file_us: int, samples: int = 960) -> None:
        """One Opus packet; ignored until the file is open (video starts every file)."""
        if self._container is None or self._audio is None:
            return
        pts = file_us * AUDIO_TIME_BASE.denominator // 1_000_000
        if pts <= self._last_audio_pts:
            return
        self._last_audio_pts = pts
        if self._audio_transcoder is not None:
            packets = self._audio_transcoder.transcode(opus_packet, pts)
        else:
            packet = av.Packet(opus_packet)
            packet.pts = packet.dts = pts
            packet.duration = samples
            packet.time_base = AUDIO_TIME_BASE
            packets = [packet]
        for packet in packets:
            packet.stream = self._audio
            self._mux(packet)
        self.audio_packets_written += 1

    def _mux(self, packet: Any) -> None:
        self._bytes_muxed += packet.size
        try:
            self._container.mux(packet)
        except (av.error.FFmpegError, OSError) as exc:
            raise _disk_error(exc, self.path) from exc

    def _open(self, keyframe: bytes) -> None:
        container_format, options = _CONTAINERS[self.format]
        try:
            container = av.open(str(self.path), "w", format=container_format, options=options)
        except (av.error.FFmpegError, OSError) as exc:
            raise _disk_error(exc, self.path) from exc
        try:
            if self.format is VideoFormat.WEBM:
                self._video = container.add_stream("libvpx-vp9", rate=self._framerate)
                self._transcoder = _VideoTranscoder(
                    self._video.codec_context, self._width, self._height, self._bitrate
                )
            else:
                parameter_sets = [
                    n for n in split_annexb(keyframe) if nal_type(n) in (NAL_SPS, NAL_PPS)
                ]
                if not parameter_sets:
                    raise RecordingError(
                        "first keyframe carries no SPS/PPS; cannot describe the H.264 track"
                    )
                self._video = container.add_stream("h264", rate=self._framerate)
                self._video.width, self._video.height = self._width, self._height
                self._video.codec_context.extradata = to_annexb(parameter_sets)
            self._video.time_base = TIME_BASE
            if self._audio_info is not None:
                self._add_audio(container, self._audio_info)
        except BaseException:
            container.close()
            raise
        self._container = container

    def _add_audio(self, container: Any, info: AudioTrackInfo) -> None:
        codec = _AUDIO_CODEC[self.format]
        layout = "stereo" if info.channels == 2 else "mono"
        if codec == "copy":
            self._audio = container.add_stream("opus", rate=info.sample_rate)
            self._audio.codec_context.layout = layout
            self._audio.codec_context.extradata = opus_head(info.channels, info.sample_rate)
        else:
            self._audio = container.add_stream(codec, rate=info.sample_rate)
            self._audio_transcoder = _AudioTranscoder(self._audio.codec_context, info)
        self._audio.time_base = AUDIO_TIME_BASE

    @property
    def size_bytes(self) -> int:
        """The file's size so far, counting what the muxer holds for its current fragment."""
        try:
            on_disk = self.path.stat().st_size
        except FileNotFoundError:
            on_disk = 0
        return max(on_disk, self._bytes_muxed)

    def close(self) -> None:
        """Flush encoders and the last fragment; safe to call twice, and after a disk error."""
        container, self._container = self._container, None
        if container is None:
            return
        try:
            for flush in (self._transcoder, self._audio_transcoder):
                if flush is not None:
                    stream = self._video if flush is self._transcoder else self._audio
                    for packet in flush.flush():
                        packet.stream = stream
                        container.mux(packet)
            container.close()
        except (av.error.FFmpegError, OSError) as exc:
            raise _disk_error(exc, self.path) from exc


class _VideoTranscoder:
    """H.264 -> VP9 for WebM, tuned for real time on few cores (libvpx ``realtime`` mode)."""

    def __init__(self, encoder: Any, width: int, height: int, bitrate: int) -> None:
        self._decoder: Any = av.CodecContext.create("h264", "r")
        encoder.width, encoder.height = width, height
        encoder.pix_fmt = "yuv420p"
        encoder.time_base = TIME_BASE
        encoder.bit_rate = bitrate
        encoder.options = {
            "deadline": "realtime",
            "cpu-used": "8",
            "row-mt": "1",
            "lag-in-frames": "0",
        }
        self._encoder = encoder

    def transcode(self, access_unit: bytes, pts: int) -> list[Any]:
        packet = av.Packet(access_unit)
        packet.pts = pts
        packet.time_base = TIME_BASE
        out = []
        for frame in self._decoder.decode(packet):
            frame.pts = pts
            frame.time_base = TIME_BASE
            out.extend(self._encoder.encode(frame))
        return out

    def flush(self) -> list[Any]:
        return list(self._encoder.encode(None))


class _AudioTranscoder:
    """Opus -> AAC or MP3 for containers that cannot carry Opus."""

    def __init__(self, encoder: Any, info: AudioTrackInfo) -> None:
        layout = "stereo" if info.channels == 2 else "mono"
        self._decoder: Any = av.CodecContext.create("libopus", "r")
        self._decoder.sample_rate = info.sample_rate
        self._decoder.layout = layout
        encoder.sample_rate = info.sample_rate
        encoder.layout = layout
        encoder.format = encoder.codec.audio_formats[0].name
        encoder.bit_rate = 128_000
        encoder.time_base = AUDIO_TIME_BASE
        encoder.open()
        self.encoder = encoder
        self._resampler = av.AudioResampler(
            format=encoder.format.name, layout=layout, rate=info.sample_rate
        )
        self._fifo = av.AudioFifo()
        self._next_pts: int | None = None

    def transcode(self, opus_packet: bytes, pts: int) -> list[Any]:
        packet = av.Packet(opus_packet)
        packet.pts = pts
        packet.time_base = AUDIO_TIME_BASE
        out: list[Any] = []
        for frame in self._decoder.decode(packet):
            if self._next_pts is None:
                self._next_pts = pts
            frame.pts = None
            for converted in self._resampler.resample(frame):
                self._fifo.write(converted)
        frame_size = self.encoder.frame_size or 1024
        while self._fifo.samples >= frame_size:
            chunk = self._fifo.read(frame_size)
            assert chunk is not None and self._next_pts is not None
            chunk.pts = self._next_pts
            chunk.time_base = AUDIO_TIME_BASE
            self._next_pts += frame_size
            out.extend(self.encoder.encode(chunk))
        return out

    def flush(self) -> list[Any]:
        return list(self.encoder.encode(None))
