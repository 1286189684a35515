"""Serving a stream from nodes other than the one that encodes it.

A stream's capture and encoder stay together on one node (its rings are that node's shared
memory).  To serve viewers from another node, that node gets one :class:`NodeRelayActor`,
which copies the stream's rings into the node's own shared memory, and any number of sender
shards that read the copies (``ring_prefix``), exactly as shards on the stream's node read the
originals.  The stream's :class:`RelayOriginActor`, started once beside the encoder, serves
every such node.

- :class:`StreamOrigin` — the origin of one stream's relays;
- :class:`RemoteNode` — one other node: its relay and its shards.

Both are detached, named actors (``kz-<session>-relay`` and ``kz-<session>-relay-<tag>``), as
every actor of a stream is: they outlive a crash of the supervisor that started them, and its
restarted self finds them by name (``find``) and asks each where it runs.
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
from actors.placement import NAMESPACE, spawn
from actors.stages.relay import NodeRelayActor, RelayOriginActor
from actors.stages.sender import SenderActor
from shared.pool.shm import segment_name, sweep_stale_segments
from shared.roq.tls import TlsIdentity

__all__ = [
    "RemoteNode",
    "StreamOrigin",
    "actor_node",
    "actor_record",
    "discard_relay",
    "origin_name",
    "relay_name",
    "sweep_node",
    "sweep_relay_rings",
]

logger = logging.getLogger(__name__)


def origin_name(session_id: str) -> str:
    """The Ray name of the stream's relay origin."""
    return f"kz-{session_id}-relay"


def relay_name(session_id: str, tag: str) -> str:
    """The Ray name of the stream's relay on the node tagged ``tag``."""
    return f"{origin_name(session_id)}-{tag}"


def actor_record(actor: Any) -> tuple[str, float]:
    """The node a (raw) Ray actor runs on (or last ran on) and when its process started (Unix
    time, s), from the GCS's actor table: ``ray.util.state`` would need the dashboard, which a
    server need not run.  A GCS round trip: call it from a thread in an event loop."""
    from ray._private.state import state

    info = state.actor_table(actor._actor_id.hex())
    return str(info["Address"]["NodeID"]), float(info["StartTime"]) / 1000  # ms in the table


def actor_node(actor: Any) -> str:
    """The node a (raw) Ray actor runs on (:func:`actor_record`)."""
    return actor_record(actor)[0]


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
            RelayOriginActor, RelayOriginHandle, name=origin_name(session_id), node_id=node_id
        )(session_id, {track: segment_name(session_id, track) for track in tracks})
        try:
            address = await handle.open()
        except BaseException:
            handle.kill()
            raise
        return cls(session_id, handle, address, list(tracks))

    @classmethod
    async def find(cls, session_id: str) -> StreamOrigin | None:
        """The stream's origin a supervisor that crashed had started, taken back by its name;
        None when there is none.  Raises what its calls raise when it does not answer."""
        try:
            handle = RelayOriginHandle(ray.get_actor(origin_name(session_id), namespace=NAMESPACE))
        except ValueError:
            return None
        return cls(session_id, handle, await handle.address(), await handle.tracks())

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
        relay = spawn(NodeRelayActor, NodeRelayHandle, name=relay_name(sid, tag), node_id=node_id)(
            sid, origin.address, origin.tracks, tag
        )
        try:
            rings = await relay.open()
        except BaseException:
            relay.kill()
            raise
        return cls(origin, node_id, tag, relay, rings)

    @classmethod
    async def find(cls, origin: StreamOrigin, tag: str) -> RemoteNode:
        """The relay tagged ``tag`` a supervisor that crashed had started for ``origin``'s
        stream, taken back by its name: where it runs and its rings (its shards are the
        pool's).  Raises ValueError when there is no such actor, and what its calls raise
        when it does not answer."""
        actor = ray.get_actor(relay_name(origin.session_id, tag), namespace=NAMESPACE)
        relay = NodeRelayHandle(actor)
        rings = (await relay.stats()).rings
        node_id, _ = await asyncio.to_thread(actor_record, actor)
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
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await handle.stop()
                relay_stopped = handle is self.relay
            except Exception as exc:
                logger.warning("stopping %s of node %s failed: %s", handle.kind, self.tag, exc)
            finally:
                handle.kill()
        self.shards.clear()
        if not relay_stopped:
            await _sweep_rings(self.node_id, self.origin.session_id, self.tag)


async def discard_relay(session_id: str, tag: str) -> None:
    """Stop and kill the stream's relay tagged ``tag`` that nobody takes back (its origin is
    gone, so it carries nothing); if it cannot stop, its rings are swept on its node."""
    try:
        actor = ray.get_actor(relay_name(session_id, tag), namespace=NAMESPACE)
    except ValueError:
        return
    relay = NodeRelayHandle(actor)
    stopped = False
    try:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await relay.stop()
        stopped = True
    except Exception as exc:
        logger.warning("stopping the relay of node %s failed: %s", tag, unwrap(exc))
    finally:
        relay.kill()
    if not stopped:
        try:
            node_id, _ = await asyncio.to_thread(actor_record, actor)
        except Exception as exc:
            logger.info("node %s: where its relay ran is unknown (%s)", tag, exc)
            return
        await _sweep_rings(node_id, session_id, tag)


async def _sweep_rings(node_id: str, session_id: str, tag: str) -> None:
    """Remove the rings a relay that could not stop left on its node."""
    await sweep_relay_rings(node_id, segment_name(session_id, f"{tag}-"), tag)


async def sweep_relay_rings(node_id: str, prefix: str, what: str) -> None:
    """Remove the stale segments named ``prefix...`` (their creator, a relay, died) on
    ``node_id``; a node that is gone is no error (its segments went with it)."""
    try:
        swept = await asyncio.wait_for(sweep_node(node_id, prefix), SWEEP_TIMEOUT_S)
        if swept:
            logger.warning("node %s: removed %s its relay left", what, swept)
    except Exception as exc:  # the node is gone too: so are its segments
        logger.info("node %s: no sweep of %s* (%s)", what, prefix, unwrap(exc))


#: How long a sweep on another node may take (a dead node fails it at once).
SWEEP_TIMEOUT_S = 10.0
#: How long a relay or shard may take to stop (closing a socket and its rings): a call to one
#: that was killed can hang until the call's own, longer, deadline (seen with Ray 2.60 on a
#: handle a restarted supervisor got by name), and the health round waits on it.
STOP_TIMEOUT_S = 5.0


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
