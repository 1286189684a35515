"""The supervisor's answer to its node's CPU pressure: the streams that shed, by priority.

A thin shell around :class:`shared.control.pressure.NodePressure`, which decides which
stream gives way and when: the supervisor feeds it the node's CPU (the ResourceMonitor's sample
of each health round) and the frames each stream's encoder had to skip, and applies each step
it decides through that stream's quality controller (``QualityActor.apply_pressure``).  One
policy for the node, not one per stream: each stream's controller reading the node's CPU on
its own would shed every stream at once, whatever its priority.

Its streams are those on the supervisor's own node (the node the ResourceMonitor measures)
whose config asks for shedding (``StreamConfig.shed_under_pressure``); a stream that does not
shed is never degraded, and never refused for pressure either (admission by budget and
``cpu_admission_percent`` still applies to it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import ray

from actors.handles import QualityHandle
from shared.control.pressure import NodePressure, PressureConfig, PressureDecision
from shared.errors import KizunaError
from shared.models import StreamConfig

logger = logging.getLogger(__name__)

__all__ = ["StreamPressure"]


class StreamPressure:
    """One node's pressure policy over its streams, fed and applied by the supervisor."""

    def __init__(self, config: PressureConfig | None = None) -> None:
        self.core = NodePressure(config=config)
        #: Each stream's encoder ``frames_dropped`` as last seen (its late frames are the rise).
        self._dropped: dict[str, int] = {}
        self._late = 0

    def admit(self, session_id: str, config: StreamConfig) -> None:
        """ResourceError when the node is under pressure and no stream of ``config``'s priority
        or lower can give way (only for a stream that sheds: module doc)."""
        if config.shed_under_pressure:
            self.core.admit(session_id, config.priority)

    def add(self, session_id: str, config: StreamConfig, *, framerate: int, rungs: int) -> None:
        if config.shed_under_pressure:
            self.core.add_stream(
                session_id,
                priority=config.priority,
                framerate=framerate,
                rungs=rungs,
                label=config.name or session_id,
            )

    def remove(self, session_id: str) -> None:
        self.core.remove_stream(session_id)
        self._dropped.pop(session_id, None)

    def state(self, session_id: str) -> PressureDecision | None:
        """The stream's steps in force (None: it does not shed), for a restarted controller."""
        return self.core.state(session_id) if session_id in self.core else None

    def note_encoder(self, session_id: str, frames_dropped: int) -> None:
        """The stream's encoder counter of frames it had to skip (fell behind its source)."""
        if session_id not in self.core:
            return
        before = self._dropped.get(session_id)
        self._dropped[session_id] = frames_dropped
        if before is not None and frames_dropped > before:
            self._late += frames_dropped - before

    async def on_sample(
        self,
        cpu_percent: float,
        now: float,
        quality_of: Callable[[str], QualityHandle | None],
    ) -> PressureDecision | None:
        """One health round: the node's CPU sample and the late frames noted since the last;
        a step decided is applied through ``quality_of(stream)``."""
        late, self._late = self._late, 0
        cpu = min(max(cpu_percent, 0.0), 100.0)
        decision = self.core.on_sample(cpu, now, late_frames=late)
        if decision is None:
            return None
        quality = quality_of(decision.stream)
        if quality is None:
            logger.warning("stream %s: no quality controller for %s", decision.stream, decision)
            return decision
        try:
            await quality.apply_pressure(decision)
        except (ray.exceptions.RayError, KizunaError, TimeoutError) as exc:
            # A controller being restarted: its restart is given the steps in force
            # (``actors.recovery``), this one among them.
            logger.warning("stream %s: pressure step not applied yet: %s", decision.stream, exc)
        return decision
