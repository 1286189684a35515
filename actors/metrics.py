"""Ray custom metrics of every stream, rung and viewer (``ray.util.metrics``).

They appear in the Ray dashboard's metrics view and on each node's Prometheus endpoint
(``ray_`` prefixed: ``ray_kizuna_stream_fps{stream="...",rung="0"}``).  The supervisor
publishes them from its periodic stats round (once a second, ``Supervisor._health_loop``),
never on the per-frame path: the figures are the ones ``kizuna-stream status`` shows
(``shared.control.overview``), so the dashboard and the CLI agree.

Metric tags: ``stream`` is the stream's name where it has one, else its id (a dashboard reads
names); ``rung`` is the rung's index; ``viewer`` the viewer's id.  Ray's counters only go up,
while the stages report running totals, so :class:`CounterDeltas` turns each total into the
increment since the last round (a total that went down, a restarted actor's, counts from 0).
"""

from __future__ import annotations

from typing import Any

from shared.control.overview import ServerOverview, StreamOverview

__all__ = ["LATENCY_BOUNDARIES_MS", "CounterDeltas", "StreamMetrics"]

#: Histogram buckets for latency, in milliseconds (interactive to sluggish).
LATENCY_BOUNDARIES_MS = [5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0]


class CounterDeltas:
    """Running totals in, increments out: what a monotonic counter should add (pure)."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}

    def delta(self, metric: str, tags: dict[str, str], total: int) -> int:
        key = (metric, tuple(sorted(tags.items())))
        last = self._last.get(key, 0)
        self._last[key] = total
        return total - last if total >= last else total

    def forget(self, keep: set[str]) -> None:
        """Drop the totals of streams no longer running (by their ``stream`` tag)."""
        self._last = {
            key: value for key, value in self._last.items() if dict(key[1]).get("stream") in keep
        }


class StreamMetrics:
    """The metric objects, registered once per supervisor process, and their update."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        stream, rung, viewer = ("stream",), ("stream", "rung"), ("stream", "viewer")
        self.fps = Gauge("kizuna_stream_fps", "Frames per second a rung encodes.", rung)
        self.bitrate = Gauge(
            "kizuna_stream_bitrate_bps", "Bits per second a rung produced (last 2 s).", rung
        )
        self.target = Gauge(
            "kizuna_rung_target_bitrate_bps", "The bitrate a rung is asked for.", rung
        )
        self.viewers = Gauge("kizuna_stream_viewers", "Viewers connected to a stream.", stream)
        self.net = Gauge(
            "kizuna_stream_sent_bytes_per_second", "What a stream's shards send.", stream
        )
        self.cpu = Gauge(
            "kizuna_stream_cpu_percent", "CPU of a stream's actors (percent of a core).", stream
        )
        self.memory = Gauge("kizuna_stream_memory_bytes", "RSS of a stream's actors.", stream)
        self.drops = Counter(
            "kizuna_stream_frames_dropped", "Frames viewers did not get (skipped).", stream
        )
        self.late = Counter(
            "kizuna_stream_late_frames", "Frames dropped as older than the latency budget.", stream
        )
        self.restarts = Counter(
            "kizuna_stream_restarts", "Actors of a stream restarted after a crash.", stream
        )
        self.latency = Histogram(
            "kizuna_viewer_latency_ms",
            "One-way network latency to a viewer (half its RTT), once a second.",
            LATENCY_BOUNDARIES_MS,
            stream,
        )
        self.viewer_bitrate = Gauge(
            "kizuna_viewer_bytes_sent", "Bytes sent to a viewer so far.", viewer
        )
        self.viewer_rtt = Gauge("kizuna_viewer_rtt_ms", "A viewer's round-trip time.", viewer)
        self.viewer_loss = Gauge("kizuna_viewer_loss_ratio", "A viewer's packet loss.", viewer)
        self.viewer_rung = Gauge("kizuna_viewer_rung", "The rung a viewer receives.", viewer)
        self.node_cpu = Gauge("kizuna_node_cpu_percent", "The supervisor node's CPU.", ())
        self.node_memory = Gauge("kizuna_node_memory_bytes", "The supervisor node's memory.", ())
        self._deltas = CounterDeltas()

    def publish(self, overview: ServerOverview) -> None:
        """Set every metric from one overview (the supervisor's stats round)."""
        self.node_cpu.set(overview.cpu_percent)
        self.node_memory.set(overview.memory_used_bytes)
        for stream in overview.streams:
            self._publish_stream(stream)
        self._deltas.forget({_stream_tag(s) for s in overview.streams})

    def _publish_stream(self, stream: StreamOverview) -> None:
        tag = _stream_tag(stream)
        tags = {"stream": tag}
        for rung in stream.rungs:
            rung_tags = {"stream": tag, "rung": str(rung.index)}
            self.fps.set(rung.fps, rung_tags)
            self.bitrate.set(rung.bitrate, rung_tags)
            self.target.set(rung.target_bitrate, rung_tags)
        connected = [v for v in stream.viewer_list if v.state == "connected"]
        self.viewers.set(stream.viewers, tags)
        self.net.set(stream.bytes_per_s, tags)
        self.cpu.set(stream.cpu_percent, tags)
        self.memory.set(stream.rss_bytes, tags)
        late = sum(v.late_frames for v in connected)
        dropped = sum(v.frames_dropped for v in connected)
        self._count(self.drops, "drops", tags, dropped)
        self._count(self.late, "late", tags, late)
        self._count(self.restarts, "restarts", tags, stream.restarts)
        for viewer in connected:
            viewer_tags = {"stream": tag, "viewer": viewer.viewer_id}
            self.viewer_bitrate.set(viewer.bytes_sent, viewer_tags)
            self.viewer_rtt.set(viewer.rtt_ms, viewer_tags)
            self.viewer_loss.set(viewer.loss, viewer_tags)
            self.viewer_rung.set(viewer.rung, viewer_tags)
            if viewer.rtt_ms > 0:
                self.latency.observe(viewer.rtt_ms / 2, tags)

    def _count(self, counter: Any, name: str, tags: dict[str, str], total: int) -> None:
        increment = self._deltas.delta(name, tags, total)
        if increment > 0:
            counter.inc(increment, tags)


def _stream_tag(stream: StreamOverview) -> str:
    return stream.name or stream.session_id
