"""Encoder throughput: the EncoderActor fed from the frame pool vs an in-process encode loop.

Both encode the same pre-rendered test pattern frames with the same encoder settings (libx264
veryfast zerolatency, threads as the actor picks them).  The baseline is a plain loop in this
process over PyAV (``shared.media.codec`` sessions), frames handed over with no copy.  The actor
figure is the pipeline's path: each frame written into a shared-memory pool, whose doorbell
wakes the actor (no Ray call per frame), copied out, encoded on a worker thread and appended to
the packet ring, whose doorbell wakes this producer in turn.

The producer keeps exactly one frame waiting: it writes frame k+1 as soon as frame k appears in
the ring, while the actor is still encoding frame k, so the actor never waits for input and the
producer adds one pool write per frame, as capture does.  The baseline runs before and after
the actor and the two are averaged, since this machine's other load drifts.  Target: the actor
reaches at least 0.95 of the baseline's frames per second (``ratio``).

Usage: python -m perf.bench_encoder [--frames N] [--json]
"""

from __future__ import annotations

import argparse
import select
import time
import uuid
from typing import Any

import msgspec
import numpy as np
import psutil
import ray

from actors.stages.encoder import EncoderActor, EncoderStats
from perf._report import emit
from shared.capture.testpattern import TestPattern
from shared.media.codec import TIME_BASE, EncoderConfig, H264Encoder
from shared.models import PixelFormat, QualityPreset, Resolution, StreamQuality
from shared.pool.frame_pool import FramePool, frame_bytes
from shared.pool.packet_ring import PacketRing
from shared.pool.shm import segment_name, unlink_segment

SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}
FPS = 30
#: Distinct frames rendered up front and cycled (rendering is not what is measured).
DISTINCT_FRAMES = 60
TARGET_RATIO = 0.95


def render(width: int, height: int) -> list[np.ndarray]:
    pattern = TestPattern(width, height, FPS)
    return [pattern.render(index, 0) for index in range(DISTINCT_FRAMES)]


def in_process(quality: StreamQuality, frames: list[np.ndarray], count: int) -> tuple[float, float]:
    """Frames per second and CPU milliseconds per frame of a plain encode loop."""
    width, height = quality.resolution.width, quality.resolution.height
    encoder = H264Encoder(
        EncoderConfig(
            width=width,
            height=height,
            framerate=quality.framerate,
            bitrate=quality.bitrate,
            keyframe_interval=60 * quality.framerate,
        )
    )
    step = TIME_BASE.denominator // quality.framerate
    for index in range(10):  # warm up
        encoder.encode(frames[index], pts=index * step, capture_us=0)
    started = time.perf_counter()
    p0 = time.process_time()
    for index in range(10, 10 + count):
        encoder.encode(frames[index % len(frames)], pts=index * step, capture_us=0)
    cpu_ms = (time.process_time() - p0) * 1000 / count
    return count / (time.perf_counter() - started), cpu_ms


class ActorRun(msgspec.Struct, frozen=True):
    fps: float
    dropped: int
    #: CPU of the whole actor process per frame: the encode, the event loop, Ray's threads.
    cpu_ms: float
    #: CPU of the worker thread per frame: scaling and encoding only.
    encode_cpu_ms: float


def through_actor(
    quality: StreamQuality,
    frames: list[np.ndarray],
    count: int,
    rungs: tuple[QualityPreset, ...] = (),
) -> ActorRun:
    """Rung 0's throughput through the actor, fed from the pool as capture feeds it."""
    sid = uuid.uuid4().hex[:10]
    width, height = quality.resolution.width, quality.resolution.height
    pool_name, ring_name = segment_name(sid, "frames"), segment_name(sid, "video")
    pool = FramePool.create(
        pool_name, slot_bytes=frame_bytes(width, height, PixelFormat.YUV420P), slots=4
    )
    actor: Any = (
        ray.remote(EncoderActor)
        .options(num_cpus=0)
        .remote(sid, quality, 60.0, pool_name, ring_name, rungs)
    )
    try:
        process = psutil.Process(ray.get(actor.open.remote()))
        ring = PacketRing.attach(ring_name)
        bell = ring.listen()
        frame_us = 1_000_000 // quality.framerate

        def write(index: int) -> None:
            pool.write(  # rings the pool's doorbell: the actor wakes
                frames[index % len(frames)],
                capture_us=index * frame_us,
                monotonic_us=index * frame_us,  # pts come from it: the same as the baseline's
                width=width,
                height=height,
                pixel_format=PixelFormat.YUV420P,
            )

        def run(first: int, total: int) -> float:
            done = ring.last_sequence()
            write(first)
            started = time.perf_counter()
            for index in range(first + 1, first + total + 1):
                write(index)  # waits in the pool while the actor encodes the one before
                while ring.last_sequence() == done:
                    select.select([bell], [], [], 1.0)  # the ring's doorbell: a packet is in
                    bell.drain()
                done = ring.last_sequence()
            return time.perf_counter() - started

        run(0, 10)  # warm up
        time.sleep(0.2)  # let the last warm-up frame finish
        cpu_before = sum(process.cpu_times()[:2])
        elapsed = run(11, count)
        actor_cpu = sum(process.cpu_times()[:2]) - cpu_before
        stats: EncoderStats = ray.get(actor.stop.remote())
        bell.close()
        ring.close()
        return ActorRun(
            fps=count / elapsed,
            dropped=stats.frames_dropped,
            cpu_ms=actor_cpu * 1000 / count,
            encode_cpu_ms=stats.rungs[0].encode_cpu_ms,
        )
    finally:
        ray.kill(actor)
        pool.close()
        pool.unlink()
        for name in (ring_name, segment_name(sid, "video1"), segment_name(sid, "video2")):
            unlink_segment(name)


def measure(label: str, width: int, height: int, count: int) -> dict[str, Any]:
    quality = StreamQuality(
        resolution=Resolution(width, height), framerate=FPS, bitrate=width * height * 2
    )
    frames = render(width, height)
    before, cpu_before = in_process(quality, frames, count)
    actor = through_actor(quality, frames, count)
    after, cpu_after = in_process(quality, frames, count)
    baseline = (before + after) / 2
    ratio = actor.fps / baseline
    return {
        "size": label,
        "frames": count,
        "in_process_fps": round(baseline, 1),
        "in_process_fps_before_after": [round(before, 1), round(after, 1)],
        "actor_fps": round(actor.fps, 1),
        "actor_frames_dropped": actor.dropped,
        "ratio": round(ratio, 3),
        "target": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        # Where the difference goes: CPU per frame of the plain loop, of the actor's encode
        # thread (the same work), and of the whole actor process.
        "in_process_cpu_ms_per_frame": round((cpu_before + cpu_after) / 2, 2),
        "actor_encode_cpu_ms_per_frame": round(actor.encode_cpu_ms, 2),
        "actor_process_cpu_ms_per_frame": round(actor.cpu_ms, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for label, (width, height) in SIZES.items():
            emit("encoder", measure(label, width, height, args.frames), as_json=args.json)
    finally:
        if started_here:
            ray.shutdown()


if __name__ == "__main__":
    main()
