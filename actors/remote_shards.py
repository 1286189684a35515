"""Serving a stream from nodes other than the one that encodes it.

A stream's capture and encoder stay together on one node (its rings are that node's shared
memory).  To serve viewers from another node, that node gets one :class:`NodeRelayActor`,
which copies the stream's rings into the node's own shared memory, and any number of sender
shards that read the copies (``ring_prefix``), exactly as shards on the stream's node read the
originals.  The stream's :class:`RelayOriginActor`, started once beside the encoder, serves
every such node.

- :class:`StreamOrigin` — the origin of one stream's relays;
- :class:`RemoteNode` — one other node: its relay and its shards.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.calls import unwrap
from actors.handles import EncoderHandle, NodeRelayHandle, RelayOriginHandle, SenderHandle
from actors.placement import spawn
from actors.stages.relay import NodeRelayActor, RelayOriginActor
from actors.stages.sender import SenderActor
from shared.pool.shm import segment_name, sweep_stale_segments
from shared.roq.tls import TlsIdentity

__all__ = ["RemoteNode", "StreamOrigin", "actor_node", "sweep_node"]

logger = logging.getLogger(__name__)


def actor_node(actor: Any) -> str:
    """The node a (raw) Ray actor runs on, from the GCS's actor table: ``ray.util.state``
    would need the dashboard, which a server need not run."""
    from ray._private.state import state

    return str(state.actor_table(actor._actor_id.hex())["Address"]["NodeID"])


@dataclass
class StreamOrigin:
    session_id: str
    handle: RelayOriginHandle
    address: tuple[str, int]
    tracks: list[str]

    @classmethod
    async def start(cls, session_id: str, node_id: str, tracks: list[str]) -> StreamOrigin:
        """Serve ``tracks`` (ring roles: ``video``, ``video1``, ``audio``) of the stream whose
        encoder runs on ``node_id``."""
        handle = spawn(
            RelayOriginActor, RelayOriginHandle, name=f"kz-{session_id}-relay", node_id=node_id
        )(session_id, {track: segment_name(session_id, track) for track in tracks})
        try:
            address = await handle.open()
        except BaseException:
            handle.kill()
            raise
        return cls(session_id, handle, address, list(tracks))

    async def stop(self) -> None:
        try:
            await self.handle.stop()
        finally:
            self.handle.kill()


@dataclass
class RemoteNode:
    """One node serving a stream it does not encode."""

    origin: StreamOrigin
    node_id: str
    #: Short and unique per stream: it prefixes the node's ring and actor names.
    tag: str
    relay: NodeRelayHandle
    rings: dict[str, str]
    shards: list[SenderHandle] = field(default_factory=list)

    @classmethod
    async def open(cls, origin: StreamOrigin, node_id: str, tag: str) -> RemoteNode:
        """Start the node's relay and wait until its rings hold the stream."""
        sid = origin.session_id
        relay = spawn(
            NodeRelayActor, NodeRelayHandle, name=f"kz-{sid}-relay-{tag}", node_id=node_id
        )(sid, origin.address, origin.tracks, tag)
        try:
            rings = await relay.open()
        except BaseException:
            relay.kill()
            raise
        return cls(origin, node_id, tag, relay, rings)

    async def add_shard(
        self,
        encoder: EncoderHandle,
        identity: TlsIdentity,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
    ) -> tuple[SenderHandle, str]:
        """One more shard on this node; it and its viewer URL."""
        sid = self.origin.session_id
        index = len(self.shards)
        shard = spawn(
            SenderActor,
            SenderHandle,
            name=f"kz-{sid}-{self.tag}-shard{index}",
            node_id=self.node_id,
        )(
            sid,
            f"{self.tag}-shard{index}",
            self.rings.get("video"),
            encoder,
            audio_ring_name=self.rings.get("audio"),
            ring_prefix=f"{self.tag}-",
        )
        self.shards.append(shard)
        url = await shard.open(host, port, identity)
        return shard, url

    async def close(self) -> None:
        """Stop the node's shards, then its relay (which removes the node's rings).  Each is
        killed even when its stop fails, and one failure does not keep the others running.
        A relay that could not stop (it crashed) left its rings behind: they are swept on its
        node, if the node is still there."""
        handles: list[SenderHandle | NodeRelayHandle] = [*self.shards, self.relay]
        relay_stopped = False
        for handle in handles:
            try:
                await handle.stop()
                relay_stopped = handle is self.relay
            except Exception as exc:
                logger.warning("stopping %s of node %s failed: %s", handle.kind, self.tag, exc)
            finally:
                handle.kill()
        self.shards.clear()
        if not relay_stopped:
            prefix = segment_name(self.origin.session_id, f"{self.tag}-")
            try:
                swept = await asyncio.wait_for(sweep_node(self.node_id, prefix), SWEEP_TIMEOUT_S)
                if swept:
                    logger.warning("node %s: removed %s its relay left", self.tag, swept)
            except Exception as exc:  # the node is gone too: so are its segments
                logger.info("node %s: no sweep of %s* (%s)", self.tag, prefix, unwrap(exc))


#: How long a sweep on another node may take (a dead node fails it at once).
SWEEP_TIMEOUT_S = 10.0


def _sweep(prefix: str) -> list[str]:
    return sweep_stale_segments(prefix)


async def sweep_node(node_id: str, prefix: str) -> list[str]:
    """Remove the stale segments named ``prefix...`` on ``node_id`` (their creator died):
    the crash sweep the supervisor runs at start, on a node it does not run on."""
    task = ray.remote(_sweep).options(
        num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    )
    swept: list[str] = await task.remote(prefix)
    return swept
