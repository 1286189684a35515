"""ResourceMonitor: CPU and memory of the node and of each stream's processes (psutil).

``psutil.Process.cpu_percent`` measures since its previous call on the same object, so the
monitor keeps one object per pid and each ``sample`` covers the interval since the last one.
"""

from __future__ import annotations

import msgspec
import psutil

__all__ = ["ProcessUsage", "ResourceMonitor", "ResourceSnapshot", "StreamLoad"]


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


class ResourceSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    cpu_percent: float
    cpu_count: int
    memory_used_bytes: int
    memory_total_bytes: int
    shm_free_bytes: int
    processes: list[ProcessUsage]
    streams: list[StreamLoad] = msgspec.field(default_factory=list)


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
        self, pids: dict[str, int], streams: list[StreamLoad] | None = None
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
        return ResourceSnapshot(
            cpu_percent=psutil.cpu_percent(None),
            cpu_count=psutil.cpu_count() or 1,
            memory_used_bytes=memory.total - memory.available,
            memory_total_bytes=memory.total,
            shm_free_bytes=shm_free,
            processes=usages,
            streams=streams or [],
        )
