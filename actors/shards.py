"""A stream's sender shards: the design's BroadcastController, for the supervisor.

Each shard is a SenderActor: one process serving many viewers of the stream on one event loop,
on its own UDP port (shards ``serve`` opens on one shared port use SO_REUSEPORT; the shards the
balancer adds get their own port, so where a ticketed viewer lands is the balancer's choice,
not a kernel hash).  This module does the I/O around two cores in ``shared.control``:

- ``ConnectionBalancer`` decides where a new viewer goes, when a shard starts and when an idle
  extra one retires; ``ConnectionRateLimiter`` spreads out arrivals;
- ``ViewerRegistry`` holds the stream's viewers and is reconciled, on every health round, with
  the connections each shard reports.  A viewer names its ticket in its RTCP CNAME (the
  ticket URL's ``viewer=`` parameter, RFC 3550 §6.5.1), which is how a connection is matched
  to a ticket; a connection that names none counts as anonymous.

Each shard's load is what the balancer needs: its viewers (seats taken, from the registry), its
CPU (psutil on the shard's process, where it runs on the supervisor's node) and its bytes per
second.  The shards the balancer adds run on the node ``actors.shard_placement`` chooses (the
stream's own, or another reading a relay copy); a viewer's URL names one shard on each other
node as an alternate endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import psutil
import ray

from actors.calls import call, unwrap
from actors.handles import EncoderHandle, QualityHandle, SenderHandle
from actors.placement import spawn
from actors.shard_placement import ShardPlacer
from actors.stages.sender import SenderActor, SenderStats
from shared.auth.server import AccessSettings
from shared.control.balancer import (
    BalancerPolicy,
    ConnectionBalancer,
    ConnectionRateLimiter,
    Refuse,
    ShardLoad,
    StartShard,
    UseShard,
    WaitForShard,
    heir,
)
from shared.control.registry import ConnectionReport, RegistryEvent, ViewerRegistry
from shared.control.resources import ProcessUsage, ResourceSnapshot
from shared.errors import KizunaError, ResourceError
from shared.models import ViewerLimits
from shared.roq.tls import TlsIdentity
from shared.roq.url import StreamUrl

logger = logging.getLogger(__name__)

#: Most alternate endpoints in a viewer's URL (one per other node).
MAX_ALTERNATES = 3


@dataclass
class Shard:
    shard_id: str
    handle: SenderHandle
    url: StreamUrl
    port: int
    pid: int
    started_at: float
    cpu_cores: float = 0.0
    bytes_per_s: float = 0.0
    last: SenderStats | None = None
    #: Ports of shards that died, now served here too.
    adopted_ports: list[int] = field(default_factory=list)
    #: Set when this is the stream's part of a port several streams share: the generation
    #: of that port's process (``actors.port_listeners``).  Such a shard is never retired,
    #: and when it dies the stream rejoins the port instead of moving it to a survivor.
    shared_port: int | None = None
    #: The node it runs on ("": the stream's own node).
    node_id: str = ""
    #: Whether its pid is a process on the supervisor's node (psutil can measure it).
    local_pid: bool = True
    _process: psutil.Process | None = None
    _sampled_at: float = 0.0
    _bytes: int = 0

    def sample(self, stats: SenderStats, now: float) -> None:
        """Fold one stats report and the process's CPU counter into the shard's load."""
        if self._process is None and self.local_pid:
            try:
                self._process = psutil.Process(self.pid)
                self._process.cpu_percent(None)  # starts the counter
            except psutil.Error:
                self._process = None
        elif self._sampled_at and now > self._sampled_at:
            # A shard on another node is no process here: its node's relay measures its CPU
            # (``ShardPool._sample_remote``).
            if self._process is not None:
                try:
                    self.cpu_cores = self._process.cpu_percent(None) / 100
                except psutil.Error:
                    self.cpu_cores = 0.0
            self.bytes_per_s = max(0, stats.bytes_sent - self._bytes) / (now - self._sampled_at)
        self._sampled_at, self._bytes, self.last = now, stats.bytes_sent, stats


@dataclass
class ShardPool:
    """The shards and viewer registry of one stream."""

    session_id: str
    node_id: str
    host: str
    identity: TlsIdentity
    video_ring: str | None
    encoder: EncoderHandle | None
    quality: QualityHandle | None
    limits: ViewerLimits = field(default_factory=ViewerLimits)
    #: Who may watch, and the key tokens are checked with; new shards start with the latest.
    access: AccessSettings | None = None
    #: Places the shards the balancer starts across the cluster's nodes (None: all on the
    #: stream's node); ``actors.shard_placement``.
    placer: ShardPlacer | None = None
    shards: dict[str, Shard] = field(default_factory=dict)
    registry: ViewerRegistry = field(default_factory=ViewerRegistry)
    starting: int = 0
    _started: asyncio.Condition = field(default_factory=asyncio.Condition)
    #: One refresh at a time: the health round and ``overview`` both refresh, and two
    #: interleaved at their awaits would both retire (pop) the same idle shard.
    _refreshing: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The last sample of each other node serving the stream (``_sample_remote``).
    remote_usage: dict[str, ResourceSnapshot] = field(default_factory=dict)
    #: Shards spawned and not yet open: stopped too if the stream stops meanwhile.
    _opening: dict[str, SenderHandle] = field(default_factory=dict)
    #: Ports of dead shards nobody could take over yet (a new shard that did not open in
    #: time on a loaded node): tried again each round, since their viewers keep coming back.
    _unadopted: dict[str, tuple[Shard, list[int]]] = field(default_factory=dict)
    #: Puts the stream back on its shared port after that port's process died (set by
    #: ``actors.port_listeners`` when the stream joins one); shards it could not yet.
    rejoin: Callable[[Shard], Awaitable[Shard]] | None = None
    _unjoined: list[Shard] = field(default_factory=list)
    #: Called the moment a shard's process dies (its ``watch`` call fails), so the owner can
    #: run its health round, which hands the dead shard's ports on, now rather than later.
    on_death: Callable[[], None] | None = None
    _watchers: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        limits = self.limits
        self.balancer = ConnectionBalancer(
            BalancerPolicy(
                max_shards=limits.max_shards,
                max_viewers_per_shard=limits.max_viewers_per_shard,
                max_viewers_per_stream=limits.max_viewers,
                scale_up_cpu=limits.shard_busy_cpu,
                retire_after_s=limits.idle_shard_retire_s,
            )
        )
        self._limiter = ConnectionRateLimiter(limits.connect_rate_per_s, limits.connect_burst)

    # --- placement ---------------------------------------------------------------------

    def loads(self) -> list[ShardLoad]:
        counts = self.registry.per_shard()
        loads = []
        for shard in self.shards.values():
            count = counts.get(shard.shard_id)
            loads.append(
                ShardLoad(
                    shard_id=shard.shard_id,
                    viewers=count.viewers if count else 0,
                    live=count.live if count else 0,
                    cpu_cores=shard.cpu_cores,
                    bytes_per_s=shard.bytes_per_s,
                    started_at=shard.started_at,
                    idle_since=count.idle_since if count else shard.started_at,
                )
            )
        return loads

    async def ticket(self, peer_id: str, *, port: int = 0) -> tuple[str, Shard]:
        """Place a new viewer: (its viewer id, its shard).  ResourceError when refused."""
        if not self._limiter.admit(time.monotonic()):
            refusal = self._limiter.refusal(time.monotonic(), stream_name=self.session_id)
            raise ResourceError(refusal.reason)
        while True:
            placement = self.balancer.choose(
                self.loads(),
                self.registry.stream_viewers(),
                self.starting,
                stream_name=self.session_id,
            )
            match placement:
                case UseShard(shard_id=shard_id):
                    shard = self.shards[shard_id]
                    break
                case StartShard():
                    shard = await self.start_shard(port)
                    break
                case WaitForShard():
                    async with self._started:
                        await self._started.wait()
                case Refuse(reason=reason):
                    raise ResourceError(reason)
        viewer_id = uuid.uuid4().hex[:8]
        self.registry.register(viewer_id, peer_id, shard.shard_id, time.monotonic())
        return viewer_id, shard

    async def start_shard(self, port: int = 0, *, reuse_port: bool | None = None) -> Shard:
        """Start one shard listening on ``port`` (0: any free port).  A shard on a free port
        goes where the placer says; one on a given port (an address viewers were told, on the
        stream's node) stays on the stream's node."""
        shard_id = f"shard-{uuid.uuid4().hex[:6]}"
        self.starting += 1
        try:
            shard = await self._open_shard(shard_id, port, reuse_port)
        finally:
            self.starting -= 1
            async with self._started:
                self._started.notify_all()
        self.shards[shard_id] = shard
        self.registry.add_shard(shard_id, time.monotonic())
        self.watch(shard)
        return shard

    async def _open_shard(self, shard_id: str, port: int, reuse_port: bool | None) -> Shard:
        node_id, ring, prefix = self.node_id, self.video_ring, ""
        try:
            if self.placer is not None and not port and reuse_port is None:
                node_id = await self.placer.choose()
                if node_id != self.node_id:
                    remote = await self.placer.acquire(node_id, shard_id)
                    ring, prefix = remote.rings.get("video"), f"{remote.tag}-"
            handle = self._opening[shard_id] = spawn(
                SenderActor,
                SenderHandle,
                name=f"kz-{self.session_id}-{shard_id}",
                node_id=node_id,
            )(
                session_id=self.session_id,
                viewer_id=shard_id,
                ring_name=ring,
                encoder=self.encoder,
                limits=self.limits,
                access=self.access,
                # The supervisor runs this pool: its own handle, for viewers' recording requests.
                supervisor=ray.get_runtime_context().current_actor,
                ring_prefix=prefix,
            )
            try:
                url = StreamUrl.parse(
                    await handle.call(SenderActor.open, self.host, port, self.identity, reuse_port)
                )
                pid = (await handle.stats()).pid
                if self.quality is not None:
                    await self.quality.add_sender(shard_id, handle)
            except BaseException:
                await self._stop_handle(shard_id, handle)
                raise
            finally:
                self._opening.pop(shard_id, None)
        except BaseException:
            await self._release_node(node_id, shard_id)
            raise
        shard = Shard(shard_id, handle, url, url.port, pid, time.monotonic())
        if node_id != self.node_id:
            shard.node_id = node_id
            shard.local_pid = node_id == ray.get_runtime_context().get_node_id()
        return shard

    def watch(self, shard: Shard) -> None:
        """Keep one ``watch`` call in flight to the shard: Ray fails it when the process dies,
        and ``on_death`` is told at once."""
        if self.on_death is None:
            return

        async def guard() -> None:
            try:
                await call(shard.handle.actor.watch.remote(), None)
            except ray.exceptions.RayActorError:
                if self.shards.get(shard.shard_id) is shard and self.on_death is not None:
                    self.on_death()

        self._watchers[shard.shard_id] = asyncio.create_task(guard(), name=shard.shard_id)

    def _unwatch(self, shard_id: str) -> None:
        task = self._watchers.pop(shard_id, None)
        if task is not None:
            task.cancel()

    # --- upkeep (the supervisor's health round) ------------------------------------------

    async def refresh(self) -> tuple[list[SenderStats], list[RegistryEvent]]:
        """Poll every shard, reconcile the registry, retire idle extra shards; a shard that
        died is dropped and its viewers marked reconnecting."""
        async with self._refreshing:
            return await self._refresh()

    async def _refresh(self) -> tuple[list[SenderStats], list[RegistryEvent]]:
        events: list[RegistryEvent] = []
        reports: list[SenderStats] = []
        shards = list(self.shards.values())
        results = await asyncio.gather(
            *(shard.handle.stats() for shard in shards), return_exceptions=True
        )
        now = time.monotonic()
        lost: list[Shard] = []
        for shard, result in zip(shards, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, ray.exceptions.RayActorError | TimeoutError):
                    logger.warning(
                        "stream %s: %s died: %s", self.session_id, shard.shard_id, unwrap(result)
                    )
                    self.shards.pop(shard.shard_id, None)
                    self._unwatch(shard.shard_id)
                    events += self.registry.shard_lost(shard.shard_id, now)
                    lost.append(shard)
                    continue
                raise result
            shard.sample(result, now)
            reports.append(result)
            connections = [
                ConnectionReport(
                    peer_id=peer.peer_id,
                    viewer_id=peer.viewer_id or None,
                    bytes_sent=peer.bytes_sent,
                    skipped_to_keyframe=peer.frames_dropped,
                )
                for peer in result.peers
            ]
            events += self.registry.reconcile(shard.shard_id, connections, now)
        await self._sample_remote()
        unjoined, self._unjoined = self._unjoined, []
        for shard in lost:
            await self._release_node(shard.node_id, shard.shard_id)
            if shard.shared_port is not None:
                unjoined.append(shard)
            elif not shard.node_id:  # a shard on another node: its viewers try their alt= URLs
                await self._adopt(shard)
        for shard in unjoined:
            await self._rejoin(shard)
        for shard_id, (dead, ports) in list(self._unadopted.items()):
            del self._unadopted[shard_id]
            await self._adopt(dead, ports=ports)
        events += self.registry.expire(now)
        for shard_id in self.balancer.retire(self.loads(), now):
            if self.shards[shard_id].shared_port is not None:
                continue  # the stream's address on a shared port: it stays
            shard = self.shards.pop(shard_id)
            self._unwatch(shard_id)
            events += self.registry.shard_lost(shard_id, now)
            logger.info("stream %s: retiring idle %s", self.session_id, shard_id)
            # Its own port had no viewer for the idle time and goes with it (a new viewer
            # gets a new ticket), but ports it adopted from a dead shard are addresses viewers
            # (or ``serve``'s printed URL) still use: they move to a survivor first.
            if shard.adopted_ports:
                await self._adopt(shard, ports=shard.adopted_ports)
            await self._stop_handle(shard_id, shard.handle)
            await self._release_node(shard.node_id, shard_id)
        return reports, events

    async def _adopt(self, dead: Shard, *, ports: list[int] | None = None) -> None:
        """Serve a dead shard's addresses (or ``ports`` of a retiring one) from the
        least-loaded survivor (or a new shard), so its viewers reconnect to the address they
        know; the registry matches them again by their CNAME (RECONNECTING -> CONNECTED)."""
        ports = list(ports) if ports is not None else [dead.port, *dead.adopted_ports]
        try:
            # A port is an address on the stream's node: only a shard there can listen on it.
            local = {s.shard_id for s in self.shards.values() if not s.node_id}
            chosen = heir([load for load in self.loads() if load.shard_id in local])
            if chosen is not None:
                successor = self.shards[chosen.shard_id]
                for port in ports:
                    await successor.handle.call(SenderActor.listen_also, self.host, port)
                successor.adopted_ports += ports
            else:
                successor = await self.start_shard(ports[0], reuse_port=True)
                for port in ports[1:]:
                    await successor.handle.call(SenderActor.listen_also, self.host, port)
                successor.adopted_ports += ports[1:]
        except (KizunaError, OSError, ray.exceptions.RayError, TimeoutError) as exc:
            logger.warning(
                "stream %s: nobody took over %s's ports %s yet: %s",
                self.session_id,
                dead.shard_id,
                ports,
                str(unwrap(exc)) or type(exc).__name__,
            )
            self._unadopted[dead.shard_id] = (dead, ports)  # again at the next round
            return
        logger.info(
            "stream %s: %s serves %s's ports %s",
            self.session_id,
            successor.shard_id,
            dead.shard_id,
            ports,
        )

    async def _rejoin(self, dead: Shard) -> None:
        if self.rejoin is None:
            return
        try:
            await self.rejoin(dead)
        except (KizunaError, OSError, ray.exceptions.RayError, TimeoutError) as exc:
            logger.warning(
                "stream %s: could not rejoin shared port %d yet: %s",
                self.session_id,
                dead.port,
                str(unwrap(exc)) or type(exc).__name__,
            )
            self._unjoined.append(dead)  # again at the next round

    async def adopt(self, shards: list[Shard], names: list[str]) -> None:
        """After the supervisor's crash: take back ``shards`` (found by name; each with the
        node it runs on) and the relays those on other nodes read (``names``: the stream's
        actor names, ``ShardPlacer.adopt``).  A shard whose node's relay is gone is stopped:
        it would serve nothing, and its viewers go on at their URLs' alternates."""
        orphans: set[str] = set()
        if self.placer is not None:
            orphans = await self.placer.adopt(
                names, {s.shard_id: s.node_id for s in shards if s.node_id}
            )
        now = time.monotonic()
        for shard in shards:
            if shard.shard_id in orphans:
                logger.warning(
                    "stream %s: %s lost its node's relay: stopped", self.session_id, shard.shard_id
                )
                await self._stop_handle(shard.shard_id, shard.handle)
                continue
            self.shards[shard.shard_id] = shard
            self.registry.add_shard(shard.shard_id, now)

    async def attach(self, shard: Shard) -> None:
        """A shard started elsewhere (the stream's part of a shared port) joins the pool."""
        if self.quality is not None:
            await self.quality.add_sender(shard.shard_id, shard.handle)
        self.shards[shard.shard_id] = shard
        self.registry.add_shard(shard.shard_id, time.monotonic())

    async def remove_viewer(self, viewer_id: str) -> bool:
        """Forget a viewer and close its connection; False if it was not registered."""
        record = self.registry.get(viewer_id)
        if record is None:
            return False
        self.registry.remove(viewer_id, time.monotonic())
        shard = self.shards.get(record.shard_id or "")
        if shard is not None:
            try:
                await shard.handle.call(SenderActor.close_viewer, viewer_id)
            except (KizunaError, ray.exceptions.RayError, TimeoutError) as exc:
                logger.warning("stream %s: closing viewer %s: %s", self.session_id, viewer_id, exc)
        return True

    # --- stopping ---------------------------------------------------------------------

    def handles(self) -> list[SenderHandle]:
        return [shard.handle for shard in self.shards.values()] + list(self._opening.values())

    def pids(self) -> dict[str, int]:
        """The shards whose processes run on the supervisor's node (the monitor's psutil
        cannot see the others)."""
        return {shard.shard_id: shard.pid for shard in self.shards.values() if shard.local_pid}

    async def stop_all(self) -> list[SenderStats]:
        for shard_id in list(self._watchers):
            self._unwatch(shard_id)
        finals = []
        for shard_id, shard in list(self.shards.items()):
            try:
                finals.append(await shard.handle.stop())
            except Exception as exc:
                logger.warning("stream %s: could not stop %s: %s", self.session_id, shard_id, exc)
        if self.placer is not None:
            await self.placer.close()
        return finals

    async def _sample_remote(self) -> None:
        """The CPU of shards on other nodes, sampled there (by each node's relay)."""
        remote = [s for s in self.shards.values() if not s.local_pid]
        if self.placer is None or not remote:
            self.remote_usage = {}
            return
        pids: dict[str, dict[str, int]] = {}
        for shard in remote:
            pids.setdefault(shard.node_id, {})[shard.shard_id] = shard.pid
        self.remote_usage = await self.placer.sample(pids)
        for shard in remote:
            sample = self.remote_usage.get(shard.node_id)
            usage = (
                next((p for p in sample.processes if p.label == shard.shard_id), None)
                if sample
                else None
            )
            if usage is not None:
                shard.cpu_cores = usage.cpu_percent / 100

    def remote_processes(self) -> list[ProcessUsage]:
        """The shards on other nodes as their nodes last measured them (label: shard id)."""
        return [p for sample in self.remote_usage.values() for p in sample.processes]

    async def _release_node(self, node_id: str, shard_id: str) -> None:
        """A shard on another node is gone: that node's relay goes with its last shard."""
        if self.placer is not None and node_id and node_id != self.node_id:
            try:
                await self.placer.release(node_id, shard_id)
            except Exception as exc:
                logger.warning("stream %s: releasing node %s: %s", self.session_id, node_id, exc)

    def ticket_url(self, shard: Shard, viewer_id: str) -> StreamUrl:
        """The URL of a viewer placed on ``shard``: its endpoint, then one shard on each other
        node as an alternate (the least loaded there), which a viewer tries when its node is
        lost.  Shards on the same node are no alternates: a dead one's port is taken over."""
        others: dict[str, Shard] = {}
        for other in sorted(self.shards.values(), key=lambda s: (s.cpu_cores, s.bytes_per_s)):
            if other.node_id != shard.node_id:
                others.setdefault(other.node_id, other)
        alternates = [(s.url.host, s.url.port) for s in list(others.values())[:MAX_ALTERNATES]]
        return shard.url.with_viewer(viewer_id).with_alternates(alternates)

    async def _stop_handle(self, shard_id: str, handle: SenderHandle) -> None:
        if self.quality is not None:
            try:
                await self.quality.remove_sender(shard_id)
            except Exception as exc:
                logger.warning("stream %s: %s out of quality: %s", self.session_id, shard_id, exc)
        try:
            await handle.stop()
        except Exception as exc:
            logger.warning("stream %s: could not stop %s: %s", self.session_id, shard_id, exc)
        try:
            handle.kill()
        except Exception as exc:
            logger.warning("stream %s: could not kill %s: %s", self.session_id, shard_id, exc)
