"""Frame handoff between two Ray actors: shared-memory frame pool vs Ray's object store.

Both paths hand the consumer actor a private copy of one yuv420p frame and both include one
Ray actor call (in the pool path it carries only the sequence number, as in the pipeline).
Two figures per size:

- end to end: from the producer starting the handoff to the consumer holding the pixels,
  measured on CLOCK_MONOTONIC, which all processes on a node share;
- data path only: the work each side does on the pixels (pool write + pool read, vs
  ``ray.put`` + ``ray.get`` and copy), with the actor call taken out.

Usage: python -m perf.bench_pool_handoff [--frames N] [--json]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import ray

from perf._report import emit, percentiles_ms
from shared.models import PixelFormat
from shared.pool.frame_pool import FramePool, FramePoolReader
from shared.pool.shm import segment_name, unlink_segment

SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}


class Consumer:
    def __init__(self, pool_name: str, size: int) -> None:
        self._reader = FramePoolReader(FramePool.attach(pool_name))
        self._buffer = np.empty(size, dtype=np.uint8)

    def take_from_pool(self, sequence: int, sent_ns: int) -> tuple[int, int]:
        started = time.perf_counter_ns()
        frame = self._reader.read(sequence, out=self._buffer)
        done = time.perf_counter_ns()
        assert frame is not None and frame.sequence == sequence
        return done - sent_ns, done - started

    def take_from_object_store(self, refs: list[Any], sent_ns: int) -> tuple[int, int]:
        started = time.perf_counter_ns()
        array = ray.get(refs[0])  # zero-copy view of the plasma object
        np.copyto(self._buffer, array)
        done = time.perf_counter_ns()
        return done - sent_ns, done - started


class Producer:
    def __init__(self, pool_name: str, width: int, height: int) -> None:
        self._width, self._height = width, height
        self._pool = FramePool.create(pool_name, slot_bytes=width * height * 3 // 2, slots=4)
        self._frame = np.random.default_rng(1).integers(
            0, 255, width * height * 3 // 2, dtype=np.uint8
        )

    def run(self, consumer: Any, mode: str, frames: int) -> dict[str, list[int]]:
        end_to_end, data_path = [], []
        for _ in range(frames):
            self._frame[:64] += 1  # a different frame each time
            if mode == "pool":
                sent = time.perf_counter_ns()
                sequence = self._pool.write(
                    self._frame,
                    capture_us=0,
                    monotonic_us=0,
                    width=self._width,
                    height=self._height,
                    pixel_format=PixelFormat.YUV420P,
                )
                write_ns = time.perf_counter_ns() - sent
                total, read_ns = ray.get(consumer.take_from_pool.remote(sequence, sent))
            else:
                sent = time.perf_counter_ns()
                ref = ray.put(self._frame)
                write_ns = time.perf_counter_ns() - sent
                # Passed inside a list so Ray hands the consumer the reference, not the value:
                # the consumer's ray.get is then part of what is measured.
                total, read_ns = ray.get(consumer.take_from_object_store.remote([ref], sent))
                del ref
            end_to_end.append(total)
            data_path.append(write_ns + read_ns)
        return {"end_to_end": end_to_end, "data_path": data_path}

    def close(self) -> None:
        self._pool.close()
        self._pool.unlink()


def measure(label: str, width: int, height: int, frames: int) -> dict[str, Any]:
    name = segment_name(f"bench{label}", "frames")
    unlink_segment(name)
    producer: Any = ray.remote(Producer).options(num_cpus=0).remote(name, width, height)
    ray.get(producer.__ray_ready__.remote())
    consumer: Any = ray.remote(Consumer).options(num_cpus=0).remote(name, width * height * 3 // 2)
    try:
        results: dict[str, dict[str, list[int]]] = {}
        for mode in ("pool", "object_store"):
            ray.get(producer.run.remote(consumer, mode, 10))  # warm up
            results[mode] = ray.get(producer.run.remote(consumer, mode, frames))
        ray.get(producer.close.remote())
    finally:
        ray.kill(consumer)
        ray.kill(producer)
        unlink_segment(name)
    pool, store = results["pool"], results["object_store"]
    pool_e2e, store_e2e = percentiles_ms(pool["end_to_end"]), percentiles_ms(store["end_to_end"])
    pool_data, store_data = percentiles_ms(pool["data_path"]), percentiles_ms(store["data_path"])
    return {
        "size": label,
        "frames": frames,
        "pool_end_to_end": pool_e2e,
        "object_store_end_to_end": store_e2e,
        "speedup_end_to_end_p50": round(store_e2e["p50_ms"] / pool_e2e["p50_ms"], 2),
        "pool_data_path": pool_data,
        "object_store_data_path": store_data,
        "speedup_data_path_p50": round(store_data["p50_ms"] / pool_data["p50_ms"], 2),
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
        for label, (width, height) in SIZES.items():
            emit("pool_handoff", measure(label, width, height, args.frames), as_json=args.json)
    finally:
        if started_here:
            ray.shutdown()


if __name__ == "__main__":
    main()
