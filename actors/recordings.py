"""The supervisor's recording bookkeeping: the design's RecordingEngine over RecorderActors.

Each recording session is its own RecorderActor reading its stream's packet rings, so a stream
can have several (a continuous one and a motion-triggered one, say), each started, paused,
resumed and stopped on its own.  Scheduled recordings wait in a ``RecordingSchedule`` whose timer
wakes exactly when the next start or stop is due.  A recorder whose process dies (killed, out of memory) is
restarted into the next numbered segment, so a crash costs at most the last fragment of the
file it was writing plus the restart gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field

import msgspec
import ray

from actors.handles import EncoderHandle, RecorderHandle
from actors.placement import spawn
from actors.stages.recorder import RecorderActor
from shared.errors import PermissionError, StreamNotFoundError
from shared.models import (
    RecordingConfig,
    RecordingSession,
    RecordingState,
    StreamQuality,
    ViewerPermissions,
)
from shared.recording.policy import RecordingSchedule, ScheduleAction, ScheduledRecording

logger = logging.getLogger(__name__)

#: A scheduled recorder is started this much before its time: starting a process takes a moment.
SCHEDULE_LEAD_S = 2.0


@dataclass
class StreamContext:
    """What a recording needs to know about its stream."""

    session_id: str
    node_id: str
    quality: StreamQuality
    ring_names: dict[str, str]
    encoder: EncoderHandle


@dataclass
class _Recording:
    recording_id: str
    stream: StreamContext
    config: RecordingConfig
    #: Set by ``Recordings._spawn`` before the recording is registered.
    handle: RecorderHandle = field(init=False)
    pid: int = 0
    segment: int = 0
    restarts: int = 0
    last: RecordingSession | None = None
    segments: list[str] = field(default_factory=list)
    start_at: float | None = None
    stop_at: float | None = None
    #: Held by a restart and by a stop: a stop that arrives while a dead recorder is being
    #: replaced waits for the new one and stops it, instead of calling the dead one and leaving
    #: the new one running.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Recordings:
    def __init__(self) -> None:
        self._recordings: dict[str, _Recording] = {}
        self._schedule = RecordingSchedule()
        self._timer: asyncio.Task[None] | None = None
        self._timer_changed = asyncio.Event()
        #: Per scheduled recording: its stream, config, and wall-clock start and stop (the
        #: recorder cuts on capture stamps, which are wall-clock).
        self._scheduled: dict[str, tuple[StreamContext, RecordingConfig, float, float]] = {}
        self._ids = itertools.count(1)

    def _new_id(self, session_id: str) -> str:
        return f"{session_id}-rec{next(self._ids)}"

    def _get(self, recording_id: str) -> _Recording:
        try:
            return self._recordings[recording_id]
        except KeyError:
            raise StreamNotFoundError(f"no active recording {recording_id!r}") from None

    def of_stream(self, session_id: str) -> list[str]:
        return [rid for rid, r in self._recordings.items() if r.stream.session_id == session_id]

    def pids(self) -> dict[str, int]:
        return {rid: r.pid for rid, r in self._recordings.items() if r.pid}

    def actor_names(self) -> dict[str, str]:
        """Each recording's recorder actor, by recording id: its Ray name, as ``_spawn``
        gives it (for ``kizuna-stream status``)."""
        return {
            rid: f"kz-{r.stream.session_id}-{rid.rsplit('-', 1)[-1]}-{r.restarts}"
            for rid, r in self._recordings.items()
        }

    async def start(
        self,
        stream: StreamContext,
        config: RecordingConfig,
        *,
        permissions: ViewerPermissions | None = None,
        recording_id: str | None = None,
        start_at: float | None = None,
        stop_at: float | None = None,
    ) -> RecordingSession:
        """Start recording; ``permissions`` are the asking viewer's, if a viewer asked.

        ``start_at`` and ``stop_at`` (wall-clock seconds) are a scheduled recording's window:
        the recorder cuts the file at the packets captured then, whenever this is called.
        """
        if permissions is not None and not permissions.can_record:
            raise PermissionError("this viewer is not allowed to record the stream")
        recording = _Recording(
            recording_id or self._new_id(stream.session_id),
            stream,
            config,
            start_at=start_at,
            stop_at=stop_at,
        )
        await self._spawn(recording)
        self._recordings[recording.recording_id] = recording
        status = await recording.handle.status()
        recording.last = status
        return status

    async def _spawn(self, recording: _Recording) -> None:
        stream = recording.stream
        short_id = recording.recording_id.rsplit("-", 1)[-1]
        handle = spawn(
            RecorderActor,
            RecorderHandle,
            name=f"kz-{stream.session_id}-{short_id}-{recording.restarts}",
            node_id=stream.node_id,
        )(
            recording_id=recording.recording_id,
            session_id=stream.session_id,
            config=recording.config,
            quality=stream.quality,
            ring_names=stream.ring_names,
            encoder=stream.encoder,
            first_segment=recording.segment,
            start_at=recording.start_at,
            stop_at=recording.stop_at,
        )
        try:
            recording.pid = await handle.open()
        except BaseException:
            handle.kill()
            raise
        recording.handle = handle

    async def stop(self, recording_id: str) -> RecordingSession:
        recording = self._get(recording_id)
        del self._recordings[recording_id]
        async with recording.lock:
            try:
                final = await recording.handle.stop()
            except ray.exceptions.RayActorError:
                # Died since the last health round: what it last reported is all there is.
                if recording.last is None:
                    raise
                final = msgspec.structs.replace(recording.last, state=RecordingState.STOPPED)
            finally:
                recording.handle.kill()
        final.segments = recording.segments + final.segments
        return final

    async def pause(self, recording_id: str) -> RecordingSession:
        result = await self._get(recording_id).handle.pause()
        return result

    async def resume(self, recording_id: str) -> RecordingSession:
        result = await self._get(recording_id).handle.resume()
        return result

    async def status(self, recording_id: str) -> RecordingSession:
        """The recording's status; while a dead recorder awaits its restart, the last known one."""
        recording = self._get(recording_id)
        try:
            result = await recording.handle.status()
        except ray.exceptions.RayActorError:
            if recording.last is None:
                raise
            return msgspec.structs.replace(
                recording.last, segments=recording.segments + recording.last.segments
            )
        recording.last = result  # what a stop returns if the recorder dies before it
        return msgspec.structs.replace(result, segments=recording.segments + result.segments)

    def schedule(
        self, stream: StreamContext, config: RecordingConfig, *, start_at: float, duration_s: float
    ) -> str:
        recording_id = self._new_id(stream.session_id)
        # The timer runs on the monotonic clock, so an NTP step neither fires nor delays it;
        # the wall-clock start is placed on that clock once, here.
        now = time.monotonic()
        start = now + (start_at - time.time())
        # Start the recorder's process SCHEDULE_LEAD_S early (or at once, when the start is
        # nearer than that); it writes from start_at itself, even if its process starts late.
        early = max(now, start - SCHEDULE_LEAD_S)
        self._schedule.add(
            ScheduledRecording(
                recording_id=recording_id, start_at=early, duration_s=start + duration_s - early
            ),
            now=now,
        )
        self._scheduled[recording_id] = (stream, config, start_at, start_at + duration_s)
        if self._timer is None or self._timer.done():
            self._timer = asyncio.create_task(self._run_schedule(), name="recording-schedule")
        else:
            self._timer_changed.set()
        return recording_id

    async def _run_schedule(self) -> None:
        """Sleep until the next scheduled start or stop (not a polling interval), then act."""
        while (due := self._schedule.next_due()) is not None:
            self._timer_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due - time.monotonic())):
                    await self._timer_changed.wait()
            for action, entry in self._schedule.poll(now=time.monotonic()):
                stream, config, start_at, stop_at = self._scheduled[entry.recording_id]
                try:
                    if action is ScheduleAction.START:
                        await self.start(
                            stream,
                            config,
                            recording_id=entry.recording_id,
                            start_at=start_at,
                            stop_at=stop_at,
                        )
                    elif entry.recording_id in self._recordings:
                        self._scheduled.pop(entry.recording_id, None)
                        await self.stop(entry.recording_id)
                except Exception as exc:
                    logger.error(
                        "scheduled recording %s could not %s: %s",
                        entry.recording_id,
                        action.value,
                        exc,
                    )

    def cancel_stream(self, session_id: str) -> None:
        """Forget scheduled recordings of a stream that stopped."""
        for recording_id, (stream, *_) in list(self._scheduled.items()):
            if stream.session_id == session_id:
                self._schedule.cancel(recording_id)
                del self._scheduled[recording_id]

    async def check(self) -> None:
        """One health round: note each recording's progress and restart dead recorders."""
        for recording in list(self._recordings.values()):
            async with recording.lock:
                if recording.recording_id not in self._recordings:
                    continue  # stopped while this round waited for the lock
                try:
                    recording.last = await recording.handle.status()
                except ray.exceptions.RayActorError:
                    await self._restart(recording)

    async def next_segment(self, session_id: str) -> None:
        """The stream's encoder restarted and its rings are new: each recording of the stream
        finishes its file and carries on in its next numbered segment (a new recorder reading
        the new rings), losing only the restart gap."""
        for recording_id in self.of_stream(session_id):
            recording = self._recordings.get(recording_id)
            if recording is None:
                continue
            async with recording.lock:
                if recording_id not in self._recordings:
                    continue  # stopped meanwhile
                try:
                    recording.last = await recording.handle.stop()
                except Exception as exc:  # it died too: what it last reported is all there is
                    logger.warning("recorder of %s: %s", recording_id, exc)
                recording.handle.kill()
                await self._restart(recording)

    async def _restart(self, recording: _Recording) -> None:
        last = recording.last
        if last is not None:
            # Its files move to the recording's list once: status() adds last.segments to that
            # list while the new recorder starts, and a failed one is checked again each round.
            recording.segments += last.segments
            recording.last = msgspec.structs.replace(last, segments=[])
        if last is not None and last.state is RecordingState.ERROR:
            return  # it failed on purpose (disk full): restarting would fail the same way
        recording.segment = recording.segment + max(1, len(last.segments) if last else 1)
        recording.restarts += 1
        logger.warning(
            "recorder of %s restarting into segment %d",
            recording.recording_id,
            recording.segment,
        )
        try:
            await self._spawn(recording)
        except Exception as exc:
            logger.error("could not restart recording %s: %s", recording.recording_id, exc)
            self._recordings.pop(recording.recording_id, None)
