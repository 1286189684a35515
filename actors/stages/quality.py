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
and answers CPU pressure (the design's "Resource Constraints" strategy): each round it feeds
the node's CPU and the frames the encoder had to skip to
:class:`shared.control.pressure.PressurePolicy` and applies its steps, each logged with its
reason: the top rung's frame rate halved (the encoder reconfigured), then the top rungs
retired (paused in the encoder, and every shard's viewers capped below them, moving down at an
IDR), and undone in reverse when the pressure passes.
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
import psutil

from shared.control.pressure import PressureAction, PressureDecision, PressurePolicy
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
        shed_under_pressure: bool = False,
        content_aware: bool = False,
    ) -> None:
        """``ceiling_bitrate``: rung 0's configured rate (the stream's quality);
        ``shed_under_pressure``: answer the node's CPU pressure (``StreamConfig``);
        ``content_aware``: let each rung's target follow the encoder's complexity signal
        (module doc).  Off by default, as shedding is in the library: the test suite and the
        benchmarks measure the ladder they configured, and the moving test pattern they
        encode is easy content (libx264 codes it at QP 1 to 8 at 1024x576 and 1.5 Mbps,
        measured), whose top rung would drop to its floor."""
        self._shed = shed_under_pressure
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
        self._pressure: PressurePolicy | None = None
        self._top: StreamQuality | None = None
        self._encoder_dropped: int | None = None
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
        if self._shed:
            self._pressure = PressurePolicy(
                framerate=top.framerate, rungs=len(ladder), now=time.monotonic()
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
        # One stats call a round serves both the content signal and the pressure policy.
        encoder = (
            await self._encoder.stats()
            if self._pressure is not None or self._content_aware
            else None
        )
        if self._pressure is not None and encoder is not None:
            dropped, self._encoder_dropped = self._encoder_dropped, encoder.frames_dropped
            # Frames the encoder had to skip (it fell behind the source) are late frames.
            late = max(0, encoder.frames_dropped - dropped) if dropped is not None else 0
            # The node's CPU since the previous round (psutil's non-blocking form).
            await self.on_cpu(psutil.cpu_percent(None), time.monotonic(), late_frames=late)
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
        floor = len(self._pressure.retired_rungs) if self._pressure is not None else 0
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
            if self._pressure is not None and target.rung in self._pressure.retired_rungs:
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

    async def on_cpu(self, cpu_percent: float, now: float, *, late_frames: int = 0) -> None:
        """One CPU sample for the pressure policy; a step it takes is applied here."""
        policy = self._pressure
        if policy is None:
            return
        decision = policy.on_sample(min(max(cpu_percent, 0.0), 100.0), now, late_frames=late_frames)
        if decision is None:
            return
        self.decisions = [*self.decisions[-31:], decision]
        logger.warning("stream %s: %s (%s)", self._session_id, decision.action, decision.reason)
        if decision.action in (PressureAction.LOWER_FRAMERATE, PressureAction.RESTORE_FRAMERATE):
            assert self._top is not None
            await self._encoder.configure(
                msgspec.structs.replace(self._top, framerate=decision.framerate)
            )
            return
        retired = decision.retired_rungs
        floor = len(retired)  # the policy retires from the top: rung 0, then 1, ...
        for handle in list(self._senders.values()):
            await handle.set_rung_floor(floor)
        for rung in retired:
            await self._encoder.set_paused(rung, True)
            self._paused[rung] = True
        if decision.action is PressureAction.RESTORE_RUNG:
            # The rung that came back is the one just above the new floor; the targets'
            # next round pauses it again if nobody is to watch it (never rung 0).
            await self._encoder.set_paused(floor, False)
            self._paused[floor] = False

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
