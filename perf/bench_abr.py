"""Per-viewer rate adaptation (issue 12) through capacity steps: SIMULATED LINK ARM.

This arm runs the real cores (``shared.rtp.bandwidth.BandwidthEstimator``,
``shared.control.probe.ProbeController``, ``shared.control.rung_choice.RungSelector``) in closed
loop with the deterministic link of ``tests/netsim.py``: a FIFO bottleneck with a 64 kB
drop-tail queue, 20 ms each way, transport-wide feedback every 50 ms, frames sent whole at
30 fps, switch IDRs 5 frames large.  It measures the control loop, not a network stack; the
real-network arm (``--arm network``: a Ray stream, a viewer in a network namespace behind a
``tc tbf`` cap, root needed) is :mod:`perf.abr_network`, with the same keys.

The scenario: the ladder 3 / 1.5 / 0.5 Mbps (the HIGH, MEDIUM and LOW presets' bitrates), one
viewer starting on the lowest rung, the capacity 4 -> 1 -> 4 -> 1 -> 4 Mbps, 20 s each.

- ``down_s``: after a step down, seconds until the rung being sent fits the new capacity
  (the worst of the steps; target at most 2 s);
- ``up_s``: after a step up, seconds until the viewer is back on the top rung (worst; target
  at most 5 s);
- ``utilisation``: from 5 s after each step to the next, shown frames' bitrate over the rate of
  the best rung that fits the capacity (a ladder cannot fill a link: 3 Mbps is what a 4 Mbps
  link can take of it; target at least 0.8).  ``link_utilisation`` divides by the raw capacity;
- ``stall_ratio``: the share of the time the picture froze (a gap between complete frames over
  max(3 frame intervals, 1 interval + 150 ms), as WebRTC's freeze stats count);
- ``rung_switches_per_minute``.

A convergence time is null where the viewer never got there before the next step.

Baseline, the same run and link: every viewer on rung 0 (what the sender does before issue 12).

Usage: python -m perf.bench_abr [--json] [--keyframe-factor F] [--arm sim|network] [--step-s S]
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from perf._report import emit
from perf.abr_network import STEADY_AFTER_S
from perf.abr_network import measure as network_measure
from tests.netsim import (
    KEYFRAME_FACTOR,
    STEP_CAPACITY,
    STEP_END,
    STEP_LADDER,
    LinkSpec,
    Simulation,
    ViewerSpec,
    run_capacity_steps,
    step_report,
)

TARGETS = {"down_s": 2.0, "up_s": 5.0, "utilisation": 0.8}


def seconds(value: float) -> float | None:
    """A convergence time for JSON: None where it never converged (JSON has no infinity)."""
    return None if math.isinf(value) else value


def rung_zero_only(keyframe_factor: float) -> dict[str, float]:
    """The baseline: the viewer pinned to rung 0, whatever its path."""
    viewer = ViewerSpec("viewer", LinkSpec(capacity_bps=STEP_CAPACITY), pin=0)
    sim = Simulation(STEP_LADDER, [viewer], keyframe_factor=keyframe_factor)
    sim.run(STEP_END)
    report = step_report(sim.viewers["viewer"].trace, STEP_CAPACITY, STEP_END)
    return {"utilisation": report.utilisation, "stall_ratio": report.stall_ratio}


def measure(keyframe_factor: float) -> dict[str, Any]:
    report, trace = run_capacity_steps(keyframe_factor=keyframe_factor)
    down_s, up_s = max(report.down_s), max(report.up_s)
    met = {
        "down_s": down_s <= TARGETS["down_s"],
        "up_s": up_s <= TARGETS["up_s"],
        "utilisation": report.utilisation >= TARGETS["utilisation"],
    }
    baseline = rung_zero_only(keyframe_factor)
    media = trace.media_bytes_sent
    return {
        "arm": "simulated link (tests/netsim.py), not a real network",
        "scenario": "ladder 3/1.5/0.5 Mbps, capacity 4->1->4->1->4 Mbps, 20 s each",
        "keyframe_factor": keyframe_factor,
        "down_s": seconds(down_s),
        "up_s": seconds(up_s),
        "down_s_each": [seconds(x) for x in report.down_s],
        "up_s_each": [seconds(x) for x in report.up_s],
        "utilisation": report.utilisation,
        "link_utilisation": report.link_utilisation,
        "stall_ratio": report.stall_ratio,
        "rung_switches_per_minute": report.switches_per_minute,
        "probe_clusters": report.probe_clusters,
        "probe_overhead": round(trace.probe_bytes / media, 4) if media else 0.0,
        "baseline_rung0_only": baseline,
        "stall_ratio_vs_baseline": (
            round(report.stall_ratio / baseline["stall_ratio"], 3)
            if baseline["stall_ratio"]
            else None
        ),
        "targets": {"down_s_max": 2.0, "up_s_max": 5.0, "utilisation_min": 0.8},
        "targets_met": all(met.values()),
        "targets_missed": sorted(name for name, ok in met.items() if not ok),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--keyframe-factor",
        type=float,
        default=KEYFRAME_FACTOR,
        help="an IDR's size in average frames (default %(default)s)",
    )
    parser.add_argument(
        "--arm",
        choices=("sim", "network"),
        default="sim",
        help="the simulated link (default) or the real network (netns + tc tbf, needs root)",
    )
    parser.add_argument(
        "--step-s", type=float, default=15.0, help="network arm: seconds per capacity step"
    )
    args = parser.parse_args(argv)
    if args.keyframe_factor < 1:
        parser.error("--keyframe-factor must be at least 1")
    if args.arm == "network":
        if args.step_s < 2 * STEADY_AFTER_S:
            parser.error(f"--step-s must be at least {2 * STEADY_AFTER_S:g}")
        from tests.netns import missing_tools

        why = missing_tools()
        if why is not None:
            parser.error(f"the network arm cannot run here: {why}")
        emit("abr_network", network_measure(args.step_s), as_json=args.json)
        return
    emit("abr", measure(args.keyframe_factor), as_json=args.json)


if __name__ == "__main__":
    main()
