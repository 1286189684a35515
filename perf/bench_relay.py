"""Which carrier takes a stream's packets to another node: a TCP relay, or Ray object refs.

Both carriers copy one origin ring into a second ring, between two actors, as a relay between
nodes does (on this machine both "nodes" share the host; the TCP path crosses loopback, the Ray
path crosses Ray's task transport and, for batches over its inline limit, the object store):

- ``tcp``: :class:`actors.stages.relay.RelayOriginActor` → :class:`NodeRelayActor`, the
  project's relay (:mod:`shared.relay.link`);
- ``ray``: an actor reads the origin ring on its doorbell and sends each wake-up's packets to a
  sink actor with ``sink.push.remote(batch)`` (what "Ray object references batched per few
  frames" costs when the batch is a wake-up's packets), and the sink appends them.

The driver writes synthetic H.264-sized packets into the origin ring at 30 frames per second
(a keyframe every 2 s, ``--mbps`` in all) with the wall-clock capture time, and reads the copy
as a shard would, measuring each packet's delay from append to arrival in the copy.  The
relays' CPU (both processes, user + system) is read from /proc before and after.

Figures: ``{tcp,ray}_delay_p50_ms``, ``{tcp,ray}_delay_p99_ms``, ``{tcp,ray}_cpu_pct``
(percent of one core for the two relay processes together) and ``cpu_ratio`` (ray / tcp).

Usage: python -m perf.bench_relay [--seconds S] [--mbps M] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from typing import Any

import numpy as np
import psutil
import ray

from actors.stages.relay import NodeRelayActor, RelayOriginActor
from perf._report import emit
from shared.pool.packet_ring import PacketRing, PacketRingReader, RingPacket
from shared.relay.downlink import RelayDownlink

FPS = 30
KEYFRAME_EVERY = 60
RING_BYTES = 16 << 20


class RayPushSource:
    """Reads a ring on its doorbell and pushes each wake-up's packets to a sink actor."""

    def __init__(self, ring_name: str, sink: Any) -> None:
        self._ring = PacketRing.attach(ring_name)
        self._sink = sink
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        bell = self._ring.listen()
        reader = PacketRingReader(self._ring, start="latest_keyframe")
        wake = asyncio.Event()
        bell.watch(asyncio.get_running_loop(), wake.set)

        async def pump() -> None:
            while not bell.writer_gone:
                await wake.wait()
                wake.clear()
                batch = reader.read_available()
                if batch.packets:
                    # Not awaited: a relay must not wait for the far end per batch.
                    self._sink.push.remote(batch.packets)

        self._task = asyncio.create_task(pump())
        return os.getpid()


class RayPushSink:
    def __init__(self, ring_name: str) -> None:
        self._ring = PacketRing.create(ring_name, capacity_bytes=RING_BYTES)
        self._downlink = RelayDownlink(1)

    def pid(self) -> int:
        return os.getpid()

    def push(self, packets: list[RingPacket]) -> None:
        for packet in packets:
            if self._downlink.accept(0, packet):
                self._ring.append(
                    packet.data,
                    pts=packet.pts,
                    capture_us=packet.capture_us,
                    monotonic_us=packet.monotonic_us,
                    keyframe=packet.keyframe,
                    duration=packet.duration,
                )

    def close(self) -> None:
        self._ring.unlink()
        self._ring.close()


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


async def drive(origin: PacketRing, copy_name: str, seconds: float, mbps: float) -> list[float]:
    """Append packets at the frame rate; the delay (ms) of each packet read from the copy."""
    deadline = time.monotonic() + 10
    while True:
        try:
            copy = PacketRing.attach(copy_name)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    frame_bytes = int(mbps * 1e6 / 8 / FPS)
    delays: list[float] = []
    reader = PacketRingReader(copy)
    bell = copy.listen()
    wake = asyncio.Event()
    bell.watch(asyncio.get_running_loop(), wake.set)

    began_us = time.time() * 1e6

    async def read() -> None:
        while True:
            await wake.wait()
            wake.clear()
            now_us = time.time() * 1e6
            for packet in reader.read_available().packets:
                if packet.capture_us >= began_us:  # not an earlier run's packets
                    delays.append((now_us - packet.capture_us) / 1000)

    reading = asyncio.create_task(read())
    try:
        start = time.monotonic()
        for index in range(int(seconds * FPS)):
            keyframe = index % KEYFRAME_EVERY == 0
            size = frame_bytes * (4 if keyframe else 1)
            now = time.time()
            origin.append(
                b"\x00" * size,
                pts=index * 3000,
                capture_us=int(now * 1e6),
                monotonic_us=int(time.monotonic() * 1e6),
                keyframe=keyframe,
                duration=3000,
            )
            await asyncio.sleep(max(0.0, start + (index + 1) / FPS - time.monotonic()))
        await asyncio.sleep(0.5)  # the last packets arrive
    finally:
        reading.cancel()
        bell.close()
        copy.close()
    return delays[FPS:]  # after a second's warm-up


async def run_tcp(origin: PacketRing, sid: str, seconds: float, mbps: float) -> dict[str, Any]:
    origin_actor: Any = (
        ray.remote(RelayOriginActor).options(num_cpus=0).remote(sid, {"v": origin.name})
    )
    address = await origin_actor.open.remote()
    receiver: Any = ray.remote(NodeRelayActor).options(num_cpus=0).remote(sid, address, ["v"], "t")
    rings = await receiver.open.remote()
    pids = [await origin_actor.pid.remote(), await receiver.pid.remote()]
    try:
        before = cpu_seconds(pids)
        delays = await drive(origin, rings["v"], seconds, mbps)
        cpu = cpu_seconds(pids) - before
    finally:
        await receiver.stop.remote()
        await origin_actor.stop.remote()
        for actor in (receiver, origin_actor):
            ray.kill(actor)
    return summary(delays, cpu, seconds)


async def run_ray(origin: PacketRing, sid: str, seconds: float, mbps: float) -> dict[str, Any]:
    copy_name = f"kz_{sid}_r-v"
    sink: Any = ray.remote(RayPushSink).options(num_cpus=0).remote(copy_name)
    source: Any = ray.remote(RayPushSource).options(num_cpus=0).remote(origin.name, sink)
    pids = [await sink.pid.remote(), await source.start.remote()]
    try:
        before = cpu_seconds(pids)
        delays = await drive(origin, copy_name, seconds, mbps)
        cpu = cpu_seconds(pids) - before
    finally:
        await sink.close.remote()
        for actor in (source, sink):
            ray.kill(actor)
    return summary(delays, cpu, seconds)


def summary(delays: list[float], cpu_s: float, seconds: float) -> dict[str, Any]:
    values = np.asarray(delays)
    return {
        "delay_p50_ms": round(float(np.percentile(values, 50)), 3),
        "delay_p99_ms": round(float(np.percentile(values, 99)), 3),
        "cpu_pct": round(100 * cpu_s / seconds, 2),
        "packets": len(delays),
    }


async def bench(seconds: float, mbps: float) -> dict[str, Any]:
    sid = uuid.uuid4().hex[:10]
    origin = PacketRing.create(f"kz_{sid}_v", capacity_bytes=RING_BYTES)
    try:
        tcp = await run_tcp(origin, sid, seconds, mbps)
        over_ray = await run_ray(origin, sid, seconds, mbps)
    finally:
        origin.unlink()
        origin.close()
    result: dict[str, Any] = {"seconds": seconds, "mbps": mbps}
    for name, figures in (("tcp", tcp), ("ray", over_ray)):
        result.update({f"{name}_{key}": value for key, value in figures.items()})
    result["cpu_ratio"] = round(over_ray["cpu_pct"] / max(tcp["cpu_pct"], 1e-9), 2)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_relay", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--mbps", type=float, default=6.0, help="all rungs together")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    started = ray.is_initialized()
    if not started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = asyncio.run(bench(args.seconds, args.mbps))
    finally:
        if not started:
            ray.shutdown()
    emit("relay", result, as_json=args.json)
    return result


if __name__ == "__main__":
    main()
