"""The supervisor's other pure decisions: stream type, listen ports, a stream's figures."""

from __future__ import annotations

import pytest

from actors.stages.capture import CaptureStats
from actors.stages.encoder import EncoderStats
from actors.stages.sender import PeerStatus, SenderStats
from shared.control.ports import ListenPorts
from shared.control.stats import stage_failure, stream_stats, viewer_connection
from shared.control.stream_type import (
    stream_config_with_screen_audio,
    stream_type_after_switch,
    stream_type_of,
)
from shared.errors import ConfigError, NetworkError
from shared.models import (
    AudioConfig,
    CameraDevice,
    CameraSource,
    ConnectionQuality,
    RecordingConfig,
    ScreenConfig,
    ScreenSource,
    StreamConfig,
    StreamStats,
    StreamType,
    TestPatternSource,
)

# --- stream type -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (StreamConfig(source="test"), StreamType.CAMERA),
        (StreamConfig(source="camera:0"), StreamType.CAMERA),
        (StreamConfig(source="file:/tmp/a.mp4"), StreamType.CAMERA),
        (StreamConfig(source="screen:1@0,0,640x360"), StreamType.SCREEN),
        (StreamConfig(source="screen", audio=AudioConfig()), StreamType.COMBINED),
        (StreamConfig(source="test", audio=AudioConfig()), StreamType.COMBINED),
    ],
)
def test_the_source_and_audio_say_what_a_stream_is(
    config: StreamConfig, expected: StreamType
) -> None:
    assert stream_type_of(config) is expected


def test_only_an_explicit_request_makes_an_audio_only_stream() -> None:
    config = StreamConfig(audio=AudioConfig())
    assert stream_type_of(config, audio_only=True) is StreamType.AUDIO
    with pytest.raises(ConfigError, match=r"needs StreamConfig\.audio"):
        stream_type_of(StreamConfig(), audio_only=True)
    recorded = StreamConfig(audio=AudioConfig(), record=RecordingConfig(output_path="/tmp/a.mp4"))
    with pytest.raises(ConfigError, match="recording an audio-only stream"):
        stream_type_of(recorded, audio_only=True)
    assert stream_type_of(recorded) is StreamType.COMBINED  # with video it can be recorded


def test_screen_capture_audio_adds_the_default_input_unless_one_is_given() -> None:
    base = StreamConfig(source="screen")
    with_audio = stream_config_with_screen_audio(base, ScreenConfig(capture_audio=True))
    assert with_audio.audio == AudioConfig() and with_audio.source == "screen"
    chosen = StreamConfig(source="screen", audio=AudioConfig(device=3))
    assert stream_config_with_screen_audio(chosen, ScreenConfig(capture_audio=True)) is chosen
    assert stream_config_with_screen_audio(base, ScreenConfig()) is base
    assert stream_config_with_screen_audio(base, None) is base


def test_a_source_switch_retypes_video_streams_only() -> None:
    camera = CameraSource(CameraDevice(index=0))
    assert stream_type_after_switch(StreamType.CAMERA, ScreenSource()) is StreamType.SCREEN
    assert stream_type_after_switch(StreamType.SCREEN, camera) is StreamType.CAMERA
    assert stream_type_after_switch(StreamType.SCREEN, TestPatternSource()) is StreamType.CAMERA
    assert stream_type_after_switch(StreamType.COMBINED, ScreenSource()) is StreamType.COMBINED
    with pytest.raises(ConfigError, match="no video source to switch"):
        stream_type_after_switch(StreamType.AUDIO, ScreenSource())


# --- listen ports ------------------------------------------------------------------------------


def test_a_fixed_port_serves_one_stream_until_its_last_sender_goes() -> None:
    ports = ListenPorts()
    ports.reserve("a", 4433)
    ports.reserve("a", 4433)  # a second shard of the same stream shares it
    with pytest.raises(NetworkError, match="port 4433 is already serving stream a"):
        ports.reserve("b", 4433)
    ports.release("a", 4433)
    with pytest.raises(NetworkError):
        ports.reserve("b", 4433)  # one shard of a still listens there
    ports.release("a", 4433)
    assert ports.owner(4433) is None
    ports.reserve("b", 4433)
    assert ports.owner(4433) == "b"


def test_port_zero_is_never_shared_and_another_streams_release_changes_nothing() -> None:
    ports = ListenPorts()
    ports.reserve("a", 0)
    ports.reserve("b", 0)
    assert ports.owner(0) is None
    ports.reserve("a", 5000)
    ports.release("b", 5000)
    assert ports.owner(5000) == "a"


def test_a_stopped_stream_frees_all_its_ports() -> None:
    ports = ListenPorts()
    for port in (5000, 5000, 5001):
        ports.reserve("a", port)
    ports.reserve("b", 5002)
    ports.release_stream("a")
    assert (ports.owner(5000), ports.owner(5001), ports.owner(5002)) == (None, None, "b")


# --- a stream's figures ------------------------------------------------------------------------


def capture_stats(*, frames_skipped: int = 0, error: str | None = None) -> CaptureStats:
    return CaptureStats(
        pid=10, frames_captured=300, frames_skipped=frames_skipped, fps=30.0, error=error
    )


def encoder_stats(*, error: str | None = None) -> EncoderStats:
    return EncoderStats(
        pid=11,
        frames_encoded=300,
        keyframes=5,
        frames_dropped=3,
        fps=30.0,
        average_fps=29.5,
        bitrate=1_400_000,
        target_bitrate=1_500_000,
        encode_ms=4.0,
        hardware_fallbacks=1,
        error=error,
    )


def peer(*, received: int, dropped: int, rtt: float, jitter: float, loss: float) -> PeerStatus:
    return PeerStatus(
        peer_id="p",
        address="127.0.0.1:1",
        connected_at=1.0,
        bytes_received=received,
        frames_dropped=dropped,
        rtt_ms=rtt,
        jitter_ms=jitter,
        loss=loss,
    )


def sender_stats(
    viewer_id: str, bytes_sent: int, peers: list[PeerStatus], error: str | None = None
) -> SenderStats:
    return SenderStats(
        pid=12,
        viewer_id=viewer_id,
        url="roq://x",
        peers=peers,
        frames_sent=100,
        frames_missed=0,
        packets_sent=200,
        bytes_sent=bytes_sent,
        keyframe_requests=0,
        error=error,
    )


def test_stream_stats_sum_volumes_and_report_the_worst_viewer() -> None:
    senders = [
        sender_stats(
            "a",
            1_000_000,
            [
                peer(received=5_000, dropped=4, rtt=40.0, jitter=3.5, loss=0.01),
                peer(received=7_000, dropped=1, rtt=90.0, jitter=7.9, loss=0.05),
            ],
        ),
        sender_stats("b", 500_000, []),
    ]
    stats = stream_stats(
        capture_stats(frames_skipped=2),
        encoder_stats(),
        senders,
        elapsed_s=10.0,
        wall_now=1_700_000_000.5,
    )
    assert stats == StreamStats(
        bytes_sent=1_500_000,
        bytes_received=12_000,
        frames_encoded=300,
        frames_decoded=0,  # only the viewers know
        frames_dropped=2 + 3 + 4 + 1,  # capture skipped, encoder dropped, peers missed
        current_bitrate=1_400_000,
        average_bitrate=600_000,  # 1.5 MB * 8 over 10 s, per sender
        latency_ms=45,  # half the worst round trip
        jitter_ms=7,
        packet_loss_rate=0.05,
        last_updated=1_700_000_000.5,
        encoder_fps=29.5,
        hardware_fallbacks=1,
    )


def test_stream_stats_without_viewers_or_time_do_not_divide_by_zero() -> None:
    stats = stream_stats(capture_stats(), encoder_stats(), [], elapsed_s=0.0, wall_now=5.0)
    assert (stats.bytes_sent, stats.average_bitrate, stats.latency_ms) == (0, 0, 0)
    assert (stats.jitter_ms, stats.packet_loss_rate, stats.frames_dropped) == (0, 0.0, 3)


def test_the_first_stage_failure_in_pipeline_order_is_reported() -> None:
    senders = [sender_stats("a", 0, [], error="sender broke")]
    assert stage_failure(capture_stats(), encoder_stats(), []) is None
    assert stage_failure(capture_stats(), encoder_stats(), senders) == "sender broke"
    assert stage_failure(capture_stats(), encoder_stats(error="x264 gone"), senders) == "x264 gone"
    assert (
        stage_failure(capture_stats(error="camera unplugged"), encoder_stats(error="x"), senders)
        == "camera unplugged"
    )


def test_a_viewer_is_disconnected_without_peers_or_before_it_is_classified() -> None:
    connected = sender_stats("a", 0, [peer(received=1, dropped=0, rtt=1.0, jitter=0.0, loss=0.0)])
    nobody = sender_stats("a", 0, [])
    classified = {"a": ConnectionQuality.GOOD}
    assert viewer_connection(connected, classified) is ConnectionQuality.GOOD
    assert viewer_connection(nobody, classified) is ConnectionQuality.DISCONNECTED
    assert viewer_connection(connected, {}) is ConnectionQuality.DISCONNECTED
