"""The quality ladder: planning (pure), decimation, scaling once per rung, and every rung encoded
by real libx264 and decoded by FFmpeg."""

from __future__ import annotations

import av
import numpy as np
import pytest

from actors.stages.encoder import ladder_ring_names
from shared.capture.testpattern import TestPattern
from shared.errors import ConfigError
from shared.media.codec import EncoderConfig, H264Decoder, H264Encoder
from shared.media.scaler import FrameDecimator, QualityScaler, Rung, plan_ladder
from shared.models import QualityPreset, Resolution, StreamQuality

LOW, MEDIUM, HIGH, ULTRA = (
    QualityPreset.LOW,
    QualityPreset.MEDIUM,
    QualityPreset.HIGH,
    QualityPreset.ULTRA,
)


def custom(width: int, height: int, fps: int, bitrate: int) -> StreamQuality:
    return StreamQuality(resolution=Resolution(width, height), framerate=fps, bitrate=bitrate)


def shape(rung: Rung) -> tuple[int, int, int, int, int]:
    return (rung.index, rung.width, rung.height, rung.framerate, rung.bitrate)


def test_presets_below_the_source_become_rungs_top_down_whatever_their_order() -> None:
    plan = plan_ladder(StreamQuality.from_preset(HIGH), (LOW, MEDIUM))
    assert [shape(r) for r in plan.rungs] == [
        (0, 1920, 1080, 30, 3_000_000),
        (1, 1280, 720, 30, 1_500_000),
        (2, 854, 480, 15, 500_000),
    ]
    assert plan.dropped == ()


def test_a_rung_capped_to_the_stream_itself_is_dropped_with_the_reason() -> None:
    plan = plan_ladder(StreamQuality.from_preset(MEDIUM), (HIGH, LOW, ULTRA))
    assert [shape(r) for r in plan.rungs] == [
        (0, 1280, 720, 30, 1_500_000),
        (1, 854, 480, 15, 500_000),
    ]
    assert len(plan.dropped) == 2
    assert plan.dropped[0].startswith("high: capped by the source to 1280x720@30")
    assert "the same as the stream's quality" in plan.dropped[0]


def test_capping_keeps_the_source_aspect_and_scales_the_bitrate() -> None:
    # A 4:3 source: the 480p rung is 640x480, not the preset's 854x480, at fewer bits.
    plan = plan_ladder(custom(960, 720, 30, 2_000_000), (LOW,))
    rung = plan.rungs[1]
    assert (rung.width, rung.height, rung.framerate) == (640, 480, 15)
    assert rung.bitrate == 500_000 * (640 * 480 * 15) // (854 * 480 * 15)
    # A source smaller than the preset: the rung keeps the source size at the preset's rate.
    small = plan_ladder(custom(640, 360, 30, 800_000), (LOW, MEDIUM))
    assert [shape(r)[1:4] for r in small.rungs] == [(640, 360, 30), (640, 360, 15)]
    assert len(small.dropped) == 1 and small.dropped[0].startswith("medium")
    # Never more bits than the stream itself.
    assert plan_ladder(custom(1920, 1080, 30, 1_000_000), (MEDIUM,)).rungs[1].bitrate == 1_000_000


def test_a_repeated_preset_is_dropped_and_custom_is_refused() -> None:
    plan = plan_ladder(StreamQuality.from_preset(HIGH), (LOW, LOW))
    assert len(plan.rungs) == 2
    assert plan.dropped == ("low: capped by the source to 854x480@15, the same as preset low",)
    with pytest.raises(ConfigError, match="named preset"):
        plan_ladder(StreamQuality.from_preset(HIGH), (QualityPreset.CUSTOM,))


def test_each_rung_has_its_own_ring() -> None:
    plan = plan_ladder(StreamQuality.from_preset(HIGH), (LOW, MEDIUM))
    assert ladder_ring_names("abc", plan.rungs) == [
        "kz_abc_video",
        "kz_abc_video1",
        "kz_abc_video2",
    ]
    assert ladder_ring_names("abc", 1) == ["kz_abc_video"]
    with pytest.raises(ConfigError):
        ladder_ring_names("abc", 0)


@pytest.mark.parametrize(
    ("source_fps", "rung_fps", "expected"),
    [
        (30, 30, list(range(12))),
        (30, 15, [0, 2, 4, 6, 8, 10]),
        (60, 30, [0, 2, 4, 6, 8, 10]),
        (30, 20, [0, 2, 3, 5, 6, 8, 9, 11]),
    ],
)
def test_decimator_takes_frames_by_timestamp(
    source_fps: int, rung_fps: int, expected: list[int]
) -> None:
    decimator = FrameDecimator(rung_fps)
    taken = [i for i in range(12) if decimator.admit(i * 90_000 // source_fps)]
    assert taken == expected


def test_decimator_tolerates_jitter_and_recovers_from_gaps_and_resets() -> None:
    decimator = FrameDecimator(30)
    jittered = [0, 2900, 6100, 8950, 12_050]
    assert all(decimator.admit(pts) for pts in jittered)
    assert decimator.admit(90_000)  # a one-second stall: resume at once, no burst
    assert not decimator.admit(90_500)
    assert decimator.admit(93_000)
    assert decimator.admit(0)  # the timeline restarted


def test_scaler_scales_each_rung_and_hands_the_source_through_at_its_own_size() -> None:
    pattern = TestPattern(1280, 720, 30)
    source = av.VideoFrame.from_numpy_buffer(
        pattern.render(3, 0).reshape(720 * 3 // 2, 1280), format="yuv420p"
    )
    source.pts = 9000
    plan = plan_ladder(StreamQuality.from_preset(MEDIUM), (LOW,))
    scaler = QualityScaler()
    top, low = (scaler.scale(source, rung) for rung in plan.rungs)
    assert top is source
    assert (low.width, low.height, low.format.name, low.pts) == (854, 480, "yuv420p", 9000)
    # Area averaging keeps the mean brightness.
    assert abs(float(low.to_ndarray()[:480].mean()) - float(source.to_ndarray()[:720].mean())) < 2


def test_rungs_encoding_in_parallel_never_share_a_frame_object() -> None:
    # Encoders set pts and picture type on the frame they get: two same-size rungs (here the
    # stream and its 15 fps rung) must each get a frame of their own over the same pixels.
    pixels = TestPattern(640, 360, 30).render(0, 0)
    plan = plan_ladder(
        StreamQuality(resolution=Resolution(640, 360), framerate=30, bitrate=800_000), (LOW,)
    )
    assert [(r.width, r.height) for r in plan.rungs] == [(640, 360), (640, 360)]
    scaler = QualityScaler()
    first, second = (scaler.picture(pixels, 640, 360, rung) for rung in plan.rungs)
    assert first is not second
    assert np.array_equal(first.to_ndarray(), second.to_ndarray())
    with pytest.raises(ConfigError):
        scaler.picture(pixels[:100], 640, 360, plan.rungs[0])


def test_every_rung_decodes_and_meets_its_bitrate_over_ten_seconds() -> None:
    """One capture, three rungs (1080p30, 720p30, 480p15), each scaled once and encoded once:
    each is its own H.264 stream that decodes at its own size, within 15% of its bitrate."""
    plan = plan_ladder(StreamQuality.from_preset(HIGH), (MEDIUM, LOW))
    width, height, fps = 1920, 1080, 30
    pattern = TestPattern(width, height, fps)
    scaler = QualityScaler()
    encoders = [
        H264Encoder(
            EncoderConfig(
                width=rung.width,
                height=rung.height,
                framerate=rung.framerate,
                bitrate=rung.bitrate,
                keyframe_interval=2 * rung.framerate,
                threads=1,
            )
        )
        for rung in plan.rungs
    ]
    decimators = [FrameDecimator(rung.framerate) for rung in plan.rungs]
    decoders = [H264Decoder() for _ in plan.rungs]
    sizes: list[list[int]] = [[] for _ in plan.rungs]
    shapes: list[set[tuple[int, int]]] = [set() for _ in plan.rungs]
    for index in range(10 * fps):
        pixels = pattern.render(index, 0)
        source = av.VideoFrame.from_numpy_buffer(
            pixels.reshape(height * 3 // 2, width), format="yuv420p"
        )
        pts = index * 90_000 // fps
        for n, rung in enumerate(plan.rungs):
            if not decimators[n].admit(pts):
                continue
            for unit in encoders[n].encode_frame(scaler.scale(source, rung), pts=pts, capture_us=0):
                sizes[n].append(len(unit.data))
                for frame in decoders[n].decode(unit.data):
                    shapes[n].add((frame.width, frame.height))
    for n, rung in enumerate(plan.rungs):
        assert len(sizes[n]) == 10 * rung.framerate
        assert decoders[n].frames_decoded == 10 * rung.framerate
        assert decoders[n].decode_errors == 0
        assert shapes[n] == {(rung.width, rung.height)}
        measured = sum(sizes[n]) * 8 / 10
        assert 0.85 * rung.bitrate <= measured <= 1.15 * rung.bitrate, (rung, measured)
    assert np.all(np.diff([r.width * r.height * r.framerate for r in plan.rungs]) < 0)
