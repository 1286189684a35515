"""Where a stream's shards run: the node choice (:mod:`shared.control.shard_nodes`) with
Ray's view of the cluster, and the relay copies the shards on other nodes read.

One :class:`ShardPlacer` per stream, held by its :class:`~actors.shards.ShardPool`.  The first
shard placed on another node starts the stream's :class:`~actors.remote_shards.StreamOrigin`
(beside its encoder) and that node's :class:`~actors.remote_shards.RemoteNode` (its relay and
rings); further shards there read the same copy.  When a node's last shard goes, its relay goes
(and its rings with it); when the last remote node goes, the origin does.  On a one-node cluster
nothing here starts anything: every shard is placed on the stream's own node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.remote_shards import RemoteNode, StreamOrigin
from shared.control.resources import ResourceSnapshot
from shared.control.shard_nodes import SHARD_RESOURCE, ShardNode, choose_shard_node

__all__ = ["ShardPlacer", "cluster_nodes"]

logger = logging.getLogger(__name__)


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
