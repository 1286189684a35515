"""Scenarios on a multi-node Ray cluster on this machine, each run in its own process.

The test session shares one single-node Ray cluster (``tests/conftest.py``); a process can join
only one, so a scenario that needs several nodes starts its own ``ray.cluster_utils.Cluster``
(a head and worker nodes, each a real raylet with its own resources) in a child process:
``python -m tests.scaleout_scenarios NAME...`` prints one JSON object, each scenario's
findings, and the tests assert on them.  Everything it starts is stopped before it exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import ray
from ray.cluster_utils import Cluster

from actors import StreamManager
from actors.handles import EncoderHandle
from actors.placement import NAMESPACE
from actors.remote_shards import RemoteNode, StreamOrigin, actor_node
from shared.models import Resolution, StreamConfig, StreamQuality
from shared.pool.packet_ring import PacketRing
from shared.pool.shm import list_segments, segment_name, sweep_stale_segments
from shared.roq.tls import generate_self_signed
from shared.roq.url import StreamUrl
from shared.viewer.client import Viewer

QVGA = StreamQuality(resolution=Resolution(320, 240), framerate=30, bitrate=300_000)
FRAMES = 30


def start_cluster(workers: int) -> Cluster:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"head": 1}, "include_dashboard": False},
    )
    for index in range(workers):
        cluster.add_node(num_cpus=1, resources={f"edge{index}": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    return cluster


async def relay_to_two_nodes(cluster: Cluster) -> dict[str, Any]:
    """A stream on one node; each of two other nodes gets one relay and two shards, each
    shard a real viewer.  Findings: frames each viewer decoded, packets each node received
    from the origin, and the origin ring's packet count over the same time."""
    findings: dict[str, Any] = {}
    async with StreamManager.start() as manager:
        sid = (await manager.start_camera_stream(StreamConfig(quality=QVGA))).session_id
        encoder_actor = ray.get_actor(f"kz-{sid}-encoder", namespace=NAMESPACE)
        encoder = EncoderHandle(encoder_actor)
        origin_node = actor_node(encoder_actor)
        edges = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != origin_node]
        findings["nodes"] = 1 + len(edges)
        identity = generate_self_signed("127.0.0.1")
        ring = PacketRing.attach(segment_name(sid, "video"))
        before = ring.last_sequence()
        origin = await StreamOrigin.start(sid, origin_node, ["video"])
        nodes: list[RemoteNode] = []
        viewers: list[Viewer] = []
        try:
            for index, node_id in enumerate(edges):
                node = await RemoteNode.open(origin, node_id, f"e{index}")
                nodes.append(node)
                for _ in range(2):
                    _, url = await node.add_shard(encoder, identity, host="127.0.0.1")
                    viewers.append(await Viewer.connect(url))
            await asyncio.gather(*(v.watch(seconds=60, frames=FRAMES) for v in viewers))
            findings["frames"] = [v.frames_decoded for v in viewers]
            findings["decode_errors"] = [v.report().decode_errors for v in viewers]
            served = await origin.handle.stats()
            findings["forwarded"] = {
                tag: stats.packets_forwarded for tag, stats in sorted(served.nodes.items())
            }
            # Every packet the encoder wrote from before the first subscription to now.
            findings["ring_packets"] = ring.last_sequence() - before
            findings["relay_delay_p99_ms"] = [
                (await node.relay.stats()).delay_p99_ms for node in nodes
            ]
        finally:
            ring.close()
            for viewer in viewers:
                await viewer.close()
            for node in nodes:
                await node.close()
            await origin.stop()
        await manager.stop_stream(sid)
    findings["segments_left"] = list_segments(f"kz_{sid}_")
    return findings


async def node_loss(cluster: Cluster) -> dict[str, Any]:
    """Two other nodes serve the stream; a viewer watches through the first, its URL naming
    the second's shard as an alternate.  The first node is removed from the cluster (its
    raylet and every process on it killed).  Findings: the viewer's frames before and after,
    its reconnects, whether the origin dropped the lost node's relay, and the segments the
    lost node's relay left (on a real cluster they vanish with the node; here nodes share
    /dev/shm, so they are stale until a sweep removes them)."""
    findings: dict[str, Any] = {}
    async with StreamManager.start() as manager:
        sid = (await manager.start_camera_stream(StreamConfig(quality=QVGA))).session_id
        encoder_actor = ray.get_actor(f"kz-{sid}-encoder", namespace=NAMESPACE)
        encoder = EncoderHandle(encoder_actor)
        origin_node = actor_node(encoder_actor)
        # The node to lose is a worker (a head cannot be removed) that does not encode; the
        # survivor is any other node that does not encode either.
        lost_worker = next(w for w in cluster.worker_nodes if w.node_id != origin_node)
        survivor_id = next(
            n["NodeID"]
            for n in ray.nodes()
            if n["Alive"] and n["NodeID"] not in (origin_node, lost_worker.node_id)
        )
        identity = generate_self_signed("127.0.0.1")
        origin = await StreamOrigin.start(sid, origin_node, ["video"])
        nodes: list[RemoteNode] = []
        viewer: Viewer | None = None
        try:
            urls = []
            for index, node_id in enumerate((lost_worker.node_id, survivor_id)):
                node = await RemoteNode.open(origin, node_id, f"e{index}")
                nodes.append(node)
                _, text = await node.add_shard(encoder, identity, host="127.0.0.1")
                urls.append(StreamUrl.parse(text))
            lost, survivor = urls
            url = lost.with_alternates([(survivor.host, survivor.port)])
            viewer = await Viewer.connect(str(url), idle_timeout=2.0)
            await viewer.watch(seconds=60, frames=FRAMES)
            findings["frames_before"] = viewer.frames_decoded
            cluster.remove_node(lost_worker, allow_graceful=False)
            lost_node = nodes.pop(0)
            await viewer.watch(seconds=60, frames=viewer.frames_decoded + FRAMES)
            findings["frames_after"] = viewer.frames_decoded - findings["frames_before"]
            findings["reconnects"] = viewer.report().reconnects
            findings["decode_errors"] = viewer.report().decode_errors
            deadline = asyncio.get_running_loop().time() + 10
            while "e0" in (await origin.handle.stats()).nodes:
                assert asyncio.get_running_loop().time() < deadline, "origin kept e0"
                await asyncio.sleep(0.1)
            findings["origin_nodes"] = sorted((await origin.handle.stats()).nodes)
            findings["lost_segments"] = list_segments(f"kz_{sid}_{lost_node.tag}-")
            findings["swept"] = sweep_stale_segments(f"kz_{sid}_{lost_node.tag}-")
        finally:
            if viewer is not None:
                await viewer.close()
            for node in nodes:
                await node.close()
            await origin.stop()
        await manager.stop_stream(sid)
    findings["segments_left"] = list_segments(f"kz_{sid}_")
    return findings


SCENARIOS: dict[str, Callable[[Cluster], Coroutine[Any, Any, dict[str, Any]]]] = {
    "relay_to_two_nodes": relay_to_two_nodes,
    "node_loss": node_loss,
}


def main(names: list[str]) -> None:
    """Run the scenarios in order on one cluster (starting one costs more than a scenario);
    print ``{name: findings}``.  A scenario that removes a node goes last."""
    cluster = start_cluster(workers=2)
    findings: dict[str, Any] = {}
    try:
        for name in names:
            findings[name] = asyncio.run(SCENARIOS[name](cluster))
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(findings))


if __name__ == "__main__":
    main(sys.argv[1:])
