"""The crash-loop decision (``shared.control.restart_policy``) with literal times."""

from __future__ import annotations

import pytest

from shared.control.restart_policy import RestartPolicy
from shared.errors import ConfigError


def test_restarts_up_to_the_limit_then_calls_it_a_crash_loop() -> None:
    policy = RestartPolicy(max_restarts=3, window_s=10.0)
    decisions = [policy.crashed("capture", now, "ActorDiedError") for now in (100.0, 100.5, 101.0)]
    assert [d.restart for d in decisions] == [True, True, True]
    assert [d.crashes for d in decisions] == [1, 2, 3]
    loop = policy.crashed("capture", 101.5, "ActorDiedError: SIGKILL")
    assert not loop.restart
    assert loop.crashes == 4
    assert "capture crashed 4 times within 10 s" in loop.reason
    assert "SIGKILL" in loop.reason
    assert policy.restarts == {"capture": 3}


def test_crashes_leave_the_window_and_are_forgotten() -> None:
    policy = RestartPolicy(max_restarts=2, window_s=10.0)
    assert policy.crashed("encoder", 0.0).restart
    assert policy.crashed("encoder", 5.0).restart
    assert policy.next_deadline() == 10.0
    # The first crash leaves the window at 10 s: at 10.0 two are counted again, not three.
    assert policy.crashes("encoder", 10.0) == 1
    assert policy.crashed("encoder", 10.0).restart
    assert not policy.crashed("encoder", 14.9).restart  # 5.0, 10.0, 14.9: three within 10 s
    # A stage crashing once a day is restarted every time.
    daily = RestartPolicy(max_restarts=1, window_s=60.0)
    assert all(daily.crashed("shard", day * 86_400.0).restart for day in range(5))


def test_kinds_are_counted_apart() -> None:
    policy = RestartPolicy(max_restarts=1, window_s=30.0)
    assert policy.crashed("capture", 1.0).restart
    assert policy.crashed("encoder", 1.1).restart
    assert policy.crashed("quality", 1.2).restart
    assert not policy.crashed("encoder", 1.3).restart
    assert policy.crashes("capture", 1.3) == 1
    assert policy.next_deadline() == 31.0


def test_nonsense_limits_are_refused() -> None:
    with pytest.raises(ConfigError, match="max_restarts 0"):
        RestartPolicy(max_restarts=0)
    with pytest.raises(ConfigError, match="window"):
        RestartPolicy(window_s=0.0)
