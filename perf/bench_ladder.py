"""Cost of a 3-rung quality ladder (simulcast) against the top rung alone.

The source is 1080p30; the ladder is the stream's HIGH quality plus MEDIUM (720p30) and LOW
(480p15) rungs, each scaled once from the source and encoded once.  Two figures, each with its
baseline measured in the same run:

- CPU per source frame in one thread: scaling plus every rung's encode, against the top rung's
  encode alone, both run by the ladder encoder core (``shared.media.ladder``) the actor runs.
  This is the work the ladder adds, whatever the core count.
- Throughput of rung 0 through the EncoderActor fed from the pool (as in bench_encoder), with
  the ladder and without: what the extra rungs cost the stream when they run on the actor's
  worker threads beside it.

Usage: python -m perf.bench_ladder [--frames N] [--json]
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import ray

from perf._report import emit
from perf.bench_encoder import render, through_actor
from shared.media.ladder import LadderEncoder
from shared.media.scaler import plan_ladder
from shared.models import PixelFormat, QualityPreset, StreamQuality
from shared.pool.frame_pool import FrameRead

SOURCE = StreamQuality.from_preset(QualityPreset.HIGH)
RUNGS = (QualityPreset.MEDIUM, QualityPreset.LOW)


def cpu_per_frame(
    frames: list[np.ndarray], count: int, rungs: tuple[QualityPreset, ...]
) -> dict[str, float]:
    """CPU milliseconds per source frame, scaling and encoding every rung due: the ladder
    encoder core (the loop the actor runs), on this thread, frames 1/30 s apart."""
    ladder = LadderEncoder(SOURCE, rungs, keyframe_interval_s=60.0)
    width, height = SOURCE.resolution.width, SOURCE.resolution.height
    scaling = encoding = 0.0
    try:
        for index in range(count + 10):
            if index == 10:  # warmed up
                scaling = encoding = 0.0
            frame = FrameRead(
                sequence=index + 1,
                capture_us=0,
                monotonic_us=index * 1_000_000 // SOURCE.framerate,
                width=width,
                height=height,
                pixel_format=PixelFormat.YUV420P,
                pixels=frames[index % len(frames)],
                missed=0,
            )
            output = ladder.encode(frame, now=index / SOURCE.framerate)
            scaling += sum(out.scale_cpu_s for out in output.rungs)
            encoding += sum(out.encode_cpu_s for out in output.rungs)
    finally:
        ladder.close()
    return {
        "scale_ms": round(scaling * 1000 / count, 3),
        "encode_ms": round(encoding * 1000 / count, 3),
        "total_ms": round((scaling + encoding) * 1000 / count, 3),
    }


def measure(count: int) -> dict[str, Any]:
    width, height = SOURCE.resolution.width, SOURCE.resolution.height
    frames = render(width, height)
    top = cpu_per_frame(frames, count, ())
    ladder = cpu_per_frame(frames, count, RUNGS)
    top_again = cpu_per_frame(frames, count, ())
    top_ms = (top["total_ms"] + top_again["total_ms"]) / 2
    alone = through_actor(SOURCE, frames, count)
    with_ladder = through_actor(SOURCE, frames, count, RUNGS)
    return {
        "source": f"{width}x{height}@{SOURCE.framerate}",
        "rungs": [
            f"{r.width}x{r.height}@{r.framerate} {r.bitrate // 1000} kbps"
            for r in plan_ladder(SOURCE, RUNGS).rungs
        ],
        "frames": count,
        "cpu_top_rung_ms_per_frame": round(top_ms, 2),
        "cpu_ladder_ms_per_frame": ladder,
        "cpu_ratio_ladder_vs_top": round(ladder["total_ms"] / top_ms, 3),
        "actor_fps_top_rung_alone": round(alone.fps, 1),
        "actor_fps_rung0_with_ladder": round(with_ladder.fps, 1),
        "actor_fps_ratio": round(with_ladder.fps / alone.fps, 3),
        "actor_process_cpu_ms_per_frame": [round(alone.cpu_ms, 2), round(with_ladder.cpu_ms, 2)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        emit("ladder", measure(args.frames), as_json=args.json)
    finally:
        if started_here:
            ray.shutdown()


if __name__ == "__main__":
    main()
