"""Per-viewer rate adaptation (issue 12) through capacity steps: REAL-NETWORK ARM.

The whole system on a real path: a Ray stream encoded as a two-rung ladder (1024x576 at
1.5 Mbps, the LOW preset's 854x480 at 0.5 Mbps, 15 fps), its sender shard on the host side of a
veth pair, the real viewer (``kizuna-stream view``, decoding) in a network namespace on the
other side, and the server-to-viewer direction shaped by ``tc ... tbf`` (``tests/netns.py``).
The capacity steps open -> 1 Mbps -> open, ``--step-s`` each (default 15 s).  Needs root and
iproute2.

What it reports, with the simulated arm's keys:

- ``down_s``: after the cap, seconds until the viewer is on the low rung (the one that fits);
- ``up_s``: after the cap is lifted, seconds until it is on the top rung again;
- ``utilisation``: in each step's steady state (from 5 s after the step), the bitrate the shard
  sent the viewer over the rate of the best rung that fits the capacity (sender-side bytes:
  media, retransmissions and probe padding);
- ``stall_ratio``: frames the viewer did not decode over the frames due (15 fps from its first
  frame): a subprocess viewer reports counts, not the per-frame times a freeze count needs;
- ``rung_switches_per_minute``: the shard's count for the viewer.

Baseline, the same run and link: the viewer pinned to rung 0 (``pin_rung``), as every viewer
was before issue 12.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shared.errors import ResourceError

REPO = Path(__file__).resolve().parent.parent
CAP_BPS = 1_000_000
TOP_BPS, LOW_BPS = 1_500_000, 500_000
FPS = 15
SAMPLE_S = 0.25
STEADY_AFTER_S = 5.0


async def _run_once(step_s: float, *, pin_top: bool) -> dict[str, Any]:
    import ray

    from actors import StreamManager
    from actors.handles import SenderHandle
    from actors.placement import NAMESPACE
    from shared.models import QualityPreset, Resolution, StreamConfig, StreamQuality
    from tests.conftest import stream_actors
    from tests.netns import CappedLink

    top = StreamQuality(resolution=Resolution(1024, 576), framerate=FPS, bitrate=TOP_BPS)
    with CappedLink() as link:
        async with StreamManager.start() as manager:
            config = StreamConfig(quality=top, rungs=(QualityPreset.LOW,), listen_host=link.host)
            sid = (await manager.start_camera_stream(config)).session_id
            ticket = await manager.add_viewer(sid, "bench")
            [name] = [n for n in stream_actors(sid) if "-shard-" in n]
            shard = SenderHandle(ray.get_actor(name, namespace=NAMESPACE))
            total_s = 3 * step_s
            viewer = subprocess.Popen(
                link.command(
                    sys.executable, "-m", "actors.cli", "view", ticket.url,
                    "--seconds", str(total_s + 30), "--json",
                ),
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            samples: list[tuple[float, int, int, int]] = []  # (t, rung, bytes, switches)
            reasons: list[tuple[float, str]] = []  # (t, why the last rung change was wanted)
            peer = None
            try:
                started = None
                while started is None:
                    stats = await shard.stats()
                    peers = [p for p in stats.peers if p.viewer_id == ticket.viewer_id]
                    if peers:
                        if pin_top:
                            await shard.pin_rung(ticket.viewer_id, 0)
                        started = time.monotonic()
                    elif viewer.poll() is not None:
                        raise ResourceError("the viewer ended before it connected")
                    else:
                        await asyncio.sleep(SAMPLE_S)
                steps = [(0.0, None), (step_s, CAP_BPS), (2 * step_s, None)]
                applied = 0
                while (now := time.monotonic() - started) < total_s:
                    while applied < len(steps) and steps[applied][0] <= now:
                        link.cap(steps[applied][1])
                        applied += 1
                    stats = await shard.stats()
                    peer = next(p for p in stats.peers if p.viewer_id == ticket.viewer_id)
                    samples.append((now, peer.rung, peer.bytes_sent, peer.rung_switches))
                    if peer.rung_reason and (not reasons or reasons[-1][1] != peer.rung_reason):
                        reasons.append((round(now, 2), peer.rung_reason))
                    await asyncio.sleep(SAMPLE_S)
            finally:
                viewer.send_signal(signal.SIGINT)
                out, err = await asyncio.to_thread(viewer.communicate, timeout=60)
                link.cap(None)
            await manager.remove_viewer(sid, ticket.viewer_id)
            await manager.stop_stream(sid)
    lines = out.decode().strip().splitlines()
    if not lines:
        raise ResourceError(f"the viewer printed nothing: {err.decode()[-2000:]}")
    report = json.loads(lines[-1])["report"]
    figures = _figures(samples, report, step_s)
    if peer is not None:
        # What probing and hold checks cost and how often the shell could not pace them.
        figures["probe_overhead"] = round(peer.padding_bytes / max(peer.bytes_sent, 1), 4)
        figures["probe_clusters"] = peer.probe_clusters
        figures["probe_restarts"] = peer.probe_restarts
        figures["probes_unpaced"] = peer.probes_unpaced
        figures["checks_short"] = peer.checks_short
    figures["rung_reasons"] = reasons
    return figures


def _first(samples: list[tuple[float, int, int, int]], after: float, rung: int) -> float | None:
    for t, r, _, _ in samples:
        if t >= after and r == rung:
            return round(t - after, 2)
    return None


def _rate(samples: list[tuple[float, int, int, int]], start: float, end: float) -> float:
    window = [(t, b) for t, _, b, _ in samples if start <= t <= end]
    if len(window) < 2:
        return 0.0
    (t0, b0), (t1, b1) = window[0], window[-1]
    return (b1 - b0) * 8 / (t1 - t0)


def _figures(
    samples: list[tuple[float, int, int, int]], report: dict[str, Any], step_s: float
) -> dict[str, Any]:
    fits = [TOP_BPS, LOW_BPS, TOP_BPS]  # the best rung for each step's capacity
    ratios = [
        _rate(samples, i * step_s + STEADY_AFTER_S, (i + 1) * step_s) / fit
        for i, fit in enumerate(fits)
    ]
    duration = samples[-1][0] if samples else 0.0
    first = report.get("first_frame_s") or 0.0
    due = max((duration - first) * FPS, 1.0)
    return {
        "down_s": _first(samples, step_s, 1),
        "up_s": _first(samples, 2 * step_s, 0),
        "utilisation": round(sum(ratios) / len(ratios), 3),
        "utilisation_each": [round(r, 3) for r in ratios],
        "stall_ratio": round(max(0.0, 1 - report["frames_decoded"] / due), 3),
        "rung_switches_per_minute": (
            round(samples[-1][3] / (duration / 60), 2) if samples and duration else 0.0
        ),
        "frames_decoded": report["frames_decoded"],
        "frames_dropped": report["frames_dropped"],
        "packets_lost": report["packets_lost"],
        "decoded_size": [report.get("width"), report.get("height")],
    }


def measure(step_s: float) -> dict[str, Any]:
    """Both runs (adaptive, then the rung-0 baseline) on one Ray cluster."""
    import ray

    # address="local": a fresh cluster of its own, never one another process left running.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace="kizuna",
        log_to_driver=False,
    )
    try:
        adaptive = asyncio.run(_run_once(step_s, pin_top=False))
        baseline = asyncio.run(_run_once(step_s, pin_top=True))
    finally:
        ray.shutdown()
    met = {
        "down_s": adaptive["down_s"] is not None and adaptive["down_s"] <= 2.0,
        "up_s": adaptive["up_s"] is not None and adaptive["up_s"] <= 5.0,
        "utilisation": adaptive["utilisation"] >= 0.8,
    }
    return {
        "arm": "real network: netns + veth + tc tbf, Ray stream, kizuna-stream view",
        "scenario": (
            f"ladder 1.5/0.5 Mbps (1024x576, 854x480 @ {FPS} fps), capacity "
            f"open -> 1 Mbps -> open, {step_s:g} s each"
        ),
        **adaptive,
        "baseline_rung0_only": {
            key: baseline[key] for key in ("utilisation", "stall_ratio", "frames_decoded")
        },
        "stall_ratio_vs_baseline": (
            round(adaptive["stall_ratio"] / baseline["stall_ratio"], 3)
            if baseline["stall_ratio"]
            else None
        ),
        "targets": {"down_s_max": 2.0, "up_s_max": 5.0, "utilisation_min": 0.8},
        "targets_met": all(met.values()),
        "targets_missed": sorted(name for name, ok in met.items() if not ok),
    }
