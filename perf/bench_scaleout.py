"""Viewers served from 1, 2 and 3 nodes of a local test cluster, and the relay's delay.

For each node count N, a fresh ``ray.cluster_utils.Cluster`` (a head and N-1 worker raylets,
each declaring ``--cpus-per-node`` CPUs to Ray), one stream encoded on the head, one sender
shard per node — on the head reading the encoder's rings, on each worker reading its relay's
copy (:mod:`actors.remote_shards`) — and ``--viewers-per-node`` light viewers (they receive and
reassemble, they do not decode; ``shared.viewer.light``) on each shard for ``--seconds``.

Figures per run: ``viewers`` (still watching at the end), ``delivered_mbps`` (all viewers),
``fps_median``, ``late_frame_ratio``; and ``relay_delay_p50_ms`` / ``relay_delay_p99_ms``
(capture to the remote node's ring, over every remote node of the largest run).

What these figures can say: that each added node serves its share through one relay copy, and
what the relay adds to latency when nodes share a host.  What they cannot say: a real
cluster's capacity.  The "nodes" of a test cluster share this machine's cores, memory bus and
loopback interface, and Ray's CPU counts are accounting, not limits; on a 2-core machine more
nodes mean more processes on the same two cores.  ``deploy/README.md`` has the capacity model
for real nodes (viewers per core from the shard arm of ``bench_fanout``, and the NIC's rate).

Usage: python -m perf.bench_scaleout [--nodes 1,2,3] [--viewers-per-node 10] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from typing import Any

import ray
from ray.cluster_utils import Cluster

from actors import StreamManager
from actors.handles import EncoderHandle, SenderHandle
from actors.placement import NAMESPACE, spawn
from actors.remote_shards import RemoteNode, StreamOrigin, actor_node
from actors.stages.sender import SenderActor
from perf._report import emit
from shared.models import Resolution, StreamConfig, StreamQuality
from shared.pool.shm import segment_name
from shared.roq.tls import generate_self_signed
from shared.viewer.load import LoadTest

QUALITY = StreamQuality(resolution=Resolution(640, 360), framerate=30, bitrate=800_000)


async def one_run(viewers_per_node: int, seconds: float) -> dict[str, Any]:
    identity = generate_self_signed("127.0.0.1")
    async with StreamManager.start() as manager:
        sid = (await manager.start_camera_stream(StreamConfig(quality=QUALITY))).session_id
        encoder_actor = ray.get_actor(f"kz-{sid}-encoder", namespace=NAMESPACE)
        encoder = EncoderHandle(encoder_actor)
        head = actor_node(encoder_actor)
        others = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head]
        origin = await StreamOrigin.start(sid, head, ["video"]) if others else None
        local = spawn(SenderActor, SenderHandle, name=f"kz-{sid}-bench-shard", node_id=head)(
            sid, "bench-shard", segment_name(sid, "video"), encoder
        )
        remote: list[RemoteNode] = []
        try:
            urls = [await local.open("127.0.0.1", 0, identity)]
            for index, node_id in enumerate(others):
                assert origin is not None
                node = await RemoteNode.open(origin, node_id, f"b{index}")
                remote.append(node)
                urls.append((await node.add_shard(encoder, identity, host="127.0.0.1"))[1])
            tests = [
                LoadTest(url, viewers_per_node, seconds, ramp_s=min(2.0, seconds / 4))
                for url in urls
            ]
            reports = await asyncio.gather(*(test.run() for test in tests))
            delays = [await node.relay.stats() for node in remote]
        finally:
            for node in remote:
                await node.close()
            try:
                await local.stop()
            finally:
                local.kill()
            if origin is not None:
                await origin.stop()
        await manager.stop_stream(sid)
    summaries = [report.summary for report in reports]
    fps = [s.fps_median for s in summaries if s.fps_median is not None]
    frames = sum(s.frames for s in summaries)
    return {
        "nodes": 1 + len(others),
        "viewers": sum(s.watching for s in summaries),
        "delivered_mbps": round(sum(s.mbps for s in summaries), 2),
        "fps_median": round(statistics.median(fps), 1) if fps else None,
        "late_frame_ratio": round(sum(s.late for s in summaries) / max(frames, 1), 4),
        "relay_delay_p50_ms": [d.delay_p50_ms for d in delays],
        "relay_delay_p99_ms": [d.delay_p99_ms for d in delays],
    }


def run_with_nodes(nodes: int, cpus_per_node: int, viewers: int, seconds: float) -> dict[str, Any]:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False},
    )
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        try:
            return asyncio.run(one_run(viewers, seconds))
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_scaleout", description=__doc__)
    parser.add_argument("--nodes", default="1,2,3", help="node counts to run, comma-separated")
    parser.add_argument("--viewers-per-node", type=int, default=10)
    parser.add_argument("--cpus-per-node", type=int, default=1, help="each node's CPUs for Ray")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.nodes.split(",")]
    if ray.is_initialized():
        parser.error("run it in its own process: it starts its own test clusters")
    runs = [
        run_with_nodes(n, args.cpus_per_node, args.viewers_per_node, args.seconds) for n in counts
    ]
    largest = max(runs, key=lambda r: r["nodes"])
    p50 = [d for d in largest["relay_delay_p50_ms"] if d is not None]
    p99 = [d for d in largest["relay_delay_p99_ms"] if d is not None]
    result: dict[str, Any] = {
        "runs": runs,
        "relay_delay_p50_ms": round(statistics.median(p50), 2) if p50 else None,
        "relay_delay_p99_ms": round(max(p99), 2) if p99 else None,
        "caveat": (
            "test-cluster nodes share this machine's cores and loopback: the runs show one "
            "relay copy per node and its delay, not a real cluster's capacity (deploy/README.md)"
        ),
    }
    emit("scaleout", result, as_json=args.json)
    return result


if __name__ == "__main__":
    main()
