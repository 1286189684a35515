"""Frame handoff between two Ray actors: shared-memory frame pool vs Ray's object store.

Each arm hands the consumer actor a private copy of one yuv420p frame and wakes it the way that
path really wakes its reader in a pipeline:

- pool: the frame is made in a pool slot (capture converts each picture straight into one,
  ``FramePool.writing``), and the handoff starts when the slot is committed: the commit rings
  the pool's doorbell (``shared.pool.doorbell``), the consumer's event loop wakes on it
  (``loop.add_reader``) and copies the newest frame out, exactly as the encoder actor does.  No
  Ray call per frame.
- object store: the frame is made in the producer's memory, and the handoff starts when the
  producer ``ray.put``s it and makes the Ray actor call that carries the reference (nobody waits
  for its result, as a per-frame notification would); the consumer awaits the reference and
  copies the pixels out.

Frames are handed over at a steady 100 per second (every 10 ms), so each handoff finds the
consumer idle and the figure is the wake-up plus the copy, not a queue.  Two figures per size:

- end to end: from the producer starting the handoff to the consumer holding the pixels,
  measured on CLOCK_MONOTONIC, which all processes on a node share;
- data path only: the work each side does on the pixels (pool commit + pool read, vs
  ``ray.put`` + getting and copying), with the wake-up taken out.

``ratio`` is the object store's end-to-end p50 over the pool's.  Targets (the data-plane
issue): ratio at least 10, and the pool's p50 at most 0.3 ms at 1080p.

Usage: python -m perf.bench_pool_handoff [--frames N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import numpy as np
import ray

from perf._report import emit, percentiles_ms
from shared.models import PixelFormat
from shared.pool.doorbell import DoorbellListener
from shared.pool.frame_pool import FramePool, FramePoolReader
from shared.pool.shm import segment_name, unlink_segment

SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}
INTERVAL_S = 0.010
TARGET_RATIO = 10.0
TARGET_POOL_P50_MS_1080P = 0.3


class Consumer:
    """An async actor, as the pipeline's readers are: its event loop does the waking."""

    def __init__(self, pool_name: str, size: int) -> None:
        self._pool = FramePool.attach(pool_name)
        self._reader = FramePoolReader(self._pool)
        self._buffer = np.empty(size, dtype=np.uint8)
        self._bell: DoorbellListener | None = None
        #: sequence (or call number) -> (done, read time), in ns
        self._taken: dict[int, tuple[int, int]] = {}

    async def listen(self) -> None:
        """Wake on the pool's doorbell from now on (the encoder's wake-up)."""
        self._bell = self._pool.listen()
        self._bell.watch(asyncio.get_running_loop(), self._on_ring)

    def _on_ring(self) -> None:
        started = time.monotonic_ns()
        frame = self._reader.read_latest(out=self._buffer)
        done = time.monotonic_ns()
        if frame is not None:
            self._taken[frame.sequence] = (done, done - started)

    async def take(self, refs: list[Any], number: int) -> None:
        """The object store's handoff: the call carries the reference."""
        started = time.monotonic_ns()
        array = await refs[0]  # zero-copy view of the plasma object
        np.copyto(self._buffer, array)
        done = time.monotonic_ns()
        self._taken[number] = (done, done - started)

    async def results(self) -> dict[int, tuple[int, int]]:
        """What was measured since the last call, and start afresh."""
        taken, self._taken = self._taken, {}
        if self._bell is not None:
            self._bell.close()
            self._bell = None
        return taken

    async def close(self) -> None:
        self._pool.close()


class Producer:
    def __init__(self, pool_name: str, width: int, height: int) -> None:
        self._width, self._height = width, height
        self._pool = FramePool.create(pool_name, slot_bytes=width * height * 3 // 2, slots=4)
        self._frame = np.random.default_rng(1).integers(
            0, 255, width * height * 3 // 2, dtype=np.uint8
        )

    def run(self, consumer: Any, mode: str, frames: int) -> dict[int, tuple[int, int]]:
        """Hand ``frames`` frames over at INTERVAL_S: per sequence (or call number), when the
        handoff started and the producer's own time on it (ns)."""
        sent: dict[int, tuple[int, int]] = {}
        calls = []
        next_at = time.monotonic()
        for number in range(1, frames + 1):
            next_at += INTERVAL_S
            time.sleep(max(0.0, next_at - time.monotonic()))
            self._frame[:64] += 1  # a different frame each time
            if mode == "pool":
                with self._pool.writing(
                    width=self._width,
                    height=self._height,
                    pixel_format=PixelFormat.YUV420P,
                    capture_us=0,
                    monotonic_us=0,
                ) as slot:
                    np.copyto(slot, self._frame)  # making the frame: capture's conversion
                    started = time.monotonic_ns()
                # Leaving the block committed the slot and rang the doorbell: the wake-up.
                sequence = self._pool.latest_sequence()
                sent[sequence] = (started, time.monotonic_ns() - started)
            else:
                started = time.monotonic_ns()
                ref = ray.put(self._frame)
                put_ns = time.monotonic_ns() - started
                # Inside a list so Ray hands the consumer the reference, not the value: getting
                # it is part of what is measured.
                calls.append(consumer.take.remote([ref], number))
                sent[number] = (started, put_ns)
                del ref
        ray.get(calls)
        return sent

    def close(self) -> None:
        self._pool.close()
        self._pool.unlink()


def measure(label: str, width: int, height: int, frames: int) -> dict[str, Any]:
    name = segment_name(f"bench{label}", "frames")
    unlink_segment(name)
    producer: Any = ray.remote(Producer).options(num_cpus=0).remote(name, width, height)
    ray.get(producer.__ray_ready__.remote())
    consumer: Any = ray.remote(Consumer).options(num_cpus=0).remote(name, width * height * 3 // 2)
    results: dict[str, tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int]]]] = {}
    try:
        for mode in ("pool", "object_store"):
            if mode == "pool":
                ray.get(consumer.listen.remote())
            ray.get(producer.run.remote(consumer, mode, 10))  # warm up
            time.sleep(0.1)
            ray.get(consumer.results.remote())
            if mode == "pool":
                ray.get(consumer.listen.remote())
            sent = ray.get(producer.run.remote(consumer, mode, frames))
            time.sleep(0.1)  # the last wake-up lands
            results[mode] = (sent, ray.get(consumer.results.remote()))
        ray.get(consumer.close.remote())
        ray.get(producer.close.remote())
    finally:
        ray.kill(consumer)
        ray.kill(producer)
        unlink_segment(name)
    figures: dict[str, Any] = {}
    for mode, (sent, taken) in results.items():
        both = sorted(sent.keys() & taken.keys())
        figures[mode] = (
            percentiles_ms([taken[n][0] - sent[n][0] for n in both]),
            percentiles_ms([sent[n][1] + taken[n][1] for n in both]),
            len(both),
        )
    (pool_e2e, pool_data, pool_count) = figures["pool"]
    (store_e2e, store_data, store_count) = figures["object_store"]
    ratio = round(store_e2e["p50_ms"] / pool_e2e["p50_ms"], 2)
    result = {
        "size": label,
        "frames": frames,
        "pool_frames_received": pool_count,
        "object_store_frames_received": store_count,
        "pool_p50_ms": pool_e2e["p50_ms"],
        "object_store_p50_ms": store_e2e["p50_ms"],
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_ratio_target": ratio >= TARGET_RATIO,
        "pool_end_to_end": pool_e2e,
        "object_store_end_to_end": store_e2e,
        "speedup_end_to_end_p50": ratio,
        "pool_data_path": pool_data,
        "object_store_data_path": store_data,
        "speedup_data_path_p50": round(store_data["p50_ms"] / pool_data["p50_ms"], 2),
    }
    if label == "1080p":
        result["target_pool_p50_ms"] = TARGET_POOL_P50_MS_1080P
        result["meets_pool_p50_target"] = pool_e2e["p50_ms"] <= TARGET_POOL_P50_MS_1080P
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for label, (width, height) in SIZES.items():
            emit("pool_handoff", measure(label, width, height, args.frames), as_json=args.json)
    finally:
        if started_here:
            ray.shutdown()


if __name__ == "__main__":
    main()
