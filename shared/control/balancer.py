"""ConnectionBalancer: which sender shard takes a new viewer, when to start one, when to retire one.

Theory of operation
===================

A stream's viewers are served by sender *shards*: each one process serving many viewers on one
event loop, each on its own UDP port.  The supervisor measures every shard (CPU in cores, bytes
per second) and counts its viewers from the ``ViewerRegistry`` (``shared.control.registry``),
then asks this module, with ``now`` passed in, three questions:

- where does a new viewer go (:meth:`ConnectionBalancer.choose`)?
- which idle shards can stop (:meth:`ConnectionBalancer.retire`), and when to ask again
  (:meth:`ConnectionBalancer.next_deadline`)?
- may another viewer connect this instant (:class:`ConnectionRateLimiter`)?

Placement, in order (:meth:`~ConnectionBalancer.choose`)::

    stream at max_viewers_per_stream               -> Refuse(limit=STREAM)
    some shard below max_viewers_per_shard
      and below scale_up_cpu                       -> UseShard(the least loaded of those)
    a shard is being started (starting > 0)        -> WaitForShard()
    shards + starting < max_shards                 -> StartShard()
    some shard below max_viewers_per_shard         -> UseShard(the least loaded of those)
    otherwise                                      -> Refuse(limit=SHARD)

"Least loaded" orders by measured CPU, then bytes per second, then viewers, then shard id, so
equal shards always give the same answer.  A shard at ``scale_up_cpu`` or above is *busy*: it
still takes viewers when no shard can be started, because a viewer served a little late beats
one refused while there are seats.

Why :class:`WaitForShard` (a fourth answer beside use/start/refuse): a shard being started has
no load to measure and no id the balancer knows, yet it will have room for
``max_viewers_per_shard`` viewers.  A second viewer arriving while the first one's shard starts
must not start another shard (two quick arrivals would start two), nor be refused (seats are
coming), nor be put on a busy shard the new one was started to relieve.  It waits for the start
and asks again, when the new shard is in ``loads``.  A supervisor that lists a starting shard in
``loads`` itself (zero CPU, its pending tickets as viewers) passes ``starting=0`` and gets
``UseShard`` for it instead.

``ShardLoad.viewers`` must count the seats a shard has promised, not only live connections:
pending tickets and unidentified connections too (``ViewerRegistry.per_shard()`` counts exactly
these), or a burst of tickets could overfill a shard before any of them connects.

Retirement: a shard with no viewers since ``idle_since`` for at least ``retire_after_s`` stops,
unless that would leave fewer than ``min_shards``.  Among idle shards the most recently started
retire first and the oldest stay: the oldest is the one the stream started with, proven to work,
and keeping it keeps the stream's first port stable for viewers that reconnect.  The supervisor
removes a retiring shard from the ``loads`` it passes to ``choose`` before stopping it, so no
ticket names a shard that is going away.

The connection rate limit is a token bucket (``burst`` tokens, refilled at ``rate_per_s``):
a crowd arriving at once costs TLS handshakes on the shards' event loops, so arrivals are
spread out and a refused viewer is told when to try again.

Driving it from a supervisor (a sketch; ``registry`` is the stream's ``ViewerRegistry``)::

    if not limiter.admit(now):
        refuse(limiter.refusal(now, stream_name=name))
    counts = registry.per_shard()
    loads = [ShardLoad(shard_id=s, viewers=counts[s].viewers, idle_since=counts[s].idle_since,
                       cpu_cores=..., bytes_per_s=..., started_at=...) for s in running]
    match balancer.choose(loads, registry.stream_viewers(), len(starting), stream_name=name):
        case UseShard(shard_id):  ticket for shard_id; registry.register(viewer, peer, shard_id, now)
        case StartShard():        start a shard; registry.add_shard(it, now); ticket for it
        case WaitForShard():      await the starting shard, then choose again
        case Refuse(reason, limit): refuse(reason)

and on one timer, at the earlier of ``balancer.next_deadline(loads)`` and
``registry.next_deadline()`` (either may be None): stop the shards ``balancer.retire(loads,
now)`` names (``registry.shard_lost`` for each), and call ``registry.expire(now)``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import msgspec

from shared.errors import ConfigError

__all__ = [
    "BalancerPolicy",
    "ConnectionBalancer",
    "ConnectionRateLimiter",
    "Placement",
    "RefusalLimit",
    "Refuse",
    "ShardLoad",
    "StartShard",
    "UseShard",
    "WaitForShard",
    "heir",
]

#: Tokens are compared with this slack: 0.1 s (0.7 - 0.6) at 10/s is 0.9999999999999998 tokens.
_TOKEN_EPSILON = 1e-9


class ShardLoad(msgspec.Struct, frozen=True, kw_only=True):
    """One running shard as the supervisor measured it."""

    shard_id: str
    #: Seats taken: live viewers, pending tickets and unidentified connections.
    viewers: int
    #: Of those, the connections it serves now (no pending ticket, no viewer away).
    live: int = 0
    #: Measured CPU of the shard process, in cores (0.35 = 35 % of one core).
    cpu_cores: float
    #: Bytes per second the shard sends, all viewers together.
    bytes_per_s: float
    #: Monotonic time the shard started.
    started_at: float
    #: Monotonic time its viewer count last became 0; None while it has viewers.  A shard
    #: counts as idle only when ``viewers == 0`` and this is set.
    idle_since: float | None = None

    def __post_init__(self) -> None:
        if not self.shard_id:
            raise ConfigError("a shard needs a non-empty id")
        if self.viewers < 0:
            raise ConfigError(f"shard {self.shard_id}: viewer count {self.viewers} is negative")
        if not (self.cpu_cores >= 0 and math.isfinite(self.cpu_cores)):
            raise ConfigError(f"shard {self.shard_id}: CPU {self.cpu_cores} cores is impossible")
        if not (self.bytes_per_s >= 0 and math.isfinite(self.bytes_per_s)):
            raise ConfigError(f"shard {self.shard_id}: {self.bytes_per_s} bytes/s is impossible")


class BalancerPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """The limits a stream's shards work within."""

    #: Most shards a stream runs at once.
    max_shards: int = 4
    #: Most viewers (seats) one shard takes.
    max_viewers_per_shard: int = 250
    #: Most viewers one stream takes, across its shards.
    max_viewers_per_stream: int = 1000
    #: A shard using this much CPU (cores) or more is busy: new viewers go elsewhere, or to a
    #: new shard.  Below one core, so a shard's event loop keeps slack for its own timers.
    scale_up_cpu: float = 0.6
    #: A shard with no viewers for this long (seconds) is retired.
    retire_after_s: float = 30.0
    #: Never retire below this many shards (0 lets an unwatched stream run no shard at all).
    min_shards: int = 1

    def __post_init__(self) -> None:
        if self.max_shards < 1:
            raise ConfigError(f"max_shards {self.max_shards} must be at least 1")
        if self.max_viewers_per_shard < 1:
            raise ConfigError(
                f"max_viewers_per_shard {self.max_viewers_per_shard} must be at least 1"
            )
        if self.max_viewers_per_stream < 1:
            raise ConfigError(
                f"max_viewers_per_stream {self.max_viewers_per_stream} must be at least 1"
            )
        if not (self.scale_up_cpu > 0 and math.isfinite(self.scale_up_cpu)):
            raise ConfigError(
                f"scale_up_cpu {self.scale_up_cpu} must be a positive number of cores"
            )
        if not (self.retire_after_s >= 0 and math.isfinite(self.retire_after_s)):
            raise ConfigError(f"retire_after_s {self.retire_after_s} must be >= 0 seconds")
        if not 0 <= self.min_shards <= self.max_shards:
            raise ConfigError(
                f"min_shards {self.min_shards} must be between 0 and max_shards ({self.max_shards})"
            )


class RefusalLimit(enum.StrEnum):
    """Which limit refused a viewer (the value is what a client or a log shows)."""

    STREAM = "stream"  # max_viewers_per_stream
    SHARD = "shard"  # every shard at max_viewers_per_shard and no more may start
    RATE = "rate"  # the connection rate limit


class UseShard(msgspec.Struct, frozen=True, tag="use"):
    """Give the viewer a ticket for this running shard."""

    shard_id: str


class StartShard(msgspec.Struct, frozen=True, tag="start"):
    """Start a new shard (the supervisor names it) and give the viewer a ticket for it."""


class WaitForShard(msgspec.Struct, frozen=True, tag="wait"):
    """A shard is starting and will have room: wait for it, then ``choose`` again."""


class Refuse(msgspec.Struct, frozen=True, tag="refuse"):
    """Turn the viewer away; ``reason`` is written for the person at the viewer."""

    reason: str
    limit: RefusalLimit


Placement = UseShard | StartShard | WaitForShard | Refuse


def _subject(stream_name: str | None) -> str:
    return f"stream {stream_name}" if stream_name else "the stream"


def heir(loads: Sequence[ShardLoad]) -> ShardLoad | None:
    """The survivor to take a dead shard's ports (its viewers are about to reconnect there):
    the fewest live connections, then CPU, then traffic.  Not CPU first: at a few viewers a
    shard's CPU sample is too small and noisy a figure to rank by on its own."""
    if not loads:
        return None
    return min(loads, key=lambda s: (s.live, s.cpu_cores, s.bytes_per_s, s.shard_id))


def _least_loaded(loads: Sequence[ShardLoad]) -> ShardLoad:
    return min(loads, key=lambda s: (s.cpu_cores, s.bytes_per_s, s.viewers, s.shard_id))


class ConnectionBalancer:
    """Placement and retirement decisions for one stream's shards; holds no state but its policy."""

    def __init__(self, policy: BalancerPolicy | None = None) -> None:
        self._policy = policy if policy is not None else BalancerPolicy()

    @property
    def policy(self) -> BalancerPolicy:
        return self._policy

    def choose(
        self,
        loads: Sequence[ShardLoad],
        stream_viewers: int,
        starting: int = 0,
        *,
        stream_name: str | None = None,
    ) -> Placement:
        """Where a new viewer goes.

        ``stream_viewers``: seats the stream has now (``ViewerRegistry.stream_viewers()``),
        not counting this viewer.  ``starting``: shards being started that are not in ``loads``.
        ``stream_name`` only reads in a refusal's reason.
        """
        policy = self._policy
        if stream_viewers < 0:
            raise ConfigError(f"stream viewer count {stream_viewers} is negative")
        if starting < 0:
            raise ConfigError(f"starting shard count {starting} is negative")
        ids = [load.shard_id for load in loads]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"a shard is listed twice in {sorted(ids)}")
        if stream_viewers >= policy.max_viewers_per_stream:
            return Refuse(
                reason=(
                    f"{_subject(stream_name)} is full: it has {stream_viewers} viewers, "
                    f"the most one stream takes is {policy.max_viewers_per_stream}"
                ),
                limit=RefusalLimit.STREAM,
            )
        with_seats = [s for s in loads if s.viewers < policy.max_viewers_per_shard]
        ready = [s for s in with_seats if s.cpu_cores < policy.scale_up_cpu]
        if ready:
            return UseShard(_least_loaded(ready).shard_id)
        if starting > 0:
            return WaitForShard()
        if len(loads) < policy.max_shards:
            return StartShard()
        if with_seats:
            return UseShard(_least_loaded(with_seats).shard_id)
        return Refuse(
            reason=(
                f"{_subject(stream_name)} is full: {len(loads)} shards with "
                f"{policy.max_viewers_per_shard} viewers each, and it may run no more than "
                f"{policy.max_shards} shards"
            ),
            limit=RefusalLimit.SHARD,
        )

    def _idle(self, loads: Sequence[ShardLoad]) -> list[ShardLoad]:
        return [s for s in loads if s.viewers == 0 and s.idle_since is not None]

    def retire(self, loads: Sequence[ShardLoad], now: float) -> list[str]:
        """Shards to stop now: idle for ``retire_after_s``, youngest first, keeping
        ``min_shards`` shards (busy or not) running."""
        spare = len(loads) - self._policy.min_shards
        if spare <= 0:
            return []
        due = [
            s
            for s in self._idle(loads)
            if s.idle_since is not None and now - s.idle_since >= self._policy.retire_after_s
        ]
        # Youngest first; ties by id, so the same loads always retire the same shards.
        due.sort(key=lambda s: (-s.started_at, s.shard_id))
        return [s.shard_id for s in due[:spare]]

    def next_deadline(self, loads: Sequence[ShardLoad]) -> float | None:
        """When :meth:`retire` could next return a shard, if nothing else changes; None if no
        shard is idle or there are no spare shards.  A time already past means "now"."""
        if len(loads) <= self._policy.min_shards:
            return None
        deadlines = [
            s.idle_since + self._policy.retire_after_s
            for s in self._idle(loads)
            if s.idle_since is not None
        ]
        return min(deadlines, default=None)


class ConnectionRateLimiter:
    """A token bucket of new connections: ``burst`` at once, then ``rate_per_s`` a second.

    The bucket starts full at the first call's ``now``.  Time that goes backwards (a caller
    mixing clocks) adds no tokens rather than raising.
    """

    def __init__(self, rate_per_s: float, burst: int) -> None:
        if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
            raise ConfigError(f"connection rate {rate_per_s} per second must be a positive number")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ConfigError(f"connection burst {burst!r} must be a whole number, at least 1")
        self._rate = float(rate_per_s)
        self._burst = burst
        self._tokens = float(burst)
        self._last: float | None = None

    @property
    def rate_per_s(self) -> float:
        return self._rate

    @property
    def burst(self) -> int:
        return self._burst

    def _available(self, now: float) -> float:
        if self._last is None:
            return float(self._burst)
        elapsed = max(0.0, now - self._last)
        return min(float(self._burst), self._tokens + elapsed * self._rate)

    def admit(self, now: float) -> bool:
        """Take a token if there is one: True lets the connection in."""
        tokens = self._available(now)
        self._tokens = tokens
        self._last = now if self._last is None else max(self._last, now)
        if tokens + _TOKEN_EPSILON >= 1.0:
            self._tokens = max(0.0, tokens - 1.0)
            return True
        return False

    def retry_after(self, now: float) -> float:
        """Seconds from ``now`` until :meth:`admit` would let a connection in (0 if now)."""
        missing = 1.0 - self._available(now)
        if missing <= _TOKEN_EPSILON:
            return 0.0
        return missing / self._rate

    def refusal(self, now: float, *, stream_name: str | None = None) -> Refuse:
        """The refusal for a connection :meth:`admit` turned away, saying when to retry
        (rounded up to a tenth of a second, so a client that waits that long gets in)."""
        retry = math.ceil(self.retry_after(now) * 10 - _TOKEN_EPSILON) / 10
        return Refuse(
            reason=(
                f"too many viewers are connecting to {_subject(stream_name)}: at most "
                f"{self._rate:g} per second (bursts of {self._burst}); try again in "
                f"{retry:.1f} s"
            ),
            limit=RefusalLimit.RATE,
        )
