"""EncoderActor on the session's real Ray cluster, fed through a real frame pool.

The test process plays capture (test pattern frames written into the pool, whose doorbell wakes
the actor: no Ray call per frame) and plays the viewers (listening to the packet rings'
doorbells, reading the rings and decoding with FFmpeg).

What the ladder decides (pts, decimation, keyframes, reconfiguration) is tested with literal
times in tests/test_ladder.py; here the shell is: frames read from the pool, each rung's access
units in its own ring, each ring's readers woken by its doorbell, control calls reaching the
encoders.  So that
nothing depends on how fast this loaded machine runs, capture hands the encoder one frame at a
time (the next is written once the actor has taken the last) and stamps them 1/30 s apart on
the monotonic clock: every frame is encoded and the counts are exact.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import ray

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
#: Monotonic capture time of the first frame (any value: only differences count).
ORIGIN_US = 1_000_000_000
T = TypeVar("T")


def quality(width: int, height: int, bitrate: int, fps: int = FPS) -> StreamQuality:
    return StreamQuality(resolution=Resolution(width, height), framerate=fps, bitrate=bitrate)


def wait_for(probe: Callable[[], T], done: Callable[[T], bool], what: str) -> T:
    """``probe()`` once ``done`` holds for it; fails the test after a minute (a hang guard:
    nothing here depends on how long it takes)."""
    deadline = time.monotonic() + 60.0
    while not done(value := probe()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last seen: {value}")
        time.sleep(0.005)
    return value


class Capture:
    """Writes test pattern frames into the pool (its doorbell wakes the actor), one at a time."""

    def __init__(self, pool: FramePool, actor: Any, width: int, height: int) -> None:
        self.pool, self.actor = pool, actor
        self.width, self.height = width, height
        self.pattern = TestPattern(width, height, FPS)
        self.index = 0

    def feed(self, frames: int, between: Callable[[], object] = lambda: None) -> None:
        """Write ``frames`` frames, each once the actor took the one before; ``between`` runs
        after each frame is taken."""
        for _ in range(frames):
            capture_us = time.time_ns() // 1000
            sequence = self.pool.write(
                self.pattern.render(self.index, capture_us),
                capture_us=capture_us,
                monotonic_us=ORIGIN_US + self.index * 1_000_000 // FPS,
                width=self.width,
                height=self.height,
                pixel_format=PixelFormat.YUV420P,
            )
            self.index += 1
            self.wait_taken(sequence)
            between()

    def wait_taken(self, sequence: int) -> None:
        wait_for(
            lambda: stats(self.actor).frames_taken,
            lambda taken: taken >= sequence,
            f"frame {sequence} to be taken",
        )


def stats(actor: Any) -> EncoderStats:
    result: EncoderStats = ray.get(actor.stats.remote())
    return result


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
        # Stop also when the test failed, to remove the rings; an error stopping is raised
        # (chained to the test's own, if any), never swallowed.
        try:
            final: EncoderStats = ray.get(actor.stop.remote())
        finally:
            ray.kill(actor)
            pool.close()
            pool.unlink()
    assert final.error is None
    wait_for_no_leaks(sid)


def readers(actor: Any) -> list[PacketRingReader]:
    return [
        PacketRingReader(PacketRing.attach(name)) for name in ray.get(actor.rung_names.remote())
    ]


def settle(actor: Any, *frames: int) -> EncoderStats:
    """Wait until rung n has encoded ``frames[n]`` frames in all (and no more), and its ring
    holds them: the codec counts a frame on the encoder's worker thread, before the event
    loop appends its access unit to the ring, so the count alone can run one frame ahead."""
    done = wait_for(
        lambda: stats(actor),
        lambda s: all(r.frames_encoded >= n for r, n in zip(s.rungs, frames, strict=True)),
        f"rungs to encode {frames} frames",
    )
    assert [r.frames_encoded for r in done.rungs] == list(frames)
    rings = [PacketRing.attach(r.ring) for r in done.rungs]
    try:
        wait_for(
            lambda: [ring.last_sequence() for ring in rings],
            lambda written: written == list(frames),
            f"rings to hold {frames} access units",
        )
    finally:
        for ring in rings:
            ring.close()
    return done


def decode_all(packets: list[RingPacket]) -> tuple[H264Decoder, list[tuple[int, int, int]]]:
    decoder = H264Decoder()
    frames = []
    for packet in packets:
        for frame in decoder.decode(packet.data, pts=packet.pts):
            frames.append((frame.width, frame.height, int(frame.pts or 0)))
    return decoder, frames


def test_a_ladder_writes_each_rung_to_its_own_ring_and_rings_its_readers(ray_cluster: str) -> None:
    with encoder_actor(quality(960, 540, 1_200_000), (QualityPreset.LOW,)) as (actor, cap, sid):
        assert ray.get(actor.rung_names.remote()) == ladder_ring_names(sid, 2)
        ladder = ray.get(actor.ladder.remote())
        assert [(r.width, r.height, r.framerate) for r in ladder] == [
            (960, 540, 30),
            (854, 480, 15),
        ]
        rings = readers(actor)
        bells = [ring.ring.listen() for ring in rings]
        cap.feed(60, between=lambda: [bell.drain() for bell in bells])
        final = settle(actor, 60, 30)  # rung 1 at 15 fps: every other frame, by timestamp
        packets = [ring.read_available().packets for ring in rings]
        for n, rung in enumerate(ladder):
            decoder, frames = decode_all(packets[n])
            assert decoder.decode_errors == 0 and len(frames) == len(packets[n])
            assert {(w, h) for w, h, _ in frames} == {(rung.width, rung.height)}
            assert packets[n][0].keyframe
        # (With the final stats, so that a miss says whether the encoder reported an error.)
        assert [len(p) for p in packets] == [60, 30], (final, stats(actor))
        # Each ring's doorbell rang its own readers up to its own newest packet.
        for bell, rung_packets in zip(bells, packets, strict=True):
            assert bell.drain() == rung_packets[-1].sequence
            bell.close()
        assert [r.readers for r in final.rungs] == [1, 1]
        assert [r.stalled_rings for r in final.rungs] == [0, 0]  # they were read as they came
        assert final.rungs[1].ring == segment_name(sid, "video1")
        assert final.codec == SOFTWARE_ENCODER and not final.hardware
        assert final.frames_encoded == final.rungs[0].frames_encoded == 60
        assert (final.frames_taken, final.frames_dropped) == (60, 0)
        for ring in rings:
            ring.ring.close()


def test_a_keyframe_request_is_served_by_the_next_frame(ray_cluster: str) -> None:
    with encoder_actor(quality(640, 360, 600_000), (QualityPreset.LOW,)) as (actor, cap, _):
        rings = readers(actor)
        cap.feed(20)
        settle(actor, 20, 10)
        for ring in rings:
            ring.read_available()
        ray.get(actor.request_keyframe.remote())
        cap.feed(10)
        settle(actor, 30, 15)
        # The first frame after the request returned is the IDR, and only on rung 0.
        assert [p.keyframe for p in rings[0].read_available().packets] == [True] + [False] * 9
        assert [p.keyframe for p in rings[1].read_available().packets] == [False] * 5
        # A request for rung 1 only.
        ray.get(actor.request_keyframe.remote(1))
        cap.feed(10)
        final = settle(actor, 40, 20)
        assert [p.keyframe for p in rings[1].read_available().packets] == [True] + [False] * 4
        assert [p.keyframe for p in rings[0].read_available().packets] == [False] * 10
        assert final.keyframe_requests == 2
        for ring in rings:
            ring.ring.close()


def test_reconfiguration_mid_stream_decodes_without_errors_at_a_viewer(ray_cluster: str) -> None:
    """Bitrate alone applies in place; a new size and frame rate start at an IDR with the
    timestamps running on, from pool frames still at the old size."""
    with encoder_actor(quality(640, 360, 600_000)) as (actor, cap, _):
        (ring,) = readers(actor)
        cap.feed(30)
        settle(actor, 30)
        ray.get(actor.configure.remote(quality(640, 360, 400_000)))
        cap.feed(15)
        in_place = settle(actor, 45)
        assert in_place.reconfigurations == 0 and in_place.target_bitrate == 400_000
        before = ring.read_available().packets
        applied = ray.get(actor.configure.remote(quality(480, 270, 300_000, fps=15)))
        assert applied.resolution == Resolution(480, 270)
        cap.feed(30)
        final = settle(actor, 60)  # 15 fps from a 30 fps pool: every other frame
        after = ring.read_available().packets
        assert final.reconfigurations == 1
        assert [p.keyframe for p in after] == [True] + [False] * 14  # an IDR at the new size
        decoder, frames = decode_all(before + after)
        assert decoder.decode_errors == 0 and len(frames) == len(before) + len(after) == 60
        sizes = [(w, h) for w, h, _ in frames]
        assert sizes == [(640, 360)] * 45 + [(480, 270)] * 15
        timestamps = [p for _, _, p in frames]
        assert timestamps == sorted(set(timestamps))
        # pts follow the frames' capture times, 1/30 s apart before and 1/15 s after (to the
        # tick: the stamps are whole microseconds), with no jump at the switch.
        steps = [b - a for a, b in itertools.pairwise(timestamps)]
        assert {round(step / 1500) for step in steps} == {2, 4}
        assert all(abs(step - 3000) <= 1 for step in steps[:45])
        assert all(abs(step - 6000) <= 1 for step in steps[45:])
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
        hardware = settle(actor, 5)
        assert hardware.codec == "h264_nvenc" and hardware.hardware
        cap.feed(35)
        final = settle(actor, 40)
        assert final.error is None
        assert final.hardware_fallbacks == 1 and final.codec == SOFTWARE_ENCODER
        assert final.fallback_reason is not None and "device lost" in final.fallback_reason
        packets = ring.read_available().packets
        assert [n for n, p in enumerate(packets) if p.keyframe] == [0, 20]
        decoder, frames = decode_all(packets)
        assert decoder.decode_errors == 0 and len(frames) == len(packets) == 40
        ring.ring.close()
