"""ConnectionBalancer and ConnectionRateLimiter: pure decisions, literal times."""

from __future__ import annotations

import msgspec
import pytest

from shared.control.balancer import (
    BalancerPolicy,
    ConnectionBalancer,
    ConnectionRateLimiter,
    Placement,
    RefusalLimit,
    Refuse,
    ShardLoad,
    StartShard,
    UseShard,
    WaitForShard,
    heir,
)
from shared.errors import ConfigError


def shard(
    shard_id: str,
    *,
    viewers: int = 10,
    cpu: float = 0.1,
    bps: float = 1e6,
    started_at: float = 0.0,
    idle_since: float | None = None,
) -> ShardLoad:
    return ShardLoad(
        shard_id=shard_id,
        viewers=viewers,
        cpu_cores=cpu,
        bytes_per_s=bps,
        started_at=started_at,
        idle_since=idle_since,
    )


def small_policy(**overrides: object) -> BalancerPolicy:
    fields: dict[str, object] = {
        "max_shards": 2,
        "max_viewers_per_shard": 3,
        "max_viewers_per_stream": 10,
        "scale_up_cpu": 0.6,
        "retire_after_s": 30.0,
        "min_shards": 1,
    }
    fields.update(overrides)
    return BalancerPolicy(**fields)  # type: ignore[arg-type]


# -- placement -------------------------------------------------------------------------------


def test_new_viewer_lands_on_the_least_cpu_loaded_shard() -> None:
    balancer = ConnectionBalancer()
    loads = [shard("a", cpu=0.30), shard("b", cpu=0.12), shard("c", cpu=0.25)]
    assert balancer.choose(loads, stream_viewers=30) == UseShard("b")


def test_cpu_ties_break_on_bytes_then_viewers_then_id() -> None:
    balancer = ConnectionBalancer()
    by_bytes = [shard("a", cpu=0.2, bps=3e6), shard("b", cpu=0.2, bps=2e6)]
    assert balancer.choose(by_bytes, stream_viewers=20) == UseShard("b")
    # Bytes outrank viewers: fewer viewers sending more (higher rungs) cost more.
    bytes_over_viewers = [
        shard("a", cpu=0.2, bps=2e6, viewers=12),
        shard("b", cpu=0.2, bps=3e6, viewers=11),
    ]
    assert balancer.choose(bytes_over_viewers, stream_viewers=23) == UseShard("a")
    by_viewers = [shard("a", cpu=0.2, viewers=12), shard("b", cpu=0.2, viewers=11)]
    assert balancer.choose(by_viewers, stream_viewers=23) == UseShard("b")
    identical = [shard("b"), shard("a"), shard("c")]
    assert balancer.choose(identical, stream_viewers=30) == UseShard("a")
    # The answer does not depend on the order the supervisor lists its shards in.
    assert balancer.choose(list(reversed(identical)), stream_viewers=30) == UseShard("a")


def test_a_busy_or_full_shard_is_passed_over_for_one_with_room() -> None:
    balancer = ConnectionBalancer(small_policy(max_shards=3))
    loads = [
        shard("busy", viewers=1, cpu=0.6),  # at the CPU threshold: busy
        shard("full", viewers=3, cpu=0.0),  # at max_viewers_per_shard, though idle on CPU
        shard("room", viewers=2, cpu=0.5),
    ]
    assert balancer.choose(loads, stream_viewers=6) == UseShard("room")


def test_a_shard_is_started_when_every_shard_is_busy() -> None:
    balancer = ConnectionBalancer(small_policy())
    loads = [shard("a", viewers=1, cpu=0.7)]
    assert balancer.choose(loads, stream_viewers=1) == StartShard()


def test_a_shard_exactly_at_the_cpu_threshold_is_busy() -> None:
    balancer = ConnectionBalancer(small_policy(scale_up_cpu=0.6))
    assert balancer.choose([shard("a", viewers=1, cpu=0.6)], stream_viewers=1) == StartShard()
    assert balancer.choose([shard("a", viewers=1, cpu=0.59)], stream_viewers=1) == UseShard("a")


def test_no_shard_at_all_starts_one() -> None:
    assert ConnectionBalancer().choose([], stream_viewers=0) == StartShard()


def test_starting_shard_makes_the_next_viewer_wait_instead_of_starting_another() -> None:
    balancer = ConnectionBalancer(small_policy(max_shards=4))
    loads = [shard("a", viewers=3, cpu=0.7)]
    assert balancer.choose(loads, stream_viewers=3, starting=0) == StartShard()
    # A second viewer arrives before that shard is up: it waits, it does not start a second.
    assert balancer.choose(loads, stream_viewers=4, starting=1) == WaitForShard()


def test_starting_shard_is_waited_for_rather_than_crowding_a_busy_shard() -> None:
    balancer = ConnectionBalancer(small_policy(max_shards=2))
    loads = [shard("a", viewers=1, cpu=0.9)]
    assert balancer.choose(loads, stream_viewers=1, starting=1) == WaitForShard()
    # A shard with room and CPU to spare is used at once even while another starts.
    loads = [shard("a", viewers=1, cpu=0.9), shard("b", viewers=1, cpu=0.1)]
    assert balancer.choose(loads, stream_viewers=2, starting=1) == UseShard("b")


def test_at_max_shards_a_busy_shard_with_seats_takes_the_viewer() -> None:
    balancer = ConnectionBalancer(small_policy(max_shards=2))
    loads = [shard("a", viewers=2, cpu=0.9), shard("b", viewers=2, cpu=0.8)]
    assert balancer.choose(loads, stream_viewers=4) == UseShard("b")
    # A full shard is not a candidate, however light its CPU.
    loads = [shard("a", viewers=3, cpu=0.61), shard("b", viewers=2, cpu=0.95)]
    assert balancer.choose(loads, stream_viewers=5) == UseShard("b")


def test_refused_when_every_shard_is_full_and_no_more_may_start() -> None:
    balancer = ConnectionBalancer(small_policy(max_shards=2, max_viewers_per_shard=3))
    loads = [shard("a", viewers=3, cpu=0.2), shard("b", viewers=3, cpu=0.2)]
    placement = balancer.choose(loads, stream_viewers=6, stream_name="demo")
    assert isinstance(placement, Refuse)
    assert placement.limit is RefusalLimit.SHARD
    assert placement.reason == (
        "stream demo is full: 2 shards with 3 viewers each, and it may run no more than 2 shards"
    )


def test_refused_when_the_stream_is_at_its_viewer_limit_even_with_room_on_shards() -> None:
    balancer = ConnectionBalancer(small_policy(max_viewers_per_stream=5))
    loads = [shard("a", viewers=0, cpu=0.0)]
    assert balancer.choose(loads, stream_viewers=4) == UseShard("a")
    placement = balancer.choose(loads, stream_viewers=5)
    assert isinstance(placement, Refuse)
    assert placement.limit is RefusalLimit.STREAM
    assert placement.reason == (
        "the stream is full: it has 5 viewers, the most one stream takes is 5"
    )


def test_placements_cross_process_boundaries_as_tagged_json() -> None:
    for placement in (
        UseShard("a"),
        StartShard(),
        WaitForShard(),
        Refuse(reason="full", limit=RefusalLimit.SHARD),
    ):
        wire = msgspec.json.encode(placement)
        assert msgspec.json.decode(wire, type=Placement) == placement
    assert msgspec.json.decode(
        b'{"type":"refuse","reason":"x","limit":"rate"}', type=Placement
    ) == (Refuse(reason="x", limit=RefusalLimit.RATE))


def test_bad_choose_arguments_are_config_errors() -> None:
    balancer = ConnectionBalancer()
    with pytest.raises(ConfigError, match="negative"):
        balancer.choose([], stream_viewers=-1)
    with pytest.raises(ConfigError, match="negative"):
        balancer.choose([], stream_viewers=0, starting=-1)
    with pytest.raises(ConfigError, match="listed twice"):
        balancer.choose([shard("a"), shard("a")], stream_viewers=0)


# -- retirement ------------------------------------------------------------------------------


def test_an_idle_shard_retires_after_retire_after_s_and_not_before() -> None:
    balancer = ConnectionBalancer(small_policy(retire_after_s=30.0))
    loads = [shard("a", started_at=0.0), shard("b", viewers=0, started_at=5.0, idle_since=100.0)]
    assert balancer.next_deadline(loads) == 130.0
    assert balancer.retire(loads, now=129.9) == []
    assert balancer.retire(loads, now=130.0) == ["b"]


def test_a_shard_with_viewers_or_no_idle_time_never_retires() -> None:
    balancer = ConnectionBalancer(small_policy(retire_after_s=30.0))
    loads = [
        shard("a", started_at=0.0),
        shard("b", viewers=2, started_at=1.0, idle_since=0.0),  # idle_since is stale: busy
        shard("c", viewers=0, started_at=2.0, idle_since=None),  # idle time not known yet
    ]
    assert balancer.retire(loads, now=1000.0) == []
    assert balancer.next_deadline(loads) is None


def test_retirement_keeps_min_shards_and_the_oldest() -> None:
    balancer = ConnectionBalancer(small_policy(max_shards=4, min_shards=2, retire_after_s=10.0))
    loads = [
        shard("old", viewers=0, started_at=0.0, idle_since=50.0),
        shard("mid", viewers=0, started_at=10.0, idle_since=50.0),
        shard("new", viewers=0, started_at=20.0, idle_since=50.0),
    ]
    assert balancer.retire(loads, now=60.0) == ["new"]
    remaining = [s for s in loads if s.shard_id != "new"]
    assert balancer.retire(remaining, now=1000.0) == []
    assert balancer.next_deadline(remaining) is None


def test_busy_shards_count_toward_min_shards() -> None:
    balancer = ConnectionBalancer(small_policy(max_shards=4, min_shards=1, retire_after_s=10.0))
    loads = [
        shard("busy", viewers=3, started_at=30.0),
        shard("x", viewers=0, started_at=0.0, idle_since=0.0),
        shard("y", viewers=0, started_at=10.0, idle_since=5.0),
    ]
    # Both idle shards may go: the busy one keeps the stream at min_shards.
    assert balancer.retire(loads, now=15.0) == ["y", "x"]
    # Before y's time only x is due.
    assert balancer.retire(loads, now=14.0) == ["x"]
    assert balancer.next_deadline(loads) == 10.0


def test_min_shards_zero_lets_the_last_idle_shard_retire() -> None:
    balancer = ConnectionBalancer(small_policy(min_shards=0, retire_after_s=5.0))
    loads = [shard("a", viewers=0, idle_since=1.0)]
    assert balancer.next_deadline(loads) == 6.0
    assert balancer.retire(loads, now=6.0) == ["a"]
    assert ConnectionBalancer(small_policy(min_shards=1)).retire(loads, now=6.0) == []


# -- policy validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_shards": 0}, "max_shards 0"),
        ({"max_viewers_per_shard": 0}, "max_viewers_per_shard 0"),
        ({"max_viewers_per_stream": -5}, "max_viewers_per_stream -5"),
        ({"scale_up_cpu": 0.0}, "scale_up_cpu 0.0"),
        ({"scale_up_cpu": float("nan")}, "scale_up_cpu nan"),
        ({"retire_after_s": -1.0}, "retire_after_s -1.0"),
        ({"retire_after_s": float("inf")}, "retire_after_s inf"),
        ({"min_shards": 3, "max_shards": 2}, "min_shards 3"),
        ({"min_shards": -1}, "min_shards -1"),
    ],
)
def test_bad_policy_is_a_config_error(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        small_policy(**overrides)


def test_default_policy_is_the_designed_one() -> None:
    policy = BalancerPolicy()
    assert (policy.max_shards, policy.max_viewers_per_shard, policy.max_viewers_per_stream) == (
        4,
        250,
        1000,
    )
    assert (policy.scale_up_cpu, policy.retire_after_s, policy.min_shards) == (0.6, 30.0, 1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"viewers": -1}, "viewer count -1"),
        ({"cpu_cores": -0.1}, "CPU -0.1"),
        ({"bytes_per_s": float("nan")}, "nan bytes/s"),
        ({"shard_id": ""}, "non-empty id"),
    ],
)
def test_impossible_shard_load_is_a_config_error(fields: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "shard_id": "a",
        "viewers": 0,
        "cpu_cores": 0.0,
        "bytes_per_s": 0.0,
        "started_at": 0.0,
    }
    base.update(fields)
    with pytest.raises(ConfigError, match=message):
        ShardLoad(**base)  # type: ignore[arg-type]


# -- connection rate limit -------------------------------------------------------------------


def test_rate_limiter_admits_a_burst_then_refuses() -> None:
    limiter = ConnectionRateLimiter(rate_per_s=2.0, burst=3)
    assert [limiter.admit(100.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.retry_after(100.0) == pytest.approx(0.5)


def test_rate_limiter_refills_at_its_rate_up_to_the_burst() -> None:
    limiter = ConnectionRateLimiter(rate_per_s=10.0, burst=2)
    assert limiter.admit(0.6) and limiter.admit(0.6)
    assert not limiter.admit(0.65)  # half a token
    assert limiter.retry_after(0.65) == pytest.approx(0.05)
    assert limiter.admit(0.7)  # one token after 0.1 s, float rounding notwithstanding
    assert not limiter.admit(0.7)
    # A long quiet spell refills to the burst, no further.
    assert [limiter.admit(100.0) for _ in range(3)] == [True, True, False]


def test_rate_limiter_retry_after_is_zero_when_a_token_is_there() -> None:
    limiter = ConnectionRateLimiter(rate_per_s=1.0, burst=1)
    assert limiter.retry_after(5.0) == 0.0
    assert limiter.admit(5.0)
    assert limiter.retry_after(5.0) == pytest.approx(1.0)
    assert limiter.retry_after(5.75) == pytest.approx(0.25)
    assert limiter.retry_after(6.0) == 0.0
    assert limiter.admit(6.0)


def test_rate_limiter_ignores_time_going_backwards() -> None:
    limiter = ConnectionRateLimiter(rate_per_s=1.0, burst=1)
    assert limiter.admit(10.0)
    assert not limiter.admit(5.0)
    assert not limiter.admit(10.5)
    assert limiter.admit(11.0)


def test_rate_refusal_says_when_to_retry() -> None:
    limiter = ConnectionRateLimiter(rate_per_s=4.0, burst=1)
    assert limiter.admit(0.0)
    assert not limiter.admit(0.0)
    refusal = limiter.refusal(0.0, stream_name="demo")
    assert refusal.limit is RefusalLimit.RATE
    assert refusal.reason == (
        "too many viewers are connecting to stream demo: at most 4 per second "
        "(bursts of 1); try again in 0.3 s"
    )


@pytest.mark.parametrize(
    ("rate", "burst", "message"),
    [
        (0.0, 1, "connection rate 0.0"),
        (float("inf"), 1, "connection rate inf"),
        (float("nan"), 1, "connection rate nan"),
        (1.0, 0, "connection burst 0"),
        (1.0, 1.5, "connection burst 1.5"),
        (1.0, True, "connection burst True"),
    ],
)
def test_bad_rate_limit_is_a_config_error(rate: float, burst: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ConnectionRateLimiter(rate_per_s=rate, burst=burst)


# -- the heir to a dead shard's ports ---------------------------------------------------------


def test_a_dead_shards_ports_go_to_the_survivor_serving_the_fewest_live_connections() -> None:
    # C holds only a ticket nobody used; B serves a viewer.  C's CPU sample happens to read
    # higher (at one viewer CPU is noise): live connections rank first, so C inherits.
    busy = msgspec.structs.replace(shard("B", viewers=1, cpu=0.02, bps=2e5), live=1)
    idle = msgspec.structs.replace(shard("C", viewers=1, cpu=0.03, bps=0.0), live=0)
    chosen = heir([busy, idle])
    assert chosen is not None and chosen.shard_id == "C"


def test_among_equally_live_survivors_the_heir_is_the_least_cpu_then_traffic() -> None:
    a = shard("A", cpu=0.2, bps=1e5)
    b = shard("B", cpu=0.1, bps=9e5)
    c = shard("C", cpu=0.1, bps=1e5)
    chosen = heir([a, b, c])
    assert chosen is not None and chosen.shard_id == "C"
    assert heir([]) is None
