"""A load test: N light viewers of one stream in this process, on one event loop, and a report.

:class:`LoadTest` starts the light viewers (:mod:`shared.viewer.light`: they parse RTP, send
the feedback a real viewer sends, and decode nothing), lets them watch for a given time, and
reports each viewer's figures and a summary, by the definitions in :mod:`shared.viewer.light`
(frames, fps, late frames, loss, bytes).  It is what ``kizuna-stream loadtest`` runs and the
load generator of a fan-out benchmark, so its own cost is part of the report: the CPU this
process used over the run, in cores, and its resident memory.

Connecting: a QUIC handshake is the most expensive thing a viewer does, and a hundred at once
would be a stampede, for the server and for this loop alike.  At most
:data:`CONNECTS_IN_FLIGHT` handshakes run at a time; with ``ramp_s`` the viewers also start
evenly spread over that many seconds (viewer ``i`` at ``i * ramp_s / N``).  The run lasts
``seconds`` from its start, ramp included, or until every viewer has ended (refused, failed,
or closed by the server), or until ``stop`` is set: then the report covers what was seen so
far.  Failures and refusals never raise: they are viewers in the report, with their reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import statistics
import time
from collections.abc import Callable

import msgspec
import numpy as np
import psutil

from shared.errors import ConfigError
from shared.roq.url import StreamUrl
from shared.viewer.light import (
    CLOSED,
    CONNECTING,
    ERROR,
    FAILED,
    IDLE_TIMEOUT_S,
    LEFT,
    WATCHING,
    LightViewer,
    LightViewerReport,
)

__all__ = ["CONNECTS_IN_FLIGHT", "LoadReport", "LoadSummary", "LoadTest"]

logger = logging.getLogger(__name__)

#: QUIC handshakes in flight at once when connecting (a few at a time, never a stampede).
CONNECTS_IN_FLIGHT = 8


class LoadSummary(msgspec.Struct, kw_only=True):
    """The run as a whole."""

    viewers: int
    """Light viewers started."""
    connected: int
    """Viewers whose connection was established at least once."""
    watching: int
    """Viewers still connected at the end."""
    failed: int
    """Viewers that never connected, or broke (state ``error``; see their ``reason``)."""
    still_connecting: int
    """Viewers whose first connection was not established when the run ended (waiting for
    their turn to connect, or in a handshake the server had not answered yet)."""
    closed: int
    """Viewers whose connection the server closed with a reason (a refusal, the stream ending)."""
    reasons: dict[str, int]
    """How many viewers failed or were closed, by reason."""
    reconnects: int
    fps_min: float | None
    """Over the viewers that connected (None when none did)."""
    fps_median: float | None
    frames: int
    late: int
    late_frame_ratio: float
    """Late frames over frames, all viewers together (0 with no frames)."""
    delay_p99_ms: float | None = None
    """The 99th percentile of frame delay over every viewer's frames (``shared.viewer.light``
    defines it; None with no frames)."""
    lost: int
    loss: float
    """RTP packets lost over packets expected (received + lost), all viewers together."""
    bytes: int
    mbps: float
    """Bytes received by all viewers, per second of the run, in megabits per second."""
    cpu_cores: float
    """This process's CPU time over the run's wall time (1.0: one core busy)."""
    cpu_per_viewer: float
    """``cpu_cores`` per viewer connected (the whole process's cost, not only the viewers')."""
    rss_mb: float
    """This process's resident memory at the end, in MiB."""
    rss_start_mb: float
    """Its resident memory when the run started (before any viewer), in MiB: what the viewers
    added is the difference."""
    seconds: float


class LoadReport(msgspec.Struct, kw_only=True):
    url: str
    interrupted: bool
    """Stopped before its time (Ctrl-C)."""
    summary: LoadSummary
    viewers: list[LightViewerReport]


class LoadTest:
    """``viewers`` light viewers of ``url`` for ``seconds``; :meth:`run` returns the report."""

    def __init__(
        self,
        url: str | StreamUrl,
        viewers: int,
        seconds: float,
        *,
        ramp_s: float = 0.0,
        connect_timeout_s: float = 10.0,
        latency_budget_s: float = 0.2,
        datagrams: bool = True,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        connects_in_flight: int = CONNECTS_IN_FLIGHT,
        token: str | None = None,
    ) -> None:
        """``token``: the viewer token every light viewer presents (the server may give each
        its own viewer id when the token names none)."""
        self.url = url if isinstance(url, StreamUrl) else StreamUrl.parse(url)
        if viewers < 1:
            raise ConfigError(f"the number of viewers must be at least 1, got {viewers}")
        if not seconds > 0:
            raise ConfigError(f"the run must last more than 0 seconds, got {seconds}")
        if not 0 <= ramp_s < seconds:
            raise ConfigError(f"the ramp must be at least 0 and shorter than the run, got {ramp_s}")
        if not (connect_timeout_s > 0 and idle_timeout_s > 0) or connects_in_flight < 1:
            raise ConfigError("the timeouts and the connects in flight must be positive")
        self.seconds, self.ramp_s = seconds, ramp_s
        gate = asyncio.Semaphore(connects_in_flight)
        self.viewers = [
            LightViewer(
                index,
                self.url,
                connect_timeout_s=connect_timeout_s,
                latency_budget_s=latency_budget_s,
                datagrams=datagrams,
                idle_timeout_s=idle_timeout_s,
                connect_gate=gate,
                token=token,
            )
            for index in range(viewers)
        ]
        self._process = psutil.Process()
        self._started = time.monotonic()
        self._cpu_start = 0.0
        self._rss_start_mb = 0.0

    async def run(
        self,
        stop: asyncio.Event | None = None,
        *,
        on_status: Callable[[LoadSummary], None] | None = None,
        status_interval_s: float = 0.5,
    ) -> LoadReport:
        """Watch until the time is up, every viewer has ended, or ``stop`` is set; then close
        every connection and report.  ``on_status`` gets a summary every ``status_interval_s``."""
        stop = stop or asyncio.Event()
        self._started = time.monotonic()
        self._cpu_start = self._cpu_time()
        self._rss_start_mb = self._rss_mb()
        end = self._started + self.seconds
        count = len(self.viewers)
        tasks = [
            asyncio.create_task(self._start(viewer, self.ramp_s * viewer.index / count))
            for viewer in self.viewers
        ]
        stopper = asyncio.create_task(stop.wait())
        pending: set[asyncio.Task[None]] = set(tasks)
        try:
            while pending and not stop.is_set():
                now = time.monotonic()
                if now >= end:
                    break
                timeout = min(end - now, status_interval_s if on_status else end - now)
                _, still = await asyncio.wait(
                    [*pending, stopper], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                pending = {task for task in tasks if task in still}
                if on_status is not None:
                    on_status(self.summary(time.monotonic()))
        finally:
            finished = time.monotonic()
            summary_cpu = self._cpu_time()
            for task in [*tasks, stopper]:
                task.cancel()
            await asyncio.gather(*tasks, stopper, return_exceptions=True)
            await asyncio.gather(*(viewer.close() for viewer in self.viewers))
        return LoadReport(
            url=str(self.url),
            interrupted=stop.is_set(),
            summary=self.summary(finished, cpu_s=summary_cpu),
            viewers=[viewer.report(finished) for viewer in self.viewers],
        )

    async def _start(self, viewer: LightViewer, delay_s: float) -> None:
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        try:
            await viewer.run()
        except Exception as exc:
            # A bug in one viewer must not end the others' run; it is logged with its
            # traceback and the viewer's report says so.
            logger.exception("light viewer %d failed", viewer.index)
            viewer.state, viewer.reason = ERROR, f"internal error: {exc!r}"

    def _cpu_time(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def summary(self, now: float, *, cpu_s: float | None = None) -> LoadSummary:
        """The run so far, up to ``now`` (monotonic seconds); CPU up to ``cpu_s`` when given
        (this process's user + system seconds), else up to this call."""
        reports = [viewer.report(now) for viewer in self.viewers]
        connected = [r for r in reports if r.state not in (FAILED, CONNECTING, LEFT, ERROR)]
        rates = [r.fps for r in connected]
        frames = sum(r.frames for r in reports)
        late = sum(r.late for r in reports)
        lost = sum(r.lost for r in reports)
        expected = sum(r.rtp_packets for r in reports) + lost
        total_bytes = sum(r.bytes for r in reports)
        elapsed = max(now - self._started, 1e-6)
        cpu = (cpu_s if cpu_s is not None else self._cpu_time()) - self._cpu_start
        cores = cpu / elapsed
        reasons = collections.Counter(
            r.reason or "no reason given" for r in reports if r.state in (FAILED, CLOSED, ERROR)
        )
        return LoadSummary(
            viewers=len(reports),
            connected=len(connected),
            watching=sum(r.state == WATCHING for r in reports),
            failed=sum(r.state in (FAILED, ERROR) for r in reports),
            still_connecting=sum(r.state in (CONNECTING, LEFT) for r in reports),
            closed=sum(r.state == CLOSED for r in reports),
            reasons=dict(reasons),
            reconnects=sum(r.reconnects for r in reports),
            fps_min=min(rates) if rates else None,
            fps_median=round(statistics.median(rates), 2) if rates else None,
            frames=frames,
            late=late,
            late_frame_ratio=round(late / frames, 6) if frames else 0.0,
            delay_p99_ms=self._delay_p99_ms(),
            lost=lost,
            loss=round(lost / expected, 6) if expected else 0.0,
            bytes=total_bytes,
            mbps=round(total_bytes * 8 / elapsed / 1e6, 3),
            cpu_cores=round(cores, 4),
            cpu_per_viewer=round(cores / len(connected), 5) if connected else 0.0,
            rss_mb=round(self._rss_mb(), 1),
            rss_start_mb=round(self._rss_start_mb, 1),
            seconds=round(elapsed, 3),
        )

    def _delay_p99_ms(self) -> float | None:
        delays = [viewer.core.frame_delays() for viewer in self.viewers]
        pooled = np.concatenate(delays) if delays else np.empty(0)
        return round(float(np.percentile(pooled, 99)), 2) if pooled.size else None

    def _rss_mb(self) -> float:
        with contextlib.suppress(psutil.Error):
            return float(self._process.memory_info().rss) / (1 << 20)
        return 0.0
