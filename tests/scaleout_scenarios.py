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
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import get_placement_group, placement_group_table

from actors import StreamManager
from actors.handles import EncoderHandle, RelayOriginHandle
from actors.placement import NAMESPACE
from actors.remote_shards import RemoteNode, StreamOrigin, actor_node
from actors.stream_group import group_name
from actors.supervisor_state import stream_actor_names
from shared.control.shard_nodes import SHARD_RESOURCE
from shared.errors import ResourceError
from shared.models import Resolution, StreamConfig, StreamQuality, ViewerLimits
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
        # Both workers are shard nodes, as the KubeRay manifest's ``shards`` group is; the
        # last also declares a GPU (only Ray's resource: this machine has none, and an
        # encoder placed there falls back to libx264).
        cluster.add_node(
            num_cpus=1,
            num_gpus=1 if index == workers - 1 else 0,
            resources={f"edge{index}": 1, SHARD_RESOURCE: 4},
        )
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
    return cluster


def node_labels(cluster: Cluster) -> dict[str, str]:
    """``head``, ``edge0``, ``edge1`` by node id, from each node's marker resource (the
    cluster's worker set has no order)."""
    labels = {}
    for node in ray.nodes():
        marks = [r for r in node["Resources"] if r == "head" or r.startswith("edge")]
        if marks:
            labels[node["NodeID"]] = marks[0]
    return labels


async def gone(name: str, timeout: float = 10) -> bool:
    """Whether no actor is named ``name`` (a killed actor's name is freed soon after)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return True
        if asyncio.get_running_loop().time() >= deadline:
            return False
        await asyncio.sleep(0.1)


def _pid(actor: object) -> int:
    return os.getpid()


async def restart_supervisor(manager: StreamManager, sid: str) -> bool:
    """SIGKILL the supervisor's process and wait until its restarted self has taken ``sid``
    back; whether it is a new process."""
    supervisor = manager._supervisor.actor
    pid = await supervisor.__ray_call__.remote(_pid)
    os.kill(pid, signal.SIGKILL)  # every node of this cluster is this machine
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        try:
            if [s.session_id for s in await manager.get_active_streams()] == [sid]:
                break
        except Exception:  # still restarting: Ray answers "unavailable"
            pass
        assert asyncio.get_running_loop().time() < deadline, "the supervisor did not come back"
        await asyncio.sleep(0.2)
    return bool(await supervisor.__ray_call__.remote(_pid) != pid)


async def balanced_shards(cluster: Cluster) -> dict[str, Any]:
    """Viewers added through the normal API (``add_viewer``), one seat per shard, so each
    starts a shard: the pool places them on the shard nodes by load, starting one relay per
    node.  Then the supervisor is killed: its restarted self takes back the shards, the relays
    and which shards read which, and places two more viewers with them.  Findings: where the
    stream and each viewer's shard run, each viewer's alternates, frames decoded (before and
    after the restart), packets each node received from the origin, the relays after the
    restart, and what is left after the stream stops."""
    findings: dict[str, Any] = {}
    labels = node_labels(cluster)
    limits = ViewerLimits(max_viewers_per_shard=1, max_shards=6, idle_shard_retire_s=1.0)
    async with StreamManager.start() as manager:
        config = StreamConfig(quality=QVGA, viewers=limits)
        sid = (await manager.start_camera_stream(config)).session_id
        origin_node = actor_node(ray.get_actor(f"kz-{sid}-encoder", namespace=NAMESPACE))
        findings["stream_node"] = labels[origin_node]
        findings["nodes"] = sum(1 for node in ray.nodes() if node["Alive"])
        ring = PacketRing.attach(segment_name(sid, "video"))
        before = ring.last_sequence()
        viewers: list[Viewer] = []
        later: list[Any] = []  # the viewers' tickets after the restart
        try:
            tickets = [await manager.add_viewer(sid, f"peer{i}") for i in range(4)]
            findings["alternates"] = [len(StreamUrl.parse(t.url).alternates) for t in tickets]
            viewers = [await Viewer.connect(t.url) for t in tickets]
            await asyncio.gather(*(v.watch(seconds=60, frames=FRAMES) for v in viewers))
            findings["frames"] = [v.frames_decoded for v in viewers]
            findings["decode_errors"] = [v.report().decode_errors for v in viewers]
            shard_of = {s.viewer_id: s.shard for s in await manager.get_viewer_status(sid)}
            # The monitor sees every shard, those on other nodes sampled there by their relay.
            findings["shards_sampled"] = sorted(
                p.label.removeprefix(f"{sid}/sender-")
                for p in (await manager.resources()).processes
                if p.label.startswith(f"{sid}/sender-") and p.alive
            ) == sorted(shard_of.values())
            findings["shard_nodes"] = [
                labels[actor_node(ray.get_actor(f"kz-{sid}-{shard_of[t.viewer_id]}", NAMESPACE))]
                for t in tickets
            ]
            overview = await manager.overview()
            findings["status_shard_nodes"] = sorted(
                labels[a.node] for a in overview.actors if a.role == "shard" and a.stream == sid
            )
            origin = RelayOriginHandle(ray.get_actor(f"kz-{sid}-relay", namespace=NAMESPACE))
            served = await origin.stats()
            relays = {tag: f"kz-{sid}-relay-{tag}" for tag in served.nodes}
            relay_nodes = {
                actor_node(ray.get_actor(name, namespace=NAMESPACE)): tag
                for tag, name in relays.items()
            }
            findings["forwarded"] = {
                labels[node]: served.nodes[tag].packets_forwarded
                for node, tag in relay_nodes.items()
            }
            findings["ring_packets"] = ring.last_sequence() - before
            # The supervisor crashes with shards and relays on both workers.  Its restarted
            # self must know the relays and which shards read them: the shards two more
            # viewers start (the stream's node, if a worker, takes the first; the other
            # worker the second) read the relay already there, no second one; and what
            # follows (a node's relay going with its last shard, the stop) runs on what it
            # rebuilt.
            relay_prefix = f"kz-{sid}-relay"
            relays_before = sorted(n for n in stream_actor_names(sid) if n.startswith(relay_prefix))
            findings["supervisor_restarted"] = await restart_supervisor(manager, sid)
            overview = await manager.overview()
            findings["status_shard_nodes_after_restart"] = sorted(
                labels[a.node] for a in overview.actors if a.role == "shard" and a.stream == sid
            )
            later += [await manager.add_viewer(sid, f"later{i}") for i in range(2)]
            shard_of = {s.viewer_id: s.shard for s in await manager.get_viewer_status(sid)}
            findings["later_shard_nodes"] = sorted(
                labels[actor_node(ray.get_actor(f"kz-{sid}-{shard_of[t.viewer_id]}", NAMESPACE))]
                for t in later
            )
            decoded = [v.frames_decoded for v in viewers]
            viewers += [await Viewer.connect(t.url) for t in later]
            decoded += [0, 0]
            await asyncio.gather(
                *(
                    v.watch(seconds=60, frames=n + FRAMES)
                    for v, n in zip(viewers, decoded, strict=True)
                )
            )
            findings["frames_after_restart"] = [
                v.frames_decoded - n for v, n in zip(viewers, decoded, strict=True)
            ]
            findings["reconnects_after_restart"] = [v.report().reconnects for v in viewers]
            findings["decode_errors_after_restart"] = [v.report().decode_errors for v in viewers]
            relays_after = sorted(n for n in stream_actor_names(sid) if n.startswith(relay_prefix))
            findings["same_relays_after_restart"] = relays_after == relays_before
            findings["relays_after_restart"] = len(relays_after)
        finally:
            ring.close()
            # The first ticket's viewer leaves last: its shard is the oldest, and the last to
            # go idle too, so it is the one that stays even when the others' shards go idle
            # in an earlier health round (the restarted supervisor counts the four first
            # viewers as anonymous connections, idle as soon as a shard reports them gone).
            await asyncio.gather(*(viewer.close() for viewer in viewers[1:]))
            if viewers:
                await viewers[0].close()
        # The viewers will leave, and the idle shards retire, youngest first, down to the
        # oldest (the first ticket's); a node's relay goes with its last shard.  The relay of a
        # node that keeps no shard crashes first: its rings outlive it (their creator is
        # dead) until that node's last shard goes, when they are swept there.
        retained = findings["shard_nodes"][0]
        crashed = next(tag for node, tag in relay_nodes.items() if labels[node] != retained)
        ray.kill(ray.get_actor(relays[crashed], namespace=NAMESPACE), no_restart=True)
        findings["crashed_relay_rings"] = list_segments(f"kz_{sid}_{crashed}-")
        for ticket in tickets + later:
            await manager.remove_viewer(sid, ticket.viewer_id)
        # The relay that should be left: the retained shard's node's, unless that node is
        # the stream's own.
        expected = sorted({retained} - {findings["stream_node"]})
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            shards = [a for a in (await manager.overview()).actors if a.role == "shard"]
            up = [n for n, tag in relay_nodes.items() if not await gone(relays[tag], 0)]
            alive = sorted(labels[n] for n in up)
            rings = list_segments(f"kz_{sid}_{crashed}-")
            settled = len(shards) == 1 and alive == expected and not rings
            if settled or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
        findings["shards_after_retiring"] = len(shards)
        findings["relays_after_retiring"] = alive
        findings["crashed_rings_after_retiring"] = rings
        await manager.stop_stream(sid)
        findings["relays_left"] = [
            name for name in [f"kz-{sid}-relay", *relays.values()] if not await gone(name)
        ]
        findings["actors_left"] = stream_actor_names(sid)
        findings["group_left"] = group_left(sid)
    findings["segments_left"] = list_segments(f"kz_{sid}_")
    return findings


def assigned_resources(actor: object) -> dict[str, float]:
    """Run in an actor by ``__ray_call__``: what Ray reserved for it."""
    return dict(ray.get_runtime_context().get_assigned_resources())


async def gpu_encoder(cluster: Cluster) -> dict[str, Any]:
    """Streams asking for hardware encoding on a cluster where one worker declares a GPU, with
    two encoder sessions per GPU: two land there, each encoder holding half the GPU in its
    stream's STRICT_PACK group beside its capture; a third is refused.  Findings: where their
    actors run, what Ray reserved, the codec (libx264: no NVENC here), the refusal, and
    whether the groups are removed when the streams stop."""
    findings: dict[str, Any] = {}
    labels = node_labels(cluster)
    hardware = msgspec.structs.replace(QVGA, hardware_acceleration=True)
    async with StreamManager.start(gpu_sessions_per_gpu=2) as manager:
        sids = [
            (await manager.start_camera_stream(StreamConfig(quality=hardware))).session_id
            for _ in range(2)
        ]
        try:
            await manager.start_camera_stream(StreamConfig(quality=hardware))
        except ResourceError as exc:
            findings["refused"] = str(exc)
        findings["streams"] = []
        for sid in sids:
            capture = ray.get_actor(f"kz-{sid}-capture", namespace=NAMESPACE)
            encoder_actor = ray.get_actor(f"kz-{sid}-encoder", namespace=NAMESPACE)
            encoder = EncoderHandle(encoder_actor)
            deadline = asyncio.get_running_loop().time() + 30
            while (stats := await encoder.stats()).frames_encoded < 1:
                assert asyncio.get_running_loop().time() < deadline, "the encoder encodes nothing"
                await asyncio.sleep(0.1)
            group = placement_group_table(get_placement_group(group_name(sid)))
            findings["streams"].append(
                {
                    "capture_node": labels[actor_node(capture)],
                    "encoder_node": labels[actor_node(encoder_actor)],
                    "encoder_gpu": (
                        await encoder_actor.__ray_call__.remote(assigned_resources)
                    ).get("GPU", 0.0),
                    "codec": stats.codec,
                    "group_strategy": group["strategy"],
                    "group_bundles": list(group["bundles"].values()),
                }
            )
        for sid in sids:
            await manager.stop_stream(sid)
        findings["groups_left"] = [sid for sid in sids if group_left(sid)]
    return findings


def group_left(session_id: str) -> bool:
    """Whether the stream's placement group still exists (not removed)."""
    try:
        group = get_placement_group(group_name(session_id))
    except ValueError:
        return False
    return bool(placement_group_table(group)["state"] != "REMOVED")


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
            findings["lost_segments_after_sweep"] = list_segments(f"kz_{sid}_{lost_node.tag}-")
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
    "balanced_shards": balanced_shards,
    "gpu_encoder": gpu_encoder,
    "node_loss": node_loss,
}


def main(names: list[str]) -> None:
    """Run the scenarios in order on one cluster (starting one costs more than a scenario);
    print ``{name: findings}``.  A scenario that removes a node goes last."""
    cluster = start_cluster(workers=2)
    findings: dict[str, Any] = {}
    try:
        for name in names:
            started = time.monotonic()
            findings[name] = asyncio.run(SCENARIOS[name](cluster))
            print(f"{name}: {time.monotonic() - started:.1f} s", file=sys.stderr)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(findings))


if __name__ == "__main__":
    main(sys.argv[1:])
