"""Supervisor: the actor that owns every stream (the design's StreamScheduler and ResourceMonitor).

For each stream it places the actors on one node, creates them in dependency order (capture
creates the frame pool, the encoder the packet ring, then recorder, quality and per-viewer
senders attach), reports the stream Active only once every stage is up, and on stop tears them
down in reverse and removes the shared memory.  Stream actors are owned by the supervisor, so
if it dies Ray kills them too; segments a crash leaves behind are swept at the next start.

A health loop polls each stream's capture and encoder once a second; a dead actor or a stage
that reported a failure moves the stream to the Error state with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
import ray

from actors.placement import spawn
from actors.recordings import Recordings, StreamContext
from actors.stages.capture import CaptureActor
from actors.stages.encoder import EncoderActor, encoder_actor_options, ladder_ring_names
from actors.stages.quality import QualityActor
from actors.stages.sender import SenderActor
from shared.control.resources import ResourceMonitor, ResourceSnapshot, StreamLoad
from shared.control.scheduler import NodeInfo, StreamScheduler
from shared.errors import (
    ConfigError,
    KizunaError,
    NetworkError,
    PermissionError,
    StreamNotFoundError,
)
from shared.media.scaler import plan_ladder
from shared.models import (
    AudioConfig,
    ConnectionQuality,
    ErrorInfo,
    RecordingConfig,
    RecordingSession,
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
    source_stream_type,
)
from shared.pool.shm import segment_name, sweep_stale_segments, unlink_segment
from shared.roq.tls import TlsIdentity, generate_self_signed, load_identity

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
CALL_TIMEOUT_S = 10.0


def unwrap(exc: BaseException) -> BaseException:
    """The original error inside a Ray task error, so callers see ``CaptureError: ...``
    rather than a remote traceback."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


async def call(ref: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
    try:
        return await asyncio.wait_for(ref, timeout)
    except ray.exceptions.RayTaskError as exc:
        raise unwrap(exc) from None


@dataclass
class _Viewer:
    handle: Any
    status: ViewerStatus


@dataclass
class _Stream:
    session: StreamSession
    config: StreamConfig
    node_id: str
    segments: list[str]
    #: One certificate per stream, so every sender of it (and every shard of one listen
    #: address) presents the fingerprint in the stream's URL.
    identity: TlsIdentity
    screen: ScreenConfig | None = None
    #: Fixed ports this stream's senders listen on (shards share one with SO_REUSEPORT).
    ports: set[int] = field(default_factory=set)
    actors: dict[str, Any] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    viewers: dict[str, _Viewer] = field(default_factory=dict)
    #: The recording StreamConfig.record asked for, if any (others are started by API).
    primary_recording: str | None = None
    context: StreamContext | None = None
    started: float = field(default_factory=time.monotonic)
    stop_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Supervisor:
    def __init__(self, max_streams: int = 16) -> None:
        self._streams: dict[str, _Stream] = {}
        self._scheduler = StreamScheduler(max_streams=max_streams)
        self._monitor = ResourceMonitor()
        self._node_id = ray.get_runtime_context().get_node_id()
        self._health: asyncio.Task[None] | None = None
        self._recordings = Recordings(call)
        removed = sweep_stale_segments()
        if removed:
            logger.warning(
                "removed %d shared-memory segments left by a crashed run: %s", len(removed), removed
            )

    async def ready(self) -> str:
        if self._health is None:
            self._health = asyncio.create_task(self._health_loop(), name="health")
        return self._node_id

    # --- streams -----------------------------------------------------------------------

    async def start_stream(
        self,
        config: StreamConfig,
        stream_type: StreamType | None = None,
        screen: ScreenConfig | None = None,
    ) -> StreamSession:
        source = parse_source(config.source)
        if screen is not None and screen.capture_audio and config.audio is None:
            config = msgspec.structs.replace(config, audio=AudioConfig())
        if stream_type is None or (
            config.audio is not None and stream_type is not StreamType.AUDIO
        ):
            stream_type = StreamType.COMBINED if config.audio else source_stream_type(source)
        if stream_type is StreamType.AUDIO and config.audio is None:
            raise ConfigError("an audio stream needs StreamConfig.audio")
        if stream_type is StreamType.AUDIO and config.record is not None:
            raise ConfigError(
                "recording an audio-only stream is not supported yet; record a combined stream"
            )
        session_id = uuid.uuid4().hex[:10]
        nodes = [
            NodeInfo(
                node_id=n["NodeID"],
                cpus=float(n["Resources"].get("CPU", 0)),
                alive=bool(n["Alive"]),
            )
            for n in ray.nodes()
        ]
        identity = (
            load_identity(config.tls_cert_path, config.tls_key_path)
            if config.tls_cert_path and config.tls_key_path
            else generate_self_signed(config.listen_host)
        )
        node_id = self._scheduler.place(session_id, config.quality, nodes, prefer=self._node_id)
        pool_name = segment_name(session_id, "frames")
        ladder = plan_ladder(config.quality, config.rungs)  # a ConfigError before any actor starts
        ring_names = ladder_ring_names(session_id, ladder.rungs)
        ring_name = ring_names[0]
        audio_ring = segment_name(session_id, "audio") if config.audio else None
        stream = _Stream(
            session=StreamSession(
                session_id=session_id,
                stream_type=stream_type,
                source=source,
                viewers=[],
                quality=config.quality,
                state=StreamState.STARTING,
                stats=StreamStats(),
                created_at=time.time(),
            ),
            config=config,
            node_id=node_id,
            segments=[pool_name, *ring_names] + ([audio_ring] if audio_ring else []),
            identity=identity,
            screen=screen,
        )
        self._streams[session_id] = stream
        try:
            await self._start_actors(stream, pool_name, ring_name)
        except BaseException as exc:
            await self._teardown(stream)
            self._streams.pop(session_id, None)
            raise unwrap(exc) from None
        stream.session.state = StreamState.ACTIVE
        logger.info("stream %s active on node %s", session_id, node_id)
        return stream.session

    async def _start_actors(self, stream: _Stream, pool_name: str, ring_name: str) -> None:
        sid, config, node = stream.session.session_id, stream.config, stream.node_id
        video = stream.session.stream_type is not StreamType.AUDIO

        def name(role: str) -> str:
            return f"kz-{sid}-{role}"

        # Capture opens every source before it creates the frame pool and the audio ring, so
        # a bad source fails here, before anything else exists; the encoder and the senders
        # attach to what it created, so it goes first.
        capture = stream.actors["capture"] = spawn(
            CaptureActor,
            kind="capture",
            name=name("capture"),
            node_id=node,
            args=(
                sid,
                stream.session.source,
                config.quality,
                pool_name,
                config.pool_slots,
                config.audio,
                segment_name(sid, "audio") if config.audio else None,
                stream.screen,
                None,
                video,
            ),
        )
        stream.pids["capture"] = await call(capture.open.remote())
        if not video:
            await call(capture.start.remote(None))
            return
        encoder = stream.actors["encoder"] = spawn(
            EncoderActor,
            kind="encoder",
            name=name("encoder"),
            node_id=node,
            args=(
                sid,
                config.quality,
                config.keyframe_interval_s,
                pool_name,
                ring_name,
                config.rungs,
            ),
            # A hardware encoder asks Ray for a GPU, but only where the chosen node has one:
            # with hard node affinity, asking elsewhere would never schedule.
            options=encoder_actor_options(
                config.quality.hardware_acceleration, node_gpus=_node_gpus(node)
            ),
        )
        stream.pids["encoder"] = await call(encoder.open.remote())
        rung_rings = await call(encoder.rung_names.remote())
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
        quality = stream.actors["quality"] = spawn(
            QualityActor,
            kind="quality",
            name=name("quality"),
            node_id=node,
            args=(sid, encoder, config.quality.bitrate),
        )
        await call(quality.start.remote())
        await call(capture.start.remote(encoder))

    async def stop_stream(self, session_id: str) -> StreamSession | None:
        """Stop a stream; stopping one that is already stopped (or unknown) does nothing."""
        stream = self._streams.get(session_id)
        if stream is None:
            return None
        async with stream.stop_lock:
            if session_id not in self._streams:
                return None
            stream.session.state = StreamState.STOPPING
            await self._refresh_stats(stream)
            await self._teardown(stream)
            self._streams.pop(session_id, None)
        stream.session.state = (
            StreamState.STOPPED if stream.session.error is None else StreamState.ERROR
        )
        return stream.session

    async def _teardown(self, stream: _Stream) -> None:
        """Stop every actor (best effort, in pipeline order), kill them, remove shared memory."""
        actors = stream.actors
        for role in ("capture", "quality", "encoder"):
            if role in actors:
                await self._stop_actor(stream, role)
        for viewer_id in list(stream.viewers):
            await self._stop_actor(stream, f"sender-{viewer_id}")
        self._recordings.cancel_stream(stream.session.session_id)
        for recording_id in self._recordings.of_stream(stream.session.session_id):
            try:
                final = await self._recordings.stop(recording_id)
            except Exception as exc:
                logger.warning("recording %s did not stop cleanly: %s", recording_id, exc)
                continue
            if recording_id == stream.primary_recording:
                stream.session.recording = final
        for handle in actors.values():
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        actors.clear()
        # Actors unlink what they created on a clean stop; this covers the ones that crashed.
        for name in stream.segments:
            unlink_segment(name)
        self._scheduler.release(stream.session.session_id)

    async def _stop_actor(self, stream: _Stream, role: str) -> None:
        handle = stream.actors.get(role)
        if handle is None:
            return
        try:
            await call(handle.stop.remote())
        except Exception as exc:
            logger.warning(
                "%s of %s did not stop cleanly: %s", role, stream.session.session_id, exc
            )

    async def switch_source(self, session_id: str, source: str) -> StreamSession:
        """Switch a running stream to another source; viewers stay connected (the capture
        actor opens the new source first, swaps it in at the next frame and asks for a
        keyframe)."""
        stream = self._get(session_id)
        if stream.session.stream_type is StreamType.AUDIO:
            raise ConfigError("an audio-only stream has no video source to switch")
        parse_source(source)  # a ConfigError here, before any actor is asked
        info = await call(stream.actors["capture"].switch_source.remote(source))
        stream.session.source = info.spec
        if stream.session.stream_type is not StreamType.COMBINED:
            stream.session.stream_type = source_stream_type(info.spec)
        return stream.session

    async def adjust_quality(self, session_id: str, quality: StreamQuality) -> StreamSession:
        """Change a running stream's quality: bitrate within one GOP, resolution or frame rate
        at an IDR with continuous timestamps (the encoder reopens and scales the pool's
        frames); viewers stay connected."""
        stream = self._get(session_id)
        if "encoder" not in stream.actors:
            raise ConfigError("an audio-only stream has no video quality to adjust")
        # The encoder first, so a raised ceiling reopens it once before the quality actor
        # retargets the rate.
        applied: StreamQuality = await call(stream.actors["encoder"].configure.remote(quality))
        await call(stream.actors["quality"].set_ceiling.remote(applied.bitrate))
        stream.session.quality = applied
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
        stream = self._get(session_id)
        if not permissions.can_view:
            raise PermissionError(f"peer {peer_id!r} is not allowed to view")
        if port:
            # Another stream's shards on this port would share its SO_REUSEPORT group, and the
            # kernel would hand each stream's viewers to the other's senders.
            for other in self._streams.values():
                if other is not stream and port in other.ports:
                    raise NetworkError(
                        f"port {port} is already serving stream {other.session.session_id}"
                    )
        viewer_id = uuid.uuid4().hex[:8]
        role = f"sender-{viewer_id}"
        handle = stream.actors[role] = spawn(
            SenderActor,
            kind="sender",
            name=f"kz-{session_id}-{role}",
            node_id=stream.node_id,
            args=(
                session_id,
                viewer_id,
                segment_name(session_id, "video"),
                stream.actors.get("encoder"),
            ),
        )
        try:
            url = await call(handle.open.remote(stream.config.listen_host, port, stream.identity))
        except BaseException:
            stream.actors.pop(role, None)
            ray.kill(handle, no_restart=True)
            raise
        stream.pids[role] = (await call(handle.stats.remote())).pid
        if port:
            stream.ports.add(port)
        if "encoder" in stream.actors:
            await call(stream.actors["encoder"].subscribe.remote(role, handle))
            await call(stream.actors["quality"].add_sender.remote(viewer_id, handle))
        stream.viewers[viewer_id] = _Viewer(
            handle=handle,
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
            ),
        )
        stream.session.viewers.append(viewer_id)
        return ViewerTicket(viewer_id=viewer_id, session_id=session_id, url=url)

    async def remove_viewer(self, session_id: str, viewer_id: str) -> None:
        stream = self._get(session_id)
        viewer = stream.viewers.pop(viewer_id, None)
        if viewer is None:
            return
        role = f"sender-{viewer_id}"
        with contextlib.suppress(Exception):
            await call(stream.actors["encoder"].unsubscribe.remote(role))
            await call(stream.actors["quality"].remove_sender.remote(viewer_id))
        await self._stop_actor(stream, role)
        ray.kill(stream.actors.pop(role), no_restart=True)
        stream.pids.pop(role, None)
        stream.session.viewers.remove(viewer_id)

    async def get_viewer_status(self, session_id: str) -> list[ViewerStatus]:
        stream = self._get(session_id)
        await self._refresh_stats(stream)
        return [viewer.status for viewer in stream.viewers.values()]

    # --- monitoring ---------------------------------------------------------------------

    async def resources(self) -> ResourceSnapshot:
        pids = {
            f"{sid}/{role}": pid
            for sid, stream in self._streams.items()
            for role, pid in stream.pids.items()
        } | self._recordings.pids()
        loads = []
        for sid, stream in list(self._streams.items()):
            if "capture" not in stream.actors:
                continue
            try:
                capture = await call(stream.actors["capture"].stats.remote())
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
        return self._monitor.sample(pids, loads)

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
        assert stream.context is not None
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
        assert stream.context is not None
        return self._recordings.schedule(
            stream.context, config, start_at=start_at, duration_s=duration_s
        )

    async def _refresh_stats(self, stream: _Stream) -> None:
        actors = stream.actors
        if "encoder" not in actors or "capture" not in actors:
            return
        try:
            capture, encoder = await asyncio.gather(
                call(actors["capture"].stats.remote()), call(actors["encoder"].stats.remote())
            )
            senders = await asyncio.gather(
                *(call(v.handle.stats.remote()) for v in stream.viewers.values())
            )
            quality = await call(actors["quality"].connection_quality.remote())
        except (ray.exceptions.RayActorError, TimeoutError, KizunaError) as exc:
            self._fail(stream, exc)
            return
        for failed in (capture.error, encoder.error, *(s.error for s in senders)):
            if failed:
                self._fail(stream, RuntimeError(failed))
        bytes_sent = sum(s.bytes_sent for s in senders)
        peers = [p for s in senders for p in s.peers]
        peer_dropped = sum(p.frames_dropped for p in peers)
        rtts = [p.rtt_ms for p in peers]
        elapsed = max(time.monotonic() - stream.started, 1e-3)
        # frames_decoded is only known at the viewers (Viewer.stream_stats()); everything else
        # comes from the stages and from what viewers report back (RTCP RR, transport feedback).
        stream.session.stats = StreamStats(
            bytes_sent=bytes_sent,
            bytes_received=sum(p.bytes_received for p in peers),
            frames_encoded=encoder.frames_encoded,
            frames_dropped=capture.frames_skipped + encoder.frames_dropped + peer_dropped,
            current_bitrate=encoder.bitrate,
            average_bitrate=int(bytes_sent * 8 / elapsed / max(len(senders), 1)),
            # One-way latency as half the RTT: RTCP's LSR/DLSR RTT when known, else QUIC's.
            latency_ms=int(max(rtts, default=0.0) / 2),
            jitter_ms=int(max((p.jitter_ms for p in peers), default=0.0)),
            packet_loss_rate=max((p.loss for p in peers), default=0.0),
            last_updated=time.time(),
            encoder_fps=encoder.average_fps,
            hardware_fallbacks=encoder.hardware_fallbacks,
        )
        for sender in senders:
            viewer = stream.viewers.get(sender.viewer_id)
            if viewer is not None:
                viewer.status.bytes_sent = sender.bytes_sent
                viewer.status.connection_quality = quality.get(
                    sender.viewer_id, ConnectionQuality.DISCONNECTED
                )
                if not sender.peers:
                    viewer.status.connection_quality = ConnectionQuality.DISCONNECTED

    def _fail(self, stream: _Stream, exc: BaseException) -> None:
        if stream.session.error is None:
            exc = unwrap(exc)
            logger.error("stream %s failed: %s", stream.session.session_id, exc)
            stream.session.error = ErrorInfo(kind=type(exc).__name__, message=str(exc))
            stream.session.state = StreamState.ERROR

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            for stream in list(self._streams.values()):
                if stream.session.state is StreamState.ACTIVE:
                    await self._refresh_stats(stream)
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


def session_to_dict(session: StreamSession) -> dict[str, Any]:
    result: dict[str, Any] = msgspec.to_builtins(session)
    return result


def _node_gpus(node_id: str) -> float:
    return next(
        (float(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["NodeID"] == node_id), 0.0
    )
