"""What a running server looks like from outside: the records ``kizuna-stream status`` and
``kizuna-stream streams list`` print, and the Ray dashboard's operator reads.

Plain msgspec Structs, built by the supervisor (``Supervisor.overview``) from its streams,
its stage actors' reports and the ResourceMonitor's samples; nothing here does I/O.
"""

from __future__ import annotations

import msgspec

__all__ = ["ActorInfo", "RungOverview", "ServerOverview", "StreamOverview", "ViewerOverview"]


class ActorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One actor of the server."""

    #: capture, encoder, shard, recorder, quality, webrtc or supervisor.
    role: str
    #: The stream it serves (its session id); None for the supervisor.
    stream: str | None
    #: Its Ray actor name (``kz-<stream>-<role>``), as the Ray dashboard lists it.
    name: str
    #: The Ray node it runs on.
    node: str
    pid: int
    alive: bool = True
    cpu_percent: float = 0.0
    rss_bytes: int = 0


class RungOverview(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    resolution: str
    framerate: int
    target_bitrate: int
    #: What the rung produced over the last two seconds.
    bitrate: int
    fps: float


class ViewerOverview(msgspec.Struct, frozen=True, kw_only=True):
    """A viewer with a ticket, or a connection to one of the stream's shards."""

    viewer_id: str
    #: pending, connected, reconnecting or disconnected.
    state: str
    shard: str
    connection: str
    bytes_sent: int
    #: Its connection's figures, while connected (its shard's view of it).
    rung: int = 0
    rtt_ms: float = 0.0
    loss: float = 0.0
    #: Frames it did not get: skipped (joined mid-GOP, congested) and late (older than the
    #: latency budget when their turn to be sent came).
    frames_dropped: int = 0
    late_frames: int = 0


class StreamOverview(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    name: str
    state: str
    source: str
    priority: int
    #: The addresses viewers connect to (one per listening port).
    urls: list[str]
    #: Viewers connected now (across the stream's shards).
    viewers: int
    bitrate: int
    fps: float
    latency_ms: int
    frames_dropped: int
    #: Actors of the stream restarted after a crash.
    restarts: int
    #: CPU (percent of one core, over the last sample) and memory of its actors together.
    cpu_percent: float
    rss_bytes: int
    #: Bytes its shards sent, and their rate over the monitor's window.
    bytes_sent: int
    bytes_per_s: float
    rungs: list[RungOverview] = msgspec.field(default_factory=list)
    viewer_list: list[ViewerOverview] = msgspec.field(default_factory=list)
    error: str | None = None


class ServerOverview(msgspec.Struct, frozen=True, kw_only=True):
    supervisor: str
    node: str
    cpu_percent: float
    cpu_count: int
    memory_used_bytes: int
    memory_total_bytes: int
    streams: list[StreamOverview]
    actors: list[ActorInfo]
    #: The node's network rates over the monitor's window (all interfaces).
    net_sent_per_s: float = 0.0
    net_received_per_s: float = 0.0
    #: Resource thresholds the node is over (``ResourceThresholds``), as words.
    over_thresholds: list[str] = msgspec.field(default_factory=list)
