"""Typed handles on the actors, one class per actor kind (as ``ray.util.queue`` wraps its actor).

A Ray actor handle is untyped: ``handle.confgure.remote(q)`` fails only when it runs, and what
it returns is ``Any``.  Each class here wraps one actor's handle and offers the calls the system
makes on it, typed:

- control calls are coroutines: they apply the call deadline and raise the actor's own error,
  not Ray's wrapper (:func:`actors.calls.call`);
- ``request_keyframe`` is fire-and-forget: a sender asks for it on a viewer's PLI from its own
  event loop, which must not wait for a round trip.

No call here carries frames or announces them: frames and packets reach their readers through
shared memory and its doorbells (:mod:`shared.pool.doorbell`); Ray is the control plane.

Each call names the actor's method by reference (``EncoderActor.configure``), not by string, so
calling a method the actor lacks, with the wrong arguments, or on another kind of actor is a
mypy error: the handle's type parameter ties those references to its own actor class.

A handle pickles with the Ray handle inside it, so the supervisor passes handles to other actors
as it passed the raw ones (the capture actor, senders and recorders get the encoder's).
In-process tests wrap a stand-in with the same ``method.remote(...)`` shape.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, Concatenate, Generic, ParamSpec, TypeVar, overload

import ray

from actors.calls import CALL_TIMEOUT_S, call
from actors.stages.capture import CaptureActor, CaptureStats
from actors.stages.encoder import EncoderActor, EncoderStats
from actors.stages.quality import QualityActor
from actors.stages.recorder import RecorderActor
from actors.stages.relay import NodeRelayActor, RelayOriginActor
from actors.stages.sender import SenderActor, SenderStats
from actors.stages.webrtc import WebRTCShardActor, WebRTCStats
from shared.capture.source import SourceInfo
from shared.control.pressure import PressureDecision
from shared.control.resources import ResourceSnapshot
from shared.control.rung_targets import RungTarget
from shared.media.scaler import Rung
from shared.models import ConnectionQuality, RecordingSession, StreamQuality, StreamSource
from shared.relay.link import ReceiverStats, ServerStats
from shared.roq.tls import TlsIdentity

__all__ = [
    "CaptureHandle",
    "EncoderHandle",
    "Handle",
    "NodeRelayHandle",
    "QualityHandle",
    "RecorderHandle",
    "RelayOriginHandle",
    "SenderHandle",
    "WebRTCHandle",
]

A = TypeVar("A")
P = ParamSpec("P")
R = TypeVar("R")


class Handle(Generic[A]):
    """A Ray actor handle whose calls are checked against the actor class ``A``."""

    #: The actor class and its kind, for ``actors.placement.spawn`` (which starts stage actors).
    actor_class: ClassVar[type[Any]]
    kind: ClassVar[str]

    def __init__(self, actor: Any, *, timeout: float | None = CALL_TIMEOUT_S) -> None:
        # ``Any`` here only: Ray types attribute access on its ActorHandle as ``Never``, so the
        # typing happens in this class instead.
        self.actor = actor
        self.timeout = timeout

    @overload
    async def call(
        self,
        method: Callable[Concatenate[A, P], Coroutine[Any, Any, R]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R: ...

    @overload
    async def call(
        self, method: Callable[Concatenate[A, P], R], /, *args: P.args, **kwargs: P.kwargs
    ) -> R: ...

    async def call(self, method: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``method`` (as the actor class has it, e.g. ``Supervisor.stop_stream``) in the
        actor and await it within the deadline; raises what the method raised."""
        remote = getattr(self.actor, method.__name__)
        return await call(remote.remote(*args, **kwargs), self.timeout)

    def send(
        self, method: Callable[Concatenate[A, P], object], /, *args: P.args, **kwargs: P.kwargs
    ) -> None:
        """Run ``method`` in the actor; nobody waits for it (a keyframe request)."""
        getattr(self.actor, method.__name__).remote(*args, **kwargs)

    def kill(self) -> None:
        """End the actor's process now (after its stop, or when it would not stop)."""
        ray.kill(self.actor, no_restart=True)


class CaptureHandle(Handle[CaptureActor]):
    actor_class = CaptureActor
    kind = "capture"

    async def open(self) -> int:
        """Open the sources, create the frame pool (and audio ring); the actor's pid."""
        return await self.call(CaptureActor.open)

    async def start(self, encoder: EncoderHandle | None) -> None:
        await self.call(CaptureActor.start, encoder)

    async def switch_source(self, source: str | StreamSource) -> SourceInfo:
        return await self.call(CaptureActor.switch_source, source)

    async def stats(self) -> CaptureStats:
        return await self.call(CaptureActor.stats)

    async def pause(self) -> None:
        await self.call(CaptureActor.pause)

    async def resume(self) -> None:
        await self.call(CaptureActor.resume)

    async def stop(self) -> CaptureStats:
        return await self.call(CaptureActor.stop)


class EncoderHandle(Handle[EncoderActor]):
    actor_class = EncoderActor
    kind = "encoder"

    async def open(self) -> int:
        """Open the codec(s) and create the packet rings; the actor's pid."""
        return await self.call(EncoderActor.open)

    async def rung_names(self) -> list[str]:
        return await self.call(EncoderActor.rung_names)

    async def ladder(self) -> list[Rung]:
        """The rungs the encoder writes, rung 0 first (their sizes and bitrates)."""
        return await self.call(EncoderActor.ladder)

    async def configure(self, quality: StreamQuality) -> StreamQuality:
        """The quality the encoder applied (``quality``, capped by the source)."""
        return await self.call(EncoderActor.configure, quality)

    async def set_bitrate(self, bitrate: int, rung: int = 0) -> int:
        return await self.call(EncoderActor.set_bitrate, bitrate, rung)

    async def set_paused(self, rung: int, paused: bool) -> bool:
        """Pause a rung nobody watches (no encoder time), or resume it with an IDR."""
        return await self.call(EncoderActor.set_paused, rung, paused)

    async def stats(self) -> EncoderStats:
        return await self.call(EncoderActor.stats)

    async def stop(self) -> EncoderStats:
        return await self.call(EncoderActor.stop)

    def request_keyframe(self, rung: int | None = 0) -> None:
        """An IDR on the next frame of ``rung`` (None: every rung)."""
        self.send(EncoderActor.request_keyframe, rung)


class SenderHandle(Handle[SenderActor]):
    actor_class = SenderActor
    kind = "sender"

    async def open(self, host: str, port: int, identity: TlsIdentity) -> str:
        """Listen on ``host:port`` (0: any free port); the stream's URL for viewers."""
        return await self.call(SenderActor.open, host, port, identity)

    async def stats(self) -> SenderStats:
        return await self.call(SenderActor.stats)

    async def set_rung_cap(self, peer_or_viewer: str, cap: int) -> int:
        """A viewer gets rungs ``cap`` and below; how many connections it applied to."""
        return await self.call(SenderActor.set_rung_cap, peer_or_viewer, cap)

    async def set_rung_floor(self, floor: int) -> None:
        """Retire the rungs above ``floor`` for every viewer of the shard (CPU pressure)."""
        await self.call(SenderActor.set_rung_floor, floor)

    async def pin_rung(self, peer_or_viewer: str, rung: int | None) -> int:
        """Pin a viewer to ``rung`` (None: unpin); how many connections it applied to."""
        return await self.call(SenderActor.pin_rung, peer_or_viewer, rung)

    async def set_rung_rates(self, rates: list[int]) -> None:
        """What each rung needs now (content-aware targets), top first: the rates every
        viewer's rung choice compares its estimate against."""
        await self.call(SenderActor.set_rung_rates, rates)

    async def stop(self) -> SenderStats:
        return await self.call(SenderActor.stop)


class WebRTCHandle(Handle[WebRTCShardActor]):
    actor_class = WebRTCShardActor
    kind = "webrtc"

    async def open(self, host: str, port: int) -> str:
        """Serve WHEP on ``host:port`` (0: a free port); the endpoint's URL."""
        return await self.call(WebRTCShardActor.open, host, port)

    async def stats(self) -> WebRTCStats:
        return await self.call(WebRTCShardActor.stats)

    async def revoke(self, token_id: str | None, viewer_id: str | None) -> int:
        """Cut a token's or a viewer's peers now and refuse it from now on; how many."""
        return await self.call(WebRTCShardActor.revoke, token_id, viewer_id)

    async def close_viewer(self, viewer_id: str) -> int:
        return await self.call(WebRTCShardActor.close_viewer, viewer_id)

    async def stop(self) -> WebRTCStats:
        return await self.call(WebRTCShardActor.stop)


class RecorderHandle(Handle[RecorderActor]):
    actor_class = RecorderActor
    kind = "recorder"

    async def open(self) -> int:
        """Check the output folder, attach to the rings and start writing; the actor's pid."""
        return await self.call(RecorderActor.open)

    async def status(self) -> RecordingSession:
        return await self.call(RecorderActor.status)

    async def pause(self) -> RecordingSession:
        return await self.call(RecorderActor.pause)

    async def resume(self) -> RecordingSession:
        return await self.call(RecorderActor.resume)

    async def stop(self) -> RecordingSession:
        return await self.call(RecorderActor.stop)


class QualityHandle(Handle[QualityActor]):
    actor_class = QualityActor
    kind = "quality"

    async def start(self) -> int:
        """Start the control loop; the actor's pid."""
        return await self.call(QualityActor.start)

    async def add_sender(self, viewer_id: str, sender: SenderHandle) -> None:
        await self.call(QualityActor.add_sender, viewer_id, sender)

    async def remove_sender(self, viewer_id: str) -> None:
        await self.call(QualityActor.remove_sender, viewer_id)

    async def set_ceiling(self, bitrate: int) -> None:
        await self.call(QualityActor.set_ceiling, bitrate)

    async def connection_quality(self) -> dict[str, ConnectionQuality]:
        return await self.call(QualityActor.connection_quality)

    async def targets(self) -> list[RungTarget]:
        """Each rung's encoder target and state after the last round."""
        return await self.call(QualityActor.targets)

    async def pressure(self) -> tuple[int, str]:
        """CPU-pressure steps in force, and the last step's reason."""
        return await self.call(QualityActor.pressure)

    async def apply_pressure(self, decision: PressureDecision) -> None:
        """The stream's pressure steps in force after the supervisor's ``decision``."""
        await self.call(QualityActor.apply_pressure, decision)

    async def reapply(self) -> None:
        """After an encoder restart: targets, paused rungs and frame rate to the new one."""
        await self.call(QualityActor.reapply)

    async def stop(self) -> None:
        await self.call(QualityActor.stop)


class RelayOriginHandle(Handle[RelayOriginActor]):
    actor_class = RelayOriginActor
    kind = "relay_origin"

    async def open(self) -> tuple[str, int]:
        """Serve the stream's rings; the (node address, port) other nodes subscribe at."""
        return await self.call(RelayOriginActor.open)

    async def address(self) -> tuple[str, int]:
        """Where an open origin listens (what ``open`` returned)."""
        return await self.call(RelayOriginActor.address)

    async def tracks(self) -> list[str]:
        return await self.call(RelayOriginActor.tracks)

    async def stats(self) -> ServerStats:
        return await self.call(RelayOriginActor.stats)

    async def stop(self) -> ServerStats:
        return await self.call(RelayOriginActor.stop)


class NodeRelayHandle(Handle[NodeRelayActor]):
    actor_class = NodeRelayActor
    kind = "relay"

    async def open(self) -> dict[str, str]:
        """Subscribe to the origin; this node's copy of each track's ring, by track."""
        return await self.call(NodeRelayActor.open)

    async def stats(self) -> ReceiverStats:
        return await self.call(NodeRelayActor.stats)

    async def sample(self, pids: dict[str, int]) -> ResourceSnapshot:
        """The relay's node, and the processes ``pids`` names there (psutil on that node)."""
        return await self.call(NodeRelayActor.sample, pids)

    async def stop(self) -> ReceiverStats:
        return await self.call(NodeRelayActor.stop)
