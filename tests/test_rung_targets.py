"""RungTargets with literal times: each rung's encoder target from its viewers and content."""

from __future__ import annotations

import pytest

from shared.control.rung_targets import (
    RungBounds,
    RungComplexity,
    RungTarget,
    RungTargets,
    ViewerRung,
)
from shared.errors import ConfigError

LADDER = (
    RungBounds(configured_bps=3_000_000),
    RungBounds(configured_bps=1_500_000),
    RungBounds(configured_bps=500_000, min_bps=200_000),
)


def on(rung: int, estimate: int, pending: int | None = None) -> ViewerRung:
    return ViewerRung(rung=rung, estimate_bps=estimate, pending_rung=pending)


def by_rung(targets: list[RungTarget]) -> dict[int, RungTarget]:
    return {t.rung: t for t in targets}


def test_a_rung_runs_at_a_low_percentile_of_its_viewers_estimates() -> None:
    targets = RungTargets(LADDER)
    [top, _, _] = targets.update([on(0, 2_800_000), on(0, 5_000_000)], now=0.0)
    # Two viewers: the 20th percentile is the lower one.
    assert (top.target_bps, top.changed, top.viewers) == (2_800_000, True, 2)
    assert top.reason == "target 2800000 bps (20% of 2 viewers' estimates)"
    # Ten viewers, one of them poor: the 20th percentile is the second lowest, which is above
    # the rung's rate, so the rung is back at it.  One viewer does not lower it for all.
    viewers = [on(0, 2_000_000)] + [on(0, 4_000_000 + i * 100_000) for i in range(9)]
    top = targets.update(viewers, now=1.0)[0]
    assert (top.target_bps, top.changed) == (3_000_000, True)


def test_a_target_stays_within_the_rungs_bounds() -> None:
    targets = RungTargets(LADDER)
    rungs = by_rung(targets.update([on(0, 900_000), on(2, 100_000)], now=0.0))
    assert rungs[0].target_bps == 1_500_000  # half the configured rate: the default floor
    assert rungs[2].target_bps == 200_000  # the floor given
    rungs = by_rung(targets.update([on(0, 9_000_000), on(2, 9_000_000)], now=1.0))
    assert rungs[0].target_bps == 3_000_000 and rungs[2].target_bps == 500_000


def test_small_moves_are_not_made_except_onto_a_bound() -> None:
    targets = RungTargets(LADDER)
    assert targets.update([on(0, 2_900_000)], now=0.0)[0].changed is False  # 3.3 %: no
    top = targets.update([on(0, 2_800_000)], now=1.0)[0]
    assert top.changed and top.target_bps == 2_800_000
    top = targets.update([on(0, 2_750_000)], now=2.0)[0]
    assert not top.changed and top.target_bps == 2_800_000
    top = targets.update([on(0, 2_900_000)], now=3.0)[0]
    assert not top.changed
    top = targets.update([on(0, 3_100_000)], now=4.0)[0]  # onto the ceiling: always
    assert top.changed and top.target_bps == 3_000_000


def test_a_rung_nobody_watches_is_paused_and_resumes_with_an_idr() -> None:
    targets = RungTargets(LADDER)
    rungs = by_rung(targets.update([on(0, 4_000_000)], now=0.0))
    assert not rungs[0].paused
    assert rungs[1].paused and rungs[2].paused
    assert rungs[1].reason == "no viewer on it: paused"
    # A viewer on its way to rung 2 (waiting for its IDR) wakes it; it still watches rung 0.
    rungs = by_rung(targets.update([on(0, 1_000_000, pending=2)], now=1.0))
    assert not rungs[2].paused and rungs[2].resumed and rungs[2].viewers == 1
    assert not rungs[0].paused and rungs[0].viewers == 0
    assert rungs[2].reason.startswith("a viewer is going to it: resumed")
    rungs = by_rung(targets.update([on(2, 1_000_000)], now=2.0))
    assert not rungs[2].resumed  # resumed once
    assert rungs[1].paused and not rungs[1].resumed


def test_rung_zero_keeps_running_unless_told_otherwise() -> None:
    assert not RungTargets(LADDER).update([], now=0.0)[0].paused
    assert RungTargets(LADDER, keep_running=()).update([], now=0.0)[0].paused
    assert not RungTargets(LADDER, keep_running=(2,)).update([], now=0.0)[2].paused


def test_without_viewers_every_rung_returns_to_its_configured_rate() -> None:
    targets = RungTargets(LADDER)
    viewers = [on(0, 2_000_000), on(1, 1_000_000), on(2, 300_000)]
    lowered = targets.update(viewers, now=0.0)
    assert [t.target_bps for t in lowered] == [2_000_000, 1_000_000, 300_000]
    back = targets.update([], now=1.0)
    assert [t.target_bps for t in back] == [3_000_000, 1_500_000, 500_000]
    assert all(t.changed for t in back)
    assert [t.paused for t in back] == [False, True, True]


def test_easy_content_lowers_a_rungs_need_and_hard_content_restores_it_at_once() -> None:
    targets = RungTargets(LADDER)
    still = [RungComplexity(rung=0, produced_bps=400_000, qp=18.0)]
    viewer = [on(0, 5_000_000)]
    for second in range(3):  # under half the target: easy, but not for 3 s yet
        top = targets.update(viewer, now=float(second), complexity=still)[0]
        assert top.need_bps == 3_000_000
    top = targets.update(viewer, now=3.0, complexity=still)[0]
    # 2x what it produced, but never under the rung's floor.
    assert top.need_bps == 1_500_000 and top.target_bps == 1_500_000 and top.changed
    assert top.reason.startswith("easy content: produced 400000 bps at QP 18, need 1500000 bps")
    assert targets.needs() == [1_500_000, 1_500_000, 500_000]
    # Motion: the encoder fills 80 % of the lowered need.  Back to the configured rate at once.
    motion = [RungComplexity(rung=0, produced_bps=1_300_000, qp=30.0)]
    top = targets.update(viewer, now=4.0, complexity=motion)[0]
    assert top.need_bps == 3_000_000 and top.target_bps == 3_000_000
    assert top.reason.startswith("content needs more")


def test_few_bits_at_a_high_qp_are_not_easy_content() -> None:
    targets = RungTargets(LADDER)
    starved = [RungComplexity(rung=0, produced_bps=400_000, qp=45.0)]
    for second in range(10):
        top = targets.update([on(0, 5_000_000)], now=float(second), complexity=starved)[0]
    assert top.need_bps == 3_000_000
    # Without a QP the bits alone decide.
    plain = [RungComplexity(rung=0, produced_bps=400_000)]
    for second in range(10, 14):
        top = targets.update([on(0, 5_000_000)], now=float(second), complexity=plain)[0]
    assert top.need_bps == 1_500_000


def test_content_that_is_easy_only_now_and_then_keeps_its_need() -> None:
    targets = RungTargets(LADDER)
    for second in range(20):
        produced = 400_000 if second % 3 else 2_800_000
        complexity = [RungComplexity(rung=0, produced_bps=produced)]
        top = targets.update([on(0, 5_000_000)], now=float(second), complexity=complexity)[0]
        assert top.need_bps == 3_000_000


def test_with_a_qp_the_need_is_the_rate_that_codes_the_content_at_the_reference_qp() -> None:
    """x264 spends a still picture's spare bits refining it (the whole rate at a low QP), so
    the QP, not the bits, says how much it needs: the bits at QP 18, 6 QP per doubling."""
    targets = RungTargets([RungBounds(configured_bps=2_000_000, min_bps=200_000)])

    def at(qp: float, produced: int = 2_000_000) -> list[RungComplexity]:
        return [RungComplexity(rung=0, produced_bps=produced, qp=qp)]

    # QP 6 and 9 with the whole 2 Mbps: 0.5 and 0.71 Mbps would code them at QP 18.  After
    # the 3 s hold, the need is the highest the content wanted meanwhile.
    for second, qp in enumerate([6.0, 9.0, 6.0]):
        top = targets.update([], now=float(second), complexity=at(qp))[0]
        assert top.need_bps == top.target_bps == 2_000_000
    top = targets.update([], now=3.0, complexity=at(6.0))[0]
    assert top.need_bps == top.target_bps == 707_106 and top.changed
    assert top.reason.startswith("easy content: produced 2000000 bps at QP 6, need 707106 bps")
    # At the lowered rate the QP settles near the reference: within 2 QP, nothing moves.
    for second in range(4, 10):
        top = targets.update([], now=float(second), complexity=at(19.5, 707_000))[0]
        assert top.need_bps == 707_106 and not top.changed
    # The picture moves: at 0.7 Mbps the encoder is at QP 26 (1.8 Mbps at QP 18).  At once.
    top = targets.update([], now=10.0, complexity=at(26.0, 707_000))[0]
    assert top.need_bps == top.target_bps == 1_781_528
    assert top.reason.startswith("content needs more: produced 707000 bps at QP 26")
    # A hard picture at the configured rate (QP 30) keeps it; the floor bounds an easy one.
    top = targets.update([], now=11.0, complexity=at(30.0))[0]
    assert top.need_bps == 2_000_000
    for second in range(12, 16):
        top = targets.update([], now=float(second), complexity=at(0.0, 1_000_000))[0]
    assert top.need_bps == 200_000


def test_bad_input_is_refused() -> None:
    with pytest.raises(ConfigError):
        RungTargets(())
    with pytest.raises(ConfigError):
        RungTargets((RungBounds(configured_bps=1_000_000, min_bps=2_000_000),))
    with pytest.raises(ConfigError):
        RungTargets(LADDER, keep_running=(3,))
    with pytest.raises(ConfigError):
        RungTargets(LADDER).update([on(3, 1_000_000)], now=0.0)
