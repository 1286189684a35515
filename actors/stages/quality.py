"""QualityActor: turns per-viewer sender feedback into the shared encoder's target bitrate.

Once a second it asks each sender for its stats, folds them into the ``QualityController``
(the sans-I/O core in ``shared.control.quality``) and applies a changed target to the encoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

from shared.control.quality import QualityController, ViewerFeedback, classify_connection
from shared.models import ConnectionQuality

if TYPE_CHECKING:
    from actors.handles import EncoderHandle, SenderHandle

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0


class QualityActor:
    def __init__(self, session_id: str, encoder: EncoderHandle, ceiling_bitrate: int) -> None:
        self._session_id = session_id
        self._encoder = encoder
        self._controller = QualityController(ceiling_bitrate, now=time.monotonic())
        self._senders: dict[str, SenderHandle] = {}
        self._previous: dict[str, tuple[int, int]] = {}
        self._connection: dict[str, ConnectionQuality] = {}
        self._task: asyncio.Task[None] | None = None
        self.adjustments = 0

    async def start(self) -> int:
        """Start the control loop; the actor's pid."""
        self._task = asyncio.create_task(self._run(), name="quality")
        return os.getpid()

    def add_sender(self, viewer_id: str, handle: SenderHandle) -> None:
        self._senders[viewer_id] = handle

    def remove_sender(self, viewer_id: str) -> None:
        self._senders.pop(viewer_id, None)
        self._previous.pop(viewer_id, None)
        self._connection.pop(viewer_id, None)
        self._controller.remove_viewer(viewer_id)

    async def set_ceiling(self, bitrate: int) -> None:
        self._controller.set_ceiling(bitrate)
        await self._encoder.set_bitrate(bitrate)

    def connection_quality(self) -> dict[str, ConnectionQuality]:
        return dict(self._connection)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            try:
                await self._poll()
            except Exception:
                # One failed round (a sender stopping mid-call) must not end adaptation.
                logger.warning("quality poll for %s failed", self._session_id, exc_info=True)

    async def _poll(self) -> None:
        feedback = []
        for viewer_id, handle in list(self._senders.items()):
            stats = await handle.stats()
            if not stats.peers:
                continue
            sent = stats.frames_sent
            dropped = sum(peer.frames_dropped for peer in stats.peers)
            previous_sent, previous_dropped = self._previous.get(viewer_id, (0, 0))
            self._previous[viewer_id] = (sent, dropped)
            delta_sent, delta_dropped = sent - previous_sent, dropped - previous_dropped
            total = delta_sent + delta_dropped
            # Network loss from the viewers' reports, or frames the sender had to drop for a
            # viewer that could not keep up, whichever is worse.  With sharded senders one
            # "viewer" here is a shard of peers: the weakest sets the shared encoder's rate.
            item = ViewerFeedback(
                viewer_id=viewer_id,
                rtt_ms=max(peer.rtt_ms for peer in stats.peers),
                loss_rate=max(
                    max(peer.loss for peer in stats.peers), delta_dropped / total if total else 0.0
                ),
                estimate_bps=min((peer.estimate_bps for peer in stats.peers), default=None) or None,
            )
            self._connection[viewer_id] = classify_connection(item)
            feedback.append(item)
        target = self._controller.update(feedback, now=time.monotonic())
        if target is not None:
            self.adjustments += 1
            await self._encoder.set_bitrate(target)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
