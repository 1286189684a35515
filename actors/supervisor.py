"""Supervisor: the actor that owns every stream (the design's StreamScheduler and ResourceMonitor).

For each stream it places the actors on one node, creates them in dependency order (capture
creates the frame pool, the encoder the packet ring, then recorder and quality attach; sender
shards start as viewers arrive, ``actors.shards``), reports the stream Active only once every
stage is up, and on stop tears them down in reverse and removes the shared memory.  Stream actors
are detached and the supervisor is restarted by Ray after a crash: it takes its streams back
by name (``actors.supervisor_state``); segments a crash leaves behind are swept at the next start.

A crashed capture, encoder or quality actor is restarted (``actors.recovery``; a crash loop
moves the stream to Error with the reason).  A health loop polls each stream's stages once a
second: a stage that reported a failure moves the stream to the Error state with the reason;
the same round reconciles the viewer registry with the shards' connections, replaces dead
shards and retires idle ones.

The supervisor does the I/O; the decisions are pure code in ``shared.control``: the stream's
state changes only through its ``StreamLifecycle`` (the state table in ``session``), which
also says what each state allows; ``stream_type`` and ``ports`` decide what a request may do,
``stats`` folds the stages' reports into the stream's figures.  The actors are reached through
the typed handles of ``actors.handles``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import ray

from actors import supervisor_state
from actors.calls import call as unwrap_call
from actors.calls import unwrap
from actors.handles import (
    CaptureHandle,
    EncoderHandle,
    Handle,
    QualityHandle,
    RecorderHandle,
    SenderHandle,
    WebRTCHandle,
)
from actors.metrics import StreamMetrics
from actors.node_pressure import StreamPressure
from actors.placement import NAMESPACE, spawn
from actors.port_listeners import PortListeners
from actors.port_listeners import actor_name as port_actor_name
from actors.recordings import Recordings, StreamContext
from actors.recovery import RAY_RESTARTS, StageRecovery
from actors.remote_shards import actor_record
from actors.shard_placement import ShardPlacer
from actors.shards import Shard, ShardPool
from actors.stages.capture import CaptureActor
from actors.stages.encoder import (
    EncoderActor,
    RungStats,
    encoder_actor_options,
    ladder_ring_names,
)
from actors.stages.quality import QualityActor, viewer_quality
from actors.stages.sender import SenderActor
from actors.stages.webrtc import WebRTCShardActor
from actors.stream_group import CAPTURE_BUNDLE, ENCODER_BUNDLE, StreamGroup
from shared.auth.control import RungInfo
from shared.auth.pending import PendingRequest
from shared.auth.secret_file import load_secret
from shared.auth.server import AccessSettings
from shared.auth.tokens import TokenIssuer, TokenKey
from shared.control.overview import (
    ActorInfo,
    RungOverview,
    ServerOverview,
    StreamOverview,
    ViewerOverview,
)
from shared.control.ports import ListenPorts
from shared.control.pressure import PressureConfig
from shared.control.registry import ConnectionReport, RegistryEvent, ViewerState
from shared.control.resources import (
    ResourceHistory,
    ResourceMonitor,
    ResourceSnapshot,
    StreamLoad,
    StreamTraffic,
)
from shared.control.scheduler import DEFAULT_GPU_SESSIONS, NodeInfo, StreamScheduler
from shared.control.session import StreamEvent, StreamLifecycle, StreamOperation
from shared.control.stats import stage_failure, stream_stats
from shared.control.stream_type import (
    stream_config_with_screen_audio,
    stream_type_after_switch,
    stream_type_of,
)
from shared.errors import (
    ConfigError,
    KizunaError,
    PermissionError,
    ResourceError,
    StreamNotFoundError,
)
from shared.media.scaler import plan_ladder
from shared.models import (
    AccessMode,
    ConnectionQuality,
    ErrorInfo,
    RecordingConfig,
    RecordingSession,
    RecordingState,
    ScreenConfig,
    StreamConfig,
    StreamQuality,
    StreamSession,
    StreamState,
    StreamStats,
    StreamType,
    ViewerPermissions,
    ViewerStatus,
    ViewerTicket,
    parse_source,
)
from shared.pool.shm import segment_name, sweep_stale_segments, unlink_segment
from shared.roq.tls import TlsIdentity, generate_self_signed, load_identity
from shared.roq.url import StreamUrl

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
#: The viewer registry's shard id for a stream's WebRTC peers (``open_whep``).
WEBRTC_SHARD = "webrtc"


async def attempt(step: Callable[[], Awaitable[object]], what: str, context: str) -> None:
    """Run one cleanup step; a failure is logged (with what was being done) and not raised,
    so the steps after it still run."""
    try:
        await step()
    except Exception as exc:
        logger.warning("%s: could not %s: %s", context, what, unwrap(exc))


@dataclass
class _Viewer:
    status: ViewerStatus


@dataclass
class _Stream:
    session: StreamSession
    lifecycle: StreamLifecycle
    config: StreamConfig
    node_id: str
    segments: list[str]
    #: One certificate per stream, so every sender of it (and every shard of one listen
    #: address) presents the fingerprint in the stream's URL.
    identity: TlsIdentity
    screen: ScreenConfig | None = None
    capture: CaptureHandle | None = None
    #: None for an audio-only stream, as is ``quality``.
    encoder: EncoderHandle | None = None
    quality: QualityHandle | None = None
    #: The sender shards serving the stream's viewers (``actors.shards``).
    shards: ShardPool | None = None
    #: The WebRTC shard serving browsers over WHEP (``open_whep``), once asked for.
    webrtc: WebRTCHandle | None = None
    pids: dict[str, int] = field(default_factory=dict)
    viewers: dict[str, _Viewer] = field(default_factory=dict)
    #: The recording StreamConfig.record asked for, if any (others are started by API).
    primary_recording: str | None = None
    context: StreamContext | None = None
    started: float = field(default_factory=time.monotonic)
    #: Held while the stream starts and while it stops: a stop waits for the start to finish.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Token ids and viewer ids revoked on this stream (new shards start with them).
    revoked_tokens: set[str] = field(default_factory=set)
    revoked_viewers: set[str] = field(default_factory=set)
    #: Recordings viewers started (``can_record``), by viewer id.
    viewer_recordings: dict[str, str] = field(default_factory=dict)
    #: Recordings the stream's pause paused (its resume resumes these, not others).
    paused_recordings: list[str] = field(default_factory=list)
    #: The encoder's per-rung figures at the last stats poll (``overview``).
    last_rungs: list[RungStats] = field(default_factory=list)
    #: Restarts its crashed capture, encoder and quality actors, once it is Active.
    recovery: StageRecovery | None = None
    #: Holds its capture and encoder together on its node (``actors.stream_group``).
    group: StreamGroup | None = None

    def handles(self) -> list[Handle[Any]]:
        stages: list[Handle[Any]] = [
            h for h in (self.capture, self.quality, self.encoder) if h is not None
        ]
        stages += [self.webrtc] if self.webrtc is not None else []
        return stages + (self.shards.handles() if self.shards is not None else [])


class Supervisor:
    def __init__(
        self,
        max_streams: int = 16,
        token_secret: bytes | None = None,
        gpu_sessions_per_gpu: int = DEFAULT_GPU_SESSIONS,
    ) -> None:
        """``token_secret``: the HS256 key viewer tokens are signed with (None: the default
        secret file, ``shared.auth.secret_file``, created when a token stream first needs it).
        ``gpu_sessions_per_gpu``: hardware encoder sessions one GPU takes
        (``shared.control.scheduler``)."""
        self._token_secret = token_secret
        self._streams: dict[str, _Stream] = {}
        self._scheduler = StreamScheduler(
            max_streams=max_streams, gpu_sessions_per_gpu=gpu_sessions_per_gpu
        )
        self._ports = ListenPorts()
        #: Ports several streams share, each owned by one process (``actors.port_listeners``).
        self._listeners = PortListeners(self._ports)
        self._monitor = ResourceMonitor()
        #: The monitor's samples, taken every health round (``_publish``): what admission,
        #: ``status`` and the Ray metrics read.
        self._history = ResourceHistory()
        self._metrics: StreamMetrics | None = None
        #: CPU pressure on this node: its streams that shed give way by priority.
        self._pressure = StreamPressure()
        self._node_id = ray.get_runtime_context().get_node_id()
        self._health: asyncio.Task[None] | None = None
        #: Set to run the health round now (a shard died), not at its next interval.
        self._health_wake = asyncio.Event()
        self._recordings = Recordings()
        removed = sweep_stale_segments()
        if removed:
            logger.warning(
                "removed %d shared-memory segments left by a crashed run: %s", len(removed), removed
            )
        context = ray.get_runtime_context()
        #: The stream records in Ray's KV are kept under this name (``supervisor_state``).
        self._name = context.get_actor_name() or ""
        self._restarted = context.was_current_actor_reconstructed
        if self._restarted:
            # Ray restarted this actor after a crash and re-ran only this constructor: take
            # the running streams back as soon as the event loop runs (``ready``).  Asked
            # from a thread, again until it is taken: while Ray still counts this actor as
            # restarting, a call to it fails at once instead of waiting.
            threading.Thread(
                target=_call_ready, args=(context.current_actor,), daemon=True, name="adopt"
            ).start()

    async def ready(self) -> str:
        if self._health is None:
            self._health = asyncio.create_task(self._health_loop(), name="health")
            if self._restarted:
                try:
                    await self._adopt_streams()
                except Exception:
                    logger.exception("taking the streams back after a restart failed")
        return self._node_id

    async def _adopt_streams(self) -> None:
        """After this supervisor's own crash: take back each stream it had, from its record
        and the actors it finds by name; a stream cut short while starting, or one that
        cannot be taken back, is removed with all its actors and segments."""
        for record in supervisor_state.records(self._name):
            sid = record.session_id
            try:
                if not record.complete:
                    raise RuntimeError("its start was cut short by the crash")
                await self._adopt(record)
                logger.warning("stream %s taken back after the supervisor's restart", sid)
            except Exception as exc:
                self._streams.pop(sid, None)
                self._scheduler.release(sid)
                killed = await asyncio.to_thread(supervisor_state.kill_stream_actors, sid)
                supervisor_state.delete(self._name, sid)
                logger.error("stream %s removed (%s); killed %s", sid, unwrap(exc), killed)

    async def _adopt(self, record: supervisor_state.StreamRecord) -> None:
        assert record.session is not None and record.config is not None
        assert record.identity is not None
        sid, config = record.session_id, record.config
        session = msgspec.structs.replace(record.session, state=StreamState.STARTING, viewers=[])
        stream = _Stream(
            session=session,
            lifecycle=StreamLifecycle(session),
            config=config,
            node_id=record.node_id,
            segments=list(record.segments),
            identity=record.identity,
            screen=record.screen,
        )
        names = supervisor_state.stream_actor_names(sid)
        stream.group = StreamGroup.find(sid)

        def actor(role: str) -> Any:
            return ray.get_actor(f"kz-{sid}-{role}", namespace=NAMESPACE)

        stream.capture = CaptureHandle(actor("capture"))
        stream.pids["capture"] = (await stream.capture.stats()).pid
        ring_name = None
        if session.stream_type is not StreamType.AUDIO:
            encoder = stream.encoder = EncoderHandle(actor("encoder"))
            stream.quality = QualityHandle(actor("quality"))
            stream.pids["encoder"] = (await encoder.stats()).pid
            stream.pids["quality"] = await unwrap_call(
                stream.quality.actor.__ray_call__.remote(_pid_of)
            )
            rung_rings = await encoder.rung_names()
            ring_name = rung_rings[0]
            stream.context = StreamContext(
                session_id=sid,
                node_id=stream.node_id,
                quality=config.quality,
                ring_names={"video": ring_name, "frames": segment_name(sid, "frames")}
                | {f"video{n}": r for n, r in enumerate(rung_rings[1:], 1)}
                | ({"audio": segment_name(sid, "audio")} if config.audio else {}),
                encoder=encoder,
            )
        shards = stream.shards = self._shard_pool(stream, ring_name)
        found: list[Shard] = []
        for name in names:
            role = name.removeprefix(f"kz-{sid}-")
            if role.startswith("shard-"):
                handle = SenderHandle(actor(role))
                stats = await handle.stats()
                url = StreamUrl.parse(stats.url)
                node, started = await asyncio.to_thread(actor_record, handle.actor)
                # Its age, not the adoption's moment: idle shards retire youngest first.
                now = time.monotonic() - max(0.0, time.time() - started)
                shard = Shard(role, handle, url, url.port, stats.pid, now)
                shard.adopted_ports = [p for p in stats.ports if p != url.port]
                if node != stream.node_id:  # reads its node's relay copy
                    shard.node_id, shard.local_pid = node, node == self._node_id
                found.append(shard)
            elif role == "webrtc":
                stream.webrtc = WebRTCHandle(actor(role))
            elif role == "relay" or role.startswith("relay-") or "-shard" in role:
                # A relay (the pool's placer takes it back below), or a shard a RemoteNode
                # started itself (not the pool's).
                continue
            elif role not in ("capture", "encoder", "quality"):
                # A recorder: what it wrote is finished cleanly; its recording's bookkeeping
                # died with the old supervisor.
                recorder = RecorderHandle(actor(role))
                await attempt(recorder.stop, f"stop recorder {role}", f"stream {sid}")
                recorder.kill()
        await shards.adopt(found, names)
        if await self._listeners.adopt(shards) is not None:  # its part of a shared port
            shards.rejoin = lambda dead: self._listeners.rejoin(shards, dead)
        gpu = stream.group is not None and stream.group.encoder_gpus > 0
        self._scheduler.restore(sid, config.quality, record.node_id, gpu=gpu)
        self._streams[sid] = stream
        stream.lifecycle.handle(StreamEvent.STARTED)
        if record.session.state is StreamState.PAUSED:
            # Paused when the old supervisor died: its capture still waits (asked again, in
            # case it was restarted meanwhile), and resume works as before.
            await stream.capture.pause()
            stream.lifecycle.handle(StreamEvent.PAUSE)
        self._watch(stream)
        if stream.quality is not None and record.node_id == self._node_id:
            # The steps the dead supervisor had shed died with it: the stream starts again
            # from nothing shed, and sheds again if the pressure is still there.
            ladder = plan_ladder(config.quality, config.rungs)
            top = ladder.rungs[0]
            self._pressure.add(sid, config, framerate=top.framerate, rungs=len(ladder.rungs))
            self._pressure.core.set_paused(sid, stream.lifecycle.state is StreamState.PAUSED)
            state = self._pressure.state(sid)
            if state is not None and (await stream.quality.pressure())[0] > 0:
                await stream.quality.apply_pressure(state)

    def _watch(self, stream: _Stream) -> None:
        """Restart the stream's stages when they crash (``actors.recovery``)."""
        sid = stream.session.session_id
        stream.recovery = StageRecovery(
            stream,
            self._recordings,
            fail=self._fail,
            pressure=lambda: self._pressure.state(sid),
            # A paused stream's stages are restarted too (capture is paused again after).
            running=lambda: (
                self._streams.get(sid) is stream
                and stream.lifecycle.state in (StreamState.ACTIVE, StreamState.PAUSED)
            ),
        )
        stream.recovery.start()

    def _record(self, stream: _Stream, *, complete: bool) -> None:
        """What a restarted supervisor needs to take the stream back (``supervisor_state``)."""
        sid = stream.session.session_id
        record = supervisor_state.StreamRecord(session_id=sid)
        if complete:
            record = supervisor_state.StreamRecord(
                session_id=sid,
                complete=True,
                session=stream.session,
                config=stream.config,
                node_id=stream.node_id,
                segments=tuple(stream.segments),
                identity=stream.identity,
                screen=stream.screen,
            )
        supervisor_state.save(self._name, record)

    # --- streams -----------------------------------------------------------------------

    async def start_stream(
        self,
        config: StreamConfig,
        stream_type: StreamType | None = None,
        screen: ScreenConfig | None = None,
    ) -> StreamSession:
        """Start a stream; ``stream_type`` matters only as AUDIO (audio only): otherwise the
        source and ``config.audio`` say what the stream is (``shared.control.stream_type``)."""
        config = stream_config_with_screen_audio(config, screen)
        stream_type = stream_type_of(config, audio_only=stream_type is StreamType.AUDIO)
        source = parse_source(config.source)
        session_id = uuid.uuid4().hex[:10]
        nodes = [
            NodeInfo(
                node_id=n["NodeID"],
                cpus=float(n["Resources"].get("CPU", 0)),
                alive=bool(n["Alive"]),
                cpu_percent=self._measured_cpu(n["NodeID"]),
                gpus=float(n["Resources"].get("GPU", 0)),
            )
            for n in ray.nodes()
        ]
        identity = (
            load_identity(config.tls_cert_path, config.tls_key_path)
            if config.tls_cert_path and config.tls_key_path
            else generate_self_signed(config.listen_host)
        )
        # A ConfigError before any actor starts, and before the scheduler counts the stream
        # (a rejected ladder after place() would leak its slot).
        ladder = plan_ladder(config.quality, config.rungs)
        node_id = self._scheduler.place(session_id, config.quality, nodes, prefer=self._node_id)
        if node_id == self._node_id:  # the node whose pressure is measured
            try:
                self._pressure.admit(session_id, config)
            except ResourceError:
                self._scheduler.release(session_id)
                raise
        pool_name = segment_name(session_id, "frames")
        ring_names = ladder_ring_names(session_id, ladder.rungs)
        ring_name = ring_names[0]
        audio_ring = segment_name(session_id, "audio") if config.audio else None
        session = StreamSession(
            session_id=session_id,
            stream_type=stream_type,
            source=source,
            viewers=[],
            quality=config.quality,
            state=StreamState.STARTING,
            stats=StreamStats(),
            created_at=time.time(),
            name=config.name,
        )
        stream = _Stream(
            session=session,
            lifecycle=StreamLifecycle(session),
            config=config,
            node_id=node_id,
            segments=[pool_name, *ring_names] + ([audio_ring] if audio_ring else []),
            identity=identity,
            screen=screen,
        )
        self._streams[session_id] = stream
        self._record(stream, complete=False)
        async with stream.lock:
            try:
                await self._start_actors(stream, pool_name, ring_name)
            except BaseException as exc:
                error = unwrap(exc)
                self._fail(stream, error)
                await self._teardown(stream)
                self._streams.pop(session_id, None)
                raise error from None
            stream.lifecycle.handle(StreamEvent.STARTED)
            self._record(stream, complete=True)
            self._watch(stream)
            if stream.quality is not None and node_id == self._node_id:
                top = ladder.rungs[0]
                self._pressure.add(
                    session_id, config, framerate=top.framerate, rungs=len(ladder.rungs)
                )
        logger.info("stream %s active on node %s", session_id, node_id)
        return stream.session

    async def _start_actors(self, stream: _Stream, pool_name: str, ring_name: str) -> None:
        sid, config = stream.session.session_id, stream.config
        video = stream.session.stream_type is not StreamType.AUDIO
        gpu_share = self._scheduler.gpu_share(sid)
        group = stream.group = await StreamGroup.reserve(
            sid, stream.node_id, video=video, encoder_gpus=gpu_share
        )
        if group.node_id != stream.node_id:  # the scheduler's node was only a soft target
            logger.warning(
                "stream %s placed on node %s, not %s", sid, group.node_id, stream.node_id
            )
            stream.node_id = group.node_id
            self._scheduler.relocate(sid, group.node_id)
        node = stream.node_id

        def name(role: str) -> str:
            return f"kz-{sid}-{role}"

        # Capture opens every source before it creates the frame pool and the audio ring, so
        # a bad source fails here, before anything else exists; the encoder and the senders
        # attach to what it created, so it goes first.
        # Capture, encoder and quality are restarted by Ray after a crash (``actors.recovery``
        # says why); the supervisor then re-runs their start and re-attaches shared memory.
        capture = stream.capture = spawn(
            CaptureActor,
            CaptureHandle,
            name=name("capture"),
            node_id=node,
            max_restarts=RAY_RESTARTS,
            bundle=group.bundle(CAPTURE_BUNDLE),
        )(
            session_id=sid,
            source=stream.session.source,
            quality=config.quality,
            pool_name=pool_name,
            slots=config.pool_slots,
            audio=config.audio,
            audio_ring_name=segment_name(sid, "audio") if config.audio else None,
            screen=stream.screen,
            capture=config.capture,
            video=video,
        )
        stream.pids["capture"] = await capture.open()
        if not video:
            stream.shards = self._shard_pool(stream, None)
            await capture.start(None)
            return
        encoder = stream.encoder = spawn(
            EncoderActor,
            EncoderHandle,
            name=name("encoder"),
            node_id=node,
            # A hardware encoder asks Ray for its share of a GPU, which its bundle holds (none
            # where the scheduler found no GPU node: it encodes in software there).
            options=encoder_actor_options(
                config.quality.hardware_acceleration, gpu_share=gpu_share
            ),
            max_restarts=RAY_RESTARTS,
            bundle=group.bundle(ENCODER_BUNDLE),
        )(
            session_id=sid,
            quality=config.quality,
            keyframe_interval_s=config.keyframe_interval_s,
            pool_name=pool_name,
            ring_name=ring_name,
            rungs=config.rungs,
        )
        stream.pids["encoder"] = await encoder.open()
        rung_rings = await encoder.rung_names()
        stream.context = StreamContext(
            session_id=sid,
            node_id=node,
            quality=config.quality,
            ring_names={"video": ring_name, "frames": pool_name}
            | {f"video{n}": r for n, r in enumerate(rung_rings[1:], 1)}
            | ({"audio": segment_name(sid, "audio")} if config.audio else {}),
            encoder=encoder,
        )
        if config.record is not None:
            started = await self._recordings.start(stream.context, config.record)
            stream.primary_recording = started.session_id
        quality = stream.quality = spawn(
            QualityActor,
            QualityHandle,
            name=name("quality"),
            node_id=node,
            max_restarts=RAY_RESTARTS,
        )(
            session_id=sid,
            encoder=encoder,
            ceiling_bitrate=config.quality.bitrate,
            content_aware=config.content_aware_targets,
        )
        stream.pids["quality"] = await quality.start()
        stream.shards = self._shard_pool(stream, ring_name)
        await capture.start(encoder)

    def _secret(self) -> bytes:
        if self._token_secret is None:
            self._token_secret = load_secret(create=True)
        return self._token_secret

    def _access(self, stream: _Stream) -> AccessSettings:
        config = stream.config
        rungs: tuple[RungInfo, ...] = ()
        if stream.encoder is not None:  # None: an audio-only stream, nothing to cap
            rungs = tuple(RungInfo.of(r) for r in plan_ladder(config.quality, config.rungs).rungs)
        return AccessSettings(
            access=config.access,
            secret=self._secret() if config.access.mode == AccessMode.TOKEN else None,
            revoked_tokens=tuple(sorted(stream.revoked_tokens)),
            revoked_viewers=tuple(sorted(stream.revoked_viewers)),
            rungs=rungs,
        )

    def _shard_pool(self, stream: _Stream, video_ring: str | None) -> ShardPool:
        def tracks() -> list[str]:
            rings = stream.context.ring_names if stream.context is not None else {"audio": ""}
            return [role for role in rings if role != "frames"]

        return ShardPool(
            session_id=stream.session.session_id,
            node_id=stream.node_id,
            host=stream.config.listen_host,
            identity=stream.identity,
            video_ring=video_ring,
            encoder=stream.encoder,
            quality=stream.quality,
            limits=stream.config.viewers,
            access=self._access(stream),
            placer=ShardPlacer(
                stream.session.session_id, stream.node_id, tracks, self._shard_counts
            ),
            # A shard that dies wakes the health round, which hands its port on at once.
            on_death=self._health_wake.set,
        )

    def _shard_counts(self) -> dict[str, int]:
        """Sender shards on each node, every stream's (what shard placement balances)."""
        counts: dict[str, int] = {}
        for stream in self._streams.values():
            for shard in stream.shards.shards.values() if stream.shards is not None else []:
                node = shard.node_id or stream.node_id
                counts[node] = counts.get(node, 0) + 1
        return counts

    async def stop_stream(self, session_id: str) -> StreamSession | None:
        """Stop a stream; stopping one that is already stopped (or unknown) does nothing.
        A stream still starting is stopped once it has started."""
        stream = self._streams.get(session_id)
        if stream is None:
            return None
        async with stream.lock:
            if session_id not in self._streams:
                return None  # stopped meanwhile, or its start failed
            await self._refresh_stats(stream)
            stream.lifecycle.handle(StreamEvent.STOP)
            await self._teardown(stream)
            self._streams.pop(session_id, None)
            stream.lifecycle.handle(StreamEvent.STOPPED)
        return stream.session

    async def _teardown(self, stream: _Stream) -> None:
        """Stop every actor (each attempted, in pipeline order), kill them, remove shared
        memory."""
        sid = stream.session.session_id
        context = f"stream {sid}"
        if stream.recovery is not None:
            await stream.recovery.close()  # the kills below are no crashes
        for role, stage in (
            ("capture", stream.capture),
            ("quality", stream.quality),
            ("encoder", stream.encoder),
        ):
            if stage is not None:
                await attempt(stage.stop, f"stop the {role}", context)
        if stream.webrtc is not None:
            await attempt(stream.webrtc.stop, "stop the WebRTC shard", context)
        if stream.shards is not None:
            await stream.shards.stop_all()
        self._recordings.cancel_stream(sid)
        for recording_id in self._recordings.of_stream(sid):
            try:
                final = await self._recordings.stop(recording_id)
            except Exception as exc:
                logger.warning("recording %s did not stop cleanly: %s", recording_id, exc)
                continue
            if recording_id == stream.primary_recording:
                stream.session.recording = final
        for handle in stream.handles():
            try:
                handle.kill()
            except Exception as exc:  # nothing left to end; say so rather than hide it
                logger.warning("could not kill %s: %s", type(handle).__name__, exc)
        stream.capture = stream.encoder = stream.quality = None
        stream.shards = None
        stream.webrtc = None
        # Actors unlink what they created on a clean stop; this covers the ones that crashed.
        for name in stream.segments:
            unlink_segment(name)
        if stream.group is not None:
            try:
                stream.group.remove()
            except Exception as exc:
                logger.warning("%s: could not remove its placement group: %s", context, exc)
            stream.group = None
        self._scheduler.release(sid)
        await self._listeners.leave(sid)
        self._pressure.remove(sid)
        self._ports.release_stream(sid)
        supervisor_state.delete(self._name, sid)

    async def switch_source(self, session_id: str, source: str) -> StreamSession:
        """Switch a running stream to another source; viewers stay connected (the capture
        actor opens the new source first, swaps it in at the next frame and asks for a
        keyframe)."""
        stream = self._get(session_id)
        stream.lifecycle.check(StreamOperation.SWITCH_SOURCE)
        # ConfigErrors here, before any actor is asked.
        stream_type_after_switch(stream.session.stream_type, parse_source(source))
        assert stream.capture is not None  # every stage is up in a state that allows this
        info = await stream.capture.switch_source(source)
        stream.session.source = info.spec
        stream.session.stream_type = stream_type_after_switch(stream.session.stream_type, info.spec)
        return stream.session

    async def pause_stream(self, session_id: str) -> StreamSession:
        """Pause a stream (StreamState.PAUSED): capture stops and its recordings pause; the
        viewers stay connected, keep the last picture, and new ones may join.  Pausing a
        paused stream does nothing."""
        stream = self._get(session_id)
        async with stream.lock:
            if stream.lifecycle.state is StreamState.PAUSED:
                return stream.session
            stream.lifecycle.handle(StreamEvent.PAUSE)
            try:
                if stream.capture is not None:
                    await stream.capture.pause()
                for recording_id in self._recordings.of_stream(session_id):
                    status = await self._recordings.status(recording_id)
                    if status.state is RecordingState.RECORDING:
                        await self._recordings.pause(recording_id)
                        stream.paused_recordings.append(recording_id)
            except Exception as exc:
                self._fail(stream, exc)
                raise unwrap(exc) from None
            self._record(stream, complete=True)  # a restarted supervisor keeps it paused
            self._pressure.core.set_paused(session_id, True)
        logger.info("stream %s paused", session_id)
        return stream.session

    async def resume_stream(self, session_id: str) -> StreamSession:
        """Resume a paused stream: capture goes on (with a keyframe first) and the recordings
        its pause paused continue.  Resuming an active stream does nothing."""
        stream = self._get(session_id)
        async with stream.lock:
            if stream.lifecycle.state is StreamState.ACTIVE:
                return stream.session
            stream.lifecycle.handle(StreamEvent.RESUME)
            try:
                if stream.capture is not None:
                    await stream.capture.resume()
                paused, stream.paused_recordings = stream.paused_recordings, []
                for recording_id in paused:
                    await self._recordings.resume(recording_id)
            except Exception as exc:
                self._fail(stream, exc)
                raise unwrap(exc) from None
            self._record(stream, complete=True)
            self._pressure.core.set_paused(session_id, False)
        logger.info("stream %s resumed", session_id)
        return stream.session

    async def adjust_quality(self, session_id: str, quality: StreamQuality) -> StreamSession:
        """Change a running stream's quality: bitrate within one GOP, resolution or frame rate
        at an IDR with continuous timestamps (the encoder reopens and scales the pool's
        frames); viewers stay connected."""
        stream = self._get(session_id)
        stream.lifecycle.check(StreamOperation.ADJUST_QUALITY)
        if stream.encoder is None or stream.quality is None:
            raise ConfigError("an audio-only stream has no video quality to adjust")
        # The encoder first, so a raised ceiling reopens it once before the quality actor
        # retargets the rate.
        applied = await stream.encoder.configure(quality)
        await stream.quality.set_ceiling(applied.bitrate)
        stream.session.quality = applied
        self._record(stream, complete=True)  # what a restarted supervisor (and encoder) use
        return stream.session

    async def get_active_streams(self) -> list[StreamSession]:
        for stream in list(self._streams.values()):
            await self._refresh_stats(stream)
        return [stream.session for stream in self._streams.values()]

    async def get_stream(self, session_id: str) -> StreamSession:
        stream = self._get(session_id)
        await self._refresh_stats(stream)
        return stream.session

    def _get(self, session_id: str) -> _Stream:
        try:
            return self._streams[session_id]
        except KeyError:
            raise StreamNotFoundError(f"no active stream {session_id!r}") from None

    # --- viewers ----------------------------------------------------------------------

    async def add_viewer(
        self, session_id: str, peer_id: str, permissions: ViewerPermissions, port: int = 0
    ) -> ViewerTicket:
        """A ticket for a new viewer on the shard the balancer chose (a new shard, listening
        on ``port`` when one is given, if every shard is full).  ResourceError when a limit
        refuses the viewer, with the reason."""
        stream = self._get(session_id)
        if not permissions.can_view:
            raise PermissionError(f"peer {peer_id!r} is not allowed to view")
        stream.lifecycle.check(StreamOperation.ADD_VIEWER)
        shards = stream.shards
        assert shards is not None  # set before the stream is Active
        self._ports.reserve(session_id, port)
        try:
            viewer_id, shard = await shards.ticket(peer_id, port=port)
            # The stream may have begun stopping (or failed) while a shard opened.
            stream.lifecycle.check(StreamOperation.ADD_VIEWER)
        finally:
            # The port stays reserved only if the chosen shard listens on it.
            if port and not any(s.port == port for s in shards.shards.values()):
                self._ports.release(session_id, port)
        url = str(shards.ticket_url(shard, viewer_id))
        stream.viewers[viewer_id] = _Viewer(
            status=ViewerStatus(
                viewer_id=viewer_id,
                peer_id=peer_id,
                device_name=peer_id,
                connection_quality=ConnectionQuality.DISCONNECTED,
                permissions=permissions,
                connected_at=time.time(),
                bytes_sent=0,
                current_quality=stream.session.quality,
                url=url,
                shard=shard.shard_id,
            ),
        )
        stream.session.viewers.append(viewer_id)
        token = None
        if stream.config.access.mode == AccessMode.TOKEN:
            token, _ = TokenIssuer(TokenKey.hs256(self._secret())).issue(
                stream=session_id, now=time.time(), permissions=permissions, viewer=viewer_id
            )
        return ViewerTicket(viewer_id=viewer_id, session_id=session_id, url=url, token=token)

    # --- access control (the design's ViewerManager and ViewerAuthentication) -------------

    def _shard_handles(self, session_id: str) -> list[SenderHandle]:
        stream = self._get(session_id)
        return [] if stream.shards is None else [s.handle for s in stream.shards.shards.values()]

    async def issue_token(
        self,
        session_id: str,
        permissions: ViewerPermissions,
        viewer_id: str | None = None,
        ttl_s: float = 3600.0,
    ) -> str:
        """A token for one viewer of a token stream (a secret: hand it to that viewer only)."""
        stream = self._get(session_id)
        if stream.config.access.mode != AccessMode.TOKEN:
            raise ConfigError(f"stream {session_id} is open: its viewers need no token")
        token, _ = TokenIssuer(TokenKey.hs256(self._secret())).issue(
            stream=session_id,
            now=time.time(),
            permissions=permissions,
            viewer=viewer_id,
            ttl_s=ttl_s,
        )
        return token

    async def viewer_requests(self, session_id: str) -> list[PendingRequest]:
        """Viewers without a token waiting for an operator, on every shard of the stream."""
        lists = await asyncio.gather(
            *(h.call(SenderActor.pending_requests) for h in self._shard_handles(session_id))
        )
        return sorted((r for rs in lists for r in rs), key=lambda r: r.requested_at)

    async def approve_viewer_request(
        self,
        session_id: str,
        request_id: str,
        permissions: ViewerPermissions | None = None,
        viewer_id: str | None = None,
    ) -> None:
        """Let a waiting viewer in (view only unless ``permissions`` say more)."""
        for handle in self._shard_handles(session_id):
            if await handle.call(SenderActor.approve_request, request_id, permissions, viewer_id):
                return
        raise StreamNotFoundError(
            f"no viewer of stream {session_id} waits with request {request_id}"
        )

    async def deny_viewer_request(self, session_id: str, request_id: str, reason: str = "") -> None:
        for handle in self._shard_handles(session_id):
            if await handle.call(SenderActor.deny_request, request_id, reason):
                return
        raise StreamNotFoundError(
            f"no viewer of stream {session_id} waits with request {request_id}"
        )

    async def revoke_viewer(
        self, session_id: str, *, token_id: str | None = None, viewer_id: str | None = None
    ) -> int:
        """Revoke a token or a viewer: its live connections are cut now, and it cannot come
        back; how many connections were cut."""
        if token_id is None and viewer_id is None:
            raise ConfigError("name a token id or a viewer id to revoke")
        stream = self._get(session_id)
        if token_id is not None:
            stream.revoked_tokens.add(token_id)
        if viewer_id is not None:
            stream.revoked_viewers.add(viewer_id)
        if stream.shards is not None:
            stream.shards.access = self._access(stream)
        cuts = await asyncio.gather(
            *(
                h.call(SenderActor.revoke, token_id, viewer_id)
                for h in self._shard_handles(session_id)
            ),
            *([stream.webrtc.revoke(token_id, viewer_id)] if stream.webrtc is not None else []),
        )
        return sum(cuts)

    async def viewer_recording(
        self, session_id: str, viewer_id: str, action: str
    ) -> tuple[bool, str | None]:
        """A shard forwards an admitted viewer's recording request (its ``can_record`` was
        checked there, from its token or approval): start or stop that viewer's recording."""
        stream = self._get(session_id)
        folder = stream.config.access.viewer_recordings_dir
        if folder is None:
            return False, "this server records on no viewer's request (no viewer_recordings_dir)"
        if action == "stop":
            recording_id = stream.viewer_recordings.pop(viewer_id, None)
            if recording_id is None:
                return False, "this viewer has no recording running"
            done = await self._recordings.stop(recording_id)
            return True, f"recording stopped: {done.file_size} bytes"
        if viewer_id in stream.viewer_recordings:
            return False, "this viewer's recording is already running"
        if stream.context is None:
            return False, "recording an audio-only stream is not supported yet"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = str(Path(folder) / f"{session_id}-{viewer_id}-{stamp}.mp4")
        try:
            started = await self._recordings.start(
                stream.context, RecordingConfig(output_path=path)
            )
        except KizunaError as exc:
            return False, str(exc)
        stream.viewer_recordings[viewer_id] = started.session_id
        return True, f"recording {started.session_id} started"

    async def adjust_viewer_quality(
        self, session_id: str, viewer_id: str, rung: int | None = None
    ) -> int:
        """Pin one viewer to ``rung`` (None: back to its bandwidth's choice); its cap (its
        ``max_quality``) still wins.  How many of its connections it applied to."""
        counts = await asyncio.gather(
            *(
                h.call(SenderActor.pin_rung, viewer_id, rung)
                for h in self._shard_handles(session_id)
            )
        )
        if not sum(counts):
            raise StreamNotFoundError(f"stream {session_id} has no connected viewer {viewer_id!r}")
        return sum(counts)

    async def broadcast_to_viewers(
        self, session_id: str, text: str, data: dict[str, Any] | None = None
    ) -> int:
        """A notice to every viewer of the stream, over their control streams; how many."""
        counts = await asyncio.gather(
            *(h.call(SenderActor.notify, text, data) for h in self._shard_handles(session_id))
        )
        return sum(counts) + await self._notify_webrtc(session_id, text, data)

    async def _notify_webrtc(self, session_id: str, text: str, data: dict[str, Any] | None) -> int:
        """The notice to the stream's browsers too, over their data channels; how many."""
        webrtc = self._get(session_id).webrtc
        return 0 if webrtc is None else await webrtc.call(WebRTCShardActor.notify, text, data)

    async def open_shards(self, session_id: str, count: int, port: int) -> str:
        """Start ``count`` more shards sharing ``port`` (SO_REUSEPORT; 0: one shard on a free
        port) for viewers without a ticket, as ``serve`` offers; the URL they connect to."""
        stream = self._get(session_id)
        stream.lifecycle.check(StreamOperation.ADD_VIEWER)
        if count < 1:
            raise ConfigError(f"open at least one shard, not {count}")
        shards = stream.shards
        assert shards is not None
        if port and self._listeners.shared(port):
            # Streams already share this port (``serve --config``): join them there.
            return await self.open_shared_port(session_id, port)
        url = ""
        for _ in range(count if port else 1):
            self._ports.reserve(session_id, port)
            try:
                shard = await shards.start_shard(port, reuse_port=bool(port))
            except BaseException:
                self._ports.release(session_id, port)
                raise
            url = str(shard.url)
        return url

    async def open_shared_port(self, session_id: str, port: int) -> str:
        """Carry the stream on ``port`` together with other streams opened there this way: one
        process owns the port and gives each viewer the stream its hello names
        (``actors.port_listeners``); the URL the stream's viewers connect to."""
        stream = self._get(session_id)
        stream.lifecycle.check(StreamOperation.ADD_VIEWER)
        shards = stream.shards
        assert shards is not None
        shard = await self._listeners.join(shards, port)
        shards.rejoin = lambda dead: self._listeners.rejoin(shards, dead)
        return str(shard.url)

    async def open_whep(self, session_id: str, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve the stream's browser viewers over WebRTC: the WHEP endpoint's URL (HTTP on
        ``host:port``, 0: a free port).  One WebRTC shard per stream; asking again returns
        its URL."""
        stream = self._get(session_id)
        stream.lifecycle.check(StreamOperation.ADD_VIEWER)
        if stream.webrtc is None:
            context = stream.context
            handle = spawn(
                WebRTCShardActor,
                WebRTCHandle,
                name=f"kz-{session_id}-webrtc",
                node_id=stream.node_id,
            )(
                session_id=session_id,
                ring_name=context.ring_names.get("video") if context is not None else None,
                encoder=stream.encoder,
                audio_ring_name=segment_name(session_id, "audio") if stream.config.audio else None,
                access=self._access(stream),
                max_peers=stream.config.viewers.max_viewers_per_shard,
                supervisor=ray.get_runtime_context().current_actor,
            )
            try:
                await handle.open(host, port)
            except BaseException:
                handle.kill()
                raise
            stream.webrtc = handle
            if stream.shards is not None:
                stream.shards.registry.add_shard(WEBRTC_SHARD, time.monotonic())
        return (await stream.webrtc.stats()).url

    async def remove_viewer(self, session_id: str, viewer_id: str) -> None:
        """Remove a viewer (removing one that is gone does nothing); its connection, if any,
        is closed."""
        stream = self._get(session_id)
        stream.lifecycle.check(StreamOperation.REMOVE_VIEWER)
        viewer = stream.viewers.pop(viewer_id, None)
        if viewer is None:
            return
        stream.session.viewers.remove(viewer_id)
        if stream.shards is not None:
            await stream.shards.remove_viewer(viewer_id)
        if stream.webrtc is not None:
            await stream.webrtc.close_viewer(viewer_id)

    async def get_viewer_status(self, session_id: str) -> list[ViewerStatus]:
        stream = self._get(session_id)
        await self._refresh_stats(stream)
        await self._reconcile_webrtc(stream)  # its peers' own quality, after the round's
        return [viewer.status for viewer in stream.viewers.values()]

    # --- WebRTC peers as viewers (the WebRTC shard calls these) ---------------------------

    async def take_webrtc_seat(
        self, session_id: str, session: str, viewer: str | None, permissions: ViewerPermissions
    ) -> tuple[str | None, str]:
        """Seat a WHEP peer among the stream's viewers, within its limits: (the reason it is
        refused, or None; the viewer id it is registered under).  A token naming a viewer
        that holds a ticket and is not connected (``add_viewer``'s) moves that viewer's seat
        to the WebRTC shard; any other peer is a new viewer, under its token's viewer id when
        that is free, else ``whep-<session>``."""
        stream = self._streams.get(session_id)
        if stream is None or stream.shards is None or not stream.lifecycle.running:
            return f"stream {session_id} takes no viewers now", ""
        registry = stream.shards.registry
        now = time.monotonic()
        full = (
            f"stream {session_id} is full ({stream.config.viewers.max_viewers} viewers)"
            if registry.stream_viewers() >= stream.config.viewers.max_viewers
            else None
        )
        record = registry.get(viewer) if viewer else None
        ticketed = viewer and record is not None and viewer in stream.viewers
        if ticketed and record is not None and record.state is not ViewerState.CONNECTED:
            # Only PENDING and RECONNECTING viewers hold a seat already.
            if record.state is ViewerState.DISCONNECTED and full is not None:
                return full, ""
            registry.move(record.viewer_id, WEBRTC_SHARD, now)
            stream.viewers[record.viewer_id].status.shard = WEBRTC_SHARD
            return None, record.viewer_id
        if full is not None:
            return full, ""
        free = viewer and record is None and viewer not in stream.viewers
        viewer_id = viewer if viewer and free else f"whep-{session}"
        registry.register(viewer_id, viewer or viewer_id, WEBRTC_SHARD, now)
        stream.viewers[viewer_id] = _Viewer(
            status=ViewerStatus(
                viewer_id=viewer_id,
                peer_id=viewer or viewer_id,
                device_name="browser (WebRTC)",
                connection_quality=ConnectionQuality.DISCONNECTED,
                permissions=permissions,
                connected_at=time.time(),
                bytes_sent=0,
                current_quality=stream.session.quality,
                shard=WEBRTC_SHARD,
                state=str(ViewerState.PENDING),
            )
        )
        stream.session.viewers.append(viewer_id)
        return None, viewer_id

    async def release_webrtc_seat(self, session_id: str, viewer_id: str) -> None:
        """A WHEP peer ended (DELETE, ICE failure, revocation, removal): it leaves the
        registry and the stream's viewers.  Releasing one that is gone does nothing."""
        stream = self._streams.get(session_id)
        if stream is None or stream.shards is None:
            return
        record = stream.shards.registry.get(viewer_id)
        if record is not None and record.shard_id == WEBRTC_SHARD:
            stream.shards.registry.remove(viewer_id, time.monotonic())
        viewer = stream.viewers.get(viewer_id)
        if viewer is not None and viewer.status.shard == WEBRTC_SHARD:
            del stream.viewers[viewer_id]
            stream.session.viewers.remove(viewer_id)

    async def _reconcile_webrtc(self, stream: _Stream) -> list[RegistryEvent]:
        """Fold the WebRTC shard's peers into the registry (a peer is connected once its ICE
        and DTLS are) and into their viewers' status, as a sender shard's report is."""
        if stream.webrtc is None or stream.shards is None:
            return []
        try:
            stats = await stream.webrtc.stats()
        except (ray.exceptions.RayActorError, TimeoutError, KizunaError) as exc:
            logger.warning("stream %s: no WebRTC stats: %s", stream.session.session_id, exc)
            return []
        registry = stream.shards.registry
        connections = [
            ConnectionReport(
                peer_id=peer.session,
                viewer_id=peer.viewer_id,
                bytes_sent=peer.bytes_sent,
                skipped_to_keyframe=peer.frames_dropped,
            )
            for peer in stats.peers
            if peer.state == "connected"
        ]
        events = registry.reconcile(WEBRTC_SHARD, connections, time.monotonic())
        config = stream.config
        rungs = plan_ladder(config.quality, config.rungs).rungs if stream.encoder else []
        for peer in stats.peers:
            viewer = stream.viewers.get(peer.viewer_id or "")
            record = registry.get(peer.viewer_id or "")
            if viewer is None or record is None or record.shard_id != WEBRTC_SHARD:
                continue
            status = viewer.status
            status.bytes_sent, status.state = record.bytes_sent, str(record.state)
            status.url = stats.url
            status.current_quality = (
                rungs[peer.rung].quality(hardware_acceleration=False)
                if 0 < peer.rung < len(rungs)
                else stream.session.quality
            )
            status.connection_quality = (
                peer.connection_quality
                if record.state is ViewerState.CONNECTED
                else ConnectionQuality.DISCONNECTED
            )
        return events

    # --- monitoring ---------------------------------------------------------------------

    async def resources(self) -> ResourceSnapshot:
        pids = (
            {
                f"{sid}/{role}": pid
                for sid, stream in self._streams.items()
                for role, pid in stream.pids.items()
            }
            | {
                f"{sid}/sender-{shard_id}": pid
                for sid, stream in self._streams.items()
                if stream.shards is not None
                for shard_id, pid in stream.shards.pids().items()
            }
            | self._recordings.pids()
            | {"supervisor": os.getpid()}
        )
        loads = []
        for sid, stream in list(self._streams.items()):
            if stream.capture is None:
                continue
            try:
                capture = await stream.capture.stats()
            except Exception:  # a stream stopping meanwhile; its processes show as gone
                continue
            loads.append(
                StreamLoad(
                    session_id=sid,
                    capture_fps=capture.fps,
                    frames_skipped=capture.frames_skipped,
                    frames_decimated=capture.frames_decimated,
                    audio_overflows=capture.audio.overflows if capture.audio else 0,
                )
            )
        traffic = [
            StreamTraffic(
                session_id=sid,
                bytes_sent=sum(
                    shard.last.bytes_sent
                    for shard in stream.shards.shards.values()
                    if shard.last is not None
                ),
            )
            for sid, stream in list(self._streams.items())
            if stream.shards is not None
        ]
        snapshot = self._monitor.sample(pids, loads, traffic)
        # Shards on other nodes, as those nodes measured them (``ShardPool.remote_processes``).
        remote = [
            msgspec.structs.replace(usage, label=f"{sid}/sender-{usage.label}")
            for sid, stream in list(self._streams.items())
            if stream.shards is not None
            for usage in stream.shards.remote_processes()
        ]
        if remote:
            snapshot = msgspec.structs.replace(snapshot, processes=[*snapshot.processes, *remote])
        self._history.add(snapshot)
        return snapshot

    async def set_admission(self, cpu_percent: float | None) -> None:
        """Refuse new streams while this node's CPU, averaged over the monitor's window, is
        at or above ``cpu_percent`` (None: admission by the pixel-rate budget alone)."""
        if cpu_percent is not None and not 0 < cpu_percent <= 100:
            raise ConfigError(f"admission threshold {cpu_percent}% must be in (0, 100]")
        self._scheduler.cpu_admission_percent = cpu_percent

    async def set_pressure(self, config: PressureConfig | None) -> None:
        """The thresholds of this node's pressure policy (None: the defaults)."""
        self._pressure.core.reconfigure(config or PressureConfig())

    def _measured_cpu(self, node_id: str) -> float | None:
        """A node's CPU over the window; only the supervisor's own node is measured."""
        usage = self._history.node() if node_id == self._node_id else None
        return usage.cpu_percent if usage is not None and usage.samples > 1 else None

    async def _publish(self) -> None:
        """Sample the resources (into the history) and publish the Ray metrics: once per
        health round, off every per-frame path."""
        snapshot = await self.resources()
        await self._pressure.on_sample(snapshot.cpu_percent, snapshot.taken_at, self._quality_of)
        overview = self._build_overview(snapshot)
        if self._metrics is None:
            self._metrics = StreamMetrics()
        self._metrics.publish(overview)

    def _quality_of(self, session_id: str) -> QualityHandle | None:
        stream = self._streams.get(session_id)
        return stream.quality if stream is not None else None

    async def overview(self) -> ServerOverview:
        """Every stream with its rungs, viewers and figures, and every actor of the server
        with its role, stream, node and pid (``kizuna-stream status``)."""
        for stream in list(self._streams.values()):
            await self._refresh_stats(stream)
        return self._build_overview(await self.resources())

    def _build_overview(self, snapshot: ResourceSnapshot) -> ServerOverview:
        usage = {p.label: p for p in snapshot.processes}
        traffic = self._history.stream_traffic()
        node = self._history.node()
        context = ray.get_runtime_context()
        me = context.get_actor_name() or "supervisor"
        own = usage.get("supervisor")
        actors = [
            ActorInfo(
                role="supervisor",
                stream=None,
                name=me,
                node=self._node_id,
                pid=os.getpid(),
                cpu_percent=own.cpu_percent if own is not None else 0.0,
                rss_bytes=own.rss_bytes if own is not None else 0,
            )
        ]
        streams = []
        for sid, stream in list(self._streams.items()):
            labelled: list[tuple[str, str, str, int]] = [
                (role, f"kz-{sid}-{role}", f"{sid}/{role}", pid)
                for role, pid in stream.pids.items()
            ]
            # Every shard, those on other nodes too (measured there: ``remote_processes``).
            elsewhere: dict[str, str] = {}
            for shard in stream.shards.shards.values() if stream.shards is not None else []:
                label = f"{sid}/sender-{shard.shard_id}"
                # The stream's part of a shared port runs in that port's process.
                name = (
                    f"kz-{sid}-{shard.shard_id}"
                    if shard.shared_port is None
                    else port_actor_name(shard.port, shard.shared_port)
                )
                labelled.append(("shard", name, label, shard.pid))
                elsewhere[label] = shard.node_id
            recorder_pids = self._recordings.pids()
            recorder_names = self._recordings.actor_names()
            labelled += [
                ("recorder", recorder_names[rid], rid, recorder_pids[rid])
                for rid in self._recordings.of_stream(sid)
                if rid in recorder_pids
            ]
            mine = []
            for role, name, label, pid in labelled:
                used = usage.get(label)
                mine.append(
                    ActorInfo(
                        role=role,
                        stream=sid,
                        name=name,
                        node=elsewhere.get(label) or stream.node_id,
                        pid=pid,
                        alive=used.alive if used is not None else True,
                        cpu_percent=used.cpu_percent if used is not None else 0.0,
                        rss_bytes=used.rss_bytes if used is not None else 0,
                    )
                )
            actors += mine
            streams.append(self._stream_overview(stream, mine, traffic.get(sid)))
        return ServerOverview(
            supervisor=me,
            node=self._node_id,
            cpu_percent=node.cpu_percent if node is not None else snapshot.cpu_percent,
            net_sent_per_s=node.net_sent_per_s if node is not None else 0.0,
            net_received_per_s=node.net_received_per_s if node is not None else 0.0,
            over_thresholds=node.over if node is not None else [],
            cpu_count=snapshot.cpu_count,
            memory_used_bytes=snapshot.memory_used_bytes,
            memory_total_bytes=snapshot.memory_total_bytes,
            streams=streams,
            actors=actors,
        )

    def _stream_overview(
        self, stream: _Stream, actors: list[ActorInfo], traffic: StreamTraffic | None
    ) -> StreamOverview:
        session, stats = stream.session, stream.session.stats
        shards = list(stream.shards.shards.values()) if stream.shards is not None else []
        senders = [s.last for s in shards if s.last is not None]
        rungs = []
        if stream.encoder is not None:
            ladder = plan_ladder(session.quality, stream.config.rungs).rungs
            figures = {r.index: r for r in stream.last_rungs}
            for index, rung in enumerate(ladder):
                seen = figures.get(index)
                rungs.append(
                    RungOverview(
                        index=index,
                        resolution=f"{rung.width}x{rung.height}",
                        framerate=rung.framerate,
                        target_bitrate=seen.target_bitrate if seen else rung.bitrate,
                        bitrate=seen.bitrate if seen else 0,
                        fps=seen.fps if seen else 0.0,
                    )
                )
        return StreamOverview(
            session_id=session.session_id,
            name=session.name,
            state=str(session.state),
            source=stream.config.source,
            priority=stream.config.priority,
            urls=sorted({str(s.url) for s in shards}),
            viewers=sum(len(s.peers) for s in senders),
            bitrate=stats.current_bitrate,
            fps=stats.encoder_fps,
            latency_ms=stats.latency_ms,
            frames_dropped=stats.frames_dropped,
            # Stage restarts after crashes, every kind together (``StageRecovery``).
            restarts=sum(stats.restarts.values()),
            cpu_percent=round(sum(a.cpu_percent for a in actors), 1),
            rss_bytes=sum(a.rss_bytes for a in actors),
            bytes_sent=sum(s.bytes_sent for s in senders),
            bytes_per_s=traffic.bytes_per_s if traffic is not None else 0.0,
            rungs=rungs,
            viewer_list=_viewer_overviews(stream, shards),
            error=f"{session.error.kind}: {session.error.message}" if session.error else None,
        )

    async def recording_status(self, session_id: str) -> RecordingSession | None:
        """The status of the recording the stream's config asked for, if any."""
        stream = self._get(session_id)
        if stream.primary_recording is None:
            return None
        return await self._recordings.status(stream.primary_recording)

    # --- recordings (the design's RecordingEngine) -----------------------------------------

    async def start_recording(
        self, session_id: str, config: RecordingConfig, viewer_id: str | None = None
    ) -> RecordingSession:
        """Start recording a stream; a viewer asking needs ``can_record``."""
        stream = self._get(session_id)
        permissions = None
        if viewer_id is not None:
            viewer = stream.viewers.get(viewer_id)
            if viewer is None:
                raise StreamNotFoundError(f"stream {session_id!r} has no viewer {viewer_id!r}")
            permissions = viewer.status.permissions
        stream.lifecycle.check(StreamOperation.RECORD)
        if stream.context is None:
            raise ConfigError("recording an audio-only stream is not supported yet")
        return await self._recordings.start(stream.context, config, permissions=permissions)

    async def stop_recording(self, recording_id: str) -> RecordingSession:
        return await self._recordings.stop(recording_id)

    async def pause_recording(self, recording_id: str) -> RecordingSession:
        return await self._recordings.pause(recording_id)

    async def resume_recording(self, recording_id: str) -> RecordingSession:
        return await self._recordings.resume(recording_id)

    async def get_recording_status(self, recording_id: str) -> RecordingSession:
        return await self._recordings.status(recording_id)

    async def schedule_recording(
        self, session_id: str, config: RecordingConfig, start_at: float, duration_s: float
    ) -> str:
        stream = self._get(session_id)
        stream.lifecycle.check(StreamOperation.RECORD)
        if stream.context is None:
            raise ConfigError("recording an audio-only stream is not supported yet")
        return self._recordings.schedule(
            stream.context, config, start_at=start_at, duration_s=duration_s
        )

    async def _refresh_stats(self, stream: _Stream) -> None:
        """Poll the stream's stages and fold their reports into its session (running streams
        only: ``StreamLifecycle.running``); reconcile its viewers with its shards'
        connections.  A shard that died costs its viewers their connection (they reconnect
        with a new ticket), not the stream."""
        if not stream.lifecycle.running or stream.shards is None:
            return
        recovery = stream.recovery
        if recovery is not None and recovery.busy:
            return  # a stage is being restarted: its calls would only wait for it
        try:
            senders, events = await stream.shards.refresh()
        except (ray.exceptions.RayActorError, TimeoutError, KizunaError) as exc:
            if stream.lifecycle.running:
                self._fail(stream, exc)
            return
        events += await self._reconcile_webrtc(stream)
        for event in events:
            logger.info("stream %s: %s", stream.session.session_id, event)
        registry = stream.shards.registry
        for viewer_id, viewer in stream.viewers.items():
            record = registry.get(viewer_id)
            if record is not None:
                viewer.status.bytes_sent = record.bytes_sent
                viewer.status.state = str(record.state)
                viewer.status.shard = record.shard_id or viewer.status.shard
                if record.state is not ViewerState.CONNECTED:
                    viewer.status.connection_quality = ConnectionQuality.DISCONNECTED
        capture, encoder, quality = stream.capture, stream.encoder, stream.quality
        if capture is None or encoder is None or quality is None:
            return  # an audio-only stream: it has no encoder to report frames
        try:
            capture_stats, encoder_stats = await asyncio.gather(capture.stats(), encoder.stats())
            classified = await quality.connection_quality()
            pressure_level, pressure_reason = await quality.pressure()
        except (ray.exceptions.RayActorError, TimeoutError, KizunaError) as exc:
            # A stop that began meanwhile kills the actors: that is no failure of the stream.
            # A stage that crashed is the recovery's to restart, or to fail the stream for.
            crashed = isinstance(exc, ray.exceptions.RayActorError) and recovery is not None
            if stream.lifecycle.running and not crashed:
                self._fail(stream, exc)
            return
        self._pressure.note_encoder(stream.session.session_id, encoder_stats.frames_dropped)
        failure = stage_failure(capture_stats, encoder_stats, senders)
        if failure is not None:
            self._fail(stream, RuntimeError(failure))
        stream.session.stats = stream_stats(
            capture_stats,
            encoder_stats,
            senders,
            elapsed_s=time.monotonic() - stream.started,
            wall_now=time.time(),
        )
        stream.last_rungs = list(encoder_stats.rungs)
        stream.session.stats.pressure_level = pressure_level
        stream.session.stats.pressure_reason = pressure_reason
        if recovery is not None:
            stream.session.stats.restarts = dict(recovery.policy.restarts)
            stream.session.stats.last_restart = recovery.last_reason
        peers = {peer.viewer_id: peer for sender in senders for peer in sender.peers}
        for viewer_id, viewer in stream.viewers.items():
            record = registry.get(viewer_id)
            if record is not None and record.state is ViewerState.CONNECTED:
                peer = peers.get(viewer_id)
                if peer is not None:
                    # Its own feedback, and the rung its shard sends it.
                    viewer.status.connection_quality, viewer.status.current_quality = (
                        viewer_quality(peer, encoder_stats, stream.session.quality)
                    )
                    continue
                # Not yet named in its RTCP: the quality actor's view of its shard.
                viewer.status.connection_quality = classified.get(
                    record.shard_id or "", ConnectionQuality.GOOD
                )

    def _fail(self, stream: _Stream, exc: BaseException) -> None:
        exc = unwrap(exc)
        if stream.lifecycle.fail(ErrorInfo(kind=type(exc).__name__, message=str(exc))):
            logger.error("stream %s failed: %s", stream.session.session_id, exc)

    async def _health_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEALTH_INTERVAL_S):
                    await self._health_wake.wait()
            self._health_wake.clear()
            for stream in list(self._streams.values()):
                if stream.lifecycle.state in (StreamState.ACTIVE, StreamState.PAUSED):
                    await self._refresh_stats(stream)
            try:
                await self._publish()
            except Exception:
                logger.exception("resource sampling or metrics failed")
            try:
                await self._recordings.check()
            except Exception:
                logger.exception("recording health check failed")

    async def shutdown(self) -> list[StreamSession]:
        stopped = []
        for session_id in list(self._streams):
            session = await self.stop_stream(session_id)
            if session is not None:
                stopped.append(session)
        if self._health is not None:
            self._health.cancel()
        return stopped


def _viewer_overviews(stream: _Stream, shards: list[Any]) -> list[ViewerOverview]:
    """Every connection to the stream's shards (named by its viewer id when it gave one),
    then the ticketed viewers not connected now."""
    viewers = []
    seen = set()
    for shard in shards:
        for peer in shard.last.peers if shard.last is not None else []:
            viewer_id = peer.viewer_id or peer.peer_id
            ticket = stream.viewers.get(viewer_id)
            seen.add(viewer_id)
            viewers.append(
                ViewerOverview(
                    viewer_id=viewer_id,
                    state="connected",
                    shard=shard.shard_id,
                    connection=str(ticket.status.connection_quality) if ticket else "",
                    bytes_sent=peer.bytes_sent,
                    rung=peer.rung,
                    rtt_ms=round(peer.rtt_ms, 1),
                    loss=round(peer.loss, 4),
                    frames_dropped=peer.frames_dropped,
                    late_frames=peer.frames_expired + peer.frames_cancelled,
                )
            )
    for viewer_id, viewer in stream.viewers.items():
        if viewer_id not in seen:
            viewers.append(
                ViewerOverview(
                    viewer_id=viewer_id,
                    state=viewer.status.state or "pending",
                    shard=viewer.status.shard,
                    connection=str(viewer.status.connection_quality),
                    bytes_sent=viewer.status.bytes_sent,
                )
            )
    return viewers


def session_to_dict(session: StreamSession) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.to_builtins(session)
    return result


def _call_ready(supervisor: Any) -> None:
    """On a thread of a restarted supervisor: call its ``ready`` once Ray lets it be called."""
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        try:
            ray.get(supervisor.ready.remote(), timeout=60.0)
            return
        except ray.exceptions.ActorUnavailableError:
            time.sleep(0.05)
        except Exception:
            logger.exception("a restarted supervisor could not take its streams back")
            return


def _pid_of(actor: object) -> int:
    """Run in an actor by ``__ray_call__``: its process id."""
    return os.getpid()
