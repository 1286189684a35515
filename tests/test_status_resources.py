"""The ResourceMonitor's history (pure, literal times), the scheduler's admission reading it,
and the metric counters' increments."""

from __future__ import annotations

import pytest

from actors.metrics import CounterDeltas
from shared.control.resources import (
    ProcessUsage,
    ResourceHistory,
    ResourceMonitor,
    ResourceSnapshot,
    ResourceThresholds,
    StreamTraffic,
)
from shared.control.scheduler import NodeInfo, StreamScheduler
from shared.errors import ResourceError
from shared.models import Resolution, StreamQuality

QUALITY = StreamQuality(resolution=Resolution(640, 360), framerate=30, bitrate=800_000)
GB = 1_000_000_000


def snapshot(
    at: float,
    cpu: float,
    *,
    sent: int = 0,
    received: int = 0,
    memory: int = 4 * GB,
    traffic: dict[str, int] | None = None,
    encoder_cpu: float = 0.0,
) -> ResourceSnapshot:
    return ResourceSnapshot(
        cpu_percent=cpu,
        cpu_count=2,
        memory_used_bytes=memory,
        memory_total_bytes=8 * GB,
        shm_free_bytes=GB,
        processes=[
            ProcessUsage(
                label="s1/encoder", pid=10, cpu_percent=encoder_cpu, rss_bytes=1, alive=True
            )
        ],
        taken_at=at,
        net_bytes_sent=sent,
        net_bytes_received=received,
        traffic=[StreamTraffic(session_id=k, bytes_sent=v) for k, v in (traffic or {}).items()],
    )


def test_history_averages_rates_and_thresholds_over_its_window() -> None:
    history = ResourceHistory(window_s=3.0, thresholds=ResourceThresholds(cpu_percent=80))
    assert history.node() is None
    # The first sample's CPU covers the time before the history: it is not averaged.
    history.add(snapshot(100.0, 5.0, sent=0, received=0, traffic={"s1": 0}))
    history.add(snapshot(101.0, 60.0, sent=1000, received=500, traffic={"s1": 400}))
    history.add(snapshot(102.0, 100.0, sent=3000, received=1000, traffic={"s1": 1000, "s2": 0}))
    node = history.node()
    assert node is not None
    assert node.cpu_percent == 80.0  # (60 + 100) / 2
    assert node.window_s == 2.0
    assert (node.net_sent_per_s, node.net_received_per_s) == (1500.0, 500.0)
    assert node.memory_percent == 50.0
    assert node.over == ["cpu 80% >= 80%"]
    traffic = history.stream_traffic()
    assert traffic["s1"].bytes_per_s == 500.0  # 1000 bytes over 2 s
    assert traffic["s2"].bytes_per_s == 0.0  # one sample: no rate yet
    assert history.process_cpu("s1/encoder") == 0.0
    # Older samples leave the window; the last one before it stays, as the rates' start.
    history.add(snapshot(106.0, 10.0, sent=7000, received=1000, memory=7_500_000_000))
    history.add(snapshot(107.0, 20.0, sent=8000, received=1000, memory=7_500_000_000))
    node = history.node()
    assert node is not None
    assert node.samples == 3 and node.window_s == 5.0  # 102, 106, 107
    assert node.cpu_percent == 15.0  # (10 + 20) / 2
    assert node.net_sent_per_s == 1000.0  # (8000 - 3000) / 5
    assert node.over == ["memory 94% >= 90%"]


def test_a_counter_that_went_back_gives_no_negative_rate() -> None:
    history = ResourceHistory()
    history.add(snapshot(1.0, 0.0, traffic={"s1": 5000}))
    history.add(snapshot(2.0, 0.0, traffic={"s1": 100}))  # a restarted shard counts from 0
    assert history.stream_traffic()["s1"].bytes_per_s == 0.0


def test_admission_refuses_a_node_measured_too_busy() -> None:
    scheduler = StreamScheduler(cpu_admission_percent=90.0)
    busy = NodeInfo(node_id="a", cpus=2, cpu_percent=95.0)
    with pytest.raises(ResourceError, match=r"too busy: CPU 95% measured.* threshold 90%"):
        scheduler.place("s1", QUALITY, [busy])
    # Nothing was recorded for the refused stream.
    assert scheduler.load("a") == 0
    # Unmeasured, or with the check off, the budget alone decides.
    assert scheduler.place("s1", QUALITY, [NodeInfo(node_id="a", cpus=2)]) == "a"
    scheduler.cpu_admission_percent = None
    assert scheduler.place("s2", QUALITY, [busy]) == "a"


def test_placement_picks_the_node_with_the_most_free_capacity_measured() -> None:
    scheduler = StreamScheduler()
    # b has more cores on paper, but is measured 90% busy: a has more free now.
    nodes = [
        NodeInfo(node_id="a", cpus=2, cpu_percent=10.0),
        NodeInfo(node_id="b", cpus=4, cpu_percent=90.0),
    ]
    assert scheduler.place("s1", QUALITY, nodes) == "a"
    # Measured idle the same way, the budget left decides.
    idle = [NodeInfo(node_id="a", cpus=2, cpu_percent=0.0), NodeInfo(node_id="b", cpus=4)]
    assert scheduler.place("s2", QUALITY, idle) == "b"


def test_the_monitor_measures_this_process() -> None:
    import os

    monitor = ResourceMonitor()
    taken = monitor.sample(
        {"me": os.getpid()}, traffic=[StreamTraffic(session_id="s", bytes_sent=7)]
    )
    [me] = taken.processes
    assert me.alive and me.rss_bytes > 0
    assert taken.net_bytes_sent > 0 and taken.taken_at > 0  # counted since boot, loopback too
    assert taken.traffic[0].bytes_sent == 7
    gone = monitor.sample({"gone": 2**22 + 12345})
    assert not gone.processes[0].alive


def test_counter_deltas_turn_totals_into_increments() -> None:
    deltas = CounterDeltas()
    tags = {"stream": "a"}
    assert deltas.delta("drops", tags, 5) == 5
    assert deltas.delta("drops", tags, 8) == 3
    assert deltas.delta("drops", {"stream": "b"}, 2) == 2  # tags are their own series
    assert deltas.delta("drops", tags, 1) == 1  # a restarted actor counts from 0
    deltas.forget({"b"})
    assert deltas.delta("drops", tags, 4) == 4  # a's total was forgotten with its stream
    assert deltas.delta("drops", {"stream": "b"}, 2) == 0
