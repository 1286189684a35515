"""The relay stage: a stream's packets carried once to each other node that serves its viewers.

- :class:`RelayOriginActor` runs beside the stream's encoder (the node whose shared memory holds
  the rings) and serves them over TCP (:class:`shared.relay.link.RelayServer`).
- :class:`NodeRelayActor` runs on a remote node, one per stream: it subscribes to the origin
  and writes the packets into rings of that node's shared memory
  (:class:`shared.relay.link.RelayReceiver`).  Shards on that node read those rings as shards
  on the origin read the encoder's: a node receives each rung once, however many viewers its
  shards serve.

Why a socket between nodes and not Ray's object store: a packet moved through ``ray.put`` costs
an object-store allocation, a reference-count round trip with its owner and a pull by the
remote raylet, per batch, on the same control plane that restarts actors; a TCP stream costs a
``send`` per wake-up and keeps the keyframe-drop logic (:mod:`shared.relay.uplink`) in one
place.  ``perf/bench_relay.py`` measures both carriers.

The remote rings are named ``kz_<session>_<node tag>-<track>`` so that nodes sharing one
``/dev/shm`` (a test cluster on one machine) do not collide, and every segment of a session
still starts with the session's prefix (what leak checks and the crash sweep look for).
"""

from __future__ import annotations

import os

import ray

from shared.control.resources import ResourceMonitor, ResourceSnapshot
from shared.pool.shm import segment_name
from shared.relay.link import ReceiverStats, RelayReceiver, RelayServer, ServerStats

__all__ = ["NodeRelayActor", "RelayOriginActor", "relay_ring_names"]


def relay_ring_names(session_id: str, node_tag: str, tracks: list[str]) -> dict[str, str]:
    """The local ring of each relayed track on the node tagged ``node_tag``."""
    return {track: segment_name(session_id, f"{node_tag}-{track}") for track in tracks}


class RelayOriginActor:
    """Serves a stream's rings (track name → segment name) to remote nodes."""

    def __init__(self, session_id: str, rings: dict[str, str]) -> None:
        self._session_id = session_id
        self._tracks = list(rings)
        self._server = RelayServer(session_id, rings)

    async def open(self) -> tuple[str, int]:
        """Listen; the (node address, port) remote nodes connect to."""
        await self._server.start()
        return self.address()

    def address(self) -> tuple[str, int]:
        """Where it listens (what ``open`` returned): how a supervisor restarted after a crash
        finds it again."""
        return ray.util.get_node_ip_address(), self._server.port

    def tracks(self) -> list[str]:
        """The tracks it serves."""
        return list(self._tracks)

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> ServerStats:
        return self._server.stats()

    async def stop(self) -> ServerStats:
        stats = self._server.stats()
        await self._server.close()
        return stats

    def __repr__(self) -> str:  # the dashboard's actor list shows it
        return f"RelayOrigin({self._session_id})"


class NodeRelayActor:
    """Copies a stream's tracks from its origin into this node's rings, and samples the node
    for the supervisor (whose own monitor sees only its node's processes)."""

    def __init__(
        self, session_id: str, origin: tuple[str, int], tracks: list[str], node_tag: str
    ) -> None:
        self._session_id = session_id
        self._node_tag = node_tag
        self._receiver = RelayReceiver(
            origin, session_id, relay_ring_names(session_id, node_tag, tracks), node=node_tag
        )
        self._monitor: ResourceMonitor | None = None

    async def open(self) -> dict[str, str]:
        """Subscribe and create the local rings; their names, by track."""
        await self._receiver.start()
        return self._receiver.stats().rings

    def pid(self) -> int:
        return os.getpid()

    def sample(self, pids: dict[str, int]) -> ResourceSnapshot:
        """This node's figures and those of the processes ``pids`` names (the shards here)."""
        if self._monitor is None:
            self._monitor = ResourceMonitor()
        return self._monitor.sample(pids)

    def stats(self) -> ReceiverStats:
        return self._receiver.stats()

    async def stop(self) -> ReceiverStats:
        await self._receiver.close()
        return self._receiver.stats()

    def __repr__(self) -> str:
        return f"NodeRelay({self._session_id}@{self._node_tag})"
