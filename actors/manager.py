"""StreamManager: the public Python API, a typed handle on the supervisor actor.

Each method calls the supervisor method of the same name through ``Handle[Supervisor]``, so
arguments and results are checked against the supervisor's own signatures.

    async with StreamManager.start() as manager:
        session = await manager.start_camera_stream(StreamConfig(source="test"))
        print(await manager.get_active_streams())
        await manager.stop_stream(session.session_id)

``start`` joins the Ray cluster named by ``address`` or ``RAY_ADDRESS`` if there is one,
otherwise starts an embedded local cluster, then starts a supervisor.  Leaving the block stops
every stream the manager started and the supervisor with them, even on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import ray

from actors.calls import CALL_TIMEOUT_S, unwrap
from actors.handles import Handle
from actors.placement import NAMESPACE, SUPERVISOR_PREFIX
from actors.supervisor import Supervisor
from shared.auth.pending import PendingRequest
from shared.control.overview import ServerOverview
from shared.control.pressure import PressureConfig
from shared.control.resources import ResourceSnapshot
from shared.control.scheduler import DEFAULT_GPU_SESSIONS
from shared.errors import ConfigError, ResourceError
from shared.models import (
    RecordingConfig,
    RecordingSession,
    ScreenConfig,
    StreamConfig,
    StreamQuality,
    StreamSession,
    StreamType,
    ViewerPermissions,
    ViewerStatus,
    ViewerTicket,
)

__all__ = ["StreamManager"]

#: A supervisor call makes several stage calls in turn (each within CALL_TIMEOUT_S); stopping
#: every stream's actors can take a few seconds on a loaded machine.
SUPERVISOR_CALL_TIMEOUT_S = CALL_TIMEOUT_S * 6


def ensure_ray(
    address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False
) -> None:
    """Connect to ``address`` / RAY_ADDRESS, or start a local cluster; no-op if connected."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {
        "namespace": NAMESPACE,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
    }
    if address is None:
        kwargs.update(num_cpus=num_cpus or os.cpu_count() or 2, include_dashboard=dashboard)
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise ResourceError(f"cannot join the Ray cluster at {address}: {exc}") from exc


class StreamManager:
    def __init__(self, supervisor: Handle[Supervisor]) -> None:
        self._supervisor = supervisor

    @classmethod
    @contextlib.asynccontextmanager
    async def start(
        cls,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        max_streams: int = 16,
        dashboard: bool = False,
        token_secret: bytes | None = None,
        gpu_sessions_per_gpu: int = DEFAULT_GPU_SESSIONS,
    ) -> AsyncIterator[StreamManager]:
        """``token_secret``: the key viewer tokens of token streams are signed with (default:
        ``KIZUNA_TOKEN_SECRET``, else the secret file ``kizuna-stream token`` also reads,
        created on first use; see ``shared.auth.secret_file``).  ``gpu_sessions_per_gpu``:
        hardware encoder sessions one GPU takes (NVENC's cap on consumer cards; see
        ``shared.control.scheduler``); a stream asking for hardware encoding is refused when
        every GPU's are taken."""
        ensure_ray(address, num_cpus=num_cpus, dashboard=dashboard)
        supervisor = Handle[Supervisor](
            ray.remote(Supervisor)
            .options(
                namespace=NAMESPACE,
                # Named, so ``kizuna-stream viewers`` can find a running server's supervisor.
                name=f"{SUPERVISOR_PREFIX}{uuid.uuid4().hex[:8]}",
                num_cpus=0,
                # Detached and restarted by Ray after a crash: its streams' actors (detached
                # too) keep streaming meanwhile, and it takes them back when it is up again
                # (``actors.supervisor_state``).  Leaving the block kills it.
                lifetime="detached",
                max_restarts=-1,
                max_concurrency=1000,
            )
            .remote(max_streams, token_secret, gpu_sessions_per_gpu),
            timeout=SUPERVISOR_CALL_TIMEOUT_S,
        )
        manager = cls(supervisor)
        try:
            await supervisor.call(Supervisor.ready)
            yield manager
        finally:
            # Shielded so that a Ctrl-C (task cancellation) cannot leave actors behind.
            await asyncio.shield(manager._shutdown())

    async def _shutdown(self) -> None:
        try:
            await self._supervisor.call(Supervisor.shutdown)
        except Exception as exc:
            logging.getLogger(__name__).warning("supervisor shutdown failed: %s", unwrap(exc))
        finally:
            self._supervisor.kill()  # detached: it would outlive this process otherwise

    # --- the design's StreamManager ------------------------------------------------------

    async def start_camera_stream(self, config: StreamConfig) -> StreamSession:
        return await self._supervisor.call(Supervisor.start_stream, config, StreamType.CAMERA)

    async def start_screen_stream(
        self, screen: ScreenConfig, config: StreamConfig | None = None
    ) -> StreamSession:
        """Stream a monitor or a region of it; ``config`` sets quality, recording and so on."""
        spec = "screen"
        if screen.monitor_index is not None:
            spec += f":{screen.monitor_index}"
        if screen.region is not None:
            r = screen.region
            spec += f"@{r.x},{r.y},{r.width}x{r.height}"
        base = config or StreamConfig()
        if not base.source.startswith("screen") and base.source != "test":
            raise ConfigError(f"start_screen_stream got a non-screen source {base.source!r}")
        stream_config = msgspec.structs.replace(base, source=spec)
        return await self._supervisor.call(
            Supervisor.start_stream, stream_config, StreamType.SCREEN, screen
        )

    async def start_audio_stream(self, config: StreamConfig) -> StreamSession:
        """Audio only (StreamType Audio): ``config.audio`` says which input."""
        if config.audio is None:
            raise ConfigError("start_audio_stream needs StreamConfig(audio=AudioConfig(...))")
        return await self._supervisor.call(Supervisor.start_stream, config, StreamType.AUDIO)

    async def switch_source(self, session_id: str, source: str) -> StreamSession:
        """Switch a running stream's video source (``camera:N``, ``screen``, ``file:PATH``, ``test``)
        without viewers reconnecting."""
        return await self._supervisor.call(Supervisor.switch_source, session_id, source)

    async def stop_stream(self, session_id: str) -> StreamSession | None:
        """Stop a stream; returns its final state, or None if it was not running."""
        return await self._supervisor.call(Supervisor.stop_stream, session_id)

    async def pause_stream(self, session_id: str) -> StreamSession:
        """Pause a stream: capture stops and its recordings pause; viewers stay connected and
        keep the last picture (StreamState.PAUSED)."""
        return await self._supervisor.call(Supervisor.pause_stream, session_id)

    async def resume_stream(self, session_id: str) -> StreamSession:
        """Resume a paused stream (capture and recordings go on)."""
        return await self._supervisor.call(Supervisor.resume_stream, session_id)

    async def adjust_quality(self, session_id: str, quality: StreamQuality) -> StreamSession:
        return await self._supervisor.call(Supervisor.adjust_quality, session_id, quality)

    async def get_active_streams(self) -> list[StreamSession]:
        return await self._supervisor.call(Supervisor.get_active_streams)

    async def get_stream(self, session_id: str) -> StreamSession:
        return await self._supervisor.call(Supervisor.get_stream, session_id)

    # --- viewers (the design's ViewerManager) -------------------------------------------

    async def add_viewer(
        self,
        session_id: str,
        peer_id: str,
        permissions: ViewerPermissions | None = None,
        *,
        port: int = 0,
    ) -> ViewerTicket:
        return await self._supervisor.call(
            Supervisor.add_viewer, session_id, peer_id, permissions or ViewerPermissions(), port
        )

    async def issue_token(
        self,
        session_id: str,
        permissions: ViewerPermissions | None = None,
        *,
        viewer_id: str | None = None,
        ttl_s: float = 3600.0,
    ) -> str:
        """A viewer token for a token stream (a secret: give it to that viewer only)."""
        return await self._supervisor.call(
            Supervisor.issue_token,
            session_id,
            permissions or ViewerPermissions(),
            viewer_id,
            ttl_s,
        )

    async def viewer_requests(self, session_id: str) -> list[PendingRequest]:
        """Viewers without a token waiting for an operator's approval."""
        return await self._supervisor.call(Supervisor.viewer_requests, session_id)

    async def approve_viewer_request(
        self,
        session_id: str,
        request_id: str,
        permissions: ViewerPermissions | None = None,
        *,
        viewer_id: str | None = None,
    ) -> None:
        await self._supervisor.call(
            Supervisor.approve_viewer_request, session_id, request_id, permissions, viewer_id
        )

    async def deny_viewer_request(self, session_id: str, request_id: str, reason: str = "") -> None:
        await self._supervisor.call(Supervisor.deny_viewer_request, session_id, request_id, reason)

    async def revoke_viewer(
        self, session_id: str, *, token_id: str | None = None, viewer_id: str | None = None
    ) -> int:
        """Revoke a token (by its id) or a viewer: cut at once, and kept out."""
        return await self._supervisor.call(
            Supervisor.revoke_viewer, session_id, token_id=token_id, viewer_id=viewer_id
        )

    async def adjust_viewer_quality(
        self, session_id: str, viewer_id: str, rung: int | None = None
    ) -> int:
        """Pin a viewer to a rung of the stream's ladder (None: adaptive again), within its
        ``max_quality``; the viewer itself may ask the same on its control stream when it has
        ``can_control_quality``."""
        return await self._supervisor.call(
            Supervisor.adjust_viewer_quality, session_id, viewer_id, rung
        )

    async def broadcast_to_viewers(
        self, session_id: str, text: str, data: dict[str, Any] | None = None
    ) -> int:
        """A notice to every viewer of the stream; how many got it."""
        return await self._supervisor.call(Supervisor.broadcast_to_viewers, session_id, text, data)

    async def open_shards(self, session_id: str, count: int = 1, *, port: int = 0) -> str:
        """Start ``count`` sender shards sharing ``port`` for viewers without a ticket; the
        URL they connect to (``serve``)."""
        return await self._supervisor.call(Supervisor.open_shards, session_id, count, port)

    async def open_shared_port(self, session_id: str, port: int) -> str:
        """Serve the stream on ``port`` together with other streams opened there this way
        (each viewer gets the stream its URL names); the URL its viewers connect to."""
        return await self._supervisor.call(Supervisor.open_shared_port, session_id, port)

    async def open_whep(self, session_id: str, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve the stream's browser viewers over WebRTC (WHEP, HTTP on ``host:port``); the
        endpoint's URL, whose ``/player`` is the player page."""
        return await self._supervisor.call(Supervisor.open_whep, session_id, host, port)

    async def remove_viewer(self, session_id: str, viewer_id: str) -> None:
        await self._supervisor.call(Supervisor.remove_viewer, session_id, viewer_id)

    async def get_viewer_status(self, session_id: str) -> list[ViewerStatus]:
        return await self._supervisor.call(Supervisor.get_viewer_status, session_id)

    # --- monitoring ---------------------------------------------------------------------

    async def resources(self) -> ResourceSnapshot:
        return await self._supervisor.call(Supervisor.resources)

    async def set_admission(self, cpu_percent: float | None) -> None:
        """Refuse new streams (ResourceError) while the node's measured CPU is at or above
        ``cpu_percent``; None turns the check off."""
        await self._supervisor.call(Supervisor.set_admission, cpu_percent)

    async def set_pressure(self, config: PressureConfig | None) -> None:
        """The thresholds at which the node's streams that shed under pressure give way,
        lowest priority first (``shared.control.pressure``); None: the defaults."""
        await self._supervisor.call(Supervisor.set_pressure, config)

    async def overview(self) -> ServerOverview:
        """Every stream with its figures and every actor with its role, node and pid."""
        return await self._supervisor.call(Supervisor.overview)

    # --- recordings (the design's RecordingEngine) ----------------------------------------

    async def start_recording(
        self, session_id: str, config: RecordingConfig, *, viewer_id: str | None = None
    ) -> RecordingSession:
        """Record a running stream; with ``viewer_id``, on that viewer's behalf (needs can_record)."""
        return await self._supervisor.call(
            Supervisor.start_recording, session_id, config, viewer_id
        )

    async def stop_recording(self, recording_id: str) -> RecordingSession:
        """Finish the recording; the result lists every file (segment) it wrote."""
        return await self._supervisor.call(Supervisor.stop_recording, recording_id)

    async def pause_recording(self, recording_id: str) -> RecordingSession:
        return await self._supervisor.call(Supervisor.pause_recording, recording_id)

    async def resume_recording(self, recording_id: str) -> RecordingSession:
        return await self._supervisor.call(Supervisor.resume_recording, recording_id)

    async def get_recording_status(self, recording_id: str) -> RecordingSession:
        return await self._supervisor.call(Supervisor.get_recording_status, recording_id)

    async def schedule_recording(
        self, session_id: str, config: RecordingConfig, *, start_at: float, duration_s: float
    ) -> str:
        """Record from ``start_at`` (wall-clock seconds) for ``duration_s``; returns its id."""
        return await self._supervisor.call(
            Supervisor.schedule_recording, session_id, config, start_at, duration_s
        )

    async def recording_status(self, session_id: str) -> RecordingSession | None:
        return await self._supervisor.call(Supervisor.recording_status, session_id)
