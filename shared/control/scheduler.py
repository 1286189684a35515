"""StreamScheduler: admission control and node placement for concurrent streams.

Pure bookkeeping: it knows the nodes (from Ray, passed in) and the streams it placed, and
decides where a new stream runs or why it cannot.  Encoding dominates a stream's CPU cost and
scales with pixel rate, so capacity is a pixel-rate budget per core: x264 ``veryfast`` at
720p30 (27.6 Mpx/s) takes roughly a third of a core here, so 60 Mpx/s per core leaves room for
capture, senders and the system.  Streams never exceed ``max_streams`` in total.

The budget is bookkeeping: what the placed streams should cost.  What the node really uses is
measured (the supervisor's ``ResourceHistory``, CPU averaged over its window) and passed in as
``NodeInfo.cpu_percent``: a node at or above ``cpu_admission_percent`` takes no new stream
whatever its budget says, and among the nodes that can take it the one with the most free
capacity (the smaller of the budget left and the cores measured idle) is chosen.
"""

from __future__ import annotations

import msgspec

from shared.errors import ResourceError
from shared.models import StreamQuality

__all__ = ["NodeInfo", "StreamScheduler"]

PIXELS_PER_CORE_PER_SECOND = 60_000_000


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    cpus: float
    alive: bool = True
    #: The node's CPU use as measured over the monitor's window (None: not measured).
    cpu_percent: float | None = None


def pixel_rate(quality: StreamQuality) -> int:
    return quality.resolution.width * quality.resolution.height * quality.framerate


class StreamScheduler:
    def __init__(
        self,
        *,
        max_streams: int = 16,
        pixels_per_core: int = PIXELS_PER_CORE_PER_SECOND,
        cpu_admission_percent: float | None = None,
    ) -> None:
        self._max_streams = max_streams
        self._pixels_per_core = pixels_per_core
        #: A node measured this busy (or busier) takes no new stream; None: not checked.
        self.cpu_admission_percent = cpu_admission_percent
        self._placements: dict[str, tuple[str, int]] = {}

    def load(self, node_id: str) -> int:
        return sum(rate for node, rate in self._placements.values() if node == node_id)

    def place(
        self,
        session_id: str,
        quality: StreamQuality,
        nodes: list[NodeInfo],
        *,
        prefer: str | None = None,
    ) -> str:
        """Choose a node for a new stream and record it; ResourceError if none can take it."""
        if len(self._placements) >= self._max_streams:
            raise ResourceError(
                f"already running {len(self._placements)} streams (the limit is {self._max_streams})"
            )
        needed = pixel_rate(quality)
        candidates = []
        busy = []
        for node in nodes:
            if not node.alive:
                continue
            free = node.cpus * self._pixels_per_core - self.load(node.node_id)
            if node.cpu_percent is not None:
                limit = self.cpu_admission_percent
                if limit is not None and node.cpu_percent >= limit:
                    busy.append(f"{node.cpu_percent:.0f}%")
                    continue
                # What the node really has idle may be less than the budget says (other
                # programs, a stream costing more than its pixel rate).
                idle = node.cpus * (1 - node.cpu_percent / 100) * self._pixels_per_core
                free_now = min(free, idle)
            else:
                free_now = free
            if free >= needed:
                # Prefer the supervisor's own node when it fits, then the most free capacity.
                candidates.append((node.node_id != prefer, -free_now, node.node_id))
        if not candidates and busy:
            raise ResourceError(
                f"every node that could take the stream is too busy: CPU {', '.join(busy)} "
                f"measured, at or above the admission threshold {self.cpu_admission_percent:.0f}%"
            )
        if not candidates:
            raise ResourceError(
                f"no node has capacity for {quality.resolution}@{quality.framerate} "
                f"({needed / 1e6:.1f} Mpx/s); lower the quality or stop another stream"
            )
        node_id = min(candidates)[2]
        self._placements[session_id] = (node_id, needed)
        return node_id

    def release(self, session_id: str) -> None:
        self._placements.pop(session_id, None)

    def node_of(self, session_id: str) -> str | None:
        placement = self._placements.get(session_id)
        return placement[0] if placement else None
