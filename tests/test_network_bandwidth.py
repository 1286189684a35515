"""BandwidthEstimator (GCC-style, send side) against a simulated bottleneck on a virtual clock."""

from __future__ import annotations

import random

import pytest

from shared.errors import ConfigError
from shared.rtp.bandwidth import BandwidthEstimator, BandwidthUsage
from shared.rtp.feedback import TransportFeedbackRecorder

PACKET = 1200


def run_link(
    *,
    capacity_bps: float,
    send_bps: float | None = None,
    seconds: float = 20.0,
    loss: float = 0.0,
    seed: int = 1,
) -> tuple[BandwidthEstimator, list[int]]:
    """A sender pacing at its own estimate (or ``send_bps``) into a FIFO bottleneck."""
    rng = random.Random(seed)
    now = 100.0
    estimator = BandwidthEstimator(initial_bps=int(send_bps or 1_000_000), now=now)
    recorder = TransportFeedbackRecorder(sender_ssrc=1)
    in_flight: list[tuple[float, int]] = []  # (arrival time, transport seq)
    link_free = now
    seq = 0
    next_feedback = now + 0.05
    estimates = []
    end = now + seconds
    while now < end:
        rate = send_bps or estimator.estimate_bps
        estimator.on_packet_sent(seq, PACKET, now)
        if rng.random() >= loss:
            # The bottleneck serialises packets at its capacity, plus a 20 ms path delay.
            link_free = max(link_free, now) + PACKET * 8 / capacity_bps
            in_flight.append((link_free + 0.02, seq))
        seq = (seq + 1) & 0xFFFF
        now += PACKET * 8 / rate
        while in_flight and in_flight[0][0] <= now:
            arrival, number = in_flight.pop(0)
            recorder.on_packet(number, int(arrival * 1e6))
        if now >= next_feedback:
            next_feedback = now + 0.05
            for feedback in recorder.build():
                estimator.on_transport_feedback(feedback, now + 0.02)
            estimates.append(estimator.estimate_bps)
    return estimator, estimates


def test_sending_into_a_bottleneck_backs_off_to_its_capacity() -> None:
    _, estimates = run_link(capacity_bps=1_000_000, send_bps=None, seconds=30)
    # Started at 1 Mbit/s on a 1 Mbit/s link: probing above it builds a queue, overuse is
    # detected and the estimate settles around the capacity instead of growing on.
    tail = estimates[len(estimates) // 2 :]
    assert max(tail) < 1_600_000
    assert sum(tail) / len(tail) > 500_000
    assert min(estimates) < 1_000_000  # it did back off at least once


def test_without_a_bottleneck_the_estimate_grows() -> None:
    estimator, estimates = run_link(capacity_bps=50_000_000, seconds=10)
    assert estimates[-1] > 1.5 * 1_000_000
    assert estimator.usage is BandwidthUsage.NORMAL


@pytest.mark.parametrize(("loss", "grows"), [(0.0, True), (0.05, None), (0.25, False)])
def test_loss_based_control(loss: float, grows: bool | None) -> None:
    estimator, _ = run_link(capacity_bps=50_000_000, seconds=10, loss=loss, send_bps=1e6)
    assert estimator.packets_lost / estimator.packets_reported == pytest.approx(loss, abs=0.04)
    if grows is True:
        assert estimator.estimate_bps > 1_000_000
    elif grows is False:
        assert estimator.estimate_bps < 500_000
    else:  # between 2 % and 10 %: it holds, give or take the windows that see more or less
        assert 500_000 < estimator.estimate_bps < 2_000_000


def test_feedback_recorder_reports_each_packet_once_and_losses() -> None:
    recorder = TransportFeedbackRecorder(sender_ssrc=1)
    for seq in (65534, 65535, 1, 2):  # 0 is lost, across the wrap
        recorder.on_packet(seq, 1_000_000 + seq % 100 * 1000)
    [feedback] = recorder.build()
    assert [(s, t is not None) for s, t in feedback.arrivals()] == [
        (65534, True),
        (65535, True),
        (0, False),
        (1, True),
        (2, True),
    ]
    assert recorder.build() == []
    recorder.on_packet(0, 2_000_000)  # too late: already reported lost
    recorder.on_packet(3, 2_000_000)
    [feedback] = recorder.build()
    assert [s for s, _ in feedback.arrivals()] == [3] and recorder.packets_late == 1


def test_feedback_recorder_splits_where_a_delta_would_overflow() -> None:
    recorder = TransportFeedbackRecorder(sender_ssrc=1)
    recorder.on_packet(10, 1_000_000)
    recorder.on_packet(11, 20_000_000)  # 19 s later: more than a 16-bit delta holds
    first, second = recorder.build()
    assert [s for s, _ in first.arrivals()] == [10]
    assert dict(second.arrivals()) == {11: 20_000_000 // 250 * 250}


def test_estimator_limits() -> None:
    with pytest.raises(ConfigError):
        BandwidthEstimator(initial_bps=10, now=0.0)


def test_a_measured_capacity_lowers_the_estimate_and_never_raises_it() -> None:
    """Hold checks that saturated the path (``shared.control.rung_choice``): an estimate left
    above what an application-limited sender never filled comes down to the capacity."""
    estimator = BandwidthEstimator(initial_bps=500_000, now=0.0)
    estimator.on_probe_result(2_000_000, now=1.0)
    assert estimator.estimate_bps == 2_000_000
    estimator.on_capacity(950_000, now=2.0)
    assert estimator.estimate_bps == 950_000
    estimator.on_capacity(3_000_000, now=3.0)  # more than the estimate: nothing to lower
    assert estimator.estimate_bps == 950_000
    with pytest.raises(ConfigError):
        estimator.on_capacity(0, now=4.0)
