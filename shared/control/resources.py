"""ResourceMonitor: CPU, memory and network of the node, of each actor and of each stream.

Two parts, as elsewhere in ``shared.control``:

- :class:`ResourceMonitor` is the shell: it reads psutil (the node's CPU, memory, network
  counters; each actor process's CPU and memory by pid) into a :class:`ResourceSnapshot`.
  ``psutil.Process.cpu_percent`` measures since its previous call on the same object, so the
  monitor keeps one object per pid and each ``sample`` covers the interval since the last one.
- :class:`ResourceHistory` is the pure core: it keeps the last samples (a short window, time
  passed in), turns the byte counters into rates (the node's from its interfaces, each
  stream's from its shards' ``bytes_sent``, as the supervisor passes them), averages the CPU
  over the window, and says which thresholds are crossed (:class:`ResourceThresholds`).  The
  supervisor samples once a second, continuously; the scheduler's admission
  (``StreamScheduler.place``) and ``status`` read the history, not a fresh sample.
"""

from __future__ import annotations

import collections
import time

import msgspec
import psutil

__all__ = [
    "NodeUsage",
    "ProcessUsage",
    "ResourceHistory",
    "ResourceMonitor",
    "ResourceSnapshot",
    "ResourceThresholds",
    "StreamLoad",
    "StreamTraffic",
]


class ProcessUsage(msgspec.Struct, frozen=True, kw_only=True):
    label: str
    pid: int
    cpu_percent: float
    rss_bytes: int
    alive: bool


class StreamLoad(msgspec.Struct, frozen=True, kw_only=True):
    """What capture reports per stream (the design's CaptureOptimizer feeding the monitor)."""

    session_id: str
    capture_fps: float
    frames_skipped: int
    frames_decimated: int
    audio_overflows: int = 0


class StreamTraffic(msgspec.Struct, frozen=True, kw_only=True):
    """A stream's network use: its shards' byte counters, and the rate over the window."""

    session_id: str
    bytes_sent: int
    bytes_per_s: float = 0.0


class ResourceSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    cpu_percent: float
    cpu_count: int
    memory_used_bytes: int
    memory_total_bytes: int
    shm_free_bytes: int
    processes: list[ProcessUsage]
    streams: list[StreamLoad] = msgspec.field(default_factory=list)
    #: When it was taken (monotonic seconds), and the node's interface counters then.
    taken_at: float = 0.0
    net_bytes_sent: int = 0
    net_bytes_received: int = 0
    #: Each stream's shards' ``bytes_sent`` then (rates: :class:`ResourceHistory`).
    traffic: list[StreamTraffic] = msgspec.field(default_factory=list)


class ResourceThresholds(msgspec.Struct, frozen=True, kw_only=True):
    """Where the node counts as under pressure (averages over the history's window)."""

    cpu_percent: float = 85.0
    memory_percent: float = 90.0

    def __post_init__(self) -> None:
        from shared.errors import ConfigError

        for name, value in (("cpu_percent", self.cpu_percent), ("memory", self.memory_percent)):
            if not 0 < value <= 100:
                raise ConfigError(f"threshold {name} {value} must be in (0, 100]")


class NodeUsage(msgspec.Struct, frozen=True, kw_only=True):
    """The node over the history's window."""

    samples: int
    window_s: float
    cpu_percent: float
    cpu_count: int
    memory_percent: float
    net_sent_per_s: float
    net_received_per_s: float
    #: Thresholds crossed, as words for a reason ("cpu 93% >= 85%"); empty: none.
    over: list[str]


class ResourceHistory:
    """The last ``window_s`` seconds of snapshots, and what they add up to (pure)."""

    def __init__(
        self,
        *,
        window_s: float = 10.0,
        max_samples: int = 120,
        thresholds: ResourceThresholds | None = None,
    ) -> None:
        self.window_s = window_s
        self.thresholds = thresholds or ResourceThresholds()
        self._samples: collections.deque[ResourceSnapshot] = collections.deque(maxlen=max_samples)

    def add(self, snapshot: ResourceSnapshot) -> None:
        self._samples.append(snapshot)
        # Keep the window plus the sample just before it (the rates need a start).
        while len(self._samples) > 2 and (
            snapshot.taken_at - self._samples[1].taken_at > self.window_s
        ):
            self._samples.popleft()

    @property
    def latest(self) -> ResourceSnapshot | None:
        return self._samples[-1] if self._samples else None

    def __len__(self) -> int:
        return len(self._samples)

    def node(self) -> NodeUsage | None:
        """The node's averages over the window; None before the first sample."""
        if not self._samples:
            return None
        first, last = self._samples[0], self._samples[-1]
        span = last.taken_at - first.taken_at
        # A snapshot's CPU covers the interval before it: the first one's is outside.
        covered = list(self._samples)[1:] or [last]
        cpu = sum(s.cpu_percent for s in covered) / len(covered)
        memory = 100.0 * last.memory_used_bytes / max(1, last.memory_total_bytes)
        over = []
        if cpu >= self.thresholds.cpu_percent:
            over.append(f"cpu {cpu:.0f}% >= {self.thresholds.cpu_percent:.0f}%")
        if memory >= self.thresholds.memory_percent:
            over.append(f"memory {memory:.0f}% >= {self.thresholds.memory_percent:.0f}%")
        return NodeUsage(
            samples=len(self._samples),
            window_s=span,
            cpu_percent=round(cpu, 1),
            cpu_count=last.cpu_count,
            memory_percent=round(memory, 1),
            net_sent_per_s=_rate(first.net_bytes_sent, last.net_bytes_sent, span),
            net_received_per_s=_rate(first.net_bytes_received, last.net_bytes_received, span),
            over=over,
        )

    def stream_traffic(self) -> dict[str, StreamTraffic]:
        """Each stream's bytes sent and its rate over the window (from the first sample that
        knew the stream)."""
        if not self._samples:
            return {}
        last = self._samples[-1]
        result = {}
        for now in last.traffic:
            start = next(
                (
                    (s.taken_at, t.bytes_sent)
                    for s in self._samples
                    for t in s.traffic
                    if t.session_id == now.session_id
                ),
                (last.taken_at, now.bytes_sent),
            )
            result[now.session_id] = StreamTraffic(
                session_id=now.session_id,
                bytes_sent=now.bytes_sent,
                bytes_per_s=_rate(start[1], now.bytes_sent, last.taken_at - start[0]),
            )
        return result

    def process_cpu(self, label: str) -> float:
        """An actor's mean CPU (percent of one core) over the window."""
        values = [
            p.cpu_percent for s in list(self._samples)[1:] for p in s.processes if p.label == label
        ]
        return round(sum(values) / len(values), 1) if values else 0.0


def _rate(start: int, end: int, span_s: float) -> float:
    # A counter that went back (a shard restarted, an interface reset) gives no rate.
    return round(max(0, end - start) / span_s, 1) if span_s > 0 else 0.0


class ResourceMonitor:
    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}
        psutil.cpu_percent(None)

    def _process(self, pid: int) -> psutil.Process:
        process = self._processes.get(pid)
        if process is None:
            process = self._processes[pid] = psutil.Process(pid)
            process.cpu_percent(None)
        return process

    def sample(
        self,
        pids: dict[str, int],
        streams: list[StreamLoad] | None = None,
        traffic: list[StreamTraffic] | None = None,
    ) -> ResourceSnapshot:
        usages = []
        for label, pid in pids.items():
            try:
                process = self._process(pid)
                with process.oneshot():
                    usages.append(
                        ProcessUsage(
                            label=label,
                            pid=pid,
                            cpu_percent=process.cpu_percent(None),
                            rss_bytes=process.memory_info().rss,
                            alive=True,
                        )
                    )
            except psutil.Error:
                self._processes.pop(pid, None)
                usages.append(
                    ProcessUsage(label=label, pid=pid, cpu_percent=0.0, rss_bytes=0, alive=False)
                )
        memory = psutil.virtual_memory()
        try:
            shm_free = psutil.disk_usage("/dev/shm").free
        except OSError:
            shm_free = 0
        net = psutil.net_io_counters()
        return ResourceSnapshot(
            cpu_percent=psutil.cpu_percent(None),
            cpu_count=psutil.cpu_count() or 1,
            memory_used_bytes=memory.total - memory.available,
            memory_total_bytes=memory.total,
            shm_free_bytes=shm_free,
            processes=usages,
            streams=streams or [],
            taken_at=time.monotonic(),
            net_bytes_sent=net.bytes_sent if net is not None else 0,
            net_bytes_received=net.bytes_recv if net is not None else 0,
            traffic=traffic or [],
        )
