"""ProbeController with literal times: when clusters go out, at what rate, what they found."""

from __future__ import annotations

import pytest

from shared.control.probe import (
    MAX_PROBE_INTERVAL_S,
    PROBE_INTERVAL_S,
    PROBE_PACKET_SIZE,
    ProbeController,
)
from shared.errors import ConfigError


def send_cluster(probe: ProbeController, start: float, first_seq: int = 0) -> list[float]:
    """Take the padding at each deadline until the cluster is sent; the send times."""
    times: list[float] = []
    seq = first_seq
    now = start
    while True:
        for packet in probe.take_probes(now):
            probe.on_packet_sent(seq, packet.size, now)
            times.append(now)
            seq += 1
        deadline = probe.next_deadline()
        if deadline is None or deadline > now + 0.5:  # the result timeout: sent
            return times
        now = deadline


def bottleneck(times: list[float], capacity_bps: float, delay: float = 0.02) -> list[int]:
    """Arrival µs of equal packets sent at ``times`` through a FIFO at ``capacity_bps``."""
    arrivals, free = [], 0.0
    for sent in times:
        free = max(free, sent) + PROBE_PACKET_SIZE * 8 / capacity_bps
        arrivals.append(round((free + delay) * 1e6))
    return arrivals


def test_a_cluster_goes_out_at_twice_the_estimate_paced() -> None:
    probe = ProbeController(now=0.0)
    assert probe.next_deadline() is None  # nothing wanted
    probe.update(estimate_bps=1_000_000, wanted_bps=3_600_000, now=1.0)
    assert probe.next_deadline() == 1.0
    times = send_cluster(probe, 1.0)
    # 2 Mbps for 30 ms: 7 packets of 1200 bytes, 4.8 ms apart.
    assert len(times) == 7
    assert times[1] - times[0] == pytest.approx(1200 * 8 / 2_000_000)
    assert probe.probing and probe.clusters_sent == 1
    assert probe.next_deadline() == pytest.approx(times[-1] + 1.0)  # the result timeout


def test_no_cluster_when_nothing_is_wanted_or_the_estimate_has_it() -> None:
    probe = ProbeController(now=0.0)
    probe.update(estimate_bps=4_000_000, wanted_bps=3_600_000, now=0.0)
    assert probe.next_deadline() is None and probe.take_probes(0.0) == []
    probe.update(estimate_bps=1_000_000, wanted_bps=None, now=0.0)
    assert probe.next_deadline() is None and probe.take_probes(0.0) == []


def test_a_cluster_through_a_saturated_bottleneck_measures_its_capacity() -> None:
    probe = ProbeController(now=0.0)
    probe.update(estimate_bps=1_000_000, wanted_bps=3_600_000, now=0.0)
    times = send_cluster(probe, 0.0)
    arrivals = bottleneck(times, capacity_bps=1_500_000)
    result = probe.on_transport_feedback(list(enumerate(arrivals)), now=0.2)
    assert result is not None and result.estimate_bps is not None
    # Sent at 2 Mbps, delivered at 1.5: saturated, so 95 % of the delivery rate.
    assert result.send_bps == pytest.approx(2_000_000, rel=0.01)
    assert result.receive_bps == pytest.approx(1_500_000, rel=0.01)
    assert result.estimate_bps == pytest.approx(0.95 * 1_500_000, rel=0.01)
    assert result.reason.startswith("path saturated")
    # What the rung selector reads of it (a doubt answered): saturated, offered 2 Mbps, and
    # sent from t=0 on.
    assert result.saturated and result.started_at == 0.0
    assert result.offered_bps == pytest.approx(2_000_000, rel=0.01)
    # 1.43 Mbps is short of the 3.6 wanted, but over 70 % of the 2 Mbps probed: the next
    # cluster follows at once (exponential probing), at twice the result.
    assert not probe.probing and probe.next_deadline() == 0.2
    probe.update(estimate_bps=result.estimate_bps, wanted_bps=3_600_000, now=0.2)
    times = send_cluster(probe, 0.2, first_seq=100)
    assert len(times) == 9  # 2.85 Mbps for 30 ms
    assert times[1] - times[0] == pytest.approx(1200 * 8 / (2 * result.estimate_bps), rel=0.01)


def test_an_unsaturated_cluster_measures_what_was_sent_and_the_ceiling_caps_it() -> None:
    probe = ProbeController(now=0.0)
    probe.update(estimate_bps=2_000_000, wanted_bps=3_000_000, now=0.0)
    times = send_cluster(probe, 0.0)
    # 2x 2 Mbps is over 1.25x the 3 Mbps wanted: the cluster goes at 3.75 Mbps.
    assert times[1] - times[0] == pytest.approx(1200 * 8 / 3_750_000)
    result = probe.on_transport_feedback(
        list(enumerate(bottleneck(times, capacity_bps=10_000_000))), now=0.2
    )
    assert result is not None and result.estimate_bps is not None
    assert result.estimate_bps == pytest.approx(3_750_000, rel=0.01)
    assert not result.saturated and result.target_bps == 3_750_000
    assert result.offered_bps == pytest.approx(3_750_000, rel=0.01)
    assert probe.probes_failed == 0
    # It confirmed what was wanted: no further probing for this goal.
    probe.update(estimate_bps=result.estimate_bps, wanted_bps=3_000_000, now=0.2)
    assert probe.next_deadline() is None


def test_a_probe_that_falls_short_backs_off() -> None:
    probe = ProbeController(now=0.0)
    now = 0.0
    waits = []
    for index in range(4):
        probe.update(estimate_bps=1_000_000, wanted_bps=3_600_000, now=now)
        times = send_cluster(probe, now, first_seq=index * 100)
        # The path carries 1.1 Mbps: the result (1.05 Mbps) is under 70 % of the 2 Mbps probed.
        arrivals = bottleneck(times, capacity_bps=1_100_000)
        sequences = range(index * 100, index * 100 + len(times))
        result = probe.on_transport_feedback(list(zip(sequences, arrivals, strict=True)), now + 0.2)
        assert result is not None and result.estimate_bps is not None
        deadline = probe.next_deadline()
        assert deadline is not None
        waits.append(round(deadline - (now + 0.2), 3))
        now = deadline
    assert waits == [PROBE_INTERVAL_S, 2.0, MAX_PROBE_INTERVAL_S, MAX_PROBE_INTERVAL_S]
    assert probe.probes_failed == 4
    # A new goal starts afresh.
    probe.update(estimate_bps=1_000_000, wanted_bps=1_800_000, now=now - 1.0)
    assert probe.next_deadline() == now - 1.0


def test_a_cluster_at_the_ceiling_that_falls_short_is_not_repeated_at_once() -> None:
    probe = ProbeController(now=0.0)
    probe.update(estimate_bps=2_500_000, wanted_bps=3_000_000, now=0.0)
    times = send_cluster(probe, 0.0)  # at the ceiling: 1.25 x 3 Mbps
    result = probe.on_transport_feedback(
        list(enumerate(bottleneck(times, capacity_bps=3_000_000))), now=0.2
    )
    # 2.85 Mbps: over 70 % of what it probed, but nothing higher is left to probe.
    assert result is not None and result.estimate_bps == pytest.approx(2_850_000, rel=0.01)
    assert probe.probes_failed == 1
    assert probe.next_deadline() == pytest.approx(0.2 + PROBE_INTERVAL_S)


def test_the_same_goal_asked_again_keeps_its_back_off() -> None:
    probe = ProbeController(now=0.0)
    probe.update(estimate_bps=1_000_000, wanted_bps=3_600_000, now=0.0)
    times = send_cluster(probe, 0.0)
    probe.on_transport_feedback(list(enumerate(bottleneck(times, 1_100_000))), now=0.2)
    assert probe.next_deadline() == pytest.approx(1.2)
    probe.update(estimate_bps=1_000_000, wanted_bps=None, now=0.3)  # blocked a moment
    probe.update(estimate_bps=1_000_000, wanted_bps=3_600_000, now=0.4)
    assert probe.next_deadline() == pytest.approx(1.2)


def test_a_cluster_mostly_lost_fails() -> None:
    probe = ProbeController(now=0.0)
    probe.update(estimate_bps=1_000_000, wanted_bps=3_600_000, now=0.0)
    times = send_cluster(probe, 0.0)
    arrivals: list[int | None] = list(bottleneck(times, capacity_bps=1_500_000))
    arrivals[1] = arrivals[2] = None  # 2 of 7 lost: under 80 % received
    result = probe.on_transport_feedback(list(enumerate(arrivals)), now=0.2)
    assert result is not None and result.estimate_bps is None
    assert result.reason == "5 of 7 probe packets received"
    assert probe.probes_failed == 1


def test_a_cluster_without_feedback_is_judged_at_its_timeout() -> None:
    probe = ProbeController(now=0.0)
    probe.update(estimate_bps=1_000_000, wanted_bps=3_600_000, now=0.0)
    times = send_cluster(probe, 0.0)
    arrivals = bottleneck(times, capacity_bps=1_500_000)
    assert probe.on_transport_feedback(list(enumerate(arrivals))[:3], now=0.2) is None
    assert probe.on_timer(times[-1] + 0.5) is None
    result = probe.on_timer(times[-1] + 1.0)
    assert result is not None and result.estimate_bps is None
    assert not probe.probing


def test_media_sent_during_a_cluster_counts_toward_it() -> None:
    probe = ProbeController(now=0.0)
    probe.update(estimate_bps=1_000_000, wanted_bps=3_600_000, now=0.0)
    probe.on_packet_sent(500, 1200, 0.0)  # before the cluster started: not counted
    [padding] = probe.take_probes(0.0)
    probe.on_packet_sent(0, padding.size, 0.0)
    for seq in range(1, 6):  # a frame of 5 packets sent in the middle of it
        probe.on_packet_sent(seq, 1000, 0.001)
    deadline = probe.next_deadline()
    assert deadline is not None
    times = send_cluster(probe, deadline, first_seq=6)
    probe.on_packet_sent(999, 1200, times[-1] + 0.001)  # after its last padding: not counted
    sequences = [0, 1, 2, 3, 4, 5, *range(6, 6 + len(times))]
    arrivals = [(seq, 1_000_000 + index * 3000) for index, seq in enumerate(sequences)]
    # Not complete while any of its 12 packets is unreported; the others do not matter.
    assert probe.on_transport_feedback([(500, 1), (999, 2), *arrivals[:-1]], now=0.2) is None
    result = probe.on_transport_feedback(arrivals[-1:], now=0.2)
    assert result is not None
    # Six padding packets and the frame before the last padding, over the cluster's 28.8 ms.
    assert result.send_bps == pytest.approx((6 * 1200 + 5 * 1000) * 8 / (6 * 0.0048), rel=0.01)


def test_a_train_sent_in_one_instant_is_measured_by_its_dispersion() -> None:
    probe = ProbeController(now=0.0)
    probe.update(estimate_bps=1_000_000, wanted_bps=3_600_000, now=0.0)
    # A shell that stamps every send of a cluster with one time (its pass's start).
    count = 0
    now = 1.0
    while (deadline := probe.next_deadline()) is not None and deadline < now + 0.5:
        now = max(now, deadline)
        for packet in probe.take_probes(now):
            probe.on_packet_sent(count, packet.size, 1.0)
            count += 1
    assert count == 7
    arrivals = bottleneck([1.0] * count, capacity_bps=1_500_000)
    result = probe.on_transport_feedback(list(enumerate(arrivals)), now=1.2)
    assert result is not None and result.estimate_bps == pytest.approx(1_500_000, rel=0.01)


def send_with_stall(
    probe: ProbeController, start: float, *, stall_after: int, stall_s: float
) -> list[tuple[int, float]]:
    """Hand out a cluster's padding at its deadlines, but the shell's timer fires
    ``stall_s`` late once, after ``stall_after`` packets: (sequence, send time) of all sent."""
    sent: list[tuple[int, float]] = []
    now, stalled = start, False
    while True:
        for packet in probe.take_probes(now):
            probe.on_packet_sent(len(sent), packet.size, now)
            sent.append((len(sent), now))
        deadline = probe.next_deadline()
        if deadline is None or deadline > now + 0.5:
            return sent
        if len(sent) == stall_after and not stalled:
            stalled = True
            deadline += stall_s
        now = deadline


def test_a_stall_in_the_middle_of_a_cluster_starts_it_again_at_its_rate() -> None:
    """A cluster scheduled at 2 Mbps whose shell stalled 100 ms after 3 packets: without
    the restart it measures 4.8 ms x 6 + 100 ms of sending, 0.6 Mbps, and says nothing about
    2 Mbps; with it, the packets after the stall are a whole cluster at 2 Mbps."""
    probe = ProbeController(now=0.0)
    probe.update(estimate_bps=1_000_000, wanted_bps=3_600_000, now=0.0)
    sent = send_with_stall(probe, 0.0, stall_after=3, stall_s=0.1)
    assert probe.cluster_restarts == 1
    # The 3 before the stall, then a whole cluster of 7 from the late wake-up on.
    assert len(sent) == 3 + 7
    restarted = sent[3:]
    assert restarted[0][1] > 0.1
    times = bottleneck([t for _, t in sent], 10_000_000)
    arrivals = dict(zip((s for s, _ in sent), times, strict=True))
    result = probe.on_transport_feedback(list(arrivals.items()), now=0.3)
    assert result is not None and result.paced
    assert result.send_bps == pytest.approx(2_000_000, rel=0.01)
    assert result.offered_bps == result.send_bps
    assert result.estimate_bps == pytest.approx(2_000_000, rel=0.01)
    assert result.started_at == restarted[0][1]


def test_a_packet_a_little_late_goes_with_the_next_and_the_cluster_keeps_its_start() -> None:
    probe = ProbeController(now=0.0)
    probe.update(estimate_bps=1_000_000, wanted_bps=3_600_000, now=0.0)
    sent = send_with_stall(probe, 0.0, stall_after=3, stall_s=0.008)  # under 10 ms late
    assert probe.cluster_restarts == 0 and len(sent) == 7
    assert sent[3][1] == sent[4][1]  # caught up: two leave together
    arrivals = bottleneck([t for _, t in sent], 10_000_000)
    result = probe.on_transport_feedback(list(enumerate(arrivals)), now=0.3)
    assert result is not None and result.started_at == 0.0
    assert result.send_bps == pytest.approx(2_000_000, rel=0.01)


def test_a_cluster_the_shell_cannot_pace_is_given_up_without_back_off() -> None:
    probe = ProbeController(now=0.0)
    probe.update(estimate_bps=1_000_000, wanted_bps=3_600_000, now=0.0)
    now = 0.0
    for _ in range(3):  # every wake-up after the first packet 50 ms late
        assert len(probe.take_probes(now)) == 1
        deadline = probe.next_deadline()
        assert deadline is not None
        now = deadline + 0.05
    assert probe.take_probes(now) == []
    assert probe.cluster_restarts == 2 and probe.clusters_unpaced == 1
    assert probe.next_deadline() == now  # the result is handed out at once
    result = probe.on_timer(now)
    assert result is not None and not result.paced and result.estimate_bps is None
    assert result.offered_bps == 0  # says nothing about the path
    assert probe.probes_failed == 0 and not probe.probing
    assert probe.next_deadline() == pytest.approx(now + PROBE_INTERVAL_S)


def test_a_hold_check_goes_out_whatever_the_estimate_and_leaves_the_back_off_alone() -> None:
    probe = ProbeController(now=0.0)
    # The estimate has what is wanted (nothing to probe for), but a check is asked.
    probe.update(estimate_bps=4_000_000, wanted_bps=None, check_bps=1_800_000, now=1.0)
    assert probe.next_deadline() == 1.0
    times = send_cluster(probe, 1.0)
    assert len(times) == 6  # 1.8 Mbps for 30 ms
    assert times[1] - times[0] == pytest.approx(1200 * 8 / 1_800_000)
    probe.update(estimate_bps=4_000_000, wanted_bps=None, check_bps=None, now=1.05)
    arrivals = bottleneck(times, capacity_bps=1_000_000)
    result = probe.on_transport_feedback(list(enumerate(arrivals)), now=1.2)
    assert result is not None and result.check and result.saturated
    assert result.estimate_bps == pytest.approx(950_000, rel=0.01)
    assert probe.probes_failed == 0
    assert probe.next_deadline() is None  # one check per request
    # A check asked and withdrawn before it started sends nothing.
    probe.update(estimate_bps=4_000_000, wanted_bps=None, check_bps=1_800_000, now=2.0)
    probe.update(estimate_bps=4_000_000, wanted_bps=None, check_bps=None, now=2.0)
    assert probe.take_probes(2.0) == [] and probe.next_deadline() is None


def test_bad_input_is_refused() -> None:
    probe = ProbeController(now=0.0)
    with pytest.raises(ConfigError):
        probe.update(estimate_bps=0, wanted_bps=1_000_000, now=0.0)
    with pytest.raises(ConfigError):
        probe.update(estimate_bps=1_000_000, wanted_bps=-1, now=0.0)


def test_a_cluster_a_stalled_receiver_read_at_once_tells_nothing_of_what_was_offered() -> None:
    """A viewer whose loop stalled reads a whole cluster in one go: its arrival times are
    bunched, far faster than anything was sent.  Not a measurement: nothing offered counts
    (the rung selector must not read it as a path that failed to carry the rate)."""
    probe = ProbeController(now=0.0)
    probe.update(estimate_bps=4_000_000, wanted_bps=None, check_bps=1_800_000, now=0.0)
    times = send_cluster(probe, 0.0)
    arrivals = [(seq, 200_000 + seq) for seq in range(len(times))]  # 1 µs apart
    result = probe.on_transport_feedback(arrivals, now=0.3)
    assert result is not None and result.estimate_bps is None and not result.measured
    assert result.send_bps == pytest.approx(1_800_000, rel=0.01)
    assert result.offered_bps == 0
    # A cluster the path dropped most of is a measurement: what it offered stands.
    probe.update(estimate_bps=4_000_000, wanted_bps=None, check_bps=1_800_000, now=1.0)
    times = send_cluster(probe, 1.0, first_seq=100)
    lost: list[tuple[int, int | None]] = [(100 + i, None) for i in range(len(times))]
    lost[0] = (100, 1_000_000)
    result = probe.on_transport_feedback(lost, now=1.3)
    assert result is not None and result.measured and result.estimate_bps is None
    assert result.offered_bps == pytest.approx(1_800_000, rel=0.01)
