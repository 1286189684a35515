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

Hardware encoding.  A stream that asks for it (``StreamQuality.hardware_acceleration``) on a
cluster with GPUs goes to a node with a GPU encoder session free, and its encoder asks Ray for
``1 / gpu_sessions_per_gpu`` of a GPU (:meth:`StreamScheduler.gpu_share`), so several encoders
share one GPU.  The sessions are bounded: NVIDIA's consumer cards (GeForce) allow a few
concurrent NVENC sessions per system (3 on older drivers, 5 and later 8 on newer ones; data
centre cards have no such cap and are bounded by their encoder's throughput instead), so the
default of 3 is safe on any card; raise it for cards that allow more.  When every session of
every GPU node is taken, the stream is refused (ResourceError) rather than silently encoded
in software on a CPU node.  A cluster with no GPU at all runs a hardware stream's encoder in
software (libx264), as on a laptop: it asked for acceleration where none exists.
"""

from __future__ import annotations

import msgspec

from shared.errors import ConfigError, ResourceError
from shared.models import StreamQuality

__all__ = ["DEFAULT_GPU_SESSIONS", "NodeInfo", "StreamScheduler"]

PIXELS_PER_CORE_PER_SECOND = 60_000_000
#: Concurrent hardware encoder sessions one GPU takes by default (NVENC on consumer cards).
DEFAULT_GPU_SESSIONS = 3


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    cpus: float
    alive: bool = True
    #: The node's CPU use as measured over the monitor's window (None: not measured).
    cpu_percent: float | None = None
    #: The node's ``GPU`` resource (0: none).
    gpus: float = 0.0


def pixel_rate(quality: StreamQuality) -> int:
    return quality.resolution.width * quality.resolution.height * quality.framerate


class StreamScheduler:
    def __init__(
        self,
        *,
        max_streams: int = 16,
        pixels_per_core: int = PIXELS_PER_CORE_PER_SECOND,
        cpu_admission_percent: float | None = None,
        gpu_sessions_per_gpu: int = DEFAULT_GPU_SESSIONS,
    ) -> None:
        if isinstance(gpu_sessions_per_gpu, bool) or not (
            isinstance(gpu_sessions_per_gpu, int) and gpu_sessions_per_gpu >= 1
        ):
            raise ConfigError(
                f"GPU encoder sessions per GPU must be a whole number, at least 1, "
                f"not {gpu_sessions_per_gpu!r}"
            )
        self._max_streams = max_streams
        self._pixels_per_core = pixels_per_core
        #: A node measured this busy (or busier) takes no new stream; None: not checked.
        self.cpu_admission_percent = cpu_admission_percent
        self.gpu_sessions_per_gpu = gpu_sessions_per_gpu
        #: session -> (node, pixel rate, whether it holds a GPU encoder session)
        self._placements: dict[str, tuple[str, int, bool]] = {}

    def load(self, node_id: str) -> int:
        return sum(rate for node, rate, _ in self._placements.values() if node == node_id)

    def gpu_sessions_used(self, node_id: str) -> int:
        return sum(1 for node, _, gpu in self._placements.values() if gpu and node == node_id)

    def gpu_share(self, session_id: str) -> float:
        """The fraction of a GPU the stream's encoder asks Ray for (0: none)."""
        placement = self._placements.get(session_id)
        return 1 / self.gpu_sessions_per_gpu if placement is not None and placement[2] else 0.0

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
        gpu_nodes = [n for n in nodes if n.alive and n.gpus > 0]
        hardware = quality.hardware_acceleration and bool(gpu_nodes)
        if hardware:
            nodes = [n for n in gpu_nodes if self._gpu_sessions_free(n) > 0]
            if not nodes:
                sessions = ", ".join(
                    f"{n.node_id[:8]}: {self.gpu_sessions_used(n.node_id)} of "
                    f"{self._gpu_sessions(n)}"
                    for n in gpu_nodes
                )
                raise ResourceError(
                    f"every GPU encoder session is taken ({sessions}; "
                    f"{self.gpu_sessions_per_gpu} per GPU): stop a hardware-encoded stream, "
                    f"add a GPU node, or start this one without hardware acceleration"
                )
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
        self._placements[session_id] = (node_id, needed, hardware)
        return node_id

    def _gpu_sessions(self, node: NodeInfo) -> int:
        return int(node.gpus * self.gpu_sessions_per_gpu + 1e-9)

    def _gpu_sessions_free(self, node: NodeInfo) -> int:
        return self._gpu_sessions(node) - self.gpu_sessions_used(node.node_id)

    def restore(self, session_id: str, quality: StreamQuality, node_id: str, *, gpu: bool) -> None:
        """Count a stream already running on ``node_id`` (a restarted supervisor taking it
        back), with its GPU encoder session if it holds one; no check: it runs already."""
        self._placements[session_id] = (node_id, pixel_rate(quality), gpu)

    def relocate(self, session_id: str, node_id: str) -> None:
        """The stream ended up on ``node_id`` (Ray took the placement as a hint)."""
        placement = self._placements.get(session_id)
        if placement is not None:
            self._placements[session_id] = (node_id, *placement[1:])

    def release(self, session_id: str) -> None:
        self._placements.pop(session_id, None)

    def node_of(self, session_id: str) -> str | None:
        placement = self._placements.get(session_id)
        return placement[0] if placement else None
