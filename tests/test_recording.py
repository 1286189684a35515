"""StreamRecorder: encoded access units muxed into fragmented MP4, checked with ffprobe."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from shared.codec import EncoderConfig, H264Encoder
from shared.errors import RecordingError
from shared.models import VideoFormat
from shared.recording import StreamRecorder
from shared.testpattern import TestPattern
from tests.conftest import require_tool

WIDTH, HEIGHT, FPS = 320, 180, 30


def probe(path: Path) -> dict[str, object]:
    ffprobe = require_tool("ffprobe")
    output = subprocess.run(
        [
            ffprobe,
            "-v",
            "error",
            "-count_frames",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name,width,height,nb_read_frames:format=duration",
            "-of",
            "json",
            str(path),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    data = json.loads(output)
    stream = data["streams"][0]
    return {**stream, "duration": float(data["format"]["duration"])}


def encoded_stream(frames: int, *, first_keyframe_at: int = 0) -> list[tuple[bytes, int, bool]]:
    encoder = H264Encoder(
        EncoderConfig(
            width=WIDTH, height=HEIGHT, framerate=FPS, bitrate=300_000, keyframe_interval=30
        )
    )
    pattern = TestPattern(WIDTH, HEIGHT, FPS)
    out = []
    for index in range(frames):
        if index == first_keyframe_at and index:
            encoder.request_keyframe()
        for frame in encoder.encode(
            pattern.render(index, index), pts=index * 3000, capture_us=index
        ):
            out.append((frame.data, frame.pts, frame.keyframe))
    return out


@pytest.mark.parametrize("video_format", [VideoFormat.MP4, VideoFormat.MOV])
def test_recording_has_every_frame_and_the_right_duration(
    tmp_path: Path, video_format: VideoFormat
) -> None:
    path = tmp_path / f"out.{video_format}"
    recorder = StreamRecorder(
        path, width=WIDTH, height=HEIGHT, framerate=FPS, video_format=video_format
    )
    for data, pts, keyframe in encoded_stream(90):
        recorder.write(data, pts=pts, keyframe=keyframe)
    recorder.close()
    recorder.close()  # idempotent
    info = probe(path)
    assert info["codec_name"] == "h264"
    assert (info["width"], info["height"]) == (WIDTH, HEIGHT)
    assert int(str(info["nb_read_frames"])) == recorder.frames_written == 90
    assert abs(float(str(info["duration"])) - 3.0) < 0.1


def test_recording_starts_at_the_first_keyframe(tmp_path: Path) -> None:
    stream = encoded_stream(60)[5:]  # joins mid-GOP: frames 5..29 cannot be decoded alone
    recorder = StreamRecorder(tmp_path / "late.mp4", width=WIDTH, height=HEIGHT, framerate=FPS)
    for data, pts, keyframe in stream:
        recorder.write(data, pts=pts, keyframe=keyframe)
    recorder.close()
    assert recorder.frames_skipped == 25
    assert int(str(probe(tmp_path / "late.mp4")["nb_read_frames"])) == 30


def test_missing_folder_and_unsupported_format_are_recording_errors(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="does not exist"):
        StreamRecorder(tmp_path / "nope" / "x.mp4", width=WIDTH, height=HEIGHT, framerate=FPS)
    with pytest.raises(RecordingError, match="not supported"):
        StreamRecorder(
            tmp_path / "x.webm",
            width=WIDTH,
            height=HEIGHT,
            framerate=FPS,
            video_format=VideoFormat.WEBM,
        )
