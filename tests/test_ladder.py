"""The quality ladder: planning (pure), decimation, scaling once per rung, and the ladder encoder
core (shared.media.ladder, the loop the encoder actor runs) fed frames with literal times,
every rung encoded by real libx264 and decoded by FFmpeg."""

from __future__ import annotations

from collections.abc import Sequence

import av
import numpy as np
import pytest

from actors.stages.encoder import ladder_ring_names
from shared.capture.testpattern import TestPattern
from shared.errors import ConfigError, EncodingError
from shared.media.codec import EncodedFrame, H264Decoder
from shared.media.hwaccel import SOFTWARE_ENCODER
from shared.media.ladder import LadderEncoder, LadderOutput
from shared.media.scaler import FrameDecimator, QualityScaler, Rung, plan_ladder
from shared.models import PixelFormat, QualityPreset, Resolution, StreamQuality
from shared.pool.frame_pool import FrameRead
from tests.test_hwaccel import FailingHardwareOpener

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


# --- the ladder encoder core, with literal times ----------------------------------------------

#: A wall-clock capture stamp (2023-11-14): data the ladder must carry, never time by.
WALL_US = 1_700_000_000_000_000


def pooled(
    pixels: np.ndarray,
    width: int,
    height: int,
    *,
    sequence: int,
    monotonic_us: int,
    capture_us: int = WALL_US,
    missed: int = 0,
) -> FrameRead:
    """A frame as the encoder reads it from the pool."""
    return FrameRead(
        sequence=sequence,
        capture_us=capture_us,
        monotonic_us=monotonic_us,
        width=width,
        height=height,
        pixel_format=PixelFormat.YUV420P,
        pixels=pixels,
        missed=missed,
    )


class Feed:
    """Test pattern frames at ``fps`` into a ladder: frame n is captured at monotonic
    n / fps s (plus ``origin_us``) and handed over at ``now`` = n / fps."""

    def __init__(self, ladder: LadderEncoder, width: int, height: int, fps: int) -> None:
        self.ladder, self.width, self.height, self.fps = ladder, width, height, fps
        self.pattern = TestPattern(width, height, fps)
        self.index = 0
        self.outputs: list[LadderOutput] = []

    def frame(self, pixels: np.ndarray | None = None, **stamps: int) -> LadderOutput:
        n = self.index
        stamps.setdefault("monotonic_us", 5_000_000 + n * 1_000_000 // self.fps)
        if pixels is None:
            pixels = self.pattern.render(n, 0)
        frame = pooled(pixels, self.width, self.height, sequence=n + 1, **stamps)
        output = self.ladder.encode(frame, now=n / self.fps)
        self.index += 1
        self.outputs.append(output)
        return output

    def run(self, count: int) -> list[LadderOutput]:
        return [self.frame() for _ in range(count)]

    def units(self, rung: int, outputs: Sequence[LadderOutput] | None = None) -> list[EncodedFrame]:
        return [u for out in outputs or self.outputs for u in out.access_units(rung)]


def keyframe_frames(feed: Feed, rung: int) -> list[int]:
    """Which frames (by index) rung ``rung`` made IDRs."""
    return [
        n for n, out in enumerate(feed.outputs) if any(u.keyframe for u in out.access_units(rung))
    ]


def test_every_rung_decodes_and_meets_its_bitrate_over_ten_seconds() -> None:
    """One capture, three rungs (1080p30, 720p30, 480p15), each scaled once and encoded once:
    each is its own H.264 stream that decodes at its own size, within 15% of its bitrate."""
    ladder = LadderEncoder(StreamQuality.from_preset(HIGH), (MEDIUM, LOW), keyframe_interval_s=2.0)
    feed = Feed(ladder, 1920, 1080, 30)
    decoders = [H264Decoder() for _ in ladder.rungs]
    sizes: list[list[int]] = [[] for _ in ladder.rungs]
    shapes: list[set[tuple[int, int]]] = [set() for _ in ladder.rungs]
    for _ in range(10 * 30):
        output = feed.frame()
        for out in output.rungs:
            for unit in out.access_units:
                sizes[out.rung].append(len(unit.data))
                for frame in decoders[out.rung].decode(unit.data):
                    shapes[out.rung].add((frame.width, frame.height))
    ladder.close()
    for n, rung in enumerate(ladder.rungs):
        assert len(sizes[n]) == 10 * rung.framerate
        assert decoders[n].frames_decoded == 10 * rung.framerate
        assert decoders[n].decode_errors == 0
        assert shapes[n] == {(rung.width, rung.height)}
        measured = sum(sizes[n]) * 8 / 10
        assert 0.85 * rung.bitrate <= measured <= 1.15 * rung.bitrate, (rung, measured)
    assert np.all(np.diff([r.width * r.height * r.framerate for r in ladder.rungs]) < 0)


SMALL = StreamQuality(resolution=Resolution(320, 180), framerate=25, bitrate=300_000)


def test_pts_come_from_the_monotonic_stamp_and_the_wall_clock_one_is_carried_as_data() -> None:
    ladder = LadderEncoder(SMALL, keyframe_interval_s=10.0)
    feed = Feed(ladder, 320, 180, 25)
    # 25 fps on the monotonic clock (40 ms: 3600 ticks of 90 kHz); the wall clock is stepped
    # back an hour after frame 4 (NTP), then forward two.
    walls = [WALL_US + n * 40_000 + (-3600 if n >= 5 else 0) * 1_000_000 for n in range(8)]
    walls += [WALL_US + n * 40_000 + 7_200_000_000 for n in range(8, 12)]
    for n, wall in enumerate(walls):
        feed.frame(monotonic_us=77_000_000 + n * 40_000, capture_us=wall)
    units = feed.units(0)
    assert [u.pts for u in units] == [n * 3600 for n in range(12)]
    assert [u.capture_us for u in units] == walls
    # Two frames stamped in the same microsecond still get rising pts, one tick apart (the
    # second is then too early for the rung's 25 fps, which leaves it out).
    feed.frame(monotonic_us=77_000_000 + 12 * 40_000)
    assert feed.units(0)[-1].pts == 12 * 3600
    twin = pooled(feed.pattern.render(13, 0), 320, 180, sequence=14, monotonic_us=77_480_000)
    job = ladder.begin(twin, now=0.52)
    assert (job.pts, job.rungs) == (12 * 3600 + 1, ())
    ladder.close()


def test_reconfiguration_starts_at_an_idr_with_pts_running_on() -> None:
    """Bitrate alone applies within the GOP; a new size and frame rate reopen the encoder at
    the next frame (an IDR) from pool frames still at the old size, pts continuing."""
    source = StreamQuality(resolution=Resolution(320, 180), framerate=20, bitrate=300_000)
    ladder = LadderEncoder(source, keyframe_interval_s=10.0)
    feed = Feed(ladder, 320, 180, 20)  # 50 ms a frame: 4500 ticks
    feed.run(10)
    lower = StreamQuality(resolution=Resolution(320, 180), framerate=20, bitrate=200_000)
    assert ladder.configure(lower) == lower
    in_place = feed.run(10)
    stats = ladder.stats(now=1.0)
    assert stats.rungs[0].reconfigurations == 0 and stats.rungs[0].target_bitrate == 200_000
    assert not any(u.keyframe for u in feed.units(0, in_place))
    smaller = StreamQuality(resolution=Resolution(160, 90), framerate=10, bitrate=100_000)
    ladder.configure(smaller)
    resized = feed.units(0, feed.run(10))  # every other frame at 10 fps
    assert [u.pts for u in resized] == [20 * 4500 + n * 9000 for n in range(5)]
    assert [u.keyframe for u in resized] == [True, False, False, False, False]
    units = feed.units(0)
    assert [u.pts for u in units[:20]] == [n * 4500 for n in range(20)]
    decoder = H264Decoder()
    frames = [f for u in units for f in decoder.decode(u.data)]
    assert decoder.decode_errors == 0 and len(frames) == len(units) == 25
    assert [(f.width, f.height) for f in frames] == [(320, 180)] * 20 + [(160, 90)] * 5
    assert ladder.stats(now=2.0).rungs[0].reconfigurations == 1
    assert [(r.width, r.height, r.framerate) for r in ladder.rungs] == [(160, 90, 10)]
    ladder.close()


def test_keyframe_requests_and_bitrates_are_per_rung() -> None:
    # 640x360@30 with the low preset capped to 640x360@15: every other frame on rung 1.
    source = StreamQuality(resolution=Resolution(640, 360), framerate=30, bitrate=800_000)
    ladder = LadderEncoder(source, (LOW,), keyframe_interval_s=10.0)
    assert [(r.width, r.height, r.framerate) for r in ladder.rungs] == [
        (640, 360, 30),
        (640, 360, 15),
    ]
    feed = Feed(ladder, 640, 360, 30)
    feed.run(6)
    ladder.request_keyframe(1)  # before frame 6, which both rungs take
    feed.run(3)
    ladder.request_keyframe(0)  # before frame 9, which rung 1 leaves out
    feed.run(3)
    ladder.request_keyframe(None)  # before frame 12: both
    feed.run(2)
    assert keyframe_frames(feed, 0) == [0, 9, 12]
    assert keyframe_frames(feed, 1) == [0, 6, 12]
    assert ladder.stats(now=1.0).keyframe_requests == 3
    # A bitrate for rung 1 only, within its GOP: no IDR, rung 0 untouched.
    assert ladder.set_bitrate(200_000, rung=1) == 200_000
    feed.run(4)
    stats = ladder.stats(now=1.0)
    assert [r.target_bitrate for r in stats.rungs] == [800_000, 200_000]
    assert keyframe_frames(feed, 1) == [0, 6, 12]
    with pytest.raises(ConfigError, match="no rung 2"):
        ladder.request_keyframe(2)
    with pytest.raises(ConfigError, match="no rung 2"):
        ladder.set_bitrate(100_000, rung=2)
    ladder.close()


def test_a_paused_rung_takes_no_frames_and_resumes_at_an_idr() -> None:
    source = StreamQuality(resolution=Resolution(640, 360), framerate=30, bitrate=800_000)
    ladder = LadderEncoder(source, (LOW,), keyframe_interval_s=10.0)
    feed = Feed(ladder, 640, 360, 30)
    feed.run(4)
    ladder.set_paused(1, True)
    paused = feed.run(8)
    assert feed.units(1, paused) == []  # no encoder time spent on it
    assert len(feed.units(0, paused)) == 8
    assert ladder.stats(now=1.0).rungs[1].paused
    ladder.set_paused(1, False)
    resumed = feed.run(4)
    units = feed.units(1, resumed)
    assert units and units[0].keyframe  # its viewers' decoders start there
    # A viewer's IDR request for a paused rung resumes it at once (a switch cannot wait).
    ladder.set_paused(1, True)
    feed.run(2)
    ladder.request_keyframe(1)
    again = feed.units(1, feed.run(2))
    assert again and again[0].keyframe
    with pytest.raises(ConfigError, match="never paused"):
        ladder.set_paused(0, True)
    ladder.close()


def test_a_scene_cut_is_an_idr_on_every_rung_even_one_that_skips_the_cut_frame() -> None:
    quality = StreamQuality(resolution=Resolution(320, 180), framerate=30, bitrate=300_000)
    ladder = LadderEncoder(quality, (LOW,), keyframe_interval_s=10.0)
    assert [r.framerate for r in ladder.rungs] == [30, 15]
    feed = Feed(ladder, 320, 180, 30)
    feed.run(21)
    flat = np.full(320 * 180 * 3 // 2, 128, np.uint8)
    flat[: 320 * 180] = 235  # a white picture: a cut from the pattern
    cut = feed.frame(flat)  # frame 21: rung 1 (even frames) leaves it out
    for _ in range(4):
        feed.frame(flat)
    assert cut.scene_cut and [out.rung for out in cut.rungs] == [0]
    assert keyframe_frames(feed, 0) == [0, 21]
    assert keyframe_frames(feed, 1) == [0, 22]  # its first frame of the new scene
    assert ladder.stats(now=1.0).scene_cuts == 1
    ladder.close()


def test_a_hardware_rung_failing_mid_stream_falls_back_to_libx264_at_an_idr() -> None:
    """The injected failure (tests.test_hwaccel.FailsMidStream) hits each rung's encoder on
    its sixth frame; both carry on in libx264 from an IDR on that same frame."""
    quality = StreamQuality(resolution=Resolution(320, 180), framerate=30, bitrate=300_000)
    opener = FailingHardwareOpener(fail_at=5)
    ladder = LadderEncoder(
        quality, (LOW,), keyframe_interval_s=10.0, codec="h264_nvenc", opener=opener
    )
    assert ladder.hardware
    feed = Feed(ladder, 320, 180, 30)
    feed.run(16)
    assert not ladder.hardware
    assert keyframe_frames(feed, 0) == [0, 5]
    assert keyframe_frames(feed, 1) == [0, 10]  # rung 1's sixth frame is source frame 10
    stats = ladder.stats(now=1.0)
    assert [(r.codec, r.hardware, r.hardware_fallbacks) for r in stats.rungs] == [
        (SOFTWARE_ENCODER, False, 1)
    ] * 2
    assert stats.fallback_reason is not None and "device lost" in stats.fallback_reason
    for rung in (0, 1):
        decoder = H264Decoder()
        units = feed.units(rung)
        assert len(units) == (16 if rung == 0 else 8)
        frames = [f for u in units for f in decoder.decode(u.data)]
        assert decoder.decode_errors == 0 and len(frames) == len(units)
    ladder.close()


def test_stats_are_measured_over_the_window_ending_now() -> None:
    ladder = LadderEncoder(SMALL, keyframe_interval_s=10.0)
    feed = Feed(ladder, 320, 180, 25)
    feed.run(50)  # handed over at now = 0.0, 0.04, ... 1.96
    feed.frame(missed=2)  # the pool had two more frames this reader never saw
    stats = ladder.stats(now=2.0)
    sizes = [len(u.data) for u in feed.units(0)]
    assert (stats.frames_taken, stats.frames_dropped) == (51, 2)
    assert stats.rungs[0].frames_encoded == 51
    # The window is (0.0 .. 2.0]: 51 units over 2 s; the first one's bytes precede it.
    assert stats.rungs[0].fps == pytest.approx(50 / 2.0)
    assert stats.rungs[0].bitrate == int(sum(sizes[1:]) * 8 / 2.0)
    assert stats.average_fps == pytest.approx(50 / 2.0)
    assert stats.rungs[0].encode_cpu_ms > 0 and stats.rungs[0].encode_ms > 0
    later = ladder.stats(now=10.0)  # nothing in the last two seconds
    assert (later.rungs[0].fps, later.rungs[0].bitrate) == (0.0, 0)
    ladder.close()


def test_the_ladder_refuses_what_it_cannot_encode() -> None:
    ladder = LadderEncoder(SMALL, (LOW,), keyframe_interval_s=10.0)
    frame = pooled(TestPattern(320, 180, 25).render(0, 0), 320, 180, sequence=1, monotonic_us=0)
    with pytest.raises(EncodingError, match="needs yuv420p"):
        ladder.begin(FrameRead(1, 0, 0, 320, 180, PixelFormat.NV12, frame.pixels, 0), now=0.0)
    assert ladder.begin(frame, now=0.0).rungs == (0, 1)
    # 40 ms later: rung 1 (15 fps) leaves the frame out, and cannot be made to encode it.
    later = pooled(frame.pixels, 320, 180, sequence=2, monotonic_us=40_000)
    job = ladder.begin(later, now=0.04)
    assert job.rungs == (0,)
    with pytest.raises(ConfigError, match="rung 1 does not take"):
        ladder.encode_rung(job, 1)
    ladder.close()
