"""The seed's other recovery strategies, in process (no Ray): a lost capture device falls back
to the next source the config names, or ends in Error with the reason; a failing encoder falls
back to lower parameters before Error (``actors.stages``)."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from typing import Any

import av

from actors.stages.capture import CaptureActor, CaptureStats
from actors.stages.encoder import EncoderActor, EncoderStats
from shared.capture.engine import CaptureEngine
from shared.capture.source import FrameSource, Pacing, SourceInfo, U8Array
from shared.capture.testpattern import TestPattern
from shared.errors import CaptureError
from shared.media.codec import EncoderConfig, open_session
from shared.models import (
    CameraSource,
    CaptureConfig,
    PixelFormat,
    Resolution,
    ScreenConfig,
    StreamQuality,
    StreamSource,
    TestPatternSource,
    parse_source,
)
from shared.pool.frame_pool import FramePool, frame_bytes
from shared.pool.packet_ring import PacketRing, PacketRingReader
from shared.pool.shm import list_segments, segment_name
from tests.media_fixtures import FakeEncoder, FrameCollector, fresh_session_id

QVGA = StreamQuality(resolution=Resolution(320, 240), framerate=30, bitrate=300_000)
#: The camera in the tests below delivers this many frames, then is unplugged.
FRAMES_BEFORE_LOSS = 10
UNPLUGGED = "VIDIOC_DQBUF: No such device (the camera was unplugged)"


class UnpluggedCamera:
    """A camera that delivers a few frames, then fails as a USB camera pulled out does."""

    pacing: Pacing = "push"

    def __init__(self, quality: StreamQuality) -> None:
        self.width, self.height = quality.resolution.width, quality.resolution.height
        self.grabs = 0
        self.closed = False

    def grab(self, *, timeout: float) -> int | None:
        if self.grabs >= FRAMES_BEFORE_LOSS:
            raise CaptureError(UNPLUGGED)
        self.grabs += 1
        time.sleep(1 / 30)
        return time.time_ns() // 1000

    def fill(self, out: U8Array, *, frame_number: int, capture_us: int) -> None:
        out[:] = 16

    def info(self) -> SourceInfo:
        return SourceInfo(
            spec=parse_source("camera:0"),
            kind="camera",
            description="a camera about to be unplugged",
            native_width=self.width,
            native_height=self.height,
            pacing=self.pacing,
        )

    def close(self) -> None:
        self.closed = True


class Cameras(CaptureEngine):
    """Camera 0 gets unplugged; /dev/video9 does not exist; the test pattern is the real one."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: UnpluggedCamera | None = None

    def open_source(
        self,
        source: StreamSource,
        quality: StreamQuality,
        *,
        capture: CaptureConfig | None = None,
        screen: ScreenConfig | None = None,
    ) -> FrameSource:
        if isinstance(source, CameraSource) and source.device.index == 0:
            self.lost = UnpluggedCamera(quality)
            return self.lost
        if isinstance(source, CameraSource):
            raise CaptureError(f"camera {source.device.name} does not exist")
        return super().open_source(source, quality, capture=capture, screen=screen)


async def until_stats(actor: CaptureActor, done: object, what: str) -> CaptureStats:
    deadline = time.monotonic() + 30
    while True:
        stats = await actor.stats()
        if done(stats):  # type: ignore[operator]
            return stats
        assert time.monotonic() < deadline, f"{what}; last seen {stats}"
        await asyncio.sleep(0.05)


def run_capture(fallbacks: tuple[str, ...]) -> tuple[CaptureStats, list[int], Cameras, int]:
    """Capture from camera 0 until it is lost and the actor falls back or gives up: the last
    stats, the luma of the frames the pool got, the engine, the keyframe requests made."""
    session = fresh_session_id()
    pool = segment_name(session, "frames")
    engine = Cameras()
    config = CaptureConfig(resolution=QVGA.resolution, fallback_devices=fallbacks)
    actor = CaptureActor(
        session, parse_source("camera:0"), QVGA, pool, 8, capture=config, engine=engine
    )
    encoder = FakeEncoder()

    async def main() -> tuple[CaptureStats, list[int]]:
        await actor.open()
        collector = FrameCollector(pool)
        await actor.start(encoder)
        # Collecting from the first frame on, as the encoder would.
        collecting = asyncio.create_task(
            collector.until(lambda f: len(f) >= FRAMES_BEFORE_LOSS + 10)
        )
        try:
            stats = await until_stats(
                actor,
                lambda s: s.error is not None or s.frames_captured >= FRAMES_BEFORE_LOSS + 15,
                "a fallback or an error",
            )
            if stats.error is None:
                await collecting
        finally:
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)
            collector.close()
        await actor.stop()
        # The camera's frames are flat 16; the test pattern's are not.
        return stats, [int(f.pixels[: 320 * 240].max()) for f in collector.frames]

    stats, lumas = asyncio.run(main())
    assert not list_segments(pool)
    return stats, lumas, engine, encoder.keyframe_requests


def test_a_lost_camera_falls_back_to_the_next_source_the_config_names() -> None:
    stats, lumas, engine, keyframes = run_capture(("camera:/dev/video9", "test"))
    assert engine.lost is not None and engine.lost.closed
    assert stats.error is None
    assert stats.fallbacks == 1
    assert stats.fallback_reason is not None
    assert UNPLUGGED in stats.fallback_reason and "fell back to test" in stats.fallback_reason
    assert stats.source is not None and stats.source.kind == "test"
    # The camera's frames, then the test pattern's, in one pool: the encoder never noticed.
    assert lumas[0] == 16 and lumas[-1] > 16
    assert keyframes == 1  # viewers get a fresh reference of the new content at once


def test_a_lost_camera_without_a_working_fallback_is_an_error_with_the_reason() -> None:
    stats, _, engine, _ = run_capture(("camera:/dev/video9",))
    assert engine.lost is not None
    assert stats.error is not None
    assert UNPLUGGED in stats.error
    assert "no fallback opened: camera:/dev/video9" in stats.error
    assert "does not exist" in stats.error
    assert stats.fallbacks == 0
    # And without any fallback named: the loss itself is the reason.
    plain, _, _, _ = run_capture(())
    assert plain.error == f"CaptureError: {UNPLUGGED}"


def test_a_bad_fallback_is_refused_with_the_config() -> None:
    import pytest

    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown source 'webcam'"):
        CaptureConfig(fallback_devices=("test", "webcam"))
    assert CaptureConfig(fallback_devices=("test",)).fallback_devices == ("test",)
    assert isinstance(parse_source("test"), TestPatternSource)


# --- encoding failure: lower parameters before Error ---------------------------------------


class FailsAbove:
    """A real libx264 session that raises FFmpeg's error on encode while its configuration
    is above what ``works`` accepts (as an encoder out of memory at a size would)."""

    def __init__(self, real: Any, config: EncoderConfig, works: Callable[[EncoderConfig], bool]):
        self._real, self._fails = real, not works(config)
        self.name, self.hardware = real.name, False

    def encode(self, frame: Any, *, keyframe: bool = False) -> list[Any]:
        if self._fails and frame is not None:
            raise av.error.ExternalError(errno.ENOMEM, "out of memory (injected)")
        return self._real.encode(frame, keyframe=keyframe)  # type: ignore[no-any-return]

    def set_bitrate(self, bitrate: int) -> None:
        self._real.set_bitrate(bitrate)

    def close(self) -> None:
        self._real.close()


def encode_with(works: Callable[[EncoderConfig], bool], frames: int) -> tuple[EncoderStats, int]:
    """Feed ``frames`` test-pattern frames to an in-process encoder actor whose sessions fail
    unless ``works``; its stats and the packets its ring got."""
    sid = fresh_session_id()
    pool = FramePool.create(
        segment_name(sid, "frames"), slot_bytes=frame_bytes(320, 240, PixelFormat.YUV420P), slots=4
    )

    def opener(config: EncoderConfig, name: str, bitrate: int, peak: int) -> Any:
        return FailsAbove(open_session(config, name, bitrate, peak), config, works)

    actor = EncoderActor(
        sid, QVGA, 2.0, pool.name, segment_name(sid, "video"), codec="libx264", opener=opener
    )
    pattern = TestPattern(320, 240, 30)

    async def main() -> tuple[EncoderStats, int]:
        await actor.open()
        reader = PacketRingReader(PacketRing.attach(segment_name(sid, "video")))
        try:
            start = time.monotonic_ns() // 1000
            for index in range(frames):
                capture_us = time.time_ns() // 1000
                pool.write(
                    pattern.render(index, capture_us),
                    capture_us=capture_us,
                    monotonic_us=start + index * 1_000_000 // 30,
                    width=320,
                    height=240,
                    pixel_format=PixelFormat.YUV420P,
                )
                deadline = time.monotonic() + 10
                while (await actor.stats()).frames_taken < index + 1:
                    if (await actor.stats()).error is not None:
                        break
                    assert time.monotonic() < deadline, f"frame {index} never taken"
                    await asyncio.sleep(0.005)
            stats = await actor.stats()
            packets = len(reader.read_available().packets)
        finally:
            reader.ring.close()
            await actor.stop()
        return stats, packets

    try:
        return asyncio.run(main())
    finally:
        pool.close()
        pool.unlink()
        assert not list_segments(f"kz_{sid}_")


def test_an_encoding_failure_lowers_the_frame_rate_and_the_stream_goes_on() -> None:
    stats, packets = encode_with(lambda c: c.framerate <= 15, frames=40)
    assert stats.error is None
    assert stats.parameter_fallbacks == 1
    assert stats.parameter_fallback_reason is not None
    assert "out of memory (injected)" in stats.parameter_fallback_reason
    assert "now 320x240 at 15 fps" in stats.parameter_fallback_reason
    # Every other frame of the 30 fps pool after the failure, from an IDR on.
    assert stats.frames_encoded == packets > 10


def test_an_encoder_failing_at_every_step_down_ends_in_error() -> None:
    stats, packets = encode_with(lambda c: False, frames=10)
    assert stats.parameter_fallbacks == 2  # 15 fps, then 160x120: both failed too
    assert stats.error is not None and "out of memory (injected)" in stats.error
    assert stats.parameter_fallback_reason is not None
    assert "160x120 at 15 fps" in stats.parameter_fallback_reason
    assert packets == 0
