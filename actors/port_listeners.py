"""Ports several streams share: the supervisor's side of :mod:`actors.stages.shared_port`.

One :class:`SharedPortActor` owns each shared port and holds a sender for every stream on it
(that module says why it must be one process).  To the rest of the supervisor each stream's
part of it is one more shard of that stream: a :class:`~actors.shards.Shard` whose handle,
a :class:`StreamOnPortHandle`, is a ``SenderHandle`` whose calls go to that stream's sender
inside the port's process.  So tickets, approvals, revocations, notices, rung caps, stats,
the quality actor's rung floor and a restarted encoder's ``reattach`` reach it unchanged.

:class:`PortListeners` starts a port's process with its first stream, adds and removes the
others, and stops the process with its last.  Recovery: when the process dies, each stream on
it notices at its own health round (its shard's stats fail) and its pool calls
:meth:`PortListeners.rejoin`; the first of them starts a new process on the same port with the
same certificate (so viewers reconnect to the address and fingerprint they know), and each
stream adds itself to it.  The generation number tells a stream whose shard is on the dead
process from one that already rejoined.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.calls import CALL_TIMEOUT_S, call, unwrap
from actors.handles import Handle, SenderHandle
from actors.placement import NAMESPACE, spawn
from actors.shards import Shard, ShardPool
from actors.stages.sender import SenderStats
from actors.stages.shared_port import SharedPortActor, SharedPortStats
from shared.auth.server import AccessSettings
from shared.control.ports import ListenPorts
from shared.errors import ConfigError, NetworkError
from shared.models import ViewerLimits
from shared.roq.tls import TlsIdentity
from shared.roq.url import StreamUrl

__all__ = ["SHARED", "PortListeners", "SharedPortHandle", "StreamOnPortHandle", "actor_name"]

logger = logging.getLogger(__name__)

#: How a shared port's reservation in ``ListenPorts`` is owned: by no single stream.
SHARED = "<shared by several streams>"


def actor_name(port: int, generation: int) -> str:
    """``kz-port-PORT-GEN``: a new name for each process a port gets, so a restart never
    waits for Ray to free a dead one's name."""
    return f"kz-port-{port}-{generation}"


class SharedPortHandle(Handle[SharedPortActor]):
    actor_class = SharedPortActor
    kind = "sender"

    async def open(self, host: str, port: int, identity: TlsIdentity) -> int:
        return await self.call(SharedPortActor.open, host, port, identity)

    async def add_stream(
        self,
        session_id: str,
        ring_name: str | None,
        encoder: Any,
        limits: ViewerLimits,
        access: AccessSettings | None,
        supervisor: Any,
    ) -> str:
        return await self.call(
            SharedPortActor.add_stream, session_id, ring_name, encoder, limits, access, supervisor
        )

    async def remove_stream(self, session_id: str) -> SenderStats | None:
        return await self.call(SharedPortActor.remove_stream, session_id)

    async def stats(self) -> SharedPortStats:
        return await self.call(SharedPortActor.stats)

    async def identity(self) -> TlsIdentity | None:
        return await self.call(SharedPortActor.identity)

    async def stop(self) -> None:
        await self.call(SharedPortActor.stop)


class StreamOnPortHandle(SenderHandle):
    """One stream's sender inside a shared port's process: a ``SenderHandle`` whose calls
    run on that stream's sender there (``SharedPortActor.call_stream``)."""

    def __init__(
        self, actor: Any, session_id: str, *, timeout: float | None = CALL_TIMEOUT_S
    ) -> None:
        super().__init__(actor, timeout=timeout)
        self.session_id = session_id

    async def call(self, method: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        remote = self.actor.call_stream.remote(self.session_id, method.__name__, *args, **kwargs)
        return await call(remote, self.timeout)

    def send(self, method: Callable[..., object], /, *args: Any, **kwargs: Any) -> None:
        self.actor.call_stream.remote(self.session_id, method.__name__, *args, **kwargs)

    def kill(self) -> None:
        """Take the stream off the port; the process stays for the others
        (:meth:`PortListeners.leave` ends it with its last stream)."""
        self.actor.remove_stream.remote(self.session_id)


@dataclass
class _Listener:
    host: str
    port: int
    node_id: str
    identity: TlsIdentity
    handle: SharedPortHandle
    pid: int
    generation: int
    streams: set[str] = field(default_factory=set)


class PortListeners:
    """The supervisor's shared ports, by port."""

    def __init__(self, ports: ListenPorts) -> None:
        self._ports = ports
        self._listeners: dict[int, _Listener] = {}
        self._lock = asyncio.Lock()
        self._generations = 0

    def shared(self, port: int) -> bool:
        """Whether streams share ``port`` now."""
        return port in self._listeners

    def port_of(self, session_id: str) -> int | None:
        return next((p for p, lst in self._listeners.items() if session_id in lst.streams), None)

    async def join(self, pool: ShardPool, port: int) -> Shard:
        """Put the pool's stream on ``port`` (starting the port's process if it is the
        first); its shard there, added to the pool."""
        if port == 0:
            raise ConfigError("streams can share a fixed port only, not port 0")
        async with self._lock:
            listener = self._listeners.get(port)
            if listener is None:
                owner = self._ports.owner(port)
                if owner is not None:
                    raise NetworkError(
                        f"port {port} is already serving stream {owner} on its own; "
                        "streams share a port only when each of them is opened shared"
                    )
                self._ports.reserve(SHARED, port)
                try:
                    listener = await self._start(pool.host, port, pool.node_id, pool.identity)
                except BaseException:
                    self._ports.release(SHARED, port)
                    raise
                self._listeners[port] = listener
            elif listener.host != pool.host:
                raise NetworkError(
                    f"port {port} is shared on {listener.host}, not {pool.host}: give the "
                    "streams that share it one listen address"
                )
            elif listener.node_id != pool.node_id:
                # Rings are shared memory, which exists per node.
                raise NetworkError(
                    f"stream {pool.session_id} runs on another node than port {port}'s other "
                    "streams; streams that share a port must run on one node"
                )
            shard = await self._add(listener, pool)
            listener.streams.add(pool.session_id)
        await pool.attach(shard)
        return shard

    async def rejoin(self, pool: ShardPool, dead: Shard) -> Shard:
        """The pool's shard on a shared port died with the port's process: start a new one
        on the same port (unless another stream already did) and add the stream to it."""
        async with self._lock:
            listener = self._listeners.get(dead.port)
            if listener is None or pool.session_id not in listener.streams:
                raise NetworkError(f"stream {pool.session_id} left port {dead.port}")
            if listener.generation == dead.shared_port:
                with contextlib.suppress(Exception):
                    listener.handle.kill()  # gone already; this only makes sure
                fresh = await self._start(
                    listener.host, listener.port, listener.node_id, listener.identity
                )
                fresh.streams = listener.streams
                listener = self._listeners[dead.port] = fresh
                logger.warning(
                    "port %d: its process died; a new one (pid %d) serves %s",
                    listener.port,
                    listener.pid,
                    sorted(listener.streams),
                )
            shard = await self._add(listener, pool)
        await pool.attach(shard)
        return shard

    async def adopt(self, pool: ShardPool) -> Shard | None:
        """After the supervisor's own restart: the pool's stream's part of a shared port,
        found by the port process's name (None: the stream shared no port)."""
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("kz-port-") and a.get("namespace", NAMESPACE) == NAMESPACE
        ]
        for name in names:
            handle = SharedPortHandle(ray.get_actor(name, namespace=NAMESPACE))
            stats = await handle.stats()
            identity = await handle.identity()
            if pool.session_id not in stats.streams or identity is None:
                continue
            generation = int(name.rsplit("-", 1)[1])
            async with self._lock:
                listener = self._listeners.get(stats.port)
                if listener is None or listener.generation != generation:
                    listener = _Listener(
                        stats.host,
                        stats.port,
                        pool.node_id,
                        identity,
                        handle,
                        stats.pid,
                        generation,
                    )
                    if self._ports.owner(stats.port) is None:
                        self._ports.reserve(SHARED, stats.port)
                    self._listeners[stats.port] = listener
                    self._generations = max(self._generations, generation)
                listener.streams.add(pool.session_id)
            handle_of_stream = StreamOnPortHandle(handle.actor, pool.session_id)
            url = StreamUrl.parse((await handle_of_stream.stats()).url)
            shard = Shard(
                shard_id=f"port-{stats.port}",
                handle=handle_of_stream,
                url=url,
                port=url.port,
                pid=stats.pid,
                started_at=time.monotonic(),
                shared_port=generation,
            )
            await pool.attach(shard)
            return shard
        return None

    async def leave(self, session_id: str) -> None:
        """The stream stopped: off its shared port (if it had one); the port's process stops
        with its last stream."""
        async with self._lock:
            port = self.port_of(session_id)
            if port is None:
                return
            listener = self._listeners[port]
            listener.streams.discard(session_id)
            try:
                await listener.handle.remove_stream(session_id)
            except Exception as exc:
                logger.info("port %d: removing %s: %s", port, session_id, unwrap(exc))
            if listener.streams:
                return
            del self._listeners[port]
            self._ports.release(SHARED, port)
            try:
                await listener.handle.stop()
            except Exception as exc:
                logger.warning("port %d: could not stop its process: %s", port, unwrap(exc))
            try:
                listener.handle.kill()
            except Exception as exc:
                logger.warning("port %d: could not kill its process: %s", port, exc)
            logger.info("port %d: its last stream left; closed", port)

    async def _start(self, host: str, port: int, node_id: str, identity: TlsIdentity) -> _Listener:
        generation = self._generations + 1
        handle = spawn(
            SharedPortActor, SharedPortHandle, name=actor_name(port, generation), node_id=node_id
        )()
        try:
            await handle.open(host, port, identity)
            pid = (await handle.stats()).pid
        except BaseException:
            with contextlib.suppress(Exception):
                handle.kill()
            raise
        self._generations = generation
        return _Listener(host, port, node_id, identity, handle, pid, generation)

    async def _add(self, listener: _Listener, pool: ShardPool) -> Shard:
        url = await listener.handle.add_stream(
            pool.session_id,
            pool.video_ring,
            pool.encoder,
            pool.limits,
            pool.access,
            ray.get_runtime_context().current_actor,
        )
        parsed = StreamUrl.parse(url)
        return Shard(
            shard_id=f"port-{listener.port}",
            handle=StreamOnPortHandle(listener.handle.actor, pool.session_id),
            url=parsed,
            port=parsed.port,
            pid=listener.pid,
            started_at=time.monotonic(),
            shared_port=listener.generation,
        )
