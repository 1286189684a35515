"""Content-aware rung targets with a real encoder: libx264's own QP, read from its packets,
lowers a still picture's rung target and raises it again when the picture moves.

The loop is the quality actor's, on a fake clock: the ladder encodes frames stamped 1/15 s
apart, and once a (stream) second its stats become the complexity signal
(``actors.stages.quality.rung_complexity``) of :class:`RungTargets`, whose target goes back to
the encoder.  The core's rules with literal figures: ``test_rung_targets.py``.
"""

from __future__ import annotations

from shared.capture.testpattern import TestPattern
from shared.control.rung_targets import RungBounds, RungTargets
from shared.media.ladder import LadderEncoder
from shared.models import PixelFormat, Resolution, StreamQuality
from shared.pool.frame_pool import FrameRead

WIDTH, HEIGHT, FPS = 640, 360, 15
#: Where the moving test pattern needs its rate (QP about 18 to 22, measured) and a still
#: picture does not (x264 refines it to QP 12 to 16 with the same bits).
RATE = 250_000


def run(still_seconds: int, moving_seconds: int) -> list[tuple[int, int, float | None]]:
    """The test pattern held still, then moving; per second (the rung's target after that
    round, the bitrate it produced, its average QP)."""
    from actors.stages.quality import rung_complexity

    quality = StreamQuality(resolution=Resolution(WIDTH, HEIGHT), framerate=FPS, bitrate=RATE)
    ladder = LadderEncoder(quality, (), keyframe_interval_s=2.0)
    targets = RungTargets([RungBounds(configured_bps=RATE)])
    pattern = TestPattern(WIDTH, HEIGHT, FPS)
    held = pattern.render(0, 0)
    rounds = []
    try:
        for n in range((still_seconds + moving_seconds) * FPS):
            pixels = held if n < still_seconds * FPS else pattern.render(n, 0)
            frame = FrameRead(
                sequence=n + 1,
                capture_us=1_700_000_000_000_000 + n * 1_000_000 // FPS,
                monotonic_us=10_000_000 + n * 1_000_000 // FPS,
                width=WIDTH,
                height=HEIGHT,
                pixel_format=PixelFormat.YUV420P,
                pixels=pixels,
                missed=0,
            )
            now = n / FPS
            ladder.encode(frame, now)
            if n % FPS == FPS - 1:  # the quality actor's round, once a second
                stats = ladder.stats(now)
                [target] = targets.update([], now=now, complexity=rung_complexity(stats.rungs))
                if target.changed:
                    ladder.set_bitrate(target.target_bps, 0)
                rung = stats.rungs[0]
                rounds.append((target.target_bps, rung.bitrate, rung.qp))
    finally:
        ladder.close()
    return rounds


def test_a_still_picture_lowers_its_rungs_target_and_motion_brings_it_back() -> None:
    rounds = run(still_seconds=10, moving_seconds=8)
    qps = [qp for _, _, qp in rounds]
    assert all(qp is not None and 0 <= qp <= 51 for qp in qps), qps  # libx264 reports it
    still, moving = rounds[:10], rounds[10:]
    # Still: after the 3 s hold the target comes down, well under the configured rate.
    assert [t for t, _, _ in still[:3]] == [RATE] * 3
    assert min(t for t, _, _ in still) <= 0.7 * RATE, rounds
    # Moving: back to the configured rate within two rounds of the first moving frame.
    assert moving[1][0] == RATE, rounds
    assert all(t == RATE for t, _, _ in moving[1:]), rounds


def test_the_moving_test_pattern_keeps_its_rate() -> None:
    rounds = run(still_seconds=0, moving_seconds=12)
    assert all(target == RATE for target, _, _ in rounds), rounds
    # It used the rate, at a QP near the reference (the picture needs its bits).
    assert sum(produced for _, produced, _ in rounds[2:]) / len(rounds[2:]) >= 0.85 * RATE


def test_the_qp_is_read_from_libx264s_packets_and_unknown_without_its_stats() -> None:
    import av
    import numpy as np

    from shared.media.codec import EncoderConfig, H264Encoder, packet_qp

    config = EncoderConfig(
        width=320, height=180, framerate=15, bitrate=200_000, keyframe_interval=30
    )
    encoder = H264Encoder(config)
    try:
        flat = np.full(320 * 180 * 3 // 2, 128, dtype=np.uint8)
        units = [u for n in range(5) for u in encoder.encode(flat, pts=n * 6000, capture_us=0)]
    finally:
        encoder.close()
    assert len(units) == 5 and units[0].keyframe
    # x264 reports every frame's QP; a flat grey picture it has bits to spare for is refined
    # to a low one.
    qps = [u.qp for u in units]
    assert all(qp is not None and 0 <= qp <= 51 for qp in qps), qps
    assert qps[-1] is not None and qps[-1] < 20
    # A packet no encoder stamped (a demuxed one, say) has no QP to read.
    assert packet_qp(av.Packet(b"\x00\x00\x00\x01\x09\xf0")) is None
