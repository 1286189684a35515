"""When a viewer should give up on a silent server, and how it tries to come back (sans-I/O).

Theory of operation
===================

A sender shard that is SIGKILLed (or whose node vanishes) sends its viewers no
CONNECTION_CLOSE, and a shard that takes over its port cannot end their connections for it:
aioquic never matches a stateless reset (RFC 9000 §10.3) against the token it stored, so the
one signal QUIC has for "this server lost your connection" is ignored.  Without more, a viewer
notices only at its QUIC idle timeout (RFC 9000 §10.1; 5 s here), far past the 3 s in which
viewers should be watching again.

What the server guarantees to send is known, so silence says more than QUIC's idle timer can:
once a track has carried a packet on a connection, the shard sends that track's RTCP sender
report every :data:`shared.rtp.sender.SR_INTERVAL_S` (0.5 s; RFC 3550 §6.2 lets the interval
vary from 0.5 to 1.5 times its mean, but this sender never waits longer than the interval
plus its loop's lag, and may go up to ``SR_EARLY_S`` early), whether or not frames flow: a
paused stream, a rung the viewer is held on, a congested viewer skipped to a keyframe, all
still get their SRs.  So once media has arrived on a connection, :data:`SILENCE_BOUND_S`
(:data:`MISSED_REPORTS` report intervals) without a single QUIC datagram from the server (media,
SR, an ACK of the viewer's own feedback, a control message) means the server is gone.  Inside
the bound fit two SRs in a row lost on the way, or one lost from a shard whose loop wakes up
to 200 ms late each time (``tests/test_liveness.py`` plays both on the real sender core); the
ACKs of the viewer's own RTCP (receiver reports every 0.5 s) come besides.  In stream mode a lost
packet waits for QUIC's retransmission, so the bound is never under three probe timeouts, the
floor RFC 9000 §10.1 sets for an idle timeout for the same reason.

Before the first media packet nothing is owed (a viewer waiting for an operator's approval,
one that joined a paused stream), so the timer is not armed and QUIC's idle timeout remains
the only judge.

The shell stamps every datagram's arrival in the transport (no work per packet here) and arms
one timer at :meth:`SilenceTimer.deadline`; when it fires it passes in the newest arrival and
asks :meth:`SilenceTimer.expired`.  An event loop runs the I/O it has ready before its due
timers, so a viewer whose own loop stalled reads what came meanwhile before it judges the
server: its own stall is not taken for the server's silence.  The core reads no clock.

Coming back: :func:`reconnect_attempts` says how long to wait before each attempt, how long the
attempt may take, and which endpoint it tries (the one that served, then the URL's
alternates in turn).  A dropped viewer's server is usually being replaced at that moment (a
shard taking over the port a second or so after the crash), and while nothing listens on the
port the handshake's Initial packets are lost; within one attempt QUIC resends them on its
probe timer, which doubles each time (RFC 9002 §6.2.1: 0.2, 0.4, 0.8, 1.6 s after the
first), so one long attempt may sit out a second and more after the new server is up.  The
first :data:`QUICK_ATTEMPTS` attempts are therefore short (:data:`QUICK_ATTEMPT_S`, or three
of the old connection's smoothed RTTs on a long path: a handshake takes one, RFC 9001 §4) and
close together, each with a fresh
Initial; after them, attempts take the connect timeout and back off exponentially, as before.
"""

from __future__ import annotations

from collections.abc import Iterator

from shared.errors import ConfigError
from shared.rtp.sender import SR_INTERVAL_S

__all__ = [
    "MISSED_REPORTS",
    "PTO_MULTIPLE",
    "QUICK_ATTEMPTS",
    "SILENCE_BOUND_S",
    "ReconnectAttempt",
    "SilenceTimer",
    "reconnect_attempts",
]

#: Report intervals of silence after which the server is taken for gone.
MISSED_REPORTS = 3
#: How long a viewer that has had media waits without hearing from the server (1.5 s).
SILENCE_BOUND_S = MISSED_REPORTS * SR_INTERVAL_S
#: The bound is never less than this many probe timeouts (RFC 9000 §10.1, RFC 9002 §6.2.1).
PTO_MULTIPLE = 3


class SilenceTimer:
    """Whether the server of one connection has been silent past the bound (module doc)."""

    __slots__ = ("_armed", "_last_heard", "bound_s")

    def __init__(self, bound_s: float = SILENCE_BOUND_S) -> None:
        if not bound_s > 0:
            raise ConfigError(f"the silence bound {bound_s} s must be positive")
        self.bound_s = bound_s
        self._armed = False
        self._last_heard = 0.0

    @property
    def armed(self) -> bool:
        """Media has arrived on this connection: the server now owes its reports."""
        return self._armed

    def reset(self) -> None:
        """A new connection: nothing is owed on it until its first media packet."""
        self._armed = False
        self._last_heard = 0.0

    def heard(self, now: float, *, media: bool = False) -> None:
        """Something arrived from the server at ``now``; ``media``: an RTP or RTCP packet,
        which arms the timer."""
        self._last_heard = max(self._last_heard, now)
        self._armed = self._armed or media

    def bound(self, pto_s: float = 0.0) -> float:
        """The silence allowed: the bound, or three probe timeouts ``pto_s`` if longer."""
        return max(self.bound_s, PTO_MULTIPLE * pto_s)

    def deadline(self, pto_s: float = 0.0) -> float | None:
        """When the server, still silent, is taken for gone (None: not armed)."""
        if not self._armed:
            return None
        return self._last_heard + self.bound(pto_s)

    def expired(self, now: float, pto_s: float = 0.0) -> bool:
        """Whether the server has been silent for longer than the bound at ``now``."""
        deadline = self.deadline(pto_s)
        return deadline is not None and now >= deadline


#: Short attempts made first after a drop, a fresh handshake each (module doc).
QUICK_ATTEMPTS = 6
#: How long a quick attempt waits for its handshake (at least; see :func:`reconnect_attempts`).
QUICK_ATTEMPT_S = 0.5
#: The pause before each quick attempt.
QUICK_DELAY_S = 0.1
#: The backoff after the quick attempts: first pause, and the most it grows to.
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.25, 4.0

#: ``(pause before it, how long it may take, which endpoint: an offset from the one that
#: served last)``.
ReconnectAttempt = tuple[float, float, int]


def reconnect_attempts(
    endpoints: int, *, rtt_s: float = 0.0, timeout_s: float = 10.0
) -> Iterator[ReconnectAttempt]:
    """The attempts to reconnect after a drop, endless (the shell stops at its deadline):
    :data:`QUICK_ATTEMPTS` short ones, then ``timeout_s`` each with exponential backoff,
    growing once every one of the ``endpoints`` has failed.  ``rtt_s``: the dropped
    connection's smoothed RTT, which stretches a quick attempt on a long path.  (Not its probe
    timeout: on a busy machine its RTT variance swells that past a second.)"""
    if endpoints < 1:
        raise ConfigError("a viewer needs an endpoint to reconnect to")
    quick = min(max(QUICK_ATTEMPT_S, 3 * rtt_s), timeout_s)
    attempt = 0
    for _ in range(QUICK_ATTEMPTS):
        yield QUICK_DELAY_S, quick, attempt
        attempt += 1
    delay = BACKOFF_FIRST_S
    while True:
        yield delay, timeout_s, attempt
        attempt += 1
        if attempt % endpoints == 0:
            delay = min(delay * 2, BACKOFF_MAX_S)
