"""Restarting a stream's crashed stage actors: who restarts each kind, and how it re-attaches.

Who restarts what, and why
==========================

- **capture, encoder, quality controller: Ray** (``max_restarts=RAY_RESTARTS`` at spawn).  A
  Ray restart keeps the actor's handle, name and node.  The encoder's handle lives in the
  capture actor, in every shard (a viewer's PLI becomes a keyframe request on it), in the
  quality controller, the recorders and the stream's recording context; a new actor would mean
  re-wiring every one of them, a restarted one needs none.  Ray re-runs only the constructor,
  so the supervisor re-runs the rest of the start sequence (``open``, ``start``) and re-attaches
  the shared memory, in the order below, once Ray has the process back (``until_back``).
- **a sender shard: the supervisor** (``ShardPool.refresh`` and ``_adopt``): what a shard holds
  is its viewers' QUIC connections, which no restart brings back.  Its ports move to a
  survivor (or a new shard) and its viewers, whose client reconnects by itself with backoff
  (``shared.viewer.client``), come back to the address they know.
- **a recorder: the supervisor** (``Recordings.check``): a new actor, named for its segment,
  writes the next numbered file.  A Ray restart would re-run the constructor with the first
  segment's path and write over the file the dead one left.

Shared memory: each segment is owned by its writer, which creates it and unlinks it on a clean
stop.  Capture owns the frame pool and the audio ring, the encoder owns the rung rings.  A
crashed writer's segment stays behind (its readers still map it); the restarted writer creates
the same name, which reclaims the dead creator's segment (``shared.pool.shm.create_segment``),
so there is never a second segment nor a leaked one.  Its readers then re-attach: the encoder
to a new frame pool (``EncoderActor.reattach_pool``), the shards to new rings
(``SenderActor.reattach``, and the WebRTC shard's feeds, ``WebRTCShardActor.reattach``; the
restarted encoder carries on the stream's pts, so the viewers' RTP timestamps run on), and
recordings continue in their next segment.  The quality controller then tells the new encoder
what it had told the old one (``QualityActor.reapply``: targets, paused rungs, a frame rate
lowered under pressure); a restarted quality controller is given the stream's pressure steps
in force by the supervisor.

How a crash is noticed: the supervisor keeps one ``watch`` call in flight to each actor, which
Ray fails the moment the process dies; no polling interval adds to the recovery time.  Each
crash goes to the stream's :class:`~shared.control.restart_policy.RestartPolicy`: a stage that
keeps dying as soon as it is restarted is a crash loop, and the stream goes to Error with the
reason instead of restarting forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import ray

from actors.calls import call, unwrap
from actors.handles import Handle
from actors.recordings import Recordings
from actors.stages.encoder import EncoderActor
from actors.stages.sender import SenderActor
from actors.stages.webrtc import WebRTCShardActor
from shared.control.pressure import PressureDecision
from shared.control.restart_policy import RestartPolicy
from shared.errors import CrashLoopError, KizunaError
from shared.models import StreamState
from shared.pool.shm import segment_name

if TYPE_CHECKING:
    from actors.supervisor import _Stream

logger = logging.getLogger(__name__)

#: ``max_restarts`` of the kinds Ray restarts: always, since the policy below bounds it.
RAY_RESTARTS = -1
#: How long Ray may take to bring a process back (a new worker imports the whole stack).
RESTART_TIMEOUT_S = 30.0
#: How often a restarting actor is asked whether it is back (Ray answers "unavailable" until).
BACK_POLL_S = 0.05


async def until_back(handle: Handle[Any], timeout: float = RESTART_TIMEOUT_S) -> None:
    """Wait for Ray to have restarted ``handle``'s actor; TimeoutError past ``timeout``.

    While Ray restarts an actor, a call to it does not wait: it fails with
    ``ActorUnavailableError`` ("The actor is restarting", or an RpcError from the dead
    process's connection), which is retried here and only that.  ``ActorDiedError`` means Ray
    will not bring it back (no restart left, or killed with ``no_restart``): it is raised at
    once, and the stream fails with it.  (Ray's own ``tests/test_actor_unavailable.py`` pins
    both: Unavailable during a restart, Died once the restarts are spent.)  A constructor that
    hangs answers nothing: that is the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await call(handle.actor.__ray_ready__.remote(), max(deadline - time.monotonic(), 0.1))
            return
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the actor was not back within {timeout:g} s") from None
            await asyncio.sleep(BACK_POLL_S)
        except TimeoutError:
            raise TimeoutError(f"the actor was not back within {timeout:g} s") from None


class StageRecovery:
    """Watches one stream's capture, encoder and quality actors and restarts them."""

    def __init__(
        self,
        stream: _Stream,
        recordings: Recordings,
        *,
        fail: Callable[[_Stream, BaseException], None],
        running: Callable[[], bool],
        pressure: Callable[[], PressureDecision | None] = lambda: None,
    ) -> None:
        """``fail`` moves the stream to Error; ``running`` says whether the stream is still
        the supervisor's and not stopping (a restart then has nothing to do); ``pressure``
        gives the stream's CPU-pressure steps in force (None: it does not shed), which a
        restarted quality controller is told again."""
        self._stream = stream
        self._pressure = pressure
        self._recordings = recordings
        self._fail = fail
        self._running = running
        self.policy = RestartPolicy(
            max_restarts=stream.config.max_restarts, window_s=stream.config.restart_window_s
        )
        self._watchers: dict[str, asyncio.Task[None]] = {}
        #: Kinds being restarted now: the health round leaves the stream's stages alone.
        self.busy: set[str] = set()
        self.last_reason = ""

    def start(self) -> None:
        """Watch every stage the stream has (an audio-only stream: capture alone)."""
        stream = self._stream
        for kind, handle in (
            ("capture", stream.capture),
            ("encoder", stream.encoder),
            ("quality", stream.quality),
        ):
            if handle is not None:
                self._watch(kind, handle)

    async def close(self) -> None:
        """Stop watching (before a teardown kills the actors on purpose)."""
        tasks = list(self._watchers.values())
        self._watchers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _watch(self, kind: str, handle: Handle[Any]) -> None:
        name = f"watch-{self._stream.session.session_id}-{kind}"
        self._watchers[kind] = asyncio.create_task(self._guard(kind, handle), name=name)

    async def _guard(self, kind: str, handle: Handle[Any]) -> None:
        try:
            # No deadline: it answers only when the process dies (or never).
            await call(handle.actor.watch.remote(), None)
        except ray.exceptions.RayActorError as exc:
            await self._crashed(kind, handle, exc)

    async def _crashed(self, kind: str, handle: Handle[Any], exc: BaseException) -> None:
        stream = self._stream
        sid = stream.session.session_id
        self.busy.add(kind)
        try:
            if not self._running():
                return
            crash: BaseException = exc
            while True:
                cause = f"{type(crash).__name__}: {str(unwrap(crash)).splitlines()[0]}"
                decision = self.policy.crashed(kind, time.monotonic(), cause)
                self.last_reason = decision.reason
                if not decision.restart:
                    logger.error("stream %s: %s", sid, decision.reason)
                    handle.kill()  # Ray would restart it once more
                    self._fail(stream, CrashLoopError(decision.reason))
                    return
                logger.warning("stream %s: %s", sid, decision.reason)
                noticed = time.monotonic()
                # An actor killed for good (no restart left) fails here, and the stream with it.
                await until_back(handle)
                back = time.monotonic()
                try:
                    async with stream.lock:  # not while the stream starts or stops
                        if not self._running():
                            return
                        await self._restart(kind)()
                except ray.exceptions.RayActorError as again:
                    # It died again during its restart sequence: another crash of the same
                    # kind, which the policy counts (a crash loop ends in Error, not here);
                    # whether Ray brings it back once more, ``until_back`` says.
                    crash = again
                    continue
                break
            # Where a recovery's time goes: Ray starting a process, then the start sequence.
            logger.warning(
                "stream %s: %s restarted %.2f s after its crash was noticed (process back "
                "after %.2f s, restart sequence %.2f s)",
                sid,
                kind,
                time.monotonic() - noticed,
                back - noticed,
                time.monotonic() - back,
            )
            self._watch(kind, handle)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logger.error("stream %s: restarting the %s failed: %s", sid, kind, unwrap(error))
            self._fail(stream, unwrap(error))
        finally:
            self.busy.discard(kind)

    def _restart(self, kind: str) -> Callable[[], Awaitable[None]]:
        return {
            "capture": self._restart_capture,
            "encoder": self._restart_encoder,
            "quality": self._restart_quality,
        }[kind]

    async def _restart_capture(self) -> None:
        """Capture re-opens its sources and creates the frame pool (and audio ring) anew; the
        encoder reads the new pool; capture starts writing."""
        stream = self._stream
        assert stream.capture is not None
        stream.pids["capture"] = await stream.capture.open()
        if stream.encoder is not None:
            await stream.encoder.call(EncoderActor.reattach_pool)
        await stream.capture.start(stream.encoder)
        if stream.lifecycle.state is StreamState.PAUSED:  # it crashed while paused
            await stream.capture.pause()
        if stream.config.audio is not None:
            await self._reattach_shards([segment_name(stream.session.session_id, "audio")])

    async def _restart_encoder(self) -> None:
        """The encoder attaches to the pool, creates its rings anew and carries on the
        stream's pts; the shards read the new rings, recordings go on in a next segment."""
        stream = self._stream
        encoder = stream.encoder
        assert encoder is not None
        stream.pids["encoder"] = await encoder.open()
        if stream.session.quality != stream.config.quality:  # adjusted since it started
            await encoder.configure(stream.session.quality)
        await self._reattach_shards(await encoder.rung_names())
        if stream.quality is not None:
            # The new process runs the configured ladder: what the controller had told the
            # old one (targets, paused rungs, a lowered frame rate) is told again.
            await stream.quality.reapply()
        await self._recordings.next_segment(stream.session.session_id)

    async def _restart_quality(self) -> None:
        """The controller learns the ladder again, gets the shards it steers and the
        pressure steps in force (its targets it works out again in its next rounds)."""
        stream = self._stream
        quality = stream.quality
        assert quality is not None
        stream.pids["quality"] = await quality.start()
        if stream.shards is not None:
            for shard_id, shard in list(stream.shards.shards.items()):
                await quality.add_sender(shard_id, shard.handle)
        state = self._pressure()
        if state is not None and state.level > 0:
            await quality.apply_pressure(state)

    async def _reattach_shards(self, rings: list[str]) -> None:
        webrtc = self._stream.webrtc
        if webrtc is not None:
            try:
                await webrtc.call(WebRTCShardActor.reattach, rings)
            except (ray.exceptions.RayError, KizunaError) as exc:
                # Its browsers lose the picture until they reconnect; the stream goes on.
                logger.warning(
                    "stream %s: the WebRTC shard did not re-attach: %s",
                    self._stream.session.session_id,
                    unwrap(exc),
                )
        shards = [] if self._stream.shards is None else list(self._stream.shards.shards.values())
        results = await asyncio.gather(
            *(s.handle.call(SenderActor.reattach, rings) for s in shards), return_exceptions=True
        )
        for shard, result in zip(shards, results, strict=True):
            if isinstance(result, BaseException):  # a dead shard: the health round adopts it
                logger.warning(
                    "stream %s: %s did not re-attach: %s",
                    self._stream.session.session_id,
                    shard.shard_id,
                    unwrap(result),
                )
