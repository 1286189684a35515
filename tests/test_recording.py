"""StreamRecorder: every format read back by ffprobe, with and without audio."""

from __future__ import annotations

import fractions
import json
import subprocess
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from shared.capture.testpattern import TestPattern
from shared.errors import RecordingError
from shared.media.codec import EncoderConfig, H264Encoder
from shared.models import VideoFormat
from shared.recording.muxer import AudioTrackInfo, StreamRecorder
from tests.conftest import require_tool

WIDTH, HEIGHT, FPS = 320, 180, 30
FRAME_US = 1_000_000 // FPS


def probe(path: Path) -> dict[str, Any]:
    """Per-stream codec, decoded frame count and duration, as ffprobe reads the file."""
    ffprobe = require_tool("ffprobe")
    output = subprocess.run(
        [
            ffprobe,
            "-v",
            "error",
            "-count_frames",
            "-show_entries",
            "stream=codec_type,codec_name,width,height,nb_read_frames:format=duration",
            "-of",
            "json",
            str(path),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    data = json.loads(output)
    streams = {s["codec_type"]: s for s in data["streams"]}
    return {"streams": streams, "duration": float(data["format"].get("duration", "nan"))}


def video_access_units(frames: int, *, keyframe_interval: int = 30) -> list[tuple[bytes, bool]]:
    encoder = H264Encoder(
        EncoderConfig(
            width=WIDTH,
            height=HEIGHT,
            framerate=FPS,
            bitrate=300_000,
            keyframe_interval=keyframe_interval,
        )
    )
    pattern = TestPattern(WIDTH, HEIGHT, FPS)
    return [
        (unit.data, unit.keyframe)
        for index in range(frames)
        for unit in encoder.encode(pattern.render(index, index), pts=index * 3000, capture_us=index)
    ]


def opus_packets(seconds: float, frequency: float = 440.0) -> list[bytes]:
    encoder: Any = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48_000, "stereo", "s16"
    encoder.bit_rate = 64_000
    encoder.time_base = fractions.Fraction(1, 48_000)
    encoder.open()
    samples = int(48_000 * seconds)
    tone = (np.sin(2 * np.pi * frequency * np.arange(samples) / 48_000) * 8000).astype(np.int16)
    packets = []
    for start in range(0, samples - 959, 960):
        block = np.repeat(tone[start : start + 960], 2).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(block, format="s16", layout="stereo")
        frame.sample_rate, frame.pts = 48_000, start
        packets += [bytes(p) for p in encoder.encode(frame)]
    return packets


def record(path: Path, video_format: VideoFormat, seconds: float, *, audio: bool) -> StreamRecorder:
    recorder = StreamRecorder(
        path,
        width=WIDTH,
        height=HEIGHT,
        framerate=FPS,
        video_format=video_format,
        bitrate=300_000,
        audio=AudioTrackInfo() if audio else None,
    )
    frames = int(seconds * FPS)
    audio_packets = opus_packets(seconds) if audio else []
    events = [(i * FRAME_US, 0, i) for i in range(frames)] + [
        (i * 20_000, 1, i) for i in range(len(audio_packets))
    ]
    units = video_access_units(frames)
    for file_us, kind, index in sorted(events):
        if kind == 0:
            recorder.write_video(units[index][0], file_us=file_us, keyframe=units[index][1])
        else:
            recorder.write_audio(audio_packets[index], file_us=file_us)
    recorder.close()
    return recorder


@pytest.mark.parametrize("video_format", list(VideoFormat))
@pytest.mark.parametrize("audio", [False, True], ids=["video", "video+audio"])
def test_every_format_reads_back(tmp_path: Path, video_format: VideoFormat, audio: bool) -> None:
    path = tmp_path / f"out.{video_format}"
    recorder = record(path, video_format, 3.0, audio=audio)
    info = probe(path)
    video = info["streams"]["video"]
    assert video["codec_name"] == ("vp9" if video_format is VideoFormat.WEBM else "h264")
    assert (video["width"], video["height"]) == (WIDTH, HEIGHT)
    frames = int(video["nb_read_frames"])
    assert abs(frames - 90) <= 0.01 * 90 and recorder.frames_written == 90
    assert abs(info["duration"] - 3.0) <= 0.2
    if audio:
        expected = {
            VideoFormat.MP4: "opus",
            VideoFormat.MOV: "aac",
            VideoFormat.AVI: "mp3",
            VideoFormat.WEBM: "opus",
        }
        assert info["streams"]["audio"]["codec_name"] == expected[video_format]
        assert int(info["streams"]["audio"]["nb_read_frames"]) > 0
    else:
        assert "audio" not in info["streams"]


def test_recording_must_start_at_a_keyframe(tmp_path: Path) -> None:
    units = video_access_units(3)
    recorder = StreamRecorder(tmp_path / "x.mp4", width=WIDTH, height=HEIGHT, framerate=FPS)
    with pytest.raises(RecordingError, match="keyframe"):
        recorder.write_video(units[1][0], file_us=0, keyframe=False)
    recorder.close()


def test_missing_folder_is_a_recording_error(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="does not exist"):
        StreamRecorder(tmp_path / "nope" / "x.mp4", width=WIDTH, height=HEIGHT, framerate=FPS)
