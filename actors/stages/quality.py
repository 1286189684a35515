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

It also classifies each shard's connections (``classify_connection``) for the viewers' status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

from shared.control.quality import FLOOR_FRACTION, ViewerFeedback, classify_connection
from shared.control.rung_targets import RungBounds, RungTarget, RungTargets, ViewerRung
from shared.models import ConnectionQuality, Resolution, StreamQuality

if TYPE_CHECKING:
    from actors.handles import EncoderHandle, SenderHandle
    from actors.stages.encoder import EncoderStats
    from actors.stages.sender import PeerStatus, SenderStats

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
    def __init__(self, session_id: str, encoder: EncoderHandle, ceiling_bitrate: int) -> None:
        """``ceiling_bitrate``: rung 0's configured rate (the stream's quality)."""
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

    async def start(self) -> int:
        """Learn the ladder and start the control loop; the actor's pid."""
        await self._plan()
        self._task = asyncio.create_task(self._run(), name="quality")
        return os.getpid()

    async def _plan(self) -> None:
        rates = [rung.bitrate for rung in await self._encoder.ladder()]
        rates[0] = self._ceiling
        self._targets = RungTargets(ladder_bounds(rates))

    def add_sender(self, viewer_id: str, handle: SenderHandle) -> None:
        self._senders[viewer_id] = handle

    def remove_sender(self, viewer_id: str) -> None:
        self._senders.pop(viewer_id, None)
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
        await self.apply(reports, now=time.monotonic())

    async def apply(self, reports: list[SenderStats], *, now: float) -> list[RungTarget]:
        """One round: the shards' stats in, the rungs' targets that moved to the encoder."""
        targets = self._targets
        assert targets is not None, "start() plans the ladder"
        count = len(targets.bounds)
        viewers = [
            ViewerRung(
                rung=min(peer.rung, count - 1),
                estimate_bps=peer.estimate_bps,
                pending_rung=(
                    min(peer.rung_wanted, count - 1) if peer.rung_wanted != peer.rung else None
                ),
            )
            for stats in reports
            for peer in stats.peers
            if peer.estimate_bps > 0
        ]
        self.last_targets = targets.update(viewers, now=now)
        for target in self.last_targets:
            was = self._paused.get(target.rung, False)
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

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
