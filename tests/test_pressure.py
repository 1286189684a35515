"""PressurePolicy on a fake clock: shed in order before lateness, restore with hysteresis."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from shared.control.pressure import (
    PressureAction,
    PressureConfig,
    PressureDecision,
    PressurePolicy,
)
from shared.errors import ConfigError

#: CPU points each step saves in the model node below: the frame rate step, then rung 0, rung 1.
STEP_COST = (15.0, 30.0, 10.0)


def model_cpu(policy: PressurePolicy, background: float) -> float:
    """The node's CPU: a background load plus the encoder work of the steps not taken."""
    shed = sum(STEP_COST[: policy.level])
    return min(background + sum(STEP_COST) - shed, 100.0)


def drive(
    policy: PressurePolicy,
    background: Callable[[float], float],
    start: float,
    end: float,
    *,
    late: Callable[[float], int] = lambda t: 0,
    period: float = 1.0,
) -> list[PressureDecision]:
    """One sample per ``period`` of the model CPU; the decisions made."""
    decisions = []
    now = start
    while now <= end:
        decision = policy.on_sample(model_cpu(policy, background(now)), now, late_frames=late(now))
        if decision is not None:
            decisions.append(decision)
        now += period
    return decisions


def test_sheds_the_frame_rate_then_the_top_rungs_while_the_cpu_stays_high() -> None:
    policy = PressurePolicy(framerate=30, rungs=3, now=0.0)
    decisions = drive(policy, lambda t: 45.0, 0.0, 60.0)  # 100 % with nothing shed
    assert [d.action for d in decisions] == [
        PressureAction.LOWER_FRAMERATE,
        PressureAction.RETIRE_RUNG,
    ]
    lowered, retired = decisions
    # At or above 85 % from the first sample: the first step after the 2 s hold.
    assert lowered.at == 2.0
    assert (lowered.framerate, lowered.retired_rungs, lowered.level) == (15, (), 1)
    assert lowered.reason == "CPU 100% at or above 85% for 2.0 s: frame rate 30 -> 15 fps"
    # 85 % after it: the next step, once the first has had its settle time.
    assert retired.at == lowered.at + policy.config.settle_s
    assert (retired.framerate, retired.retired_rungs, retired.level) == (15, (0,), 2)
    assert retired.reason.endswith("rung 0 retired")
    # 55 % with two steps shed: nothing more, though a third step is there to take.
    assert policy.level == 2 and not policy.saturated


def test_keeps_shedding_to_the_lowest_rung_and_never_retires_it() -> None:
    policy = PressurePolicy(framerate=30, rungs=3, now=0.0)
    decisions = drive(policy, lambda t: 100.0, 0.0, 120.0)
    assert [(d.action, d.retired_rungs) for d in decisions] == [
        (PressureAction.LOWER_FRAMERATE, ()),
        (PressureAction.RETIRE_RUNG, (0,)),
        (PressureAction.RETIRE_RUNG, (0, 1)),
    ]
    assert policy.saturated and policy.current_framerate == 15


def test_one_busy_sample_does_not_shed() -> None:
    policy = PressurePolicy(framerate=30, rungs=3, now=0.0)
    decisions = drive(policy, lambda t: 45.0 if t == 10.0 else 0.0, 0.0, 30.0)
    # 100 % for one sample among 55 % ones: the smoothing keeps it under 85 %.
    assert decisions == []
    assert policy.cpu_percent is not None and policy.cpu_percent < 60


def test_late_frames_shed_a_step_at_once() -> None:
    policy = PressurePolicy(framerate=30, rungs=3, now=0.0)
    late = lambda t: 3 if 5.0 <= t <= 7.0 else 0  # noqa: E731
    decisions = drive(policy, lambda t: 20.0, 0.0, 10.0, late=late)
    # 75 % CPU: only the lateness shed, and once: the frames late at 6 and 7 s came before the
    # step had its settle time to show.
    [decision] = decisions
    assert decision.at == 5.0 and decision.late_frames == 3
    assert decision.action is PressureAction.LOWER_FRAMERATE
    assert decision.reason == "3 frames came out late: frame rate 30 -> 15 fps"


def test_restores_in_reverse_order_once_the_load_passes() -> None:
    policy = PressurePolicy(framerate=30, rungs=3, now=0.0)
    decisions = drive(policy, lambda t: 45.0 if t < 30 else 0.0, 0.0, 120.0)
    assert [d.action for d in decisions] == [
        PressureAction.LOWER_FRAMERATE,
        PressureAction.RETIRE_RUNG,
        PressureAction.RESTORE_RUNG,
        PressureAction.RESTORE_FRAMERATE,
    ]
    restore_rung, restore_rate = decisions[2:]
    # 55 % with both steps in force, under 60 % from t = 8 on; but rung 0 saved 29 points,
    # which fit under 80 % only once the load went at t = 30.  The frame rate comes back a
    # full exit hold after the next sample (each restore starts the hold again).
    assert restore_rung.at == 30.0
    assert restore_rate.at == restore_rung.at + 1.0 + policy.config.exit_hold_s
    assert "the 29 points the step saved fit: rung 0 restored" in restore_rung.reason
    assert restore_rate.reason.endswith("frame rate 15 -> 30 fps")
    assert (policy.level, policy.current_framerate, policy.retired_rungs) == (0, 30, ())


@pytest.mark.parametrize(
    ("background", "restored"),
    [
        # Both steps in force: background + 10 %.  Rung 0 saved 30 points (measured 29).
        (10.0, [PressureAction.RESTORE_RUNG, PressureAction.RESTORE_FRAMERATE]),
        # 40 % (under 60 %), 69 % with rung 0: it fits under 80 %.  Then 70 %: over 60 %.
        (30.0, [PressureAction.RESTORE_RUNG]),
        # 55 % (under 60 %), but 84 % with rung 0: it would be shed again at once.  No flip.
        (45.0, []),
    ],
)
def test_a_step_is_restored_only_if_its_saving_fits(
    background: float, restored: list[PressureAction]
) -> None:
    policy = PressurePolicy(framerate=30, rungs=3, now=0.0)
    decisions = drive(policy, lambda t: 45.0 if t < 20 else background, 0.0, 300.0)
    shed = [PressureAction.LOWER_FRAMERATE, PressureAction.RETIRE_RUNG]
    assert [d.action for d in decisions] == shed + restored


def test_a_restore_undone_at_once_doubles_the_restore_hold() -> None:
    """A load that comes back with every restore and lasts 8 s (the step's measured saving is
    right; the load is not the step's): each restore is undone, and the policy waits twice
    as long before the next, instead of flipping every half minute."""
    config = PressureConfig()
    policy = PressurePolicy(framerate=30, rungs=1, now=0.0, config=config)  # one step: the rate
    restores: list[float] = []
    sheds: list[float] = []
    now = 0.0
    while now <= 600.0:
        background = 80.0 if now < 20 else 30.0
        if restores and now - restores[-1] < 8.0:
            background += 45.0
        cpu = background + (15.0 if policy.level == 0 else 0.0)
        decision = policy.on_sample(cpu, now)
        if decision is not None:
            is_restore = decision.action is PressureAction.RESTORE_FRAMERATE
            (restores if is_restore else sheds).append(decision.at)
        now += 1.0
    assert len(sheds) == len(restores) + 1  # every restore undone, and the last shed stays
    # The first restore after the base exit hold of 10 s (under 60 % from t = 20); each later
    # one once the load has passed (8 s after the restore before) and the hold has run: 20 s,
    # then 40, 80 and 120, the maximum.
    assert restores[0] == 20.0 + config.exit_hold_s
    holds = [restore - (previous + 8.0) for previous, restore in itertools.pairwise(restores)]
    assert holds == [20.0, 40.0, 80.0, 120.0, 120.0, 120.0]
    # Without the back-off: a flip every 13 s, more than 40 of them.


def test_nothing_to_shed_makes_no_decisions() -> None:
    policy = PressurePolicy(framerate=15, rungs=1, now=0.0)  # at the minimum frame rate
    assert policy.saturated
    assert drive(policy, lambda t: 100.0, 0.0, 30.0, late=lambda t: 5) == []


def test_decisions_are_kept_for_the_stats() -> None:
    policy = PressurePolicy(framerate=30, rungs=3, now=0.0, history=2)
    drive(policy, lambda t: 100.0, 0.0, 120.0)  # three steps
    assert [d.level for d in policy.decisions] == [2, 3]  # the latest two


@pytest.mark.parametrize(
    "config",
    [
        {"enter_percent": 60.0, "exit_percent": 70.0},
        {"enter_percent": 101.0},
        {"enter_hold_s": 0.0},
        {"exit_hold_s": 30.0, "max_exit_hold_s": 20.0},
        {"min_framerate": 0},
    ],
)
def test_bad_configuration_is_refused(config: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        PressureConfig(**config)  # type: ignore[arg-type]


def test_bad_samples_are_refused() -> None:
    policy = PressurePolicy(framerate=30, rungs=2, now=0.0)
    with pytest.raises(ConfigError):
        policy.on_sample(120.0, 1.0)
    with pytest.raises(ConfigError):
        policy.on_sample(50.0, 1.0, late_frames=-1)
    with pytest.raises(ConfigError):
        PressurePolicy(framerate=0, rungs=2, now=0.0)
