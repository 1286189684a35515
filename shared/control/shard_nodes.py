"""Which node a stream's next sender shard runs on: the cluster-wide half of the balancer.

Theory of operation
===================

The :mod:`~shared.control.balancer` decides *when* a stream needs another shard; this module
decides *where*.  A shard on the stream's own node reads the encoder's rings directly; a shard on
any other node reads that node's relay copy (:mod:`actors.stages.relay`), which costs one copy
of the stream per node however many shards read it.  So the choice weighs two things: spreading
the viewers' cost (CPU, NIC) over the nodes meant for it, and not starting a relay where a node
already carrying the stream has room.

Shard nodes.  An operator marks the nodes meant to serve viewers with the custom Ray resource
:data:`SHARD_RESOURCE` (``ray start --resources='{"kizuna_shards": 8}'``; the KubeRay manifest's
``shards`` group and the cluster launcher's ``shards`` node type do), its amount being how many
shards the node is meant to host.  When any live node is marked, only marked nodes take new
shards; when none is, every live node does, with its CPU count as its capacity (a shard is busy
at ``scale_up_cpu``, 0.6 of a core: about one shard per core).  On a one-node cluster the only
node is the stream's own: the local path, no relay.

Choice, among the candidates (:func:`choose_shard_node`)::

    the candidates with room (shards < capacity), else all of them (over capacity beats refusing
    a viewer while the balancer allows another shard), ordered by
      1. load after adding the shard: (shards + 1) / capacity, lowest first
      2. a node that already carries the stream (its own node, or a relay copy) first
      3. the stream's own node first
      4. node id (the same inputs always give the same node)

A marked node that died no longer counts as marked: when none is left, every live node takes
shards again, so viewers are still served.  No live node at all: :class:`ResourceError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from shared.errors import ConfigError, ResourceError

__all__ = ["SHARD_RESOURCE", "ShardNode", "choose_shard_node"]

#: The custom Ray resource that marks a node as a shard node; its amount is the number of
#: shards the node is meant to host.  deploy/kuberay/raycluster.yaml and deploy/ray/cluster.yaml
#: declare it on their ``shards`` workers.
SHARD_RESOURCE = "kizuna_shards"


class ShardNode(msgspec.Struct, frozen=True, kw_only=True):
    """One Ray node as the shard placement sees it."""

    node_id: str
    alive: bool = True
    #: The node's ``CPU`` resource.
    cpus: float
    #: Its :data:`SHARD_RESOURCE` amount; None: not marked as a shard node.
    shard_slots: float | None = None
    #: Sender shards running there now, every stream's.
    shards: int = 0
    #: The stream is already there: it is the stream's own node, or has its relay copy.
    carries_stream: bool = False

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ConfigError("a node needs a non-empty id")
        if not (self.cpus >= 0 and math.isfinite(self.cpus)):
            raise ConfigError(f"node {self.node_id}: {self.cpus} CPUs is impossible")
        if self.shard_slots is not None and not (
            self.shard_slots >= 0 and math.isfinite(self.shard_slots)
        ):
            raise ConfigError(f"node {self.node_id}: {self.shard_slots} shard slots is impossible")
        if self.shards < 0:
            raise ConfigError(f"node {self.node_id}: shard count {self.shards} is negative")

    @property
    def marked(self) -> bool:
        return self.shard_slots is not None and self.shard_slots > 0

    def capacity(self) -> float:
        """Shards the node is meant to host: its slots if marked, else one per core (at
        least one, so a node Ray reports with no CPU still ranks instead of dividing by 0)."""
        slots = self.shard_slots if self.marked else self.cpus
        assert slots is not None
        return max(slots, 1.0)


def choose_shard_node(nodes: Sequence[ShardNode], *, stream_node: str) -> str:
    """The node for the stream's next shard (see the module's theory of operation)."""
    ids = [node.node_id for node in nodes]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"a node is listed twice in {sorted(ids)}")
    alive = [node for node in nodes if node.alive]
    marked = [node for node in alive if node.marked]
    candidates = marked or alive
    if not candidates:
        raise ResourceError(
            f"no live node can run a sender shard (the stream's node {stream_node} is gone too)"
        )
    with_room = [node for node in candidates if node.shards < node.capacity()]
    best = min(
        with_room or candidates,
        key=lambda node: (
            (node.shards + 1) / node.capacity(),
            not node.carries_stream,
            node.node_id != stream_node,
            node.node_id,
        ),
    )
    return best.node_id
