from __future__ import annotations

import builtins

import msgspec
import pytest

from shared import errors
from shared.errors import ConfigError
from shared.models import (
    CameraSource,
    FileSource,
    QualityPreset,
    Resolution,
    ScreenRegion,
    ScreenSource,
    StreamConfig,
    StreamQuality,
    StreamSession,
    StreamState,
    StreamStats,
    StreamType,
    TestPatternSource,
    parse_source,
)


@pytest.mark.parametrize(
    ("preset", "width", "height", "fps", "bitrate"),
    [
        (QualityPreset.LOW, 854, 480, 15, 500_000),
        (QualityPreset.MEDIUM, 1280, 720, 30, 1_500_000),
        (QualityPreset.HIGH, 1920, 1080, 30, 3_000_000),
        (QualityPreset.ULTRA, 1920, 1080, 60, 6_000_000),
    ],
)
def test_presets_have_the_designs_values(
    preset: QualityPreset, width: int, height: int, fps: int, bitrate: int
) -> None:
    quality = StreamQuality.from_preset(preset)
    assert (quality.resolution.width, quality.resolution.height) == (width, height)
    assert (quality.framerate, quality.bitrate, quality.quality_preset) == (fps, bitrate, preset)


def test_custom_preset_has_no_fixed_values() -> None:
    with pytest.raises(ConfigError, match="no fixed values"):
        StreamQuality.from_preset(QualityPreset.CUSTOM)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Resolution(0, 720), "impossible"),
        (lambda: Resolution(1280, 100_000), "impossible"),
        (lambda: StreamQuality(resolution=Resolution(1281, 720), framerate=30, bitrate=1), "even"),
        (
            lambda: StreamQuality(resolution=Resolution(1280, 720), framerate=0, bitrate=1),
            "frame rate",
        ),
        (
            lambda: StreamQuality(resolution=Resolution(1280, 720), framerate=1000, bitrate=1),
            "frame rate",
        ),
        (
            lambda: StreamQuality(resolution=Resolution(1280, 720), framerate=30, bitrate=0),
            "bitrate",
        ),
        (lambda: StreamConfig(source="nonsense"), "unknown source"),
        (lambda: StreamConfig(keyframe_interval_s=0), "keyframe interval"),
        (lambda: StreamConfig(pool_slots=1), "pool_slots"),
        (lambda: ScreenRegion(0, 0, 0, 10), "screen region"),
    ],
)
def test_impossible_values_are_config_errors(make: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()  # type: ignore[operator]


def test_config_error_is_a_value_error_and_permission_error_is_builtin() -> None:
    assert issubclass(ConfigError, ValueError)
    assert issubclass(errors.PermissionError, builtins.PermissionError)
    assert issubclass(errors.ProtocolError, errors.NetworkError)
    for name in (
        "CaptureError",
        "EncodingError",
        "NetworkError",
        "PermissionError",
        "ResourceError",
    ):
        assert issubclass(getattr(errors, name), errors.KizunaError)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("test", TestPatternSource()),
        ("file:/tmp/a.mp4", FileSource(path="/tmp/a.mp4")),
        ("screen", ScreenSource()),
        ("screen:1", ScreenSource(monitor_index=1)),
        (
            "screen:0@10,20,640x480",
            ScreenSource(monitor_index=0, region=ScreenRegion(10, 20, 640, 480)),
        ),
        ("screen@0,0,320x240", ScreenSource(region=ScreenRegion(0, 0, 320, 240))),
    ],
)
def test_parse_source(spec: str, expected: object) -> None:
    assert parse_source(spec) == expected


def test_parse_camera_sources() -> None:
    by_index = parse_source("camera:2")
    by_path = parse_source("camera:/dev/video1")
    assert isinstance(by_index, CameraSource) and by_index.device.index == 2
    assert isinstance(by_path, CameraSource) and by_path.device.path == "/dev/video1"
    for bad in ("camera:", "camera:abc", "screen:x", "file:", "rtsp://x"):
        with pytest.raises(ConfigError):
            parse_source(bad)


def test_session_round_trips_through_json() -> None:
    session = StreamSession(
        session_id="abc",
        stream_type=StreamType.CAMERA,
        source=parse_source("screen:0@1,2,30x40"),
        viewers=["v1"],
        quality=StreamQuality.from_preset(QualityPreset.LOW),
        state=StreamState.ACTIVE,
        stats=StreamStats(frames_encoded=3),
        created_at=1.5,
    )
    data = msgspec.json.encode(session)
    assert b'"type":"screen"' in data
    assert msgspec.json.decode(data, type=StreamSession) == session
