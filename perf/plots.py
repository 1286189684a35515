"""The suite's PNG plots (matplotlib, the optional ``perf`` extra), drawn from a run's results.

Each function takes the data the suite gathered in the same run and writes one PNG; none
measures anything, except :func:`abr_steps`, which replays the ABR benchmark's simulated link
(deterministic: the same run ``perf.bench_abr`` measures) to get its trace over time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["abr_steps", "fanout_viewers", "latency_distributions", "soak_memory"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a benchmark machine
    import matplotlib.pyplot as plt

    return plt


_ARM_LABELS = {
    "pipeline": "kizuna-stream (RTP over QUIC, Ray actors)",
    "in_process_baseline": "in-process floor (no Ray, no sockets)",
    "ffmpeg": "FFmpeg (libx264 zerolatency, RTP/UDP)",
    "gstreamer": "GStreamer (x264enc zerolatency, RTP/UDP)",
}


def latency_distributions(samples: dict[str, list[float]], out: Path, title: str) -> Path:
    """One empirical CDF per pipeline of capture-to-decode latency (all runs pooled)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm, values in samples.items():
        if not values:
            continue
        ordered = sorted(values)
        share = [(i + 1) / len(ordered) for i in range(len(ordered))]
        ax.step(
            ordered, share, where="post", label=f"{_ARM_LABELS.get(arm, arm)}, n={len(ordered)}"
        )
    ax.set_xlabel("capture-to-decode latency (ms)")
    ax.set_ylabel("share of frames at or below")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def fanout_viewers(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    """Viewers against late frames (left axis) and the sender shard's CPU (right axis)."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: r["viewers"])
    viewers = [r["viewers"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    late = ax.plot(
        viewers,
        [r["late_frame_ratio"] * 100 for r in rows],
        "o-",
        color="tab:red",
        label="late frames",
    )
    ax.set_xlabel("light QUIC viewers of one 720p30 1.5 Mbps stream")
    ax.set_ylabel("late frames (%)", color="tab:red")
    ax.grid(True, alpha=0.3)
    cpu = ax.twinx()
    shard = cpu.plot(
        viewers,
        [r["sender_cpu_cores"] for r in rows],
        "s--",
        color="tab:blue",
        label="sender shard CPU",
    )
    loadgen = cpu.plot(
        viewers,
        [r["loadgen_cpu_cores"] for r in rows],
        "^:",
        color="tab:gray",
        label="load generator CPU",
    )
    cpu.set_ylabel("CPU (cores)")
    cpu.set_ylim(bottom=0)
    ax.set_ylim(bottom=0)
    lines = late + shard + loadgen
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
    ax.set_title("Fan-out: viewers vs late frames and CPU")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def abr_steps(out: Path) -> Path:
    """The simulated link's capacity, the viewer's estimate and the rung sent, over time."""
    from tests.netsim import STEP_CAPACITY, STEP_END, run_capacity_steps

    plt = _pyplot()
    _, trace = run_capacity_steps()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps_t = [t for t, _ in STEP_CAPACITY] + [STEP_END]
    steps_c = [c / 1e6 for _, c in STEP_CAPACITY]
    ax.stairs(steps_c, steps_t, color="black", label="link capacity")
    ax.plot(
        [t for t, _ in trace.estimates],
        [e / 1e6 for _, e in trace.estimates],
        color="tab:orange",
        alpha=0.7,
        label="bandwidth estimate",
    )
    rung_t = [t for t, _ in trace.rungs] + [STEP_END]
    rung_rate = [trace.rates[r] / 1e6 for _, r in trace.rungs]
    ax.stairs(rung_rate, rung_t, color="tab:blue", linewidth=2, label="rung being sent")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("Mbps")
    ax.set_title("ABR through capacity steps (simulated link, tests/netsim.py)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def soak_memory(series: Sequence[dict[str, Any]], out: Path, title: str) -> Path:
    """RSS per process kind over the soak (one label's processes summed) and the total; below,
    open fds, mapped segments and the measuring viewer's latency."""
    plt = _pyplot()
    by_label: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for sample in series:
        totals: dict[str, float] = defaultdict(float)
        for proc in sample["processes"]:
            totals[proc["label"]] += proc["rss_bytes"] / 2**20
        for label, mib in totals.items():
            by_label[label].append((sample["t_s"], mib))
    fig, (ax, fds, latency) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    for label, points in sorted(by_label.items(), key=lambda kv: -max(v for _, v in kv[1])):
        ax.plot([t for t, _ in points], [v for _, v in points], label=label, linewidth=1)
    times = [s["t_s"] for s in series]
    ax.plot(
        times,
        [sum(p["rss_bytes"] for p in s["processes"]) / 2**20 for s in series],
        color="black",
        linewidth=2,
        label="all processes",
    )
    ax.set_ylabel("RSS (MiB)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fds.plot(times, [sum(p["fds"] for p in s["processes"]) for s in series], color="tab:blue")
    fds.set_ylabel("open fds, all processes", color="tab:blue")
    fds.grid(True, alpha=0.3)
    segments = fds.twinx()
    segments.plot(times, [s["segments"] for s in series], color="tab:orange")
    segments.set_ylabel("shm segments mapped", color="tab:orange")
    timed = [(s["t_s"], s["latency_p50_ms"]) for s in series if s["latency_p50_ms"] is not None]
    latency.plot([t for t, _ in timed], [v for _, v in timed], color="tab:green")
    latency.set_ylabel("viewer latency p50\nper sample (ms)")
    latency.set_xlabel("time (s)")
    latency.grid(True, alpha=0.3)
    fig.subplots_adjust(left=0.08, right=0.72, top=0.95, bottom=0.07, hspace=0.15)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
