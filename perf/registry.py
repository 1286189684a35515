"""The suite's registry: each benchmark, how ``python -m perf`` runs it, and its figures.

Every benchmark keeps its own ``main`` and its own JSON keys: the suite runs it as a separate
process (``python -m perf.bench_x --json ...``, so each run has a fresh Ray cluster and
nothing of one run leaks into the next) and reads its JSON lines.  An :class:`Entry` says
with which arguments (full suite and ``--quick``), how many times (each figure is the median
over the runs), and how the lines of one run become :class:`perf.suite.Reading` s.

Benchmarks that may not exist yet (``OPTIONAL_MODULES``) are registered by module name only
when the module is there at run time; until an extractor is written for them their numeric
top-level keys are reported as figures as they are (:func:`generic`).
"""

from __future__ import annotations

import importlib.util
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from perf.suite import Reading, Target

Lines = Sequence[dict[str, Any]]

__all__ = ["ENTRIES", "OPTIONAL_MODULES", "Entry", "entries", "generic"]


@dataclass(frozen=True)
class Entry:
    """One benchmark of the suite."""

    name: str
    module: str
    full: tuple[str, ...]
    """Arguments in the full suite (``--json`` is always added)."""
    quick: tuple[str, ...] | None
    """Arguments under ``--quick``; None: not in the quick subset."""
    repeats: int
    repeats_quick: int
    extract: Callable[[Lines], list[Reading]]
    timeout_s: float
    """One run's limit: past it the run is stopped and counted as failed."""
    cost_s: float
    """Seconds one full-suite run takes on an idle 2-core machine: the suite's time budget
    plan (:func:`perf.suite.fits`) scales these by how much slower the runs so far went."""
    samples_flag: str | None = None
    """A flag taking a file path the benchmark writes raw samples to, for the plots."""


def _only(lines: Lines, benchmark: str) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("benchmark") == benchmark]


def _get(line: dict[str, Any], *path: str) -> float | None:
    """The number at ``path`` (the median where the benchmark gives one per round), or None."""
    value: Any = line
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if isinstance(value, list):
        numbers = [v for v in value if isinstance(v, int | float) and not isinstance(v, bool)]
        return float(statistics.median(numbers)) if numbers else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def pool_handoff(lines: Lines) -> list[Reading]:
    return [
        Reading(
            name=f"frame handoff {line['size']} p50",
            unit="ms",
            ours=_get(line, "pool_p50_ms"),
            peer=_get(line, "object_store_p50_ms"),
            peer_name="Ray object store",
            ratio=_get(line, "ratio"),  # object store over pool: how many times faster
            target=Target("ratio", ">=", 10.0),
        )
        for line in _only(lines, "pool_handoff")
    ]


def encoder(lines: Lines) -> list[Reading]:
    return [
        Reading(
            name=f"pipeline throughput {line['size']}",
            unit="fps",
            ours=_get(line, "actor_fps"),
            peer=_get(line, "in_process_fps"),
            peer_name="in-process PyAV",
            ratio=_get(line, "ratio"),
            target=Target("ratio", ">=", 0.95),
        )
        for line in _only(lines, "encoder")
    ]


def latency(lines: Lines) -> list[Reading]:
    readings: list[Reading] = []
    for line in _only(lines, "capture_to_decode_latency"):
        readings.append(
            Reading(
                name="capture-to-decode p50 vs in-process floor",
                unit="ms",
                ours=_get(line, "pipeline", "p50_ms"),
                peer=_get(line, "in_process_baseline", "p50_ms"),
                peer_name="in-process",
                ratio=_get(line, "ratio_p50"),
                target=Target("ratio", "<=", 1.3),
            )
        )
        for arm, label, key in (
            ("ffmpeg", "FFmpeg", "pipeline_p99_over_ffmpeg"),
            ("gstreamer", "GStreamer", "pipeline_p99_over_gstreamer"),
        ):
            ours, peer = _get(line, "pipeline", "p50_ms"), _get(line, arm, "p50_ms")
            readings.append(
                Reading(
                    name=f"capture-to-decode p50 vs {label}",
                    unit="ms",
                    ours=ours,
                    peer=peer,
                    peer_name=label,
                    ratio=round(ours / peer, 2) if ours is not None and peer else None,
                )
            )
            readings.append(
                Reading(
                    name=f"capture-to-decode p99 vs {label}",
                    unit="ms",
                    ours=_get(line, "pipeline", "p99_ms"),
                    peer=_get(line, arm, "p99_ms"),
                    peer_name=label,
                    ratio=_get(line, key),
                    target=Target("ratio", "<=", 1.0),
                )
            )
    return readings


def sender(lines: Lines) -> list[Reading]:
    readings: list[Reading] = []
    for line in _only(lines, "sender_packets_per_second_per_core"):
        readings.append(
            Reading(
                name="sender packets/s per core",
                unit="pkt/s",
                ours=_get(line, "broadcast_sender_pps"),
                peer=_get(line, "skeleton_rtp_pps"),
                peer_name="plain RTP",
                ratio=_get(line, "ratio"),
            )
        )
        if "cpu_per_viewer_cores" in line:
            readings.append(
                Reading(
                    name="QUIC shard CPU per 1.5 Mbps viewer (GSO)",
                    unit="cores",
                    ours=_get(line, "cpu_per_viewer_cores"),
                    peer=_get(line, "cpu_per_viewer_cores_sendto"),
                    peer_name="sendto",
                    ratio=_get(line, "gso_cpu_ratio"),
                )
            )
    return readings


def network_latency(lines: Lines) -> list[Reading]:
    readings: list[Reading] = []
    for line in _only(lines, "network_capture_to_decode_latency"):
        for loss in ("1", "5"):
            readings.append(
                Reading(
                    name=f"latency p99 at {loss}% loss",
                    unit="ms",
                    ours=_get(line, f"loss_{loss}pct", "latency", "p99_ms"),
                    peer=_get(line, "loss_0pct", "latency", "p99_ms"),
                    peer_name="0% loss",
                    ratio=_get(line, f"loss_{loss}pct", "ratio_p99"),
                )
            )
    return readings


def receiver_feedback(lines: Lines) -> list[Reading]:
    return [
        Reading(
            name="repaired frame latency p50 (virtual clock)",
            unit="ms",
            ours=_get(line, "next_deadline", "repaired_frames", "p50_ms"),
            peer=_get(line, "baseline_poll_20ms", "repaired_frames", "p50_ms"),
            peer_name="20 ms poll",
            ratio=_get(line, "ratio_repaired_frames_p50_ms"),
        )
        for line in _only(lines, "receiver_feedback_timing")
    ]


def ladder(lines: Lines) -> list[Reading]:
    return [
        Reading(
            name="3-rung ladder CPU per frame",
            unit="ms",
            ours=_get(line, "cpu_ladder_ms_per_frame", "total_ms"),
            peer=_get(line, "cpu_top_rung_ms_per_frame"),
            peer_name="top rung alone",
            ratio=_get(line, "cpu_ratio_ladder_vs_top"),
        )
        for line in _only(lines, "ladder")
    ]


def fanout(lines: Lines) -> list[Reading]:
    readings: list[Reading] = []
    rows = _only(lines, "fanout")
    for line in _only(lines, "fanout_vs_aiortc"):
        readings.append(
            Reading(
                name="viewers per core",
                unit="viewers",
                ours=_get(line, "viewers_per_core"),
                peer=_get(line, "aiortc", "viewers_per_core"),
                peer_name="aiortc",
                ratio=_get(line, "ratio_viewers_per_core_vs_aiortc"),
                target=Target("ratio", ">=", 20.0),
            )
        )
        readings.append(
            Reading(
                name="viewers served with <= 1% late frames",
                unit="viewers",
                ours=_get(line, "viewers_served"),
                target=Target("ours", ">=", 100.0),
            )
        )
        if rows:
            readings.append(
                Reading(
                    name="sender memory per viewer (worst count)",
                    unit="MiB",
                    ours=max(float(r["rss_mb_per_viewer"]) for r in rows),
                    target=Target("ours", "<=", 2.0),
                )
            )
        if isinstance(line.get("stalled"), dict):
            readings.append(
                Reading(
                    name="delay p99 beside a frozen viewer",
                    unit="ms",
                    ours=_get(line, "stalled", "delay_p99_ms_beside_stalled"),
                    peer=_get(line, "stalled", "delay_p99_ms_alone"),
                    peer_name="alone",
                    ratio=_get(line, "stalled", "delay_p99_ratio"),
                    target=Target("ratio", "<", 1.10),
                )
            )
    return readings


def abr(lines: Lines) -> list[Reading]:
    readings: list[Reading] = []
    for line in _only(lines, "abr"):
        readings += [
            Reading(
                name="ABR time to adapt down (simulated link)",
                unit="s",
                ours=_get(line, "down_s"),
                target=Target("ours", "<=", 2.0),
            ),
            Reading(
                name="ABR time back to top rung (simulated link)",
                unit="s",
                ours=_get(line, "up_s"),
                target=Target("ours", "<=", 5.0),
            ),
            Reading(
                name="ABR utilisation (simulated link)",
                unit="share",
                ours=_get(line, "utilisation"),
                peer=_get(line, "baseline_rung0_only", "utilisation"),
                peer_name="rung 0 only",
                target=Target("ours", ">=", 0.8),
            ),
            Reading(
                name="ABR stall ratio (simulated link)",
                unit="share",
                ours=_get(line, "stall_ratio"),
                peer=_get(line, "baseline_rung0_only", "stall_ratio"),
                peer_name="rung 0 only",
                ratio=_get(line, "stall_ratio_vs_baseline"),
            ),
        ]
    return readings


def soak(lines: Lines) -> list[Reading]:
    readings: list[Reading] = []
    for line in _only(lines, "soak"):
        minutes = f"{float(line['seconds']) / 60:g} min"
        readings += [
            Reading(
                name=f"soak RSS growth ({minutes})",
                unit="%",
                ours=_get(line, "rss_growth_pct"),
                target=Target("ours", "<", 5.0),
            ),
            Reading(
                name=f"soak fd growth ({minutes})",
                unit="fds",
                ours=_get(line, "fd_growth"),
                target=Target("ours", "<=", 0.0),
            ),
            Reading(
                name=f"soak shm segment growth ({minutes})",
                unit="segments",
                ours=_get(line, "segment_growth"),
                target=Target("ours", "<=", 0.0),
            ),
            Reading(
                name=f"soak latency drift ({minutes})",
                unit="ms",
                ours=_get(line, "latency_drift_ms"),
            ),
        ]
    return readings


def recovery(lines: Lines) -> list[Reading]:
    """One figure per actor kind: SIGKILL to the next frame decoded at a viewer."""
    readings: list[Reading] = []
    for line in _only(lines, "recovery"):
        kind = line.get("kind", "?")
        readings.append(
            Reading(
                name=f"recovery after SIGKILL: {kind}",
                unit="s",
                ours=_get(line, "recover_s"),
                target=Target("ours", "<=", 3.0),
            )
        )
        if "recording_resumed_s" in line:
            readings.append(
                Reading(
                    name="recording resumed after recorder SIGKILL",
                    unit="s",
                    ours=_get(line, "recording_resumed_s"),
                )
            )
    return readings


def webrtc(lines: Lines) -> list[Reading]:
    """Browser-protocol viewers (WHEP, aiortc clients) against QUIC viewers, same stream."""
    readings: list[Reading] = []
    for line in _only(lines, "webrtc_vs_quic"):
        webrtc_vpc, quic_vpc = (
            _get(line, "webrtc_viewers_per_core"),
            _get(line, "quic_viewers_per_core"),
        )
        readings += [
            Reading(
                name="WebRTC viewers per core",
                unit="viewers",
                ours=webrtc_vpc,
                peer=quic_vpc,
                peer_name="QUIC viewers",
                ratio=_get(line, "ratio"),
            ),
            Reading(
                name="WebRTC viewer latency p50",
                unit="ms",
                ours=_get(line, "webrtc_latency_p50_ms"),
                peer=_get(line, "quic_latency_p50_ms"),
                peer_name="QUIC viewers",
                ratio=_ratio(line, "webrtc_latency_p50_ms", "quic_latency_p50_ms"),
            ),
            Reading(
                name="WebRTC viewer latency p95",
                unit="ms",
                ours=_get(line, "webrtc_latency_p95_ms"),
                peer=_get(line, "quic_latency_p95_ms"),
                peer_name="QUIC viewers",
                ratio=_ratio(line, "webrtc_latency_p95_ms", "quic_latency_p95_ms"),
            ),
        ]
    return readings


def relay(lines: Lines) -> list[Reading]:
    """The node relay's carrier against the alternative it was chosen over (Ray object refs)."""
    readings: list[Reading] = []
    for line in _only(lines, "relay"):
        for stat in ("p50", "p99"):
            readings.append(
                Reading(
                    name=f"relay delay {stat} (TCP carrier)",
                    unit="ms",
                    ours=_get(line, f"tcp_delay_{stat}_ms"),
                    peer=_get(line, f"ray_delay_{stat}_ms"),
                    peer_name="Ray object refs",
                    ratio=_ratio(line, f"tcp_delay_{stat}_ms", f"ray_delay_{stat}_ms"),
                )
            )
        readings.append(
            Reading(
                name="relay CPU (TCP carrier, both ends)",
                unit="% core",
                ours=_get(line, "tcp_cpu_pct"),
                peer=_get(line, "ray_cpu_pct"),
                peer_name="Ray object refs",
                ratio=_ratio(line, "tcp_cpu_pct", "ray_cpu_pct"),
            )
        )
    return readings


def scaleout(lines: Lines) -> list[Reading]:
    """Delivered bitrate per node count of the local test cluster (one machine's cores: the
    wiring and the relay's delay, not a real cluster's capacity), against one node."""
    readings: list[Reading] = []
    for line in _only(lines, "scaleout"):
        runs = [r for r in line.get("runs", []) if isinstance(r, dict)]
        one = next((r for r in runs if r.get("nodes") == 1), None)
        for run in runs:
            nodes, mbps = run.get("nodes"), _get(run, "delivered_mbps")
            base = _get(one, "delivered_mbps") if one is not None else None
            readings.append(
                Reading(
                    name=f"scale-out delivered, {nodes} node(s), {run.get('viewers')} viewers",
                    unit="Mbps",
                    ours=mbps,
                    peer=base,
                    peer_name="1 node",
                    ratio=round(mbps / base, 2) if mbps is not None and base else None,
                )
            )
        for stat in ("p50", "p99"):
            readings.append(
                Reading(
                    name=f"scale-out relay delay {stat}",
                    unit="ms",
                    ours=_get(line, f"relay_delay_{stat}_ms"),
                )
            )
    return readings


def _ratio(line: dict[str, Any], ours: str, peer: str) -> float | None:
    a, b = _get(line, ours), _get(line, peer)
    return round(a / b, 3) if a is not None and b else None


def generic(lines: Lines) -> list[Reading]:
    """Every numeric top-level key of every line, as it is: for benchmarks not yet described."""
    return [
        Reading(name=f"{line.get('benchmark', '?')}.{key}", unit="", ours=float(value))
        for line in lines
        for key, value in line.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


#: Default soak length inside the full suite (``--soak-minutes``); its own command runs 10.
SUITE_SOAK_MINUTES: Final = 3.0

ENTRIES: Final = (
    Entry(
        "abr",
        "perf.bench_abr",
        (),
        (),
        repeats=3,
        repeats_quick=1,
        extract=abr,
        timeout_s=120,
        cost_s=3,
    ),
    Entry(
        "receiver_feedback",
        "perf.bench_receiver_feedback",
        ("--seconds", "60"),
        ("--seconds", "20"),
        repeats=3,
        repeats_quick=1,
        extract=receiver_feedback,
        timeout_s=120,
        cost_s=4,
    ),
    Entry(
        "pool_handoff",
        "perf.bench_pool_handoff",
        ("--frames", "120"),
        ("--frames", "40"),
        repeats=3,
        repeats_quick=1,
        extract=pool_handoff,
        timeout_s=180,
        cost_s=30,
    ),
    Entry(
        "latency",
        "perf.bench_latency",
        ("--seconds", "5"),
        ("--seconds", "3"),
        repeats=3,
        repeats_quick=1,
        extract=latency,
        timeout_s=240,
        cost_s=60,
        samples_flag="--samples-out",
    ),
    Entry(
        "encoder",
        "perf.bench_encoder",
        ("--frames", "90"),
        ("--frames", "30"),
        repeats=2,
        repeats_quick=1,
        extract=encoder,
        timeout_s=240,
        cost_s=50,
    ),
    Entry(
        "ladder",
        "perf.bench_ladder",
        ("--frames", "60"),
        None,
        repeats=1,
        repeats_quick=0,
        extract=ladder,
        timeout_s=240,
        cost_s=40,
    ),
    Entry(
        "sender",
        "perf.bench_sender",
        ("--seconds", "3", "--shard-viewers", "20", "--shard-seconds", "5"),
        None,
        repeats=1,
        repeats_quick=0,
        extract=sender,
        timeout_s=180,
        cost_s=35,
    ),
    Entry(
        "network_latency",
        "perf.bench_network_latency",
        ("--seconds", "5"),
        None,
        repeats=1,
        repeats_quick=0,
        extract=network_latency,
        timeout_s=180,
        cost_s=35,
    ),
    Entry(
        "fanout",
        "perf.bench_fanout",
        (
            *("--viewers", "10,20,40,80", "--seconds", "6"),
            *("--aiortc-peers", "1,2,4", "--stalled-viewers", "10", "--stalled-rounds", "1"),
        ),
        None,
        repeats=1,
        repeats_quick=0,
        extract=fanout,
        timeout_s=360,
        cost_s=150,
    ),
    Entry(
        "soak",
        "perf.soak",
        ("--minutes", str(SUITE_SOAK_MINUTES)),
        None,
        repeats=1,
        repeats_quick=0,
        extract=soak,
        timeout_s=SUITE_SOAK_MINUTES * 60 + 180,
        cost_s=SUITE_SOAK_MINUTES * 60 + 40,
        samples_flag="--series-out",
    ),
    Entry(
        "recovery",
        "perf.bench_recovery",
        (),
        None,
        repeats=1,
        repeats_quick=0,
        extract=recovery,
        timeout_s=300,
        cost_s=40,
    ),
    Entry(
        "webrtc",
        "perf.bench_webrtc",
        (),
        None,
        repeats=1,
        repeats_quick=0,
        extract=webrtc,
        timeout_s=300,
        cost_s=50,
    ),
    Entry(
        "relay",
        "perf.bench_relay",
        (),
        None,
        repeats=1,
        repeats_quick=0,
        extract=relay,
        timeout_s=300,
        cost_s=30,
    ),
    Entry(
        "scaleout",
        "perf.bench_scaleout",
        (),
        None,
        repeats=1,
        repeats_quick=0,
        extract=scaleout,
        timeout_s=300,
        cost_s=70,
    ),
)

#: Benchmarks a later change adds before it writes their extractor: registered by module name
#: when present, their numeric top-level keys reported as they are (:func:`generic`).
OPTIONAL_MODULES: tuple[tuple[str, str], ...] = ()


def entries(*, soak_minutes: float = SUITE_SOAK_MINUTES) -> list[Entry]:
    """The registry as it stands in this checkout, the soak set to ``soak_minutes``."""
    chosen = [
        replace(
            e,
            full=("--minutes", f"{soak_minutes:g}"),
            timeout_s=soak_minutes * 60 + 180,
            cost_s=soak_minutes * 60 + 40,
        )
        if e.name == "soak"
        else e
        for e in ENTRIES
    ]
    for name, module in OPTIONAL_MODULES:
        if importlib.util.find_spec(module) is not None:
            chosen.append(Entry(name, module, (), None, 1, 0, generic, timeout_s=300, cost_s=60))
    return chosen
