"""RungSelector with literal times: down at once, up after a hold, hysteresis, back-off, the
IDR handshake, caps and pins.  (The closed loop with the real estimator: test_abr_sim.py.)"""

from __future__ import annotations

import pytest

from shared.control.rung_choice import RungSelector, RungSelectorConfig, RungSwitch, cap_for
from shared.errors import ConfigError
from shared.media.scaler import plan_ladder
from shared.models import QualityPreset, StreamQuality

RATES = (3_000_000, 1_500_000, 500_000)  # HIGH, MEDIUM, LOW
FEEDBACK = 0.05  # the viewer's transport-wide feedback interval


def feed(
    selector: RungSelector,
    estimate: int,
    start: float,
    end: float,
    *,
    loss: float = 0.0,
    rtt: float = 0.05,
) -> list[tuple[float, RungSwitch]]:
    """Feedback every 50 ms over [start, end) with one estimate; the switches asked for.
    Each switch is completed at once (the encoder's IDR comes with the next frame)."""
    switches = []
    steps = round((end - start) / FEEDBACK)
    for step in range(steps):
        now = start + step * FEEDBACK
        switch = selector.on_estimate(estimate, loss=loss, rtt_s=rtt, now=now)
        if switch is not None:
            switches.append((now, switch))
            assert selector.keyframe_request(now) == switch.to_rung
            assert selector.on_keyframe(switch.to_rung, now)
    return switches


def first_switch(selector: RungSelector, estimate: int, start: float) -> float:
    """Feedback with ``estimate`` from ``start`` until it switches (done at once); when."""
    step, now = 0, start
    while selector.on_estimate(estimate, loss=0.0, rtt_s=0.05, now=now) is None:
        step += 1
        now = start + step * 0.25  # feedback on a quarter-second grid: exact in binary
        assert step < 1200, "no switch in 300 s"
    rung = selector.keyframe_request(now)
    assert rung is not None and selector.on_keyframe(rung, now)
    return now


def test_goes_down_on_the_first_feedback_under_the_rung() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=0)
    assert feed(selector, 3_500_000, 0.0, 1.0) == []
    # 2.9 Mbps is within the 5 % tolerance of rung 0's 3 Mbps: it holds.
    assert feed(selector, 2_900_000, 1.0, 2.0) == []
    switch = selector.on_estimate(2_800_000, loss=0.0, rtt_s=0.05, now=2.0)
    assert switch is not None
    assert (switch.from_rung, switch.to_rung, switch.up) == (0, 1, False)
    assert switch.reason == "estimate 2.80 Mbps under rung 0's 3.00 Mbps"
    assert selector.pending == switch and selector.rung == 0 and selector.wanted == 1


def test_a_deep_fall_goes_straight_to_the_rung_that_fits() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=0)
    [(when, switch)] = feed(selector, 900_000, 0.0, 0.2)
    assert when == 0.0 and switch.to_rung == 2
    # Under even the lowest rung: the lowest rung (there is nothing lower).
    selector = RungSelector(RATES, now=0.0, start_rung=0)
    [(_, switch)] = feed(selector, 100_000, 0.0, 0.2)
    assert switch.to_rung == 2


def test_goes_up_only_after_the_estimate_held_the_headroom_for_the_hold() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=2)
    # 1.8 Mbps is 1.2 x rung 1's rate: up after 1 s of it, not before.
    [(when, switch)] = feed(selector, 1_800_000, 0.0, 3.0)
    assert when == pytest.approx(1.0)
    assert (switch.from_rung, switch.to_rung) == (2, 1)
    assert switch.reason == "estimate 1.80 Mbps at least 1.2x rung 1's 1.50 Mbps for 1.0 s"
    # Just under the headroom: never.
    selector = RungSelector(RATES, now=0.0, start_rung=2)
    assert feed(selector, 1_790_000, 0.0, 30.0) == []


def test_going_up_skips_to_the_highest_rung_cleared() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=2)
    [(when, switch)] = feed(selector, 4_000_000, 0.0, 2.0)
    assert when == pytest.approx(1.0) and switch.to_rung == 0


def test_a_dip_below_the_headroom_restarts_the_hold() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=2)
    assert feed(selector, 1_900_000, 0.0, 0.9) == []
    assert feed(selector, 1_700_000, 0.9, 1.0) == []  # one feedback under 1.8 Mbps
    [(when, _)] = feed(selector, 1_900_000, 1.0, 3.0)
    assert when == pytest.approx(2.0)


def test_gcc_sawtooth_never_flips_the_rung() -> None:
    """GCC's steady estimate rises 8 %/s and falls to 0.85x (§5.5): between the rung's hold
    (95 %) and the next rung's headroom (1.2x) it never moves the viewer."""
    selector = RungSelector(RATES, now=0.0, start_rung=1)
    now, estimate, switches = 0.0, 1_450_000.0, []
    while now < 120.0:
        switch = selector.on_estimate(int(estimate), loss=0.0, rtt_s=0.05, now=now)
        if switch is not None:
            switches.append(switch)
        estimate *= 1.08**FEEDBACK
        if estimate > 3_500_000:  # an overuse at the top of each tooth
            estimate *= 0.85 * 0.85 * 0.85 * 0.85 * 0.85
        now += FEEDBACK
    assert switches == []


@pytest.mark.parametrize(
    ("loss", "rtt"),
    [
        (0.03, 0.05),  # loss between 2 and 10 %: GCC holds, so does the selector
        (0.0, 0.16),  # the RTT 110 ms above its minimum of 50 ms: a standing queue
    ],
)
def test_going_up_waits_while_the_path_is_lossy_or_queueing(loss: float, rtt: float) -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=2)
    assert feed(selector, 500_000, 0.0, 1.0) == []  # the RTT's minimum: 50 ms
    assert feed(selector, 4_000_000, 1.0, 5.0, loss=loss, rtt=rtt) == []
    assert selector.probe_target(5.0) is None  # and no probing either
    [(when, switch)] = feed(selector, 4_000_000, 5.0, 7.0)
    assert when == pytest.approx(6.0) and switch.to_rung == 0


def test_no_going_up_while_settling_after_a_step_down() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=1)
    [(when, _)] = feed(selector, 400_000, 0.0, 0.1)
    assert when == 0.0 and selector.rung == 2
    # The estimate is back at once; the 1 s hold would end at 1.05, but the step down at 0.0
    # keeps the viewer settling until 1.0, so the hold only starts then.
    [(when, switch)] = feed(selector, 1_900_000, 0.05, 3.0)
    assert when == pytest.approx(2.0) and switch.to_rung == 1


def test_an_up_switch_undone_soon_doubles_that_rungs_hold_and_a_kept_one_resets_it() -> None:
    config = RungSelectorConfig(idr_grace_s=0.0)
    selector = RungSelector(RATES, now=0.0, start_rung=1, config=config)
    holds = []
    now = 0.0
    for _ in range(5):  # up to rung 0, then the path falls back under it 2 s later
        when = first_switch(selector, 3_700_000, now)
        holds.append(round(when - now, 2))
        assert first_switch(selector, 2_000_000, when + 2.0) == when + 2.0
        now = when + 3.0  # past settle_s
    assert holds == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert selector.failed_ups == 5
    # Kept through the 10 s window this time: the hold is back to 1 s for the next attempt.
    when = first_switch(selector, 3_700_000, now)
    assert round(when - now, 2) == 30.0  # 32 s, at most max_up_hold_s
    feed(selector, 3_700_000, when + FEEDBACK, when + 10.5)
    assert selector.rung == 0
    first_switch(selector, 2_000_000, when + 10.5)
    assert selector.failed_ups == 5  # not a failed one
    now = when + 12.0
    assert round(first_switch(selector, 3_700_000, now) - now, 2) == 1.0


def test_the_back_off_stops_at_its_maximum() -> None:
    config = RungSelectorConfig(idr_grace_s=0.0, max_up_hold_s=3.0)
    selector = RungSelector(RATES, now=0.0, start_rung=1, config=config)
    holds, now = [], 0.0
    for _ in range(4):
        when = first_switch(selector, 3_700_000, now)
        holds.append(round(when - now, 2))
        first_switch(selector, 2_000_000, when + 2.0)
        now = when + 3.0
    assert holds == [1.0, 2.0, 3.0, 3.0]


def test_a_fall_just_after_an_up_switch_is_probed_before_it_is_believed() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=1)
    [(when, _)] = feed(selector, 3_700_000, 0.0, 1.05)
    assert when == pytest.approx(1.0) and selector.rung == 0
    # The switch's IDR makes GCC see overuse: 2.3 Mbps, no loss.  For 1.5 s from the fall the
    # viewer stays and a probe at what rung 0 needs is asked for.
    assert feed(selector, 2_300_000, 1.05, 2.45) == []
    assert selector.probe_target(2.45) == 3_600_000
    assert selector.next_deadline() == pytest.approx(2.55)
    # The probe found the capacity: the estimate is back, nothing happened.
    assert feed(selector, 3_800_000, 2.45, 5.0) == []
    assert selector.rung == 0 and selector.failed_ups == 0


def test_a_fall_after_an_up_switch_not_undone_by_the_grace_steps_down() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=1)
    feed(selector, 3_700_000, 0.0, 1.05)
    [(when, switch)] = feed(selector, 2_300_000, 1.05, 3.0)
    assert 2.55 <= when <= 2.6 and switch.to_rung == 1  # 1.5 s after the fall
    assert selector.failed_ups == 1
    # With loss, there is no grace: at once.
    selector = RungSelector(RATES, now=0.0, start_rung=1)
    feed(selector, 3_700_000, 0.0, 1.05)
    [(when, switch)] = feed(selector, 2_300_000, 1.05, 3.0, loss=0.15)
    assert when == pytest.approx(1.05) and switch.to_rung == 1


def test_any_idr_of_the_viewers_rung_earns_the_grace() -> None:
    """Another viewer's switch (or a scene cut) makes an IDR of this viewer's rung: its burst
    is doubted the same way, so one viewer going up does not knock the others down."""
    selector = RungSelector(RATES, now=0.0, start_rung=0)
    assert feed(selector, 3_800_000, 0.0, 20.0) == []
    # Without an IDR before it, the same fall is acted on at once.
    assert selector.on_keyframe(0, 20.0) is False  # no switch of its own
    assert feed(selector, 2_800_000, 20.05, 21.0) == []
    assert selector.probe_target(21.0) == 3_600_000
    assert feed(selector, 3_700_000, 21.0, 30.0) == []  # the probe found the path
    [(when, _)] = feed(selector, 2_800_000, 30.0, 31.0)
    assert when == 30.0


def test_a_probe_that_finds_the_doubted_rung_does_not_hold_moves_the_viewer_at_once() -> None:
    """The doubt after an IDR waits for a probe, not for the grace, when the probe answers:
    measured on a veth capped by ``tc tbf`` (perf.abr_network), the probe sent at the fall
    came back 0.1 s later under the rung, and waiting out the 1.5 s grace missed down_s."""
    selector = RungSelector(RATES, now=0.0, start_rung=0)
    assert feed(selector, 3_800_000, 0.0, 20.0) == []
    selector.on_keyframe(0, 19.7)  # a periodic IDR
    assert feed(selector, 1_900_000, 20.0, 20.1) == []  # doubted: stays, probes rung 0
    assert selector.probe_target(20.1) == 3_600_000
    # Not an answer: a cluster older than the fall; one offered too little to tell (the path
    # was not saturated); one that found the path carries the rung.
    assert (
        selector.on_probe_result(
            1_000_000, offered_bps=3_000_000, saturated=True, started_at=19.9, now=20.1
        )
        is None
    )
    assert (
        selector.on_probe_result(
            2_000_000, offered_bps=2_000_000, saturated=False, started_at=20.0, now=20.1
        )
        is None
    )
    assert (
        selector.on_probe_result(
            2_900_000, offered_bps=4_500_000, saturated=True, started_at=20.0, now=20.1
        )
        is None
    )
    assert selector.pending is None and selector.rung == 0
    # The answer: the path saturated under the rung's hold (2.85 Mbps).
    switch = selector.on_probe_result(
        1_800_000, offered_bps=4_500_000, saturated=True, started_at=20.0, now=20.15
    )
    assert switch is not None and (switch.to_rung, switch.requested_at) == (1, 20.15)
    assert switch.reason == (
        "estimate 1.90 Mbps under rung 0's 3.00 Mbps (a probe at 4.50 Mbps found 1.80 Mbps)"
    )
    assert selector.keyframe_request(20.15) == 1


def test_a_failed_probe_that_offered_the_rung_answers_the_doubt_too() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=0)
    assert feed(selector, 3_800_000, 0.0, 20.0) == []
    selector.on_keyframe(0, 19.7)
    assert feed(selector, 2_500_000, 20.0, 20.1) == []
    # Failed (most of it lost) after offering less than the rung: it tells nothing.
    assert (
        selector.on_probe_result(
            None, offered_bps=2_000_000, saturated=False, started_at=20.0, now=20.1
        )
        is None
    )
    switch = selector.on_probe_result(
        None, offered_bps=3_600_000, saturated=False, started_at=20.0, now=20.2
    )
    assert switch is not None and switch.to_rung == 1
    assert switch.reason.endswith("(a probe at 3.60 Mbps failed)")
    # Without a doubt, a result moves nothing (the estimator takes it).
    assert selector.on_keyframe(1, 20.25) and selector.rung == 1
    assert (
        selector.on_probe_result(
            100_000, offered_bps=3_000_000, saturated=True, started_at=20.3, now=20.4
        )
        is None
    )


def test_an_idr_never_undoes_a_step_down_already_asked_for() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=0)
    selector.on_estimate(1_000_000, loss=0.0, rtt_s=0.05, now=10.0)
    assert selector.pending is not None and selector.pending.to_rung == 2
    selector.on_keyframe(0, 10.01)  # a scene cut: every rung's next frame is an IDR
    selector.on_estimate(1_000_000, loss=0.0, rtt_s=0.05, now=10.05)
    assert selector.pending is not None and selector.pending.to_rung == 2
    assert selector.on_keyframe(2, 10.06) and selector.rung == 2


def test_the_switch_waits_for_an_idr_of_the_new_rung() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=0)
    switch = selector.on_estimate(1_600_000, loss=0.0, rtt_s=0.05, now=1.0)
    assert switch is not None and switch.to_rung == 1
    assert selector.wants_keyframe(1) and not selector.wants_keyframe(0)
    assert selector.next_deadline() == 1.0  # ask now
    assert selector.keyframe_request(1.0) == 1
    assert selector.keyframe_request(1.1) is None  # asked already
    assert selector.next_deadline() == pytest.approx(1.5)
    assert selector.keyframe_request(1.5) == 1  # no IDR yet: ask again
    # IDRs of other rungs do not switch it; the viewer stays on rung 0 until rung 1's.
    assert not selector.on_keyframe(0, 1.55) and not selector.on_keyframe(2, 1.55)
    assert selector.rung == 0
    assert selector.on_keyframe(1, 1.6)
    assert selector.rung == 1 and selector.pending is None and selector.last_switch == switch
    assert selector.switches_down == 1 and selector.keyframe_request(1.7) is None


def test_a_pending_switch_up_is_dropped_when_its_rung_stops_holding() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=2)
    for step in range(21):
        selector.on_estimate(1_900_000, loss=0.0, rtt_s=0.05, now=step * FEEDBACK)
    assert selector.pending is not None and selector.pending.to_rung == 1
    selector.on_estimate(1_600_000, loss=0.0, rtt_s=0.05, now=1.05)  # still holds rung 1
    assert selector.pending is not None
    selector.on_estimate(1_000_000, loss=0.0, rtt_s=0.05, now=1.1)  # no longer
    assert selector.pending is None and not selector.on_keyframe(1, 1.15)
    assert selector.rung == 2


def test_a_pending_switch_down_is_never_made_less_conservative() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=0)
    selector.on_estimate(600_000, loss=0.0, rtt_s=0.05, now=0.0)
    assert selector.pending is not None and selector.pending.to_rung == 2
    selector.on_estimate(1_500_000, loss=0.0, rtt_s=0.05, now=0.05)  # rung 1 would hold now
    assert selector.pending.to_rung == 2
    selector.on_estimate(3_500_000, loss=0.0, rtt_s=0.05, now=0.1)  # rung 0 too
    assert selector.pending.to_rung == 2
    assert selector.rung_to_remember == 2


def test_the_cap_is_never_exceeded_and_applies_at_once() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=0)
    switch = selector.set_cap(2, now=0.0)  # max_quality low
    assert switch is not None and switch.to_rung == 2
    assert switch.reason == "rung 0 is above the viewer's cap 2"
    selector.on_keyframe(2, 0.05)
    assert feed(selector, 50_000_000, 0.1, 60.0) == []
    assert selector.rung == 2 and selector.probe_target(60.0) is None
    # Lifting it lets the viewer climb, after the hold.
    selector.set_cap(0, now=60.0)
    [(when, switch)] = feed(selector, 50_000_000, 60.0, 62.0)
    assert when == pytest.approx(61.0) and switch.to_rung == 0


def test_a_viewer_starts_on_the_lowest_allowed_rung_or_where_it_left() -> None:
    assert RungSelector(RATES, now=0.0).rung == 2
    assert RungSelector(RATES, now=0.0, start_rung=0).rung == 0
    assert RungSelector(RATES, now=0.0, start_rung=0, cap=1).rung == 1


def test_a_pin_holds_whatever_the_estimate_but_never_above_the_cap() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=2)
    switch = selector.set_pin(0, now=0.0)
    assert switch is not None and switch.to_rung == 0 and switch.reason == "pinned to rung 0"
    selector.on_keyframe(0, 0.05)
    assert feed(selector, 400_000, 0.1, 10.0) == []  # a poor path: the viewer chose it
    assert selector.rung == 0 and selector.probe_target(10.0) is None
    assert selector.on_timer(20.0) is None  # no feedback for 10 s: pinned, nothing moves
    switch = selector.set_cap(1, now=20.0)
    assert switch is not None and switch.to_rung == 1
    assert switch.reason == "pinned to rung 0, capped at rung 1"
    selector.on_keyframe(1, 20.05)
    # Unpinned, the estimate decides again (away from the IDR's grace).
    switch = selector.set_pin(None, now=25.0)
    assert switch is not None and switch.to_rung == 2


def test_without_feedback_the_viewer_steps_down_one_rung_per_timeout() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=0)
    selector.on_estimate(4_000_000, loss=0.0, rtt_s=0.05, now=0.0)
    assert selector.next_deadline() == 1.0
    assert selector.on_timer(0.5) is None
    switch = selector.on_timer(1.0)
    assert switch is not None and switch.to_rung == 1
    assert switch.reason == "no feedback for 1.0 s: one rung down"
    selector.on_keyframe(1, 1.05)
    switch = selector.on_timer(2.0)
    assert switch is not None and switch.to_rung == 2
    selector.on_keyframe(2, 2.05)
    assert selector.on_timer(5.0) is None  # the lowest rung: nowhere lower


def test_next_deadline_is_the_end_of_a_hold() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=2)
    selector.on_estimate(4_000_000, loss=0.0, rtt_s=0.05, now=0.0)
    assert selector.next_deadline() == pytest.approx(1.0)
    switch = selector.on_timer(1.0)  # no feedback since: the hold ended all the same
    assert switch is not None and switch.to_rung == 0


def test_probe_target_is_what_the_top_allowed_rung_needs() -> None:
    selector = RungSelector(RATES, now=0.0, start_rung=2)
    selector.on_estimate(600_000, loss=0.0, rtt_s=0.05, now=0.0)
    assert selector.probe_target(0.0) == 3_600_000
    selector.set_cap(1, now=0.0)
    assert selector.probe_target(0.0) == 1_800_000
    selector.on_estimate(1_900_000, loss=0.0, rtt_s=0.05, now=0.05)
    assert selector.probe_target(0.05) is None  # confirmed already


def test_cap_for_maps_max_quality_onto_the_ladder() -> None:
    source = StreamQuality.from_preset(QualityPreset.HIGH)
    rungs = plan_ladder(source, (QualityPreset.MEDIUM, QualityPreset.LOW)).rungs
    assert cap_for(QualityPreset.ULTRA, rungs) == 0
    assert cap_for(QualityPreset.HIGH, rungs) == 0
    assert cap_for(QualityPreset.MEDIUM, rungs) == 1
    assert cap_for(QualityPreset.LOW, rungs) == 2
    assert cap_for(QualityPreset.CUSTOM, rungs) == 0
    # A stream with no rung low enough: its lowest rung.
    assert cap_for(QualityPreset.LOW, plan_ladder(source, ()).rungs) == 0
    with pytest.raises(ConfigError):
        cap_for(QualityPreset.LOW, ())


def test_bad_input_is_refused() -> None:
    with pytest.raises(ConfigError):
        RungSelector((), now=0.0)
    with pytest.raises(ConfigError):
        RungSelector((3_000_000, 0), now=0.0)
    with pytest.raises(ConfigError):
        RungSelector(RATES, now=0.0, cap=3)
    with pytest.raises(ConfigError):
        RungSelector(RATES, now=0.0, start_rung=-1)
    with pytest.raises(ConfigError):
        RungSelectorConfig(up_headroom=1.04, down_tolerance=0.05)  # no hysteresis left
    selector = RungSelector(RATES, now=0.0)
    with pytest.raises(ConfigError):
        selector.on_estimate(0, loss=0.0, rtt_s=0.05, now=0.0)
    with pytest.raises(ConfigError):
        selector.on_estimate(1_000_000, loss=1.5, rtt_s=0.05, now=0.0)
    with pytest.raises(ConfigError):
        selector.set_rates((1, 2))
    with pytest.raises(ConfigError):
        selector.set_pin(5, now=0.0)


def at(selector: RungSelector, now: float) -> RungSwitch | None:
    """A feedback at ``now`` with the estimate unchanged (2 Mbps)."""
    return selector.on_estimate(2_000_000, loss=0.0, rtt_s=0.05, now=now)


def checked_selector() -> RungSelector:
    """On rung 1 (1.5 Mbps, at its cap), estimate 2 Mbps, sending 0.6 Mbps since t=0; a
    check confirming a short one 0.25 s after it."""
    config = RungSelectorConfig(confirm_s=0.25)
    selector = RungSelector(RATES, now=0.0, start_rung=1, cap=1, config=config)
    selector.set_sending(600_000)
    assert selector.on_estimate(2_000_000, loss=0.0, rtt_s=0.05, now=0.0) is None
    return selector


def check_result(
    selector: RungSelector, estimate: int | None, now: float, *, offered: int = 1_800_000
) -> RungSwitch | None:
    saturated = estimate is not None and estimate < 0.9 * offered
    return selector.on_probe_result(
        estimate, offered_bps=offered, saturated=saturated, started_at=now, now=now, check=True
    )


def test_a_rung_sending_under_its_rate_gets_a_hold_check_every_second() -> None:
    selector = checked_selector()
    assert selector.check_target(0.0) is None
    assert selector.next_deadline() == 1.0
    assert at(selector, 1.0) is None
    # At 1.2x the rung's rate, asked for until the result comes back.
    assert selector.check_target(1.0) == selector.check_target(1.1) == 1_800_000
    assert selector.next_deadline() == 2.0  # the feedback timeout; the check is out
    assert check_result(selector, 1_700_000, 1.1) is None  # the path carries it
    assert selector.check_target(1.1) is None
    at(selector, 1.5)
    assert selector.next_deadline() == pytest.approx(2.1)  # the next check, a second on


def test_two_short_hold_checks_in_a_row_step_down_to_what_the_path_carries() -> None:
    """A 1 Mbps cap under a rung that sends 0.6 Mbps: GCC's estimate stays at 2 Mbps (nothing
    it sends overuses the path), the checks find 0.95 Mbps, and the viewer goes down to the
    rung that fits at once, not at the next IDR that would overflow the queue."""
    selector = checked_selector()
    at(selector, 1.0)
    assert check_result(selector, 950_000, 1.1) is None  # one short: confirmed soon
    assert selector.next_deadline() == pytest.approx(1.35)
    at(selector, 1.35)
    assert selector.check_target(1.35) == 1_800_000
    switch = check_result(selector, 950_000, 1.45)
    assert switch is not None and (switch.from_rung, switch.to_rung) == (1, 2)
    assert switch.capacity_bps == 950_000
    assert switch.reason.startswith("2 hold checks of rung 1's 1.50 Mbps came back short")
    assert selector.checks_short == 2 and selector.check_target(1.45) is None


def test_a_short_check_then_one_that_carries_moves_nothing() -> None:
    selector = checked_selector()
    at(selector, 1.0)
    assert check_result(selector, 950_000, 1.1) is None
    at(selector, 1.35)
    assert check_result(selector, 1_700_000, 1.45) is None
    at(selector, 2.45)
    assert check_result(selector, 950_000, 2.55) is None  # one short again: not two in a row
    assert selector.pending is None and selector.rung == 1


def test_a_check_that_offered_too_little_or_was_not_paced_tells_nothing() -> None:
    selector = checked_selector()
    at(selector, 1.0)
    assert check_result(selector, 950_000, 1.1) is None
    at(selector, 1.35)
    # Sent at 1.0 Mbps (the shell fell behind), delivered all of it: says nothing of 1.5.
    assert check_result(selector, 1_000_000, 1.45, offered=1_000_000) is None
    at(selector, 2.45)
    # Given up unpaced: nothing offered, nothing found.
    assert check_result(selector, None, 2.5, offered=0) is None
    assert selector.pending is None
    at(selector, 3.5)
    switch = check_result(selector, 950_000, 3.6)  # the second short in a row
    assert switch is not None and switch.to_rung == 2


def test_no_hold_checks_on_a_rung_sending_its_rate_on_the_lowest_or_when_switched_off() -> None:
    selector = checked_selector()
    selector.set_sending(1_300_000)  # over 80 % of 1.5 Mbps (an IDR): GCC sees the path itself
    at(selector, 1.0)
    assert selector.check_target(1.0) is None
    assert selector.next_deadline() == 1.25  # looked at again soon, not a second on
    selector.set_sending(600_000)  # the IDR out of the last second: the check goes then
    at(selector, 1.25)
    assert selector.check_target(1.25) == 1_800_000
    lowest = RungSelector(RATES, now=0.0, start_rung=2, cap=2)
    lowest.set_sending(100_000)
    lowest.on_estimate(2_000_000, loss=0.0, rtt_s=0.05, now=0.0)
    at(lowest, 1.0)
    assert lowest.check_target(1.0) is None  # nowhere lower to go
    off = RungSelector(
        RATES, now=0.0, start_rung=1, cap=1, config=RungSelectorConfig(check_interval_s=None)
    )
    off.set_sending(600_000)
    off.on_estimate(2_000_000, loss=0.0, rtt_s=0.05, now=0.0)
    at(off, 1.0)
    assert off.check_target(1.0) is None
    # Probing for a higher rung serves as the check: none while it may go up.
    climbing = RungSelector(RATES, now=0.0, start_rung=1)
    climbing.set_sending(600_000)
    climbing.on_estimate(2_000_000, loss=0.0, rtt_s=0.05, now=0.0)
    at(climbing, 1.0)
    assert climbing.probe_target(1.0) is not None and climbing.check_target(1.0) is None
