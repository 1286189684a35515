"""QualityActor: sets each rung's encoder target from the viewers on that rung.

Once a second it asks each sender shard for its stats: every viewer's rung (and the rung it is
switching to) and its bandwidth estimate (``SenderStats.peers``).  The sans-I/O core
:class:`shared.control.rung_targets.RungTargets` turns them into one target per rung, within
the rung's bounds, and the actor applies the targets that moved to the encoder's rungs.

Each viewer's own rung follows its own path (``shared.control.rung_choice``, in its shard), so
the targets only trim a rung for the viewers on it; a viewer on a poor link moves down a rung
instead of lowering the picture for everyone.  A rung with no viewer runs at its configured
rate: a stream nobody watches returns to its configured quality (the shared target of the
single-rung design stayed wherever the last viewers had left it, 300 kbps after an overload of
30 viewers, because shards without viewers reported nothing and the old estimates stood).

Content-aware (``content_aware``): each round also reads the encoder's stats, and each
running rung's bitrate over the last two seconds and the average QP libx264 reported for
those frames (:func:`rung_complexity`) go to the core as its complexity signal, so a rung
showing a still or simple picture is given less than its configured rate (its need) and gets
it back as soon as the picture moves (the rules are the core's).  No call is made per frame:
the encoder keeps the figures, this polls them with the stats call it makes anyway.  Each
shard is also given the rungs' needs whenever they move (``SenderHandle.set_rung_rates``), so
every viewer's rung choice weighs its estimate against what its rung needs now.

It also classifies each shard's connections (``classify_connection``) for the viewers' status,
and applies the CPU-pressure steps the supervisor decides for the stream (the design's
"Resource Constraints" strategy; the node's streams shed by priority in
:class:`shared.control.pressure.NodePressure`): the top rung's frame rate halved (the encoder
reconfigured), then the top rungs retired (paused in the encoder, and every shard's viewers
capped below them, moving down at an IDR), and undone in reverse when the pressure passes.
After an encoder restart (:meth:`QualityActor.reapply`) it gives the new encoder process what
the old one had been told: the rungs' targets, the paused rungs, the lowered frame rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from shared.control.pressure import PressureDecision
from shared.control.quality import FLOOR_FRACTION, ViewerFeedback, classify_connection
from shared.control.rung_targets import (
    RungBounds,
    RungComplexity,
    RungTarget,
    RungTargets,
    ViewerRung,
)
from shared.models import ConnectionQuality, Resolution, StreamQuality

if TYPE_CHECKING:
    from actors.handles import EncoderHandle, SenderHandle
    from actors.stages.encoder import EncoderStats
    from actors.stages.sender import PeerStatus, SenderStats
    from shared.media.ladder import RungEncodeStats

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0


def ladder_bounds(rates: list[int]) -> list[RungBounds]:
    """Each rung's bounds: its configured rate as the ceiling; the floor half of it, except
    on the lowest rung, which has no rung below for its viewers to move to and may go down
    to :data:`FLOOR_FRACTION` of its rate (a picture at all beats none)."""
    bounds = [RungBounds(configured_bps=rate) for rate in rates]
    lowest = rates[-1]
    bounds[-1] = RungBounds(configured_bps=lowest, min_bps=max(int(lowest * FLOOR_FRACTION), 1))
    return bounds


def rung_complexity(rungs: Sequence[RungEncodeStats]) -> list[RungComplexity]:
    """Each running rung's complexity signal from the encoder's stats (``EncoderStats.rungs``):
    what it produced over the last two seconds (against the target it was given, which the
    targets core knows) and its average QP where the encoder reports one.  A paused rung, or
    one with no frames in the window yet, says nothing."""
    return [
        RungComplexity(rung=index, produced_bps=rung.bitrate, qp=rung.qp)
        for index, rung in enumerate(rungs)
        if not rung.paused and rung.bitrate > 0
    ]


def viewer_quality(
    peer: PeerStatus, encoder: EncoderStats, top: StreamQuality
) -> tuple[ConnectionQuality, StreamQuality]:
    """A connected viewer's ``ViewerStatus.connection_quality`` and ``current_quality``: its
    own feedback classified, and the rung it receives (rung 0: the stream's ``top``
    quality; another rung: its size and frame rate at the rung's current target)."""
    connection = classify_connection(
        ViewerFeedback(
            viewer_id=peer.viewer_id or peer.peer_id, rtt_ms=peer.rtt_ms, loss_rate=peer.loss
        )
    )
    if peer.rung == 0 or peer.rung >= len(encoder.rungs):
        return connection, top
    rung = encoder.rungs[peer.rung]
    quality = StreamQuality(
        resolution=Resolution(rung.width, rung.height),
        framerate=rung.framerate,
        bitrate=rung.target_bitrate,
        hardware_acceleration=top.hardware_acceleration,
    )
    return connection, quality


class QualityActor:
    def __init__(
        self,
        session_id: str,
        encoder: EncoderHandle,
        ceiling_bitrate: int,
        content_aware: bool = False,
    ) -> None:
        """``ceiling_bitrate``: rung 0's configured rate (the stream's quality);
        ``content_aware``: let each rung's target follow the encoder's complexity signal
        (module doc).  Off by default, as shedding is in the library: the test suite and the
        benchmarks measure the ladder they configured, and the moving test pattern they
        encode is easy content (libx264 codes it at QP 1 to 8 at 1024x576 and 1.5 Mbps,
        measured), whose top rung would drop to its floor."""
        self._content_aware = content_aware
        self._session_id = session_id
        self._encoder = encoder
        self._ceiling = ceiling_bitrate
        self._targets: RungTargets | None = None
        self._senders: dict[str, SenderHandle] = {}
        self._connection: dict[str, ConnectionQuality] = {}
        self._task: asyncio.Task[None] | None = None
        self.adjustments = 0
        self.last_targets: list[RungTarget] = []
        #: Each rung's pause as last applied to the encoder.
        self._paused: dict[int, bool] = {}
        self._top: StreamQuality | None = None
        #: The pressure steps in force: the top rung's frame rate as applied (None: as
        #: configured) and the rungs retired.
        self._framerate: int | None = None
        self._retired: tuple[int, ...] = ()
        #: Pressure steps taken and undone, newest last (the stream's stats show the last).
        self.decisions: list[PressureDecision] = []
        #: The rungs' needs each shard was last given (content-aware).
        self._needs_sent: dict[str, list[int]] = {}

    async def start(self) -> int:
        """Learn the ladder and start the control loop; the actor's pid."""
        await self._plan()
        self._task = asyncio.create_task(self._run(), name="quality")
        return os.getpid()

    async def _plan(self) -> None:
        ladder = await self._encoder.ladder()
        rates = [rung.bitrate for rung in ladder]
        rates[0] = self._ceiling
        self._targets = RungTargets(ladder_bounds(rates))
        top = ladder[0]
        self._top = StreamQuality(
            resolution=Resolution(top.width, top.height),
            framerate=top.framerate,
            bitrate=self._ceiling,
            quality_preset=top.preset,
        )

    def add_sender(self, viewer_id: str, handle: SenderHandle) -> None:
        self._senders[viewer_id] = handle

    def remove_sender(self, viewer_id: str) -> None:
        self._senders.pop(viewer_id, None)
        self._needs_sent.pop(viewer_id, None)
        self._connection.pop(viewer_id, None)

    async def set_ceiling(self, bitrate: int) -> None:
        """The stream's quality changed: rung 0's ceiling is ``bitrate`` from now on."""
        self._ceiling = bitrate
        await self._plan()
        await self._encoder.set_bitrate(bitrate)

    def connection_quality(self) -> dict[str, ConnectionQuality]:
        return dict(self._connection)

    def targets(self) -> list[RungTarget]:
        """Each rung's target and state after the last round."""
        return list(self.last_targets)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            try:
                await self._poll()
            except Exception:
                # One failed round (a sender stopping mid-call) must not end adaptation.
                logger.warning("quality poll for %s failed", self._session_id, exc_info=True)

    async def _poll(self) -> None:
        encoder = await self._encoder.stats() if self._content_aware else None
        reports: list[SenderStats] = []
        for shard_id, handle in list(self._senders.items()):
            stats = await handle.stats()
            reports.append(stats)
            if stats.peers:
                item = ViewerFeedback(
                    viewer_id=shard_id,
                    rtt_ms=max(peer.rtt_ms for peer in stats.peers),
                    loss_rate=max(peer.loss for peer in stats.peers),
                )
                self._connection[shard_id] = classify_connection(item)
            else:
                self._connection.pop(shard_id, None)
        complexity = rung_complexity(encoder.rungs) if self._content_aware and encoder else []
        await self.apply(reports, now=time.monotonic(), complexity=complexity)

    async def apply(
        self,
        reports: list[SenderStats],
        *,
        now: float,
        complexity: Sequence[RungComplexity] = (),
    ) -> list[RungTarget]:
        """One round: the shards' stats and the encoder's complexity signal in
        (:func:`rung_complexity`), the rungs' targets that moved to the encoder."""
        targets = self._targets
        assert targets is not None, "start() plans the ladder"
        count = len(targets.bounds)
        # Viewers still on a rung retired under pressure are on their way to the floor's.
        floor = len(self._retired)
        viewers = [
            ViewerRung(
                rung=max(min(peer.rung, count - 1), floor),
                estimate_bps=peer.estimate_bps,
                pending_rung=(
                    min(peer.rung_wanted, count - 1) if peer.rung_wanted != peer.rung else None
                ),
            )
            for stats in reports
            for peer in stats.peers
            if peer.estimate_bps > 0
        ]
        self.last_targets = targets.update(viewers, now=now, complexity=complexity)
        if self._content_aware:
            await self._send_needs(targets.needs())
        for target in self.last_targets:
            was = self._paused.get(target.rung, False)
            if target.rung in self._retired:
                continue  # retired under CPU pressure: stays paused whoever asks
            # A rung nobody watches costs no encoder time; resumed, it starts at an IDR.  A
            # pause is applied again every round: a viewer's IDR request resumes a rung in the
            # encoder itself (a switch must not wait for this round), and if that viewer never
            # came, the rung pauses again here.
            if target.paused or was:
                if target.paused != was:
                    logger.info(
                        "stream %s rung %d: %s", self._session_id, target.rung, target.reason
                    )
                await self._encoder.set_paused(target.rung, target.paused)
                self._paused[target.rung] = target.paused
            if target.changed:
                self.adjustments += 1
                logger.info("stream %s rung %d: %s", self._session_id, target.rung, target.reason)
                await self._encoder.set_bitrate(target.target_bps, target.rung)
        return self.last_targets

    async def _send_needs(self, needs: list[int]) -> None:
        """Each shard whose viewers' selectors have other rates than the rungs' needs gets
        them (a shard added since, or needs that moved): a viewer then compares its estimate
        with what its rung really needs (``RungSelector.set_rates``)."""
        for shard_id, handle in list(self._senders.items()):
            if self._needs_sent.get(shard_id) != needs:
                await handle.set_rung_rates(needs)
                self._needs_sent[shard_id] = list(needs)

    def pressure(self) -> tuple[int, str]:
        """Steps in force and the last decision's reason ("" when none was ever taken)."""
        if not self.decisions:
            return 0, ""
        last = self.decisions[-1]
        return last.level, last.reason

    async def apply_pressure(self, decision: PressureDecision) -> None:
        """Bring the encoder and the shards to the steps in force after ``decision`` (the
        supervisor's, ``shared.control.pressure.NodePressure``): the top rung's frame rate,
        and the rungs retired from the top.  Idempotent: what is already so is not sent again,
        so the supervisor may send a restarted controller the stream's state as it stands."""
        if not self.decisions or self.decisions[-1] != decision:
            self.decisions = [*self.decisions[-31:], decision]
            logger.warning("stream %s: %s (%s)", self._session_id, decision.action, decision.reason)
        top = self._top
        assert top is not None, "start() plans the ladder"
        framerate = None if decision.framerate == top.framerate else decision.framerate
        if framerate != self._framerate:
            await self._encoder.configure(
                msgspec.structs.replace(top, framerate=decision.framerate)
            )
            self._framerate = framerate
        await self._retire(decision.retired_rungs)

    async def _retire(self, retired: tuple[int, ...], *, force: bool = False) -> None:
        # The policy retires from the top: rung 0, then 1, ...; the floor is their count.
        floor, was = len(retired), len(self._retired)
        if floor != was or force:
            for handle in list(self._senders.values()):
                await handle.set_rung_floor(floor)
        for rung in retired:
            if force or rung not in self._retired:
                await self._encoder.set_paused(rung, True)
                self._paused[rung] = True
        for rung in range(floor, was):
            # A rung that came back; the targets' next round pauses it again if nobody is to
            # watch it (never rung 0).
            await self._encoder.set_paused(rung, False)
            self._paused[rung] = False
        self._retired = retired

    async def reapply(self) -> None:
        """The encoder restarted (``actors.recovery``): it runs its configured ladder again,
        every rung running at its configured rate.  Tell it what its predecessor had been
        told: the lowered frame rate, the rungs retired or paused, each rung's target."""
        top = self._top
        assert top is not None, "start() plans the ladder"
        if self._framerate is not None:
            await self._encoder.configure(msgspec.structs.replace(top, framerate=self._framerate))
        await self._retire(self._retired, force=True)
        for rung, paused in sorted(self._paused.items()):
            if paused and rung not in self._retired:
                await self._encoder.set_paused(rung, True)
        for target in self.last_targets:
            await self._encoder.set_bitrate(target.target_bps, target.rung)

    async def watch(self) -> None:
        """Returns never: the supervisor keeps this call in flight, and Ray fails it the
        moment this process dies, which is how a crash is noticed at once
        (``actors.recovery``)."""
        await asyncio.Event().wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
