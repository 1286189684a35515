"""The performance suite's bookkeeping, with fabricated readings: no benchmark runs here."""

from __future__ import annotations

import json

import msgspec
import pytest

from perf import registry
from perf.soak import ProcessSample, Sample, growth
from perf.suite import Reading, Target, aggregate, fits, table

HANDOFF = Target("ratio", ">=", 10.0)


def _handoff(ours: float, peer: float, ratio: float) -> Reading:
    return Reading(
        name="frame handoff 720p p50",
        unit="ms",
        ours=ours,
        peer=peer,
        peer_name="Ray object store",
        ratio=ratio,
        target=HANDOFF,
    )


def test_a_figure_is_the_median_of_its_runs_and_its_ratio_the_median_of_each_runs_ratio() -> None:
    # The ratio of the medians (5.0 / 0.5 = 10) differs from the median of the per-run ratios
    # (9.0): the suite must take the latter, each ratio measured within one run.
    runs = [
        [_handoff(0.4, 4.4, 11.0)],
        [_handoff(0.5, 4.5, 9.0)],
        [_handoff(0.6, 5.0, 8.3)],
    ]
    [figure] = aggregate("pool_handoff", runs)
    assert (figure.ours, figure.peer, figure.ratio) == (0.5, 4.5, 9.0)
    assert figure.runs == 3
    assert figure.met is False
    assert figure.target == "ratio >= 10"
    assert figure.ours_each == [0.4, 0.5, 0.6]


def test_a_figure_missing_from_a_run_counts_only_the_runs_that_measured_it() -> None:
    lone = Reading(name="soak fd growth", unit="fds", ours=0.0, target=Target("ours", "<=", 0))
    figures = aggregate("x", [[_handoff(0.5, 6.0, 12.0), lone], [_handoff(0.7, 7.0, 10.0)]])
    by_name = {f.name: f for f in figures}
    assert by_name["soak fd growth"].runs == 1
    assert by_name["soak fd growth"].met is True
    assert by_name["frame handoff 720p p50"].ratio == 11.0
    assert by_name["frame handoff 720p p50"].met is True


@pytest.mark.parametrize(
    ("target", "ours", "ratio", "met"),
    [
        (Target("ratio", "<=", 1.3), 20.0, 1.3, True),
        (Target("ratio", "<=", 1.3), 20.0, 1.31, False),
        (Target("ours", "<", 5.0), 5.0, None, False),
        (Target("ours", "<", 5.0), 4.99, None, True),
        (Target("ratio", ">=", 0.95), 30.0, None, None),
    ],
)
def test_targets(target: Target, ours: float, ratio: float | None, met: bool | None) -> None:
    assert target.met(ours, ratio) is met


def test_the_table_has_one_row_per_figure_and_names_failures() -> None:
    [figure] = aggregate("pool_handoff", [[_handoff(0.5, 6.0, 12.0)]])
    text = table([figure], {"fanout": "1 of 1 runs failed: exit 1: boom"})
    lines = text.splitlines()
    assert lines[0].split() == ["figure", "ours", "peer", "ratio", "target", "met?", "runs"]
    row = lines[2]
    assert row.startswith("frame handoff 720p p50 (ms)")
    assert "6.00 Ray object store" in row and "12.00" in row and "yes" in row
    assert lines[-1] == "FAILED fanout: 1 of 1 runs failed: exit 1: boom"
    json.dumps(msgspec.to_builtins(figure))  # the figure goes into latest.json as it is


def test_the_latency_extractor_reads_the_benchmarks_own_keys() -> None:
    line = {
        "benchmark": "capture_to_decode_latency",
        "in_process_baseline": {"p50_ms": 12.0, "p99_ms": 30.0},
        "ffmpeg": {"p50_ms": 75.0, "p99_ms": 110.0},
        "gstreamer": {"p50_ms": 40.0, "p99_ms": 50.0},
        "pipeline": {"p50_ms": 16.0, "p99_ms": 55.0},
        "ratio_p50": 1.33,
        "pipeline_p99_over_ffmpeg": 0.5,
        "pipeline_p99_over_gstreamer": 1.1,
    }
    readings = {r.name: r for r in registry.latency([line, {"benchmark": "other"}])}
    floor = readings["capture-to-decode p50 vs in-process floor"]
    assert (floor.ours, floor.peer, floor.ratio) == (16.0, 12.0, 1.33)
    gst = readings["capture-to-decode p99 vs GStreamer"]
    assert (gst.ours, gst.peer, gst.ratio) == (55.0, 50.0, 1.1)
    assert readings["capture-to-decode p50 vs FFmpeg"].ratio == round(16 / 75, 2)


def test_an_arm_that_did_not_run_reads_as_not_measured() -> None:
    line = {"benchmark": "capture_to_decode_latency", "pipeline": {"p50_ms": 16.0, "p99_ms": 55}}
    readings = {r.name: r for r in registry.latency([line])}
    assert readings["capture-to-decode p99 vs GStreamer"].peer is None
    assert readings["capture-to-decode p50 vs FFmpeg"].ratio is None


def test_modules_not_yet_written_are_left_out_and_present_ones_registered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        registry, "OPTIONAL_MODULES", (("absent", "perf.no_such_bench"), ("suite", "perf.suite"))
    )
    names = [e.name for e in registry.entries(soak_minutes=1.5)]
    assert "absent" not in names and "suite" in names
    soak = next(e for e in registry.entries(soak_minutes=1.5) if e.name == "soak")
    assert soak.full == ("--minutes", "1.5")


def _sample(t: float, rss: list[int], fds: list[int], segments: int) -> Sample:
    processes = [
        ProcessSample(pid, "p", r, f) for pid, (r, f) in enumerate(zip(rss, fds, strict=True))
    ]
    return Sample(t, processes, segments, None)


def test_soak_growth_compares_medians_of_a_start_and_an_end_window_after_the_warm_up() -> None:
    seconds = 100.0  # warm-up 20 s, latency windows 30 s
    samples = [_sample(0, [10, 10], [5, 5], 9)]  # in the warm-up: ignored
    samples += [_sample(t, [100, 100], [10, 10], 4) for t in (20, 25, 30)]
    samples += [_sample(t, [100, 102], [10, 10], 4) for t in (60,)]
    samples += [_sample(t, [105, 105], [10, 11], 5) for t in (80, 90, 99)]
    latencies = [(25.0, 20.0), (30.0, 22.0), (40.0, 24.0), (75.0, 30.0), (95.0, 32.0)]
    result = growth(samples, latencies, seconds)
    assert result.rss_growth_pct == 5.0
    assert result.fd_growth == 1
    assert result.segment_growth == 1
    assert result.latency_drift_ms == 31.0 - 22.0
    assert result.processes_gone == 0


def test_soak_growth_counts_only_processes_alive_at_both_ends() -> None:
    start = [_sample(t, [100, 50], [10, 3], 2) for t in (20, 21, 22)]
    # The second process is gone and a new one is there: neither is growth.
    end = [
        Sample(t, [ProcessSample(0, "p", 100, 10), ProcessSample(7, "p", 500, 30)], 2, None)
        for t in (97, 98, 99)
    ]
    result = growth(start + end, [], 100.0)
    assert (result.rss_growth_pct, result.fd_growth, result.processes_gone) == (0.0, 0, 1)
    assert result.latency_drift_ms is None


def test_soak_growth_refuses_too_few_samples() -> None:
    with pytest.raises(ValueError, match="need 6 samples"):
        growth([_sample(t, [1], [1], 0) for t in (30, 40, 50)], [], 100.0)


def test_a_repeat_runs_only_if_every_first_run_still_fits_the_budget_at_the_observed_pace() -> None:
    # Idle pace: 100 s spent on 100 s of plan; 50 + 500 more fits in 900, 50 + 800 does not.
    assert fits(elapsed_s=100, planned_done_s=100, next_s=50, rest_s=500, budget_s=900)
    assert not fits(elapsed_s=100, planned_done_s=100, next_s=50, rest_s=800, budget_s=900)
    # Twice as slow as planned: the same 550 s of plan needs 1100 s.
    assert not fits(elapsed_s=200, planned_done_s=100, next_s=50, rest_s=500, budget_s=900)
    # Faster than planned never shrinks the plan below its own cost.
    assert not fits(elapsed_s=50, planned_done_s=100, next_s=50, rest_s=820, budget_s=900)


def test_recovery_gives_one_figure_per_actor_kind_not_a_median_across_kinds() -> None:
    # The generic extractor once folded every kind's recover_s into one median, which read as
    # "recovery 1.47 s" while the shard took 5.4 s: each kind is its own figure and target.
    lines = [
        {"benchmark": "recovery", "kind": "capture", "recover_s": 1.5, "frames_lost": 44},
        {"benchmark": "recovery", "kind": "shard", "recover_s": 5.4, "frames_lost": 162},
        {
            "benchmark": "recovery",
            "kind": "recorder",
            "recover_s": 0.01,
            "recording_resumed_s": 1.5,
        },
    ]
    figures = {f.name: f for f in aggregate("recovery", [registry.recovery(lines)])}
    assert figures["recovery after SIGKILL: capture"].met is True
    assert figures["recovery after SIGKILL: shard"].ours == 5.4
    assert figures["recovery after SIGKILL: shard"].met is False
    assert figures["recording resumed after recorder SIGKILL"].ours == 1.5


def test_scaleout_compares_each_node_count_with_one_node_of_the_same_run() -> None:
    line = {
        "benchmark": "scaleout",
        "runs": [
            {"nodes": 1, "viewers": 10, "delivered_mbps": 6.0},
            {"nodes": 3, "viewers": 30, "delivered_mbps": 15.0},
        ],
        "relay_delay_p50_ms": 4.0,
    }
    readings = {r.name: r for r in registry.scaleout([line])}
    assert readings["scale-out delivered, 3 node(s), 30 viewers"].ratio == 2.5
    assert readings["scale-out relay delay p50"].ours == 4.0
    assert readings["scale-out relay delay p99"].ours is None


def test_every_benchmark_module_in_the_checkout_has_a_named_extractor() -> None:
    # No benchmark of the suite reports through the generic fallback.
    assert all(e.extract is not registry.generic for e in registry.entries())
