"""Rate control cores (sans-I/O, literal times) and the adaptive GOP with real libx264."""

from __future__ import annotations

import numpy as np
import pytest

from shared.capture.testpattern import TestPattern
from shared.errors import ConfigError
from shared.media.codec import EncoderConfig, H264Decoder, H264Encoder
from shared.media.rate_control import (
    INITIAL_GAIN,
    MAX_GAIN,
    MIN_GAIN,
    BitrateAdjuster,
    SceneCutDetector,
    encoder_threads,
)

FPS = 30


def run(adjuster: BitrateAdjuster, efficiency: float, seconds: float, start: float = 0.0) -> float:
    """Feed frames from an encoder producing ``efficiency`` times the rate it is given;
    returns the time reached."""
    now = start
    for _ in range(int(seconds * FPS)):
        adjuster.observe(now, int(adjuster.encoder_bitrate * efficiency / FPS / 8))
        now += 1 / FPS
    return now


def test_adjuster_closes_the_loop_on_an_encoder_that_undershoots() -> None:
    adjuster = BitrateAdjuster(1_000_000)
    assert adjuster.gain == INITIAL_GAIN
    run(adjuster, efficiency=0.75, seconds=6)
    produced = adjuster.encoder_bitrate * 0.75
    assert produced == pytest.approx(1_000_000, rel=0.05)
    assert adjuster.measured_bitrate() == pytest.approx(1_000_000, rel=0.08)


def test_adjuster_takes_back_an_overshoot_and_stays_within_its_bounds() -> None:
    adjuster = BitrateAdjuster(1_000_000)
    run(adjuster, efficiency=1.3, seconds=6)
    assert adjuster.encoder_bitrate * 1.3 == pytest.approx(1_000_000, rel=0.05)
    run(adjuster, efficiency=5.0, seconds=10, start=6)
    assert adjuster.gain == MIN_GAIN
    # Below half the target at the lowest gain: content-limited, so no wind-up from there.
    run(adjuster, efficiency=0.55, seconds=5, start=16)
    assert adjuster.gain < INITIAL_GAIN
    hungry = BitrateAdjuster(1_000_000)  # an encoder that can never reach the target
    run(hungry, efficiency=0.45, seconds=20)
    assert hungry.gain == MAX_GAIN


def test_adjuster_does_not_wind_up_on_content_that_needs_no_bits() -> None:
    adjuster = BitrateAdjuster(1_000_000)
    now = 0.0
    for _ in range(10 * FPS):  # a still picture: tiny P-frames whatever the rate
        adjuster.observe(now, 400)
        now += 1 / FPS
    assert adjuster.gain == INITIAL_GAIN


def test_a_new_target_starts_a_new_measurement_and_keeps_the_gain() -> None:
    adjuster = BitrateAdjuster(1_000_000)
    now = run(adjuster, efficiency=0.8, seconds=5)
    gain = adjuster.gain
    adjuster.set_target(500_000)
    assert adjuster.measured_bitrate() == 0 and adjuster.gain == gain
    assert adjuster.encoder_bitrate == int(500_000 * gain)
    run(adjuster, efficiency=0.8, seconds=5, start=now)
    assert adjuster.encoder_bitrate * 0.8 == pytest.approx(500_000, rel=0.05)
    adjuster.observe(0.0, 1000)  # the timeline restarted: measuring starts over
    assert adjuster.measured_bitrate() == 0
    with pytest.raises(ConfigError):
        adjuster.set_target(0)


def test_threads_leave_a_core_for_the_rest_of_the_pipeline() -> None:
    assert encoder_threads(1280, 720, 30, cores=2) == 1
    assert encoder_threads(1920, 1080, 30, cores=1) == 1
    assert encoder_threads(1920, 1080, 60, cores=16) == 2
    assert encoder_threads(3840, 2160, 60, cores=64) == 4
    with pytest.raises(ConfigError):
        encoder_threads(0, 720, 30, cores=2)


def luma(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    return pixels[: width * height].reshape(height, width)


def test_scene_cut_detector_ignores_motion_and_fades_and_finds_cuts() -> None:
    width, height = 640, 360
    pattern = TestPattern(width, height, FPS)
    detector = SceneCutDetector()
    frames = [luma(pattern.render(i, 0), width, height) for i in range(60)]
    cuts = [i for i, y in enumerate(frames) if detector.observe(y, i / FPS)]
    assert cuts == []  # scrolling detail and a bouncing box are motion, not cuts
    last = frames[-1].astype(np.int16)
    for step in range(1, 31):  # a fade to black over a second: a few levels a frame
        faded = np.clip(last - 4 * step, 0, 255).astype(np.uint8)
        assert not detector.observe(faded, (59 + step) / FPS)
    other = np.random.default_rng(7).integers(0, 256, (height, width), dtype=np.uint8)
    assert detector.observe(other, 90 / FPS)  # a cut to another picture
    assert not detector.observe(other, 91 / FPS)  # ... which then stays
    assert detector.cuts == 1


def test_cuts_closer_than_the_minimum_interval_make_one_idr() -> None:
    detector = SceneCutDetector(min_interval_s=0.5)
    black = np.zeros((90, 160), np.uint8)
    white = np.full((90, 160), 235, np.uint8)
    detector.observe(black, 0.0)
    assert detector.observe(white, 1.0)
    assert not detector.observe(black, 1.1)  # a strobe
    detector.keyframe_sent(2.0)  # a periodic IDR just went out
    assert not detector.observe(white, 2.2)
    assert detector.observe(black, 2.6)


def test_adaptive_gop_puts_an_idr_on_the_cut_and_none_elsewhere() -> None:
    """A long GOP (10 s), a scene cut at frame 45: IDRs at 0 and 45 only."""
    width, height = 320, 180
    first, second = TestPattern(width, height, FPS), TestPattern(width, height, FPS)
    encoder = H264Encoder(
        EncoderConfig(
            width=width,
            height=height,
            framerate=FPS,
            bitrate=300_000,
            keyframe_interval=10 * FPS,
            threads=1,
        )
    )
    detector = SceneCutDetector()
    decoder = H264Decoder()
    keyframes = []
    for index in range(90):
        # The second scene: the pattern upside down, seen from frame 45 on.
        pixels = first.render(index, 0)
        if index >= 45:
            y = luma(second.render(index, 0), width, height)[::-1]
            pixels = pixels.copy()
            pixels[: width * height] = y.reshape(-1)
        cut = detector.observe(luma(pixels, width, height), index / FPS)
        for unit in encoder.encode(pixels, pts=index * 3000, capture_us=0, keyframe=cut):
            if unit.keyframe:
                keyframes.append(index)
                detector.keyframe_sent(index / FPS)
            decoder.decode(unit.data)
    assert keyframes == [0, 45]
    assert decoder.frames_decoded == 90 and decoder.decode_errors == 0
