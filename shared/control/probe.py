"""Probing for headroom, sans-I/O: when to send a probe cluster, at what rate, what it found.

A viewer on a low rung is limited by what it is sent, not by its path: the acknowledged rate
is the rung's rate, and GCC never raises its estimate much above what gets through
(draft-ietf-rmcat-gcc-02 §5.5 bounds the increase to 1.5x the incoming rate).  So before a
viewer may go up a rung, the sender finds out whether the path carries more by sending a short
burst of padding at a higher rate, a *probe cluster*, and measuring how fast it was delivered.
This is libwebrtc's probing (``modules/congestion_controller/goog_cc/probe_controller.cc``
decides when and at what rate, ``probe_bitrate_estimator.cc`` turns a cluster's feedback into a
rate); here both halves are one object, :class:`ProbeController`, one job: probing.

Theory of operation
-------------------
*When.*  The caller says on every estimate update what rate it would like confirmed
(:meth:`ProbeController.update`: the rung selector's :meth:`~shared.control.rung_choice.
RungSelector.probe_target`, None when it wants nothing).  A cluster starts when that rate is
above the estimate and no other cluster is out, no sooner than :data:`PROBE_INTERVAL_S` after
the previous probe that fell short.  Each probe that falls short doubles that wait, up to
:data:`MAX_PROBE_INTERVAL_S`, as libwebrtc spaces its periodic probes while the sender is
application-limited (its ALR probing, every 5 s there).  The wait is capped at 2 s here so a
viewer climbs back within the 5 s the project targets after its path recovers; a probe that
finds nothing costs one cluster of ~30 ms at twice the estimate, a queue of at most that
long at the bottleneck, which is why it can afford to be frequent.

*At what rate.*  Exponential, as libwebrtc's: the first cluster at :data:`PROBE_SCALE` x the
estimate; when a cluster's result reaches :data:`REPEAT_MIN_FRACTION` of what it probed, the
next one follows at once at twice the result, until the wanted rate is confirmed or a cluster
at the ceiling falls short (that is a failed probe).  No cluster goes above
``wanted x`` :data:`PROBE_OVERSHOOT`: on a saturated path a result is 95 % of the
delivery rate (below), so probing a little past the wanted rate lets a path that does carry it
confirm it.

*A cluster.*  ``max(MIN_PROBE_PACKETS, rate x CLUSTER_S)`` padding packets of
:data:`PROBE_PACKET_SIZE` bytes, due one after another at the cluster's rate
(:meth:`ProbeController.take_probes` hands out those due; :meth:`ProbeController.next_deadline`
says when the next is).  Every packet the sender sends while the cluster is out counts towards
it (:meth:`ProbeController.on_packet_sent`, media too), as libwebrtc's pacer tags media it sends
during a probe with the cluster's id: the cluster measures the path, not the padding.

*Paced, or not at all.*  The shell hands the padding out when its timer fires, and on a loaded
machine a timer can fire tens of milliseconds late.  A packet a little late goes with the next
ones (the bottleneck's dispersion of a short train still measures the path), but a stall in
the middle of a cluster leaves a hole in it: measured from its first packet to its last, a
cluster scheduled at 1.5 Mbps went out at 0.3 Mbps (seen on the real path of
``perf.abr_network``), which says nothing about whether the path carries 1.5.  So, as
libwebrtc's ``BitrateProber`` drops a cluster it is more than ``max_probe_delay`` late for
(10 ms), a cluster whose next packet is handed out more than :data:`MAX_PROBE_DELAY_S` after
it was due starts again from that moment, its packets so far left out of its measurement; a
cluster that has to start again more than :data:`MAX_CLUSTER_RESTARTS` times is given up
with a result that says so (``paced`` False, no estimate), which is not a failed probe: the
path was never measured, and the next probe goes after :data:`PROBE_INTERVAL_S` with no back-off.
What a cluster offered the path is what was measured leaving (:attr:`ProbeResult.offered_bps`),
never its schedule.

*Hold checks* (:meth:`ProbeController.update`'s ``check_bps``): one cluster at a given rate,
sent as soon as no other is out, whatever the estimate: the rung selector asks for one to
learn whether the path still carries a rung that is sending less than its rate (module doc
of :mod:`shared.control.rung_choice`).  Its result goes to the caller like any other, marked
``check``, and changes nothing in the probing's own back-off.

*What it found* (libwebrtc ``ProbeBitrateEstimator::HandleProbeAndEstimateBitrate``).  Once
every packet of the cluster is reported by transport-wide feedback
(draft-holmer-rmcat-transport-wide-cc-extensions-01), or :data:`RESULT_TIMEOUT_S` after its
last packet: fewer than :data:`MIN_RECEIVED_FRACTION` of its packets received is a failed probe.
Otherwise the send rate is the bytes sent less the last packet over the send span, the receive
rate the bytes received less the first packet over the receive span (a packet's bytes belong
to the interval after it is sent and before it arrives).  A receive rate above
:data:`MAX_VALID_RATIO` x the send rate is not believed; the result is the smaller of the two,
and when the receive rate is under :data:`SATURATED_RATIO` x the send rate the path was
saturated and the result is :data:`TARGET_UTILISATION` x the receive rate.  The caller hands a
result to :meth:`shared.rtp.bandwidth.BandwidthEstimator.on_probe_result`.

Time is passed in (``now``, monotonic seconds; arrival times in the receiver's microseconds,
whose offset cancels out of every span).  Nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Final

import msgspec

from shared.errors import ConfigError

__all__ = [
    "MAX_PROBE_INTERVAL_S",
    "PROBE_INTERVAL_S",
    "ProbeController",
    "ProbePacket",
    "ProbeResult",
]

#: Padding packet size, bytes (an RTP packet of a full MTU, as media's).
PROBE_PACKET_SIZE: Final = 1200
#: Length of a cluster's padding, seconds (libwebrtc sends at least 15 ms; a little longer
#: averages the bottleneck's service over more packets).
CLUSTER_S: Final = 0.03
#: Fewest padding packets in a cluster (libwebrtc: 5).
MIN_PROBE_PACKETS: Final = 5
#: The first cluster probes this multiple of the estimate (libwebrtc's ALR probes: 2x).
PROBE_SCALE: Final = 2.0
#: A result at least this fraction of the probed rate earns an immediate next cluster at
#: twice the result (libwebrtc ``kRepeatedProbeMinPercentage``: 70 %).
REPEAT_MIN_FRACTION: Final = 0.7
#: Clusters never go above the wanted rate times this.
PROBE_OVERSHOOT: Final = 1.25
#: Wait after a probe that fell short, doubling per shortfall up to the maximum.
PROBE_INTERVAL_S: Final = 1.0
MAX_PROBE_INTERVAL_S: Final = 2.0
#: A cluster not fully reported this long after its last packet is judged on what came back.
RESULT_TIMEOUT_S: Final = 1.0
#: libwebrtc's ``kMinReceivedProbesRatio``, ``kMaxValidRatio``,
#: ``kMinRatioForUnsaturatedLink`` and ``kTargetUtilizationFraction``.
MIN_RECEIVED_FRACTION: Final = 0.8
MAX_VALID_RATIO: Final = 2.0
SATURATED_RATIO: Final = 0.9
TARGET_UTILISATION: Final = 0.95
#: Spans longer than this do not measure a burst (libwebrtc ``kMaxProbeInterval``: 1 s).
MAX_SPAN_S: Final = 1.0
#: A padding packet handed out later than this after it was due restarts its cluster
#: (libwebrtc ``BitrateProberConfig::max_probe_delay``: 10 ms).
MAX_PROBE_DELAY_S: Final = 0.01
#: Restarts after which a cluster is given up (the shell cannot pace it now).
MAX_CLUSTER_RESTARTS: Final = 2


class ProbePacket(msgspec.Struct, frozen=True, kw_only=True):
    """One padding packet to send now, for cluster ``cluster_id``."""

    cluster_id: int
    size: int


class ProbeResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one cluster found.  ``estimate_bps`` is None when the probe failed."""

    cluster_id: int
    #: When its first packet was due (monotonic seconds): what it measured is the path since.
    started_at: float
    #: The rate the cluster was sent at (padding schedule).
    target_bps: int
    send_bps: int
    receive_bps: int
    estimate_bps: int | None
    #: Why the result is what it is, for the logs.
    reason: str
    #: A hold check (``check_bps``), not a probe for headroom.
    check: bool = False
    #: False: the cluster was given up unsent (the shell could not pace it, module doc).
    paced: bool = True
    #: False: its spans could not be believed (delivered over twice as fast as it was sent,
    #: as when a stalled receiver reads a whole cluster at once, or spread over a second).
    measured: bool = True

    @property
    def offered_bps(self) -> int:
        """The rate the cluster really offered the path: what was measured leaving while it
        was out (media leaving with it counts), not its schedule (module doc); 0 when the
        cluster measured nothing (unpaced, or spans not believed), so it tells nothing."""
        return self.send_bps if self.paced and self.measured else 0

    @property
    def saturated(self) -> bool:
        """The path delivered clearly less than it was offered: the result is its capacity."""
        return self.estimate_bps is not None and self.receive_bps < SATURATED_RATIO * self.send_bps


class _Cluster:
    __slots__ = (
        "arrivals",
        "check",
        "closed_at",
        "count",
        "first_due",
        "id",
        "interval_s",
        "restarts",
        "sent",
        "taken",
        "target_bps",
    )

    def __init__(self, cluster_id: int, target_bps: int, now: float, *, check: bool) -> None:
        self.id = cluster_id
        self.target_bps = target_bps
        self.check = check
        self.restarts = 0
        self.count = max(
            MIN_PROBE_PACKETS, math.ceil(target_bps * CLUSTER_S / 8 / PROBE_PACKET_SIZE)
        )
        self.interval_s = PROBE_PACKET_SIZE * 8 / target_bps
        self.first_due = now
        self.taken = 0
        #: When the last padding packet was handed out (None while padding is still due).
        self.closed_at: float | None = None
        #: transport sequence -> (send time, size) of every packet sent while it was out.
        self.sent: dict[int, tuple[float, int]] = {}
        #: transport sequence -> arrival µs, or None when reported lost.
        self.arrivals: dict[int, int | None] = {}

    def next_due(self) -> float:
        return self.first_due + self.taken * self.interval_s

    def restart(self, now: float) -> None:
        """Start the schedule again at ``now``; what was sent so far is not measured."""
        self.restarts += 1
        self.first_due = now
        self.taken = 0
        self.sent.clear()
        self.arrivals.clear()

    @property
    def sending(self) -> bool:
        return self.taken < self.count


class ProbeController:
    """One viewer's probing (module doc)."""

    def __init__(self, *, now: float) -> None:
        self._wanted: int | None = None
        #: The last rate wanted (the goal the back-off belongs to).
        self._goal: int | None = None
        self._estimate = 0
        self._cluster: _Cluster | None = None
        self._next_cluster_id = 1
        self._next_probe_at = now
        self._interval = PROBE_INTERVAL_S
        #: The rate the next cluster probes (set by a result that earns a repeat).
        self._repeat_bps: int | None = None
        self.clusters_sent = 0
        self.probes_failed = 0
        #: Clusters started again after a late timer, and clusters given up (module doc).
        self.cluster_restarts = 0
        self.clusters_unpaced = 0
        #: The hold check asked for and not yet started: (rate, when asked).
        self._check: tuple[int, float] | None = None
        #: A result to hand out at the next :meth:`on_timer` (a cluster given up).
        self._unpaced: ProbeResult | None = None
        self.last_result: ProbeResult | None = None

    @property
    def probing(self) -> bool:
        """A cluster is out (sending, or waiting for its feedback)."""
        return self._cluster is not None

    def update(
        self,
        *,
        estimate_bps: int,
        wanted_bps: int | None,
        now: float,
        check_bps: int | None = None,
    ) -> None:
        """The current estimate, the rate the caller wants confirmed (None: nothing), and a
        hold check to send (``check_bps``: one cluster at that rate as soon as none is out;
        None asks for none, and withdraws one not yet started)."""
        if estimate_bps <= 0:
            raise ConfigError(f"an estimate must be positive, got {estimate_bps} bps")
        if wanted_bps is not None and wanted_bps <= 0:
            raise ConfigError(f"a wanted rate must be positive, got {wanted_bps} bps")
        if check_bps is not None and check_bps <= 0:
            raise ConfigError(f"a check rate must be positive, got {check_bps} bps")
        if check_bps is None:
            self._check = None
        elif self._cluster is not None and self._cluster.check:
            pass  # that check is out: its result answers this request
        elif self._check is None or self._check[0] != check_bps:
            self._check = (check_bps, now)
        if wanted_bps is not None and wanted_bps != self._goal:
            # A new goal is not the one earlier probes fell short of: no back-off carried over.
            # (The same goal asked for again after a pause keeps its back-off.)
            self._goal = wanted_bps
            self._interval = PROBE_INTERVAL_S
            self._next_probe_at = now
        self._wanted = wanted_bps
        self._estimate = estimate_bps
        if wanted_bps is None or estimate_bps >= wanted_bps:
            self._repeat_bps = None

    def _ceiling(self) -> int:
        assert self._wanted is not None
        return int(self._wanted * PROBE_OVERSHOOT)

    def _wants_cluster(self, now: float) -> bool:
        return (
            self._cluster is None
            and self._wanted is not None
            and self._estimate < self._wanted
            and now >= self._next_probe_at
        )

    def next_deadline(self) -> float | None:
        """When :meth:`take_probes` next has something to do (None: nothing planned)."""
        if self._unpaced is not None:
            return self._unpaced.started_at
        cluster = self._cluster
        if cluster is not None:
            if cluster.closed_at is None:
                return cluster.next_due()
            return cluster.closed_at + RESULT_TIMEOUT_S
        if self._check is not None:
            return self._check[1]
        if self._wanted is not None and self._estimate < self._wanted:
            return self._next_probe_at
        return None

    def take_probes(self, now: float) -> list[ProbePacket]:
        """Padding packets due at ``now``; starts a cluster when one is due.

        The caller sends each one (padding-only RTP packets with a transport-wide sequence
        number) and reports it to :meth:`on_packet_sent`, as every other packet it sends.
        At :meth:`next_deadline` the caller runs :meth:`on_timer` first, then this.
        """
        if self._cluster is None and self._check is not None and self._unpaced is None:
            rate, self._check = self._check[0], None
            self._start(now, rate, check=True)
        elif self._wants_cluster(now) and self._unpaced is None:
            self._start(now, None, check=False)
        cluster = self._cluster
        if cluster is None or not cluster.sending:
            return []
        if cluster.taken and now - cluster.next_due() > MAX_PROBE_DELAY_S:
            # A stall left a hole in the cluster (module doc): again from now, or give up.
            if cluster.restarts >= MAX_CLUSTER_RESTARTS:
                self._give_up(cluster, now)
                return []
            cluster.restart(now)
            self.cluster_restarts += 1
        due: list[ProbePacket] = []
        while cluster.sending and cluster.next_due() <= now:
            cluster.taken += 1
            due.append(ProbePacket(cluster_id=cluster.id, size=PROBE_PACKET_SIZE))
        if not cluster.sending:
            cluster.closed_at = now
        return due

    def _start(self, now: float, rate: int | None, *, check: bool) -> None:
        if rate is None:
            rate = self._repeat_bps or int(self._estimate * PROBE_SCALE)
            rate = min(rate, self._ceiling())
            self._repeat_bps = None
        self._cluster = _Cluster(self._next_cluster_id, rate, now, check=check)
        self._next_cluster_id += 1
        self.clusters_sent += 1

    def _give_up(self, cluster: _Cluster, now: float) -> None:
        """The shell could not pace the cluster: no measurement, no back-off (module doc)."""
        self._cluster = None
        self.clusters_unpaced += 1
        self._unpaced = ProbeResult(
            cluster_id=cluster.id,
            started_at=now,
            target_bps=cluster.target_bps,
            send_bps=0,
            receive_bps=0,
            estimate_bps=None,
            reason=f"not paced: restarted {cluster.restarts} times after late timers",
            check=cluster.check,
            paced=False,
        )
        if not cluster.check:
            self._next_probe_at = now + PROBE_INTERVAL_S

    def on_packet_sent(self, transport_sequence: int, size: int, now: float) -> None:
        """Every packet the sender sends (media, padding, retransmission), with its size."""
        cluster = self._cluster
        # The cluster closes with its last padding packet (and whatever leaves with it).
        if cluster is None or (cluster.closed_at is not None and now > cluster.closed_at):
            return
        cluster.sent[transport_sequence & 0xFFFF] = (now, size)

    def on_transport_feedback(
        self, arrivals: Iterable[tuple[int, int | None]], now: float
    ) -> ProbeResult | None:
        """Arrivals (``RtcpTransportFeedback.arrivals()``: sequence, µs or None for lost);
        the cluster's result once it is complete."""
        cluster = self._cluster
        if cluster is None:
            return None
        for sequence, arrival_us in arrivals:
            if sequence in cluster.sent:
                cluster.arrivals[sequence] = arrival_us
        if cluster.closed_at is None or len(cluster.arrivals) < len(cluster.sent):
            return None
        return self._finish(cluster, now)

    def on_timer(self, now: float) -> ProbeResult | None:
        """A cluster whose feedback did not all come back is judged at its deadline; a
        cluster given up unpaced is reported here."""
        if self._unpaced is not None:
            result, self._unpaced = self._unpaced, None
            self.last_result = result
            return result
        cluster = self._cluster
        if cluster is None or cluster.closed_at is None:
            return None
        if now < cluster.closed_at + RESULT_TIMEOUT_S:
            return None
        return self._finish(cluster, now)

    def _finish(self, cluster: _Cluster, now: float) -> ProbeResult:
        self._cluster = None
        result = _measure(cluster)
        self.last_result = result
        if cluster.check:
            return result  # the selector's question: nothing for the probing's back-off
        estimate = result.estimate_bps
        if estimate is not None and self._wanted is not None:
            if estimate >= self._wanted:
                self._interval = PROBE_INTERVAL_S
                self._next_probe_at = now
                return result
            further = cluster.target_bps < self._ceiling()
            if further and estimate >= REPEAT_MIN_FRACTION * cluster.target_bps:
                # The path took most of it and there is further to look: at once (libwebrtc's
                # exponential probing), from what it delivered.  A cluster at the ceiling
                # that fell short is a probe that failed, or it would repeat back to back.
                self._repeat_bps = min(int(estimate * PROBE_SCALE), self._ceiling())
                self._next_probe_at = now
                return result
        self.probes_failed += 1
        self._next_probe_at = now + self._interval
        self._interval = min(self._interval * 2, MAX_PROBE_INTERVAL_S)
        return result


def _measure(cluster: _Cluster) -> ProbeResult:
    """libwebrtc's ProbeBitrateEstimator on one cluster (module doc)."""

    def failed(
        reason: str, send_bps: int = 0, receive_bps: int = 0, *, measured: bool = True
    ) -> ProbeResult:
        return ProbeResult(
            cluster_id=cluster.id,
            started_at=cluster.first_due,
            target_bps=cluster.target_bps,
            send_bps=send_bps,
            receive_bps=receive_bps,
            estimate_bps=None,
            reason=reason,
            check=cluster.check,
            measured=measured,
        )

    sent = sorted(cluster.sent.values())
    received = sorted(
        (arrival, cluster.sent[seq][1])
        for seq, arrival in cluster.arrivals.items()
        if arrival is not None
    )
    send_span = sent[-1][0] - sent[0][0] if sent else 0.0
    if len(sent) < 2 or len(received) < MIN_RECEIVED_FRACTION * len(sent):
        # What it offered still counts: a cluster the path dropped says it was too much.
        offered = int(sum(size for _, size in sent[:-1]) * 8 / send_span) if send_span > 0 else 0
        return failed(f"{len(received)} of {len(sent)} probe packets received", offered)
    receive_span = (received[-1][0] - received[0][0]) / 1e6
    if receive_span <= 0 or receive_span > MAX_SPAN_S or send_span > MAX_SPAN_S:
        return failed(
            f"spans out of range: sent over {send_span:.3f} s, received over {receive_span:.3f} s",
            measured=False,
        )
    # A packet's bytes are sent after its send time and received by its arrival: the last
    # packet's bytes are outside the send span, the first packet's outside the receive span.
    receive_bps = int(sum(size for _, size in received[1:]) * 8 / receive_span)
    # Sent in one instant (a shell whose timer is coarser than the cluster): the train's
    # dispersion at the bottleneck still measures the path, so the send rate does not limit.
    send_bps = (
        int(sum(size for _, size in sent[:-1]) * 8 / send_span) if send_span > 0 else receive_bps
    )
    if receive_bps > MAX_VALID_RATIO * send_bps:
        return failed(
            f"received at {receive_bps} bps, over twice the {send_bps} bps sent",
            send_bps,
            receive_bps,
            measured=False,
        )
    if receive_bps < SATURATED_RATIO * send_bps:
        estimate = int(TARGET_UTILISATION * receive_bps)
        reason = f"path saturated: delivered {receive_bps} of {send_bps} bps"
    else:
        estimate = min(send_bps, receive_bps)
        reason = f"delivered {receive_bps} bps of {send_bps} bps sent"
    return ProbeResult(
        cluster_id=cluster.id,
        started_at=cluster.first_due,
        target_bps=cluster.target_bps,
        send_bps=send_bps,
        receive_bps=receive_bps,
        estimate_bps=estimate,
        reason=reason,
        check=cluster.check,
    )
