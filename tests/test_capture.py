"""Capture engine core: the optimizer's decisions, pixel conversion, and the capture actor's
loop (run without Ray) with the test pattern, a file, and a switch between them."""

from __future__ import annotations

import asyncio
import itertools
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from actors.stages.capture import CaptureActor, CaptureStats
from shared.capture.engine import CaptureEngine
from shared.capture.optimizer import choose_mode
from shared.capture.pacing import FrameGate, FramePacer, PlaybackClock, RateMeter
from shared.capture.pixels import FitRect, I420Converter, fit_rect
from shared.capture.source import CameraMode, EndOfSource, FrameSource, Pacing, SourceInfo, U8Array
from shared.capture.stamp import planes, read_stamp
from shared.errors import CaptureError, ConfigError
from shared.models import (
    CaptureConfig,
    FileSource,
    PixelFormat,
    Resolution,
    ScreenConfig,
    StreamQuality,
    StreamSource,
    TestPatternSource,
)
from shared.pool.shm import list_segments, segment_name
from tests.media_fixtures import (
    CLIP_FPS,
    FakeEncoder,
    FrameCollector,
    collect_frames,
    fresh_session_id,
    i420_to_rgb,
    make_clip,
)

QVGA = StreamQuality(resolution=Resolution(320, 240), framerate=30, bitrate=300_000)


# --- choose_mode ---------------------------------------------------------------------------------


def _mode(
    fourcc: str, width: int, height: int, *rates: float, compressed: bool = False
) -> CameraMode:
    return CameraMode(
        pixel_format=fourcc,
        width=width,
        height=height,
        framerates=list(rates),
        compressed=compressed,
    )


# A typical USB 2 webcam: raw YUYV is fast only at small sizes, MJPG is fast everywhere.
WEBCAM = [
    _mode("YUYV", 640, 480, 30, 15),
    _mode("YUYV", 1280, 720, 10, 5),
    _mode("YUYV", 1920, 1080, 5),
    _mode("MJPG", 640, 480, 30, compressed=True),
    _mode("MJPG", 1280, 720, 30, compressed=True),
    _mode("MJPG", 1920, 1080, 30, compressed=True),
]


def _config(
    width: int, height: int, fps: int, fmt: PixelFormat = PixelFormat.YUV420P
) -> CaptureConfig:
    return CaptureConfig(resolution=Resolution(width, height), framerate=fps, pixel_format=fmt)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        # 720p30: YUYV 720p only reaches 10 fps, so MJPG at the exact size wins.
        (_config(1280, 720, 30), ("MJPG", 1280, 720, 30)),
        # 640x480@30: the raw mode at the exact size beats decoding JPEG.
        (_config(640, 480, 30), ("YUYV", 640, 480, 30)),
        # 480p15: the smallest covering mode, and of its rates the one closest above.
        (_config(640, 480, 15), ("YUYV", 640, 480, 15)),
        # 854x480 is not covered by 640x480: the next size up that keeps the rate.
        (_config(854, 480, 30), ("MJPG", 1280, 720, 30)),
        # Larger than anything offered: the largest mode at the rate.
        (_config(3840, 2160, 30), ("MJPG", 1920, 1080, 30)),
        # A rate nobody reaches: the fastest available at a covering size.
        (_config(1920, 1080, 60), ("MJPG", 1920, 1080, 30)),
    ],
)
def test_choose_mode_picks_the_closest_mode(
    config: CaptureConfig, expected: tuple[str, int, int, float]
) -> None:
    choice = choose_mode(WEBCAM, config)
    assert choice is not None
    got = (choice.mode.pixel_format, choice.mode.width, choice.mode.height, choice.framerate)
    assert got == expected


def test_choose_mode_prefers_the_requested_format_and_handles_no_modes() -> None:
    modes = [_mode("YUYV", 640, 480, 30), _mode("NV12", 640, 480, 30)]
    nv12 = choose_mode(modes, _config(640, 480, 30, PixelFormat.NV12))
    assert nv12 is not None and nv12.mode.pixel_format == "NV12"
    # Without a preference, the cheaper conversion to yuv420p (NV12 is already 4:2:0).
    default = choose_mode(modes, _config(640, 480, 30, PixelFormat.BGR24))
    assert default is not None and default.mode.pixel_format == "NV12"
    assert choose_mode([], _config(640, 480, 30)) is None
    # A mode without listed rates is taken at the requested rate.
    bare = choose_mode([_mode("YUYV", 640, 480)], _config(640, 480, 25))
    assert bare is not None and bare.framerate == 25


# --- pacing ---------------------------------------------------------------------------------------


def test_frame_pacer_keeps_an_absolute_schedule_and_skips_when_behind() -> None:
    pacer = FramePacer(10, start=100.0)
    assert pacer.wait(100.0) == 0
    pacer.taken()
    assert pacer.wait(100.03) == pytest.approx(0.07)
    # 0.35 s late for frame 1: frames 1-3 are skipped, frame 4 (due at 100.4) is taken now.
    assert pacer.wait(100.45) == 0
    assert (pacer.frame_number, pacer.skipped) == (4, 3)
    pacer.taken()
    assert pacer.wait(100.45) == pytest.approx(0.05)
    with pytest.raises(ConfigError):
        FramePacer(0, start=0.0)


def test_frame_gate_thins_a_fast_source_to_the_stream_rate() -> None:
    gate = FrameGate(30)
    sixty = [round(i * 1_000_000 / 60) for i in range(120)]
    admitted = [t for t in sixty if gate.admit(t)]
    assert len(admitted) == 60 and gate.dropped == 60
    # Admitted frames are evenly spaced, one every 1/30 s.
    assert set(np.diff(admitted).tolist()) <= {33_333, 33_334}
    # The same with a millisecond of jitter: still every other frame.
    gate = FrameGate(30)
    rng = np.random.default_rng(3)
    jittery = [t + int(rng.integers(-1_000, 1_000)) for t in sixty]
    assert sum(gate.admit(t) for t in jittery) == 60


def test_frame_gate_keeps_a_jittery_source_at_the_rate_and_restarts_after_a_gap() -> None:
    gate = FrameGate(30)
    rng = np.random.default_rng(7)
    times = [round(i * 1_000_000 / 30 + rng.integers(-5_000, 5_000)) for i in range(90)]
    assert all(gate.admit(t) for t in times)
    # A 2 s stall, then frames again: admitted at once, no burst of "owed" frames.
    restart = times[-1] + 2_000_000
    assert gate.admit(restart)
    assert not gate.admit(restart + 10_000)
    assert gate.admit(restart + 33_334)


def test_rate_meter_measures_a_window_and_the_average() -> None:
    meter = RateMeter(window_s=2.0)
    assert meter.rate(0.0) == 0.0 and meter.average(0.0) == 0.0
    for i in range(61):  # 30 fps for 2 s
        meter.add(i / 30)
    assert meter.rate(2.0) == pytest.approx(30, rel=0.02)
    assert meter.average(2.0) == pytest.approx(30, rel=0.02)
    # It stops: the window rate falls as time passes without frames, the average too.
    assert meter.rate(3.5) < 15
    assert meter.rate(10.0) == 0.0


def test_playback_clock_maps_media_time_and_rebases_when_far_behind() -> None:
    clock = PlaybackClock(max_lag_us=500_000)
    assert clock.due_us(0, now_us=1_000_000) == 1_000_000
    assert clock.due_us(400_000, now_us=1_100_000) == 1_400_000  # early: wait for it
    assert clock.due_us(500_000, now_us=1_800_000) == 1_500_000  # 0.3 s late: still on time
    assert clock.rebases == 0
    # 0.7 s late: start again from now rather than race through the backlog.
    assert clock.due_us(600_000, now_us=2_300_000) == 2_300_000
    assert clock.rebases == 1
    assert clock.due_us(700_000, now_us=2_300_000) == 2_400_000


# --- pixel conversion -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst", "rect"),
    [
        ((1280, 720), (1280, 720), FitRect(0, 0, 1280, 720)),
        ((640, 480), (1280, 720), FitRect(160, 0, 960, 720)),  # 4:3 in 16:9: pillarbox
        ((1920, 1080), (640, 480), FitRect(0, 60, 640, 360)),  # 16:9 in 4:3: letterbox
        ((333, 333), (320, 240), FitRect(40, 0, 240, 240)),  # odd sizes: even rectangle
        ((100, 7), (320, 240), FitRect(0, 108, 320, 22)),  # centred, rounded down to even
    ],
)
def test_fit_rect_keeps_the_aspect_ratio_on_even_pixels(
    src: tuple[int, int], dst: tuple[int, int], rect: FitRect
) -> None:
    assert fit_rect(*src, *dst) == rect
    assert all(value % 2 == 0 for value in rect)


def test_bgr_converts_to_limited_range_i420_and_letterboxes_in_black() -> None:
    converter = I420Converter(64, 36)
    out = np.zeros(64 * 36 * 3 // 2, np.uint8)
    red = np.zeros((36, 64, 3), np.uint8)
    red[..., 2] = 255
    converter.from_bgr(red, out)
    y, u, v = planes(out, 64, 36)
    # BT.601 limited range: pure red is Y 82, Cb 90, Cr 240.
    assert (np.unique(y).tolist(), np.unique(u).tolist(), np.unique(v).tolist()) == (
        [82],
        [90],
        [240],
    )
    # A 4:3 BGRA picture: pillarboxed, the bars black (16, 128, 128), the middle green.
    green = np.zeros((30, 40, 4), np.uint8)
    green[..., 1] = 255
    converter.from_bgr(green, out)
    y, u, v = planes(out, 64, 36)
    rect = fit_rect(40, 30, 64, 36)
    assert rect == FitRect(8, 0, 48, 36)
    assert set(np.unique(y[:, : rect.x])) == {16} and set(
        np.unique(y[:, rect.x + rect.width :])
    ) == {16}
    assert set(np.unique(u[:, : rect.x // 2])) == {128}
    inner = i420_to_rgb(out, 64, 36)[:, rect.x + 2 : rect.x + rect.width - 2]
    assert np.abs(inner.astype(int) - [0, 255, 0]).max() <= 3
    with pytest.raises(ConfigError):
        converter.from_bgr(np.zeros((4, 4), np.uint8), out)
    with pytest.raises(ConfigError):
        I420Converter(63, 36)


def test_pyav_frames_of_any_format_convert_once_into_the_slot() -> None:
    converter = I420Converter(64, 48)
    out = np.zeros(64 * 48 * 3 // 2, np.uint8)
    # An rgb24 frame twice the size: scaled and converted by libswscale in one pass.
    rgb = np.zeros((96, 128, 3), np.uint8)
    rgb[..., 2] = 255  # blue
    converter.from_av(av.VideoFrame.from_ndarray(rgb, format="rgb24"), out)
    assert np.abs(i420_to_rgb(out, 64, 48).astype(int) - [0, 0, 255]).max() <= 3
    # A yuv420p frame at the exact size whose rows PyAV pads: copied plane by plane.
    source = np.arange(64 * 48 * 3 // 2, dtype=np.uint32).astype(np.uint8)
    frame = av.VideoFrame.from_ndarray(source.reshape(72, 64), format="yuv420p")
    converter.from_av(frame, out)
    assert np.array_equal(out, source)
    # A 16:9 frame into 4:3: letterboxed, bars black.
    wide = av.VideoFrame.from_ndarray(np.full((36, 64, 3), 200, np.uint8), format="rgb24")
    converter.from_av(wide, out)
    y, _, _ = planes(out, 64, 48)
    assert set(np.unique(y[:6])) == {16} and set(np.unique(y[-6:])) == {16}
    assert 180 < y[24, 32] < 220


# --- the capture actor, without Ray ------------------------------------------------------------


def _actor(source: object, quality: StreamQuality = QVGA) -> tuple[CaptureActor, str]:
    session = fresh_session_id()
    pool = segment_name(session, "frames")
    return CaptureActor(session, source, quality, pool, 8), pool  # type: ignore[arg-type]


def test_the_test_pattern_flows_into_the_pool_with_readable_stamps() -> None:
    actor, pool = _actor(TestPatternSource())
    encoder = FakeEncoder()

    async def main() -> list[int]:
        await actor.open()
        await actor.start(encoder)
        # Collected as the encoder would: woken by the pool's doorbell, no call per frame.
        frames = await collect_frames(pool, lambda f: len(f) >= 20)
        stats = await actor.stats()
        # The doorbell rings inside the write, before the capture loop counts the frame: the
        # count may trail the frames read by the one in flight.
        assert stats.frames_captured >= len(frames) - 1 >= 19
        assert stats.fps > 0 and stats.error is None and stats.pool_readers == 1
        assert stats.source is not None and stats.source.kind == "test"
        await actor.stop()
        numbers = []
        for frame in frames:
            stamp = read_stamp(planes(frame.pixels, 320, 240)[0])
            assert stamp is not None and stamp.capture_us == frame.capture_us
            numbers.append(stamp.frame_number)
        return numbers

    numbers = asyncio.run(main())
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert not list_segments(pool)


class SteppedClockCamera:
    """A push source at 30 fps whose wall-clock stamps jump back an hour after frame 5, as
    when NTP steps the clock: a device, faked; the actor's path through it is the real one."""

    pacing: Pacing = "push"
    STEP_US = 3_600_000_000

    def __init__(self, quality: StreamQuality) -> None:
        self.width, self.height = quality.resolution.width, quality.resolution.height
        self.stamps: list[int] = []

    def grab(self, *, timeout: float) -> int | None:
        time.sleep(1 / 30)  # the device delivering at its frame rate
        stamp = time.time_ns() // 1000 - (self.STEP_US if len(self.stamps) >= 5 else 0)
        self.stamps.append(stamp)
        return stamp

    def fill(self, out: U8Array, *, frame_number: int, capture_us: int) -> None:
        out[:] = frame_number % 256

    def info(self) -> SourceInfo:
        return SourceInfo(
            spec=TestPatternSource(),
            kind="camera",
            description="a camera whose clock steps back",
            native_width=self.width,
            native_height=self.height,
            pacing=self.pacing,
        )

    def close(self) -> None:
        pass


class SteppedClockEngine(CaptureEngine):
    def __init__(self) -> None:
        super().__init__()
        self.source: SteppedClockCamera | None = None

    def open_source(
        self,
        source: StreamSource,
        quality: StreamQuality,
        *,
        capture: CaptureConfig | None = None,
        screen: ScreenConfig | None = None,
    ) -> FrameSource:
        self.source = SteppedClockCamera(quality)
        return self.source


def test_a_wall_clock_step_neither_stops_capture_nor_changes_the_stamps() -> None:
    """The gate times frames on the monotonic clock; the wall-clock stamp is kept as data."""
    session = fresh_session_id()
    pool = segment_name(session, "frames")
    engine = SteppedClockEngine()
    actor = CaptureActor(session, TestPatternSource(), QVGA, pool, 8, engine=engine)

    async def main() -> tuple[list[Any], CaptureStats]:
        await actor.open()
        await actor.start(FakeEncoder())
        collector = FrameCollector(pool)
        try:
            await collector.until(lambda f: len(f) >= 1 and f[-1].sequence >= 20)
        finally:
            collector.close()
        return collector.frames, await actor.stop()

    frames, stats = asyncio.run(main())
    assert engine.source is not None
    # Every frame the device delivered went into the pool: the step dropped none of them.
    assert stats.frames_decimated == 0 and stats.error is None
    assert frames[-1].sequence >= 20
    # Each pooled frame carries the device's own wall-clock stamp, stepped back or not ...
    stamps = engine.source.stamps
    assert [f.capture_us for f in frames] == [stamps[f.sequence - 1] for f in frames]
    assert any(f.capture_us < stamps[0] - SteppedClockCamera.STEP_US // 2 for f in frames)
    # ... and a monotonic stamp that only moves forward, at least a frame interval a step.
    steps = np.diff([f.monotonic_us for f in frames]) / np.diff([f.sequence for f in frames])
    assert steps.min() >= 1_000_000 / 30 - 1_000
    assert not list_segments(pool)


def test_switching_source_keeps_the_stream_and_asks_for_a_keyframe(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=1.0, size=(320, 240), audio=False)
    actor, pool = _actor(TestPatternSource())
    encoder = FakeEncoder()

    async def main() -> None:
        await actor.open()
        await actor.start(encoder)
        await collect_frames(pool, lambda f: len(f) >= 5)
        # A source that cannot open: the error comes back and the pattern keeps running.
        with pytest.raises(CaptureError, match="does not exist"):
            await actor.switch_source(f"file:{tmp_path / 'missing.mp4'}")
        with pytest.raises(ConfigError):
            await actor.switch_source("bogus")
        before = (await actor.stats()).frames_captured
        await collect_frames(pool, lambda f: len(f) >= 3)
        assert (await actor.stats()).frames_captured > before
        assert encoder.keyframe_requests == 0

        info = await actor.switch_source(f"file:{clip}")
        assert info.kind == "file" and (info.native_width, info.native_height) == (320, 240)
        # Frames now come from the clip: its own stamps, frame numbers 0.. at 1/10 s apart.
        frames = await collect_frames(
            pool,
            lambda f: sum(1 for x in f if _clip_frame(x) is not None) >= 4,
        )
        clip_frames = [n for x in frames if (n := _clip_frame(x)) is not None]
        assert clip_frames == sorted(clip_frames) and clip_frames[0] <= 3
        stats = await actor.stats()
        assert stats.switches == 1 and encoder.keyframe_requests == 1
        assert stats.source is not None and stats.source.kind == "file"
        # Every frame kept the stream's size, so the encoder carries on.
        assert {(f.width, f.height) for f in frames} == {(320, 240)}

        # The clip ends (no loop); switching back starts the loop again.
        deadline = time.monotonic() + 60  # a hang guard; the clip lasts a second
        while not (await actor.stats()).ended:
            assert time.monotonic() < deadline, "the clip never ended"
            await asyncio.sleep(0.05)
        await actor.switch_source("test")
        after = await collect_frames(pool, lambda f: len(f) >= 3)
        assert all(read_stamp(planes(f.pixels, 320, 240)[0]) is not None for f in after)
        assert (await actor.stats()).switches == 2
        await actor.stop()

    asyncio.run(main())
    assert not list_segments(pool)


def _clip_frame(frame: object) -> int | None:
    """The clip frame number of a pooled frame, if it is one (its stamp's time is n/fps s)."""
    stamp = read_stamp(planes(frame.pixels, 320, 240)[0])  # type: ignore[attr-defined]
    if stamp is None or stamp.capture_us != stamp.frame_number * 1_000_000 // CLIP_FPS:
        return None
    return stamp.frame_number


def test_a_source_that_cannot_open_fails_open_and_leaves_no_shared_memory(tmp_path: Path) -> None:
    actor, pool = _actor(FileSource(path=str(tmp_path / "nope.mp4")))

    async def main() -> None:
        with pytest.raises(CaptureError, match=r"nope\.mp4 does not exist"):
            await actor.open()
        await actor.stop()  # stopping a stream that never opened is harmless

    asyncio.run(main())
    assert not list_segments(pool)


def test_end_of_source_is_a_signal_not_an_error() -> None:
    assert not issubclass(EndOfSource, CaptureError)


def test_frames_keep_pts_arithmetic_exact_across_a_loop(tmp_path: Path) -> None:
    """A looped file's stamps keep rising by exactly one frame interval across the seam."""
    clip = make_clip(tmp_path / "loop.mp4", seconds=0.5, size=(320, 240), audio=False)
    actor, pool = _actor(FileSource(path=str(clip), loop=True))

    async def main() -> list[tuple[int, int]]:
        await actor.open()
        await actor.start(FakeEncoder())
        frames = await collect_frames(pool, lambda f: len(f) >= 12)
        await actor.stop()
        return [(f.capture_us, n) for f in frames if (n := _clip_frame(f)) is not None]

    stamped = asyncio.run(main())
    numbers = [n for _, n in stamped]
    assert 4 in numbers and 0 in numbers[numbers.index(4) :]  # wrapped around: looped
    times = [t for t, _ in stamped]
    steps = {round(b - a) for a, b in itertools.pairwise(times)}
    # Consecutive frames are 100 ms apart, multiples of it where the collector missed one.
    assert all(step % (1_000_000 // CLIP_FPS) == 0 and step > 0 for step in steps), steps


def test_frame_time_base_of_generated_clips_is_what_the_tests_assume(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "c.mp4", seconds=0.3, audio=False)
    with av.open(str(clip)) as container:
        times = [frame.time for frame in container.decode(video=0)]
    assert [Fraction(t).limit_denominator(100) for t in times] == [
        0,
        Fraction(1, 10),
        Fraction(1, 5),
    ]
