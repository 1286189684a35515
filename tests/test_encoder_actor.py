"""EncoderActor on the session's real Ray cluster, fed through a real frame pool.

The test process plays capture (test pattern frames written into the pool at 30 fps, each
announced with ``frame_ready``) and plays the viewers (reading the packet rings and decoding
with FFmpeg).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from actors.handles import PacketSubscriber
from actors.placement import NAMESPACE
from actors.stages.encoder import EncoderActor, EncoderStats, ladder_ring_names
from shared.capture.testpattern import TestPattern
from shared.media.codec import H264Decoder
from shared.media.hwaccel import SOFTWARE_ENCODER
from shared.models import PixelFormat, QualityPreset, Resolution, StreamQuality
from shared.pool.frame_pool import FramePool, frame_bytes
from shared.pool.packet_ring import PacketRing, PacketRingReader, RingPacket
from shared.pool.shm import segment_name
from tests.conftest import wait_for_no_leaks
from tests.test_hwaccel import FailingHardwareOpener

pytestmark = pytest.mark.ray

FPS = 30


def quality(width: int, height: int, bitrate: int, fps: int = FPS) -> StreamQuality:
    return StreamQuality(resolution=Resolution(width, height), framerate=fps, bitrate=bitrate)


class Collector:
    """A subscriber: records every ``packets_ready`` call with its arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def packets_ready(self, sequence: int, *rung: int) -> None:
        self.calls.append((sequence, *rung))

    def seen(self) -> list[tuple[int, ...]]:
        return self.calls


class Capture:
    """Writes test pattern frames into the pool at the frame rate and announces them."""

    def __init__(self, pool: FramePool, actor: Any, width: int, height: int) -> None:
        self.pool, self.actor = pool, actor
        self.width, self.height = width, height
        self.pattern = TestPattern(width, height, FPS)
        self.index = 0

    def feed(self, frames: int) -> None:
        started = time.monotonic()
        for n in range(frames):
            capture_us = time.time_ns() // 1000
            sequence = self.pool.write(
                self.pattern.render(self.index, capture_us),
                capture_us=capture_us,
                width=self.width,
                height=self.height,
                pixel_format=PixelFormat.YUV420P,
            )
            self.actor.frame_ready.remote(sequence)
            self.index += 1
            time.sleep(max(0.0, started + (n + 1) / FPS - time.monotonic()))


@contextlib.contextmanager
def encoder_actor(
    source: StreamQuality, rungs: tuple[QualityPreset, ...] = (), **options: Any
) -> Iterator[tuple[Any, Capture, str]]:
    sid = uuid.uuid4().hex[:10]
    width, height = source.resolution.width, source.resolution.height
    pool = FramePool.create(
        segment_name(sid, "frames"),
        slot_bytes=frame_bytes(width, height, PixelFormat.YUV420P),
        slots=4,
    )
    actor: Any = (
        ray.remote(EncoderActor)
        .options(name=f"kz-{sid}-encoder", namespace=NAMESPACE, num_cpus=0)
        .remote(sid, source, 60.0, pool.name, segment_name(sid, "video"), rungs, **options)
    )
    try:
        ray.get(actor.open.remote())
        yield actor, Capture(pool, actor, width, height), sid
    finally:
        with contextlib.suppress(Exception):
            ray.get(actor.stop.remote())
        ray.kill(actor)
        pool.close()
        pool.unlink()
    wait_for_no_leaks(sid)


def readers(actor: Any) -> list[PacketRingReader]:
    return [
        PacketRingReader(PacketRing.attach(name)) for name in ray.get(actor.rung_names.remote())
    ]


def settle(actor: Any, frames: int, rung: int = 0, timeout: float = 10.0) -> EncoderStats:
    """Wait until rung ``rung`` has encoded at least ``frames`` frames in all."""
    deadline = time.monotonic() + timeout
    while True:
        stats: EncoderStats = ray.get(actor.stats.remote())
        if stats.rungs[rung].frames_encoded >= frames or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def decode_all(packets: list[RingPacket]) -> tuple[H264Decoder, list[tuple[int, int, int]]]:
    decoder = H264Decoder()
    frames = []
    for packet in packets:
        for frame in decoder.decode(packet.data, pts=packet.pts):
            frames.append((frame.width, frame.height, int(frame.pts or 0)))
    return decoder, frames


def test_a_ladder_writes_each_rung_to_its_own_ring_and_notifies_per_rung(ray_cluster: str) -> None:
    with encoder_actor(quality(960, 540, 1_200_000), (QualityPreset.LOW,)) as (actor, cap, sid):
        assert ray.get(actor.rung_names.remote()) == ladder_ring_names(sid, 2)
        ladder = ray.get(actor.ladder.remote())
        assert [(r.width, r.height, r.framerate) for r in ladder] == [
            (960, 540, 30),
            (854, 480, 15),
        ]
        collectors: dict[int | None, Any] = {
            rung: ray.remote(Collector).options(num_cpus=0).remote() for rung in (0, 1, None)
        }
        for rung, collector in collectors.items():
            ray.get(actor.subscribe.remote(f"c{rung}", PacketSubscriber[Any](collector), rung))
        rings = readers(actor)
        cap.feed(60)
        stats = settle(actor, 55)
        packets = [ring.read_available().packets for ring in rings]
        for n, rung in enumerate(ladder):
            decoder, frames = decode_all(packets[n])
            assert decoder.decode_errors == 0 and len(frames) == len(packets[n])
            assert {(w, h) for w, h, _ in frames} == {(rung.width, rung.height)}
            assert packets[n][0].keyframe
        # Rung 1 runs at 15 fps: every other source frame by timestamp.  A loaded machine makes
        # the encoder drop frames (latest-frame semantics), so only bounds are asserted.
        assert len(packets[0]) >= 20 and 10 <= len(packets[1]) <= 31
        assert len(packets[1]) <= len(packets[0])
        calls = {rung: ray.get(c.seen.remote()) for rung, c in collectors.items()}
        # Rung 0 subscribers keep the single-argument call; the others learn the rung.
        assert all(len(call) == 1 for call in calls[0])
        assert {call[1] for call in calls[1]} == {1}
        assert {call[1] for call in calls[None]} == {0, 1}
        assert calls[0][-1][0] == packets[0][-1].sequence
        assert stats.rungs[1].ring == segment_name(sid, "video1")
        assert stats.codec == SOFTWARE_ENCODER and not stats.hardware
        assert stats.frames_encoded == stats.rungs[0].frames_encoded
        for ring in rings:
            ring.ring.close()
        for collector in collectors.values():
            ray.kill(collector)


def test_a_keyframe_request_is_served_by_the_next_frame(ray_cluster: str) -> None:
    with encoder_actor(quality(640, 360, 600_000), (QualityPreset.LOW,)) as (actor, cap, _):
        rings = readers(actor)
        cap.feed(20)
        settle(actor, 18)
        for ring in rings:
            ring.read_available()
        requested_at = rings[0].ring.last_sequence()
        ray.get(actor.request_keyframe.remote())
        returned_us = time.time_ns() // 1000
        cap.feed(10)
        settle(actor, 28)
        after = rings[0].read_available().packets
        keyframe = next(p for p in after if p.sequence > requested_at and p.keyframe)
        first_captured_after = next(p for p in after if p.capture_us > returned_us)
        # No frame captured after the request returned went out before the IDR: the request
        # is served within one frame interval.
        assert keyframe.sequence <= first_captured_after.sequence
        assert keyframe.sequence - requested_at <= 2
        assert [p.sequence for p in after if p.keyframe] == [keyframe.sequence]
        assert not any(p.keyframe for p in rings[1].read_available().packets)  # rung 0 only
        # A request for rung 1 only.
        ray.get(actor.request_keyframe.remote(1))
        cap.feed(10)
        settle(actor, 38)
        assert any(p.keyframe for p in rings[1].read_available().packets)
        assert not any(p.keyframe for p in rings[0].read_available().packets)
        assert ray.get(actor.stats.remote()).keyframe_requests == 2
        for ring in rings:
            ring.ring.close()


def test_reconfiguration_mid_stream_decodes_without_errors_at_a_viewer(ray_cluster: str) -> None:
    """Bitrate alone applies in place; a new size and frame rate start at an IDR with the
    timestamps running on, from pool frames still at the old size."""
    with encoder_actor(quality(640, 360, 600_000)) as (actor, cap, _):
        (ring,) = readers(actor)
        cap.feed(30)
        settle(actor, 28)
        ray.get(actor.configure.remote(quality(640, 360, 400_000)))
        cap.feed(15)
        stats = settle(actor, 43)
        assert stats.reconfigurations == 0 and stats.target_bitrate == 400_000
        before = ring.read_available().packets
        applied = ray.get(actor.configure.remote(quality(480, 270, 300_000, fps=15)))
        assert applied.resolution == Resolution(480, 270)
        cap.feed(30)
        stats = settle(actor, 55)
        after = ring.read_available().packets
        assert stats.reconfigurations == 1
        assert after[0].keyframe  # the first frame at the new size is an IDR
        decoder, frames = decode_all(before + after)
        assert decoder.decode_errors == 0 and len(frames) == len(before) + len(after)
        sizes = [(w, h) for w, h, _ in frames]
        switch = len(before)
        assert set(sizes[:switch]) == {(640, 360)} and set(sizes[switch:]) == {(480, 270)}
        timestamps = [p for _, _, p in frames]
        assert timestamps == sorted(timestamps) and len(set(timestamps)) == len(timestamps)
        # 15 fps from a 30 fps pool: about every other frame, spaced by ~1/15 s of pts.
        assert 12 <= len(after) <= 18
        steps = [b - a for a, b in zip(timestamps[switch:], timestamps[switch + 1 :], strict=False)]
        assert min(steps) >= 6000 - 1500
        ring.ring.close()


def test_a_hardware_encoder_failing_mid_stream_falls_back_visibly(ray_cluster: str) -> None:
    """The injected failure (see tests.test_hwaccel.FailsMidStream) hits on frame 20; the
    stream goes on in libx264 from an IDR and the stats say so."""
    opener = FailingHardwareOpener(fail_at=20)
    with encoder_actor(quality(640, 360, 600_000), codec="h264_nvenc", opener=opener) as (
        actor,
        cap,
        _,
    ):
        (ring,) = readers(actor)
        cap.feed(5)
        stats = settle(actor, 4)
        assert stats.codec == "h264_nvenc" and stats.hardware
        cap.feed(35)
        stats = settle(actor, 38)
        assert stats.error is None
        assert stats.hardware_fallbacks == 1 and stats.codec == SOFTWARE_ENCODER
        assert stats.fallback_reason is not None and "device lost" in stats.fallback_reason
        packets = ring.read_available().packets
        keyframes = [n for n, p in enumerate(packets) if p.keyframe]
        assert keyframes == [0, 20]
        decoder, frames = decode_all(packets)
        assert decoder.decode_errors == 0 and len(frames) == len(packets)
        ring.ring.close()
