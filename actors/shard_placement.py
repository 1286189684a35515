"""Where a stream's shards run: the node choice (:mod:`shared.control.shard_nodes`) with
Ray's view of the cluster, and the relay copies the shards on other nodes read.

One :class:`ShardPlacer` per stream, held by its :class:`~actors.shards.ShardPool`.  The first
shard placed on another node starts the stream's :class:`~actors.remote_shards.StreamOrigin`
(beside its encoder) and that node's :class:`~actors.remote_shards.RemoteNode` (its relay and
rings); further shards there read the same copy.  When a node's last shard goes, its relay goes
(and its rings with it); when the last remote node goes, the origin does.  On a one-node cluster
nothing here starts anything: every shard is placed on the stream's own node.

A supervisor restarted after its crash rebuilds its placers with :meth:`ShardPlacer.adopt`: the
origin and relays its predecessor started are found by their names (a relay's tag is in its
name, its node is asked of the GCS), and the shards it took back are matched to their node's
relay by the node they run on (one relay per node and stream).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.calls import unwrap
from actors.placement import NAMESPACE
from actors.remote_shards import (
    RemoteNode,
    StreamOrigin,
    discard_relay,
    origin_name,
    relay_name,
    sweep_relay_rings,
)
from shared.control.resources import ResourceSnapshot
from shared.control.shard_nodes import SHARD_RESOURCE, ShardNode, choose_shard_node
from shared.pool.shm import segment_name

__all__ = ["ShardPlacer", "cluster_nodes"]

logger = logging.getLogger(__name__)

#: The tags :meth:`ShardPlacer.acquire` gives nodes (``n1``, ``n2``..): never reused within a
#: stream, so a relay just killed (whose name Ray frees a moment later) never blocks the next.
_TAG = re.compile(r"n(\d+)")


def cluster_nodes(
    shard_counts: dict[str, int], carrying: set[str], raw: list[dict[str, Any]] | None = None
) -> list[ShardNode]:
    """Ray's nodes (``ray.nodes()`` unless ``raw`` is given) as the shard placement sees them:
    ``shard_counts`` shards already on each, ``carrying`` the nodes the stream is on."""
    nodes = []
    for node in ray.nodes() if raw is None else raw:
        resources = node.get("Resources", {})
        slots = resources.get(SHARD_RESOURCE)
        nodes.append(
            ShardNode(
                node_id=node["NodeID"],
                alive=bool(node["Alive"]),
                cpus=float(resources.get("CPU", 0)),
                shard_slots=float(slots) if slots is not None else None,
                shards=shard_counts.get(node["NodeID"], 0),
                carries_stream=node["NodeID"] in carrying,
            )
        )
    return nodes


@dataclass
class ShardPlacer:
    """The nodes one stream's shards run on, and their relays."""

    session_id: str
    #: The stream's own node (its capture, encoder and rings).
    node_id: str
    #: Ring roles a remote node needs (``video``, ``video1``.., ``audio``): read when the first
    #: remote node opens, after the encoder made its rungs.
    tracks: Callable[[], list[str]]
    #: Shards on each node, every stream's (the supervisor counts them).
    shard_counts: Callable[[], dict[str, int]]
    origin: StreamOrigin | None = None
    remote: dict[str, RemoteNode] = field(default_factory=dict)
    #: The shards reading each remote node's copy.
    users: dict[str, set[str]] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tags: int = 0

    async def choose(self) -> str:
        """The node for the stream's next shard."""
        counts, carrying = self.shard_counts(), {self.node_id, *self.remote}
        raw = await asyncio.to_thread(ray.nodes)  # a GCS round trip: off the event loop
        return choose_shard_node(cluster_nodes(counts, carrying, raw), stream_node=self.node_id)

    async def acquire(self, node_id: str, shard_id: str) -> RemoteNode:
        """The relay copy on ``node_id`` for ``shard_id`` to read, opened on first need."""
        async with self._lock:
            remote = self.remote.get(node_id)
            if remote is None:
                if self.origin is None:
                    self.origin = await StreamOrigin.start(
                        self.session_id, self.node_id, self.tracks()
                    )
                self._tags += 1
                try:
                    remote = await RemoteNode.open(self.origin, node_id, f"n{self._tags}")
                except BaseException:
                    await self._stop_origin_if_unused()
                    raise
                self.remote[node_id] = remote
                logger.info(
                    "stream %s: node %s serves viewers from relay copy %s",
                    self.session_id,
                    node_id,
                    remote.tag,
                )
            self.users.setdefault(node_id, set()).add(shard_id)
            return remote

    async def adopt(self, names: list[str], shard_nodes: dict[str, str]) -> set[str]:
        """After the supervisor's crash, take back the stream's origin and relays (found among
        ``names``, the stream's actor names) and which of the shards taken back read each
        (``shard_nodes``: shard id -> node).  A node keeps its relay while a shard there reads
        it; a relay no shard reads, a second one on a node, or any relay left without an
        origin is stopped.  Returns the shards on other nodes left with no relay: the caller
        stops them (their viewers go on at their URLs' alternates)."""
        prefix = relay_name(self.session_id, "")
        tags = sorted(
            (name.removeprefix(prefix) for name in names if name.startswith(prefix)),
            key=lambda tag: (0, int(m.group(1))) if (m := _TAG.fullmatch(tag)) else (1, 0),
        )
        for tag in tags:
            if match := _TAG.fullmatch(tag):
                self._tags = max(self._tags, int(match.group(1)))
        remote = {shard: node for shard, node in shard_nodes.items() if node != self.node_id}
        async with self._lock:
            origin = None
            if origin_name(self.session_id) in names:
                try:
                    origin = await StreamOrigin.find(self.session_id)
                except Exception as exc:
                    logger.warning(
                        "stream %s: its relay origin does not answer: %s",
                        self.session_id,
                        unwrap(exc),
                    )
                    try:
                        dead = ray.get_actor(origin_name(self.session_id), namespace=NAMESPACE)
                        ray.kill(dead, no_restart=True)
                    except ValueError:
                        pass  # gone meanwhile
            for tag in tags:
                node = None
                if origin is not None:
                    try:
                        node = await RemoteNode.find(origin, tag)
                    except Exception as exc:
                        logger.warning(
                            "stream %s: relay %s does not answer: %s",
                            self.session_id,
                            tag,
                            unwrap(exc),
                        )
                if node is None:
                    await discard_relay(self.session_id, tag)
                elif node.node_id in self.remote or node.node_id not in remote.values():
                    await node.close()  # a duplicate (its start was cut short), or unread
                else:
                    self.remote[node.node_id] = node
            self.origin = origin
            orphans = set()
            for shard, node_id in remote.items():
                if node_id in self.remote:
                    self.users.setdefault(node_id, set()).add(shard)
                else:
                    orphans.add(shard)
            await self._stop_origin_if_unused()
        # A relay that died with no one to stop it left its rings on its node (they are its
        # shards' only source, and a new relay there, tagged anew, would not use them).
        for node_id in sorted({remote[shard] for shard in orphans}):
            await sweep_relay_rings(node_id, segment_name(self.session_id, "n"), node_id[:8])
        if self.remote or orphans:
            logger.warning(
                "stream %s: took back relays on %d nodes, %d shards there; %d without a relay",
                self.session_id,
                len(self.remote),
                sum(map(len, self.users.values())),
                len(orphans),
            )
        return orphans

    async def release(self, node_id: str, shard_id: str) -> None:
        """``shard_id`` on ``node_id`` is gone: the node's relay goes with its last shard."""
        async with self._lock:
            users = self.users.get(node_id)
            if users is None:
                return
            users.discard(shard_id)
            if users:
                return
            del self.users[node_id]
            remote = self.remote.pop(node_id, None)
            if remote is not None:
                await remote.close()
            await self._stop_origin_if_unused()

    async def sample(self, pids: dict[str, dict[str, int]]) -> dict[str, ResourceSnapshot]:
        """Each remote node's figures and its shards' (``pids``: node -> label -> pid),
        sampled on that node by its relay; a node whose relay does not answer is left out."""
        nodes = [(node, self.remote[node]) for node in pids if node in self.remote]
        results = await asyncio.gather(
            *(remote.relay.sample(pids[node]) for node, remote in nodes), return_exceptions=True
        )
        samples = {}
        for (node, remote), result in zip(nodes, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning(
                    "stream %s: sampling node %s: %s", self.session_id, remote.tag, result
                )
                continue
            samples[node] = result
        return samples

    async def close(self) -> None:
        """Stop every relay and the origin (the pool stopped the shards)."""
        async with self._lock:
            for remote in self.remote.values():
                await remote.close()
            self.remote.clear()
            self.users.clear()
            await self._stop_origin_if_unused()

    async def _stop_origin_if_unused(self) -> None:
        if self.origin is not None and not self.remote:
            origin, self.origin = self.origin, None
            try:
                await origin.stop()
            except Exception as exc:
                logger.warning("stream %s: stopping the relay origin: %s", self.session_id, exc)
