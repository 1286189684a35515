"""Ray custom metrics of a real stream, read back from the node's Prometheus endpoint, and the
admission reading the ResourceMonitor's continuous samples."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest
import ray

from actors import StreamManager
from shared.errors import ResourceError
from shared.models import AccessMode, StreamAccess, StreamConfig
from shared.viewer.client import Viewer
from tests.conftest import wait_for_no_leaks
from tests.test_pipeline import eventually
from tests.test_streams_cli import SMALL

pytestmark = pytest.mark.ray

_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$")


def scrape() -> list[tuple[str, dict[str, str], float]]:
    """Every sample on this node's Ray metrics endpoint, as Prometheus serves it."""
    port = ray.nodes()[0]["MetricsExportPort"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
    except OSError:
        return []  # the metrics agent is not listening yet: the callers wait for samples

    samples = []
    for line in body.splitlines():
        match = _SAMPLE.match(line)
        if match is not None and match["name"].startswith("ray_kizuna_"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
            samples.append((match["name"], labels, float(match["value"])))
    return samples


def value(samples: list[tuple[str, dict[str, str], float]], name: str, **tags: str) -> float | None:
    for sample_name, labels, number in samples:
        if sample_name == name and all(labels.get(k) == v for k, v in tags.items()):
            return number
    return None


def test_metrics_reach_prometheus_and_admission_reads_the_monitor(ray_cluster: str) -> None:
    async def main() -> str:
        async with StreamManager.start() as manager:
            config = StreamConfig(
                name="metered", quality=SMALL, access=StreamAccess(mode=AccessMode.OPEN)
            )
            sid = (await manager.start_camera_stream(config)).session_id
            ticket = await manager.add_viewer(sid, "watcher")
            viewer = await Viewer.connect(ticket.url)
            watching = asyncio.create_task(viewer.watch(seconds=180))
            try:
                await eventually(lambda: viewer.frames_decoded, lambda n: n >= 10, "frames")
                # Ray exports on its own period: wait for the stream's series to show figures.
                samples = await eventually(
                    lambda: asyncio.to_thread(scrape),
                    lambda s: (
                        (value(s, "ray_kizuna_stream_fps", stream="metered", rung="0") or 0) > 0
                        and value(s, "ray_kizuna_stream_viewers", stream="metered") == 1
                        and (value(s, "ray_kizuna_viewer_bytes_sent", viewer=ticket.viewer_id) or 0)
                        > 0
                        # Every series checked below, present (their values are checked there):
                        # one export can carry the first gauges of a health round before the
                        # encoder's first bitrate figure.
                        and (value(s, "ray_kizuna_stream_bitrate_bps", stream="metered") or 0) > 0
                        and value(s, "ray_kizuna_rung_target_bitrate_bps", stream="metered")
                        is not None
                        and value(s, "ray_kizuna_node_cpu_percent") is not None
                    ),
                    "the stream's metrics on the Prometheus endpoint",
                    timeout=90,
                )
                bitrate = value(samples, "ray_kizuna_stream_bitrate_bps", stream="metered")
                assert bitrate is not None and 0 < bitrate < 2_000_000
                target = value(samples, "ray_kizuna_rung_target_bitrate_bps", stream="metered")
                assert target is not None and 0 < target <= SMALL.bitrate
                assert (value(samples, "ray_kizuna_stream_memory_bytes", stream="metered") or 0) > 0
                assert value(samples, "ray_kizuna_node_cpu_percent") is not None
                # The latency histogram has observations (QUIC always has an RTT estimate).
                count = value(samples, "ray_kizuna_viewer_latency_ms_count", stream="metered")
                assert count is not None and count > 0

                # Admission: the monitor samples continuously, so a threshold below what the
                # node measures refuses a new stream with the reason; off again, it starts.
                overview = await eventually(
                    manager.overview, lambda o: o.cpu_percent > 1.0, "CPU measured"
                )
                await manager.set_admission(1.0)
                with pytest.raises(ResourceError, match=r"too busy: CPU .* threshold 1%"):
                    await manager.start_camera_stream(StreamConfig(quality=SMALL))
                await manager.set_admission(None)
                second = await manager.start_camera_stream(StreamConfig(quality=SMALL))
                await manager.stop_stream(second.session_id)
                assert overview.net_sent_per_s > 0  # a viewer is watching
            finally:
                watching.cancel()
                await viewer.close()
            await manager.stop_stream(sid)
            return sid

    wait_for_no_leaks(asyncio.run(main()))
