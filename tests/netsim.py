"""A deterministic simulated network for the rate-adaptation cores: one ladder, N viewers.

Nothing here is a socket or a clock.  Time is a float advanced by an event queue (literal
seconds); loss bursts draw from a seeded generator, so a run is the same every time.

What is simulated, and how
--------------------------
- **The encoder** (:class:`SimLadder`): one frame per rung every ``1 / fps`` seconds, of
  ``target / fps`` bytes (the rung's target from :class:`shared.control.rung_targets.RungTargets`
  when the simulation runs one, else its configured rate).  An IDR, made when some viewer's
  :meth:`RungSelector.keyframe_request` asked for one on that rung, is ``keyframe_factor``
  times larger (default :data:`KEYFRAME_FACTOR`: ``shared.media.rate_control`` measured an
  IDR at 5 to 10 P-frames), and the frames after it are smaller by up to half until the extra
  bits are paid back, as a CBR encoder's VBV makes them, so a rung's average rate is its
  target.  A paused rung makes no frames.
- **The sender** (what the sender shard does per viewer): every frame of the viewer's current
  rung goes out at once as packets of at most :data:`PACKET_SIZE` bytes (FU-A fragments of one
  size, as ``H264Packetizer`` cuts them), each with a transport-wide sequence number reported to
  the REAL :class:`shared.rtp.bandwidth.BandwidthEstimator` and
  :class:`shared.control.probe.ProbeController`; probe padding is sent when the probe
  controller says it is due.  An IDR of a rung the viewer's selector is switching to completes
  the switch (:meth:`RungSelector.on_keyframe`), and that IDR is the first frame sent from it.
- **The link** (:class:`Link`): a FIFO bottleneck whose capacity follows a schedule, with a
  drop-tail queue bounded in bytes, then a propagation delay that may spike; packets sent in a
  loss burst are dropped with the burst's probability.  A link never reorders: a packet
  arrives no earlier than the one before it (when a delay spike ends, the packets behind it
  bunch up, as on a real path).
- **The receiver**: a REAL :class:`shared.rtp.feedback.TransportFeedbackRecorder` records each
  arrival and is drained every :data:`FEEDBACK_INTERVAL_S` (the viewer's default) into
  transport-wide feedback, which travels back over the propagation delay (the reverse path is
  not a bottleneck and loses nothing).  The RTT is measured as QUIC would: from the newest
  packet a feedback acknowledges, less the time the receiver held it.
- **Playback**: a frame is shown when all its packets arrived; there is no retransmission and
  no decoding dependency in the model (the real viewer NACKs and asks for a keyframe).  A gap
  between shown frames longer than ``max(3 x frame interval, frame interval + 150 ms)`` is a
  freeze, as WebRTC's stats define one; :meth:`ViewerTrace.stall_ratio` is the frozen share of
  the time.

The shell logic (what the sender actor will do with the cores) is in :class:`SimViewer`'s
``_on_feedback`` and ``_on_timer``; read them as the reference of the wiring.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from shared.control.probe import ProbeController, ProbeResult
from shared.control.rung_choice import RungSelector, RungSelectorConfig
from shared.control.rung_targets import RungBounds, RungTargets, ViewerRung
from shared.rtp.bandwidth import BandwidthEstimator
from shared.rtp.feedback import TransportFeedbackRecorder
from shared.rtp.rtcp import RtcpTransportFeedback

__all__ = [
    "FEEDBACK_INTERVAL_S",
    "KEYFRAME_FACTOR",
    "PACKET_SIZE",
    "SETTLE_S",
    "STEP_CAPACITY",
    "STEP_END",
    "STEP_LADDER",
    "Link",
    "LinkSpec",
    "SimLadder",
    "SimRung",
    "Simulation",
    "StepReport",
    "ViewerSpec",
    "ViewerTrace",
    "best_fitting_rate",
    "run_capacity_steps",
    "step_report",
]

PACKET_SIZE: Final = 1200
FEEDBACK_INTERVAL_S: Final = 0.05
KEYFRAME_FACTOR: Final = 5.0
#: A gap between shown frames is a freeze above max(3 x interval, interval + 150 ms).
FREEZE_EXTRA_S: Final = 0.15


@dataclass(frozen=True)
class LinkSpec:
    """One viewer's path.  Every schedule is ``(from time, value)`` steps, in time order."""

    capacity_bps: Sequence[tuple[float, float]]
    #: One-way propagation delay, each way.
    delay_s: float = 0.02
    #: ``(start, end, extra one-way delay)``: the path's delay is raised while it lasts.
    delay_spikes: Sequence[tuple[float, float, float]] = ()
    #: ``(start, end, probability)``: packets sent in it are dropped with that probability.
    loss_bursts: Sequence[tuple[float, float, float]] = ()
    #: The bottleneck's queue, bytes (drop-tail).
    queue_bytes: int = 64_000
    seed: int = 1

    def capacity_at(self, now: float) -> float:
        times = [t for t, _ in self.capacity_bps]
        index = bisect.bisect_right(times, now) - 1
        return self.capacity_bps[max(index, 0)][1]

    def delay_at(self, now: float) -> float:
        extra = sum(e for start, end, e in self.delay_spikes if start <= now < end)
        return self.delay_s + extra

    def loss_at(self, now: float) -> float:
        return max((p for start, end, p in self.loss_bursts if start <= now < end), default=0.0)


class Link:
    """The forward path: a capacity-limited FIFO with a bounded queue, then propagation."""

    def __init__(self, spec: LinkSpec) -> None:
        self.spec = spec
        self._random = random.Random(spec.seed)
        self._busy_until = -math.inf
        self._queue: list[tuple[float, int]] = []  # (service end, size), oldest first
        self._queued_bytes = 0
        self._last_arrival = -math.inf
        self.dropped = 0

    def send(self, size: int, now: float) -> float | None:
        """The arrival time of a packet of ``size`` bytes sent at ``now``; None if dropped."""
        while self._queue and self._queue[0][0] <= now:
            self._queued_bytes -= self._queue.pop(0)[1]
        loss = self.spec.loss_at(now)
        if loss and self._random.random() < loss:
            self.dropped += 1
            return None
        if self._queued_bytes + size > self.spec.queue_bytes:
            self.dropped += 1
            return None
        start = max(now, self._busy_until)
        end = start + size * 8 / self.spec.capacity_at(start)
        self._busy_until = end
        self._queue.append((end, size))
        self._queued_bytes += size
        arrival = max(end + self.spec.delay_at(end), self._last_arrival)
        self._last_arrival = arrival
        return arrival


@dataclass(frozen=True)
class SimRung:
    rate_bps: int
    fps: int = 30


@dataclass(frozen=True)
class ViewerSpec:
    name: str
    link: LinkSpec
    #: A remembered starting rung (None: the selector's default, the lowest allowed).
    start_rung: int | None = None
    cap: int = 0
    pin: int | None = None
    config: RungSelectorConfig | None = None


@dataclass
class ViewerTrace:
    """What happened to one viewer, for the assertions and the benchmark."""

    rates: tuple[int, ...]
    #: (time, rung) at the start and at every completed switch: the rung being sent.
    rungs: list[tuple[float, int]] = field(default_factory=list)
    #: (time the frame was complete at the receiver, bytes, rung) of every shown frame.
    shown: list[tuple[float, int, int]] = field(default_factory=list)
    #: (time, estimate bps) at each feedback.
    estimates: list[tuple[float, int]] = field(default_factory=list)
    #: Reasons of every pending switch, with the time it was asked for.
    reasons: list[tuple[float, str]] = field(default_factory=list)
    probe_clusters: int = 0
    probe_bytes: int = 0
    media_bytes_sent: int = 0

    def rung_at(self, now: float) -> int:
        times = [t for t, _ in self.rungs]
        return self.rungs[max(bisect.bisect_right(times, now) - 1, 0)][1]

    def switches(self, start: float, end: float) -> int:
        return sum(1 for t, _ in self.rungs[1:] if start <= t < end)

    def first_time(self, start: float, predicate: Callable[[int], bool]) -> float | None:
        """The first time at or after ``start`` the rung being sent satisfies ``predicate``."""
        if predicate(self.rung_at(start)):
            return start
        return next((t for t, r in self.rungs if t >= start and predicate(r)), None)

    def delivered_bps(self, start: float, end: float) -> float:
        shown = sum(size for t, size, _ in self.shown if start <= t < end)
        return shown * 8 / (end - start)

    def stall_ratio(self, start: float, end: float, fps: int) -> float:
        """The share of ``[start, end)`` spent frozen (module doc)."""
        interval = 1 / fps
        limit = max(3 * interval, interval + FREEZE_EXTRA_S)
        times = [t for t, _, _ in self.shown if start <= t < end]
        frozen = 0.0
        for before, after in itertools.pairwise([start, *times, end]):
            if after - before > limit:
                frozen += after - before
        return frozen / (end - start)


class SimLadder:
    """The encoder side: per rung its frame clock, its target and its IDR requests."""

    def __init__(self, rungs: Sequence[SimRung]) -> None:
        self.rungs = list(rungs)
        self.targets = [rung.rate_bps for rung in rungs]
        self.paused = [False] * len(rungs)
        self.idr_requested = [False] * len(rungs)
        self.keyframes = [0] * len(rungs)
        #: Bytes an IDR took above an average frame, still to be paid back (the VBV).
        self.debt = [0] * len(rungs)

    def frame_size(self, rung: int, keyframe: bool, factor: float) -> int:
        average = max(1, int(self.targets[rung] / self.rungs[rung].fps / 8))
        if keyframe:
            self.debt[rung] += int(average * (factor - 1))
            return int(average * factor)
        repaid = min(self.debt[rung], average // 2)
        self.debt[rung] -= repaid
        return average - repaid


class SimViewer:
    """One viewer: its link, the sender's cores for it, its receiver (module doc)."""

    def __init__(self, spec: ViewerSpec, sim: Simulation, now: float) -> None:
        self.spec = spec
        self.sim = sim
        self.link = Link(spec.link)
        rates = [rung.rate_bps for rung in sim.ladder.rungs]
        self.selector = RungSelector(
            rates,
            now=now,
            start_rung=spec.start_rung,
            cap=spec.cap,
            pin=spec.pin,
            config=spec.config,
        )
        self.estimator = BandwidthEstimator(initial_bps=rates[self.selector.rung], now=now)
        self.probe = ProbeController(now=now)
        self.recorder = TransportFeedbackRecorder(sender_ssrc=1)
        self.trace = ViewerTrace(rates=tuple(rates), rungs=[(now, self.selector.rung)])
        self._sequence = 0
        self._sent_at: dict[int, float] = {}
        self._arrived_at: dict[int, float] = {}
        #: frame id -> packets still missing, bytes, rung
        self._frames: dict[int, list[int]] = {}
        self._timer_at: float | None = None

    # -- sender ----------------------------------------------------------------------------

    def _send_packet(self, size: int, now: float, frame: int | None) -> None:
        sequence = self._sequence
        self._sequence = (sequence + 1) & 0xFFFF
        self.estimator.on_packet_sent(sequence, size, now)
        self.probe.on_packet_sent(sequence, size, now)
        self._sent_at[sequence] = now
        arrival = self.link.send(size, now)
        if arrival is not None:
            self.sim.schedule(arrival, lambda t: self._on_arrival(sequence, frame, t))

    def send_frame(self, frame: int, rung: int, size: int, now: float) -> None:
        count = max(1, math.ceil(size / PACKET_SIZE))
        self._frames[frame] = [count, size, rung]
        if len(self._frames) > 600:  # frames that lost a packet never complete: forget them
            del self._frames[next(iter(self._frames))]
        base, extra = divmod(size, count)
        for index in range(count):
            self._send_packet(base + (1 if index < extra else 0), now, frame)
        self.trace.media_bytes_sent += size

    def on_keyframe(self, rung: int, now: float) -> None:
        if self.selector.on_keyframe(rung, now):
            self.trace.rungs.append((now, rung))

    def _ask_keyframe(self, now: float) -> None:
        rung = self.selector.keyframe_request(now)
        if rung is not None:
            self.sim.ladder.idr_requested[rung] = True

    def _on_feedback(self, feedback: list[RtcpTransportFeedback], rtt_s: float, now: float) -> None:
        """What the sender shard does with one viewer's feedback (the shell's wiring)."""
        for packet in feedback:
            self.estimator.on_transport_feedback(packet, now)
            self._on_probe_result(self.probe.on_transport_feedback(packet.arrivals(), now), now)
        self.estimator.on_rtt(rtt_s)
        self._decide(now)

    def _on_probe_result(self, result: ProbeResult | None, now: float) -> None:
        """As ``PeerAdaptation._on_probe_result``: to the estimator, and to the selector."""
        if result is None:
            return
        if result.estimate_bps is not None:
            self.estimator.on_probe_result(result.estimate_bps, now)
        switch = self.selector.on_probe_result(
            result.estimate_bps,
            offered_bps=result.offered_bps,
            saturated=result.saturated,
            started_at=result.started_at,
            now=now,
        )
        if switch is not None:
            self.trace.reasons.append((now, switch.reason))

    def _decide(self, now: float) -> None:
        estimate = self.estimator.estimate_bps
        self.trace.estimates.append((now, estimate))
        switch = self.selector.on_estimate(
            estimate,
            loss=self.estimator.loss,
            rtt_s=self.estimator.rtt_s,
            now=now,
        )
        if switch is not None:
            self.trace.reasons.append((now, switch.reason))
        self._after_decision(now)

    def _after_decision(self, now: float) -> None:
        self.probe.update(
            estimate_bps=self.estimator.estimate_bps,
            wanted_bps=self.selector.probe_target(now),
            now=now,
        )
        self._ask_keyframe(now)
        self._send_probes(now)
        self._arm(now)

    def _send_probes(self, now: float) -> None:
        for packet in self.probe.take_probes(now):
            self._send_packet(packet.size, now, None)
            self.trace.probe_bytes += packet.size
        self.trace.probe_clusters = self.probe.clusters_sent

    def _on_timer(self, now: float) -> None:
        self._timer_at = None
        self._on_probe_result(self.probe.on_timer(now), now)
        switch = self.selector.on_timer(now)
        if switch is not None:
            self.trace.reasons.append((now, switch.reason))
        self._after_decision(now)

    def _arm(self, now: float) -> None:
        deadlines = [d for d in (self.selector.next_deadline(), self.probe.next_deadline()) if d]
        if not deadlines:
            return
        deadline = max(min(deadlines), now + 1e-4)
        if self._timer_at is not None and self._timer_at <= deadline:
            return
        self._timer_at = deadline
        self.sim.schedule(deadline, self._fire)

    def _fire(self, now: float) -> None:
        if self._timer_at is not None and now >= self._timer_at:
            self._on_timer(now)

    # -- receiver --------------------------------------------------------------------------

    def _on_arrival(self, sequence: int, frame: int | None, now: float) -> None:
        self.recorder.on_packet(sequence, int(now * 1e6))
        self._arrived_at[sequence] = now
        if frame is None:
            return
        state = self._frames.get(frame)
        if state is None:
            return
        state[0] -= 1
        if state[0] == 0:
            del self._frames[frame]
            self.trace.shown.append((now, state[1], state[2]))

    def on_feedback_tick(self, now: float) -> None:
        feedback = self.recorder.build()
        if not feedback:
            return
        newest = max(
            (seq for packet in feedback for seq, arrival in packet.arrivals() if arrival),
            key=lambda seq: self._arrived_at[seq],
        )
        held = now - self._arrived_at[newest]
        sent = self._sent_at[newest]
        back = self.link.spec.delay_at(now)
        self._arrived_at.clear()

        def deliver(t: float) -> None:
            self._on_feedback(feedback, t - sent - held, t)

        self.sim.schedule(now + back, deliver)


class Simulation:
    """One ladder, its viewers, an event queue on a fake clock (module doc)."""

    def __init__(
        self,
        rungs: Sequence[SimRung],
        viewers: Sequence[ViewerSpec],
        *,
        start: float = 0.0,
        rung_targets: bool = False,
        keyframe_factor: float = KEYFRAME_FACTOR,
    ) -> None:
        self.now = start
        self.keyframe_factor = keyframe_factor
        self.start = start
        self.ladder = SimLadder(rungs)
        self._events: list[tuple[float, int, Callable[[float], None]]] = []
        self._order = itertools.count()
        self._frame_ids = itertools.count()
        self.targets: RungTargets | None = None
        if rung_targets:
            bounds = [RungBounds(configured_bps=r.rate_bps) for r in rungs]
            self.targets = RungTargets(bounds)
        self.viewers = {spec.name: SimViewer(spec, self, start) for spec in viewers}
        for index, rung in enumerate(rungs):
            self._frame_loop(index, 1 / rung.fps, start)
        self._feedback_loop(start + FEEDBACK_INTERVAL_S)
        for viewer in self.viewers.values():
            viewer._after_decision(start)
        self._update_targets(start)

    def schedule(self, at: float, action: Callable[[float], None]) -> None:
        heapq.heappush(self._events, (at, next(self._order), action))

    def at(self, when: float, action: Callable[[Simulation, float], object]) -> None:
        """Run ``action(sim, now)`` at ``when`` (a cap or a pin changing, say)."""

        def run(now: float) -> None:
            action(self, now)

        self.schedule(when, run)

    def _frame_loop(self, rung: int, interval: float, when: float) -> None:
        def tick(now: float) -> None:
            self._on_frame(rung, now)
            self.schedule(now + interval, tick)

        self.schedule(when, tick)

    def _feedback_loop(self, when: float) -> None:
        def tick(now: float) -> None:
            for viewer in self.viewers.values():
                viewer.on_feedback_tick(now)
            self._update_targets(now)
            self.schedule(now + FEEDBACK_INTERVAL_S, tick)

        self.schedule(when, tick)

    def _update_targets(self, now: float) -> None:
        if self.targets is None:
            return
        viewers = [
            ViewerRung(
                rung=v.selector.rung,
                pending_rung=None if v.selector.pending is None else v.selector.pending.to_rung,
                estimate_bps=v.estimator.estimate_bps,
            )
            for v in self.viewers.values()
        ]
        for target in self.targets.update(viewers, now=now):
            self.ladder.targets[target.rung] = target.target_bps
            if target.paused != self.ladder.paused[target.rung] and not target.paused:
                self.ladder.idr_requested[target.rung] = True  # resume with an IDR
            self.ladder.paused[target.rung] = target.paused

    def _on_frame(self, rung: int, now: float) -> None:
        ladder = self.ladder
        if ladder.paused[rung]:
            return
        keyframe = ladder.idr_requested[rung]
        if keyframe:
            ladder.idr_requested[rung] = False
            ladder.keyframes[rung] += 1
        size = ladder.frame_size(rung, keyframe, self.keyframe_factor)
        frame = next(self._frame_ids)
        for viewer in self.viewers.values():
            if keyframe:
                viewer.on_keyframe(rung, now)
            if viewer.selector.rung == rung:
                viewer.send_frame(frame, rung, size, now)

    def run(self, until: float) -> None:
        while self._events and self._events[0][0] <= until:
            when, _, action = heapq.heappop(self._events)
            self.now = when
            action(when)
        self.now = until


# -- the capacity-step scenario (tests/test_abr_sim.py, perf/bench_abr.py) ----------------------

#: The ladder of the scenario: HIGH, MEDIUM and LOW presets' bitrates (shared.models), at 30 fps.
STEP_LADDER: Final = (SimRung(3_000_000), SimRung(1_500_000), SimRung(500_000))
#: Capacity steps 4 -> 1 -> 4 Mbps, twice, 20 s each.
STEP_CAPACITY: Final = ((0.0, 4e6), (20.0, 1e6), (40.0, 4e6), (60.0, 1e6), (80.0, 4e6))
STEP_END: Final = 100.0
#: Steady state starts this long after each capacity change (the up target: 5 s).
SETTLE_S: Final = 5.0


@dataclass(frozen=True)
class StepReport:
    """Figures of one viewer through capacity steps (what ``perf.bench_abr`` prints)."""

    #: Per step down: seconds until the rung being sent fits the new capacity (rate <= it).
    down_s: list[float]
    #: Per step up: seconds until the viewer is back on the top rung it may get.
    up_s: list[float]
    #: Steady state: delivered (shown frames') bitrate over the rate of the best rung that
    #: fits the capacity, time-weighted over every phase from SETTLE_S after its start.
    utilisation: float
    #: The same delivered bitrate over the raw capacity (a ladder cannot fill a link).
    link_utilisation: float
    stall_ratio: float
    switches_per_minute: float
    probe_clusters: int


def _fits(rates: Sequence[int], capacity: float, rung: int) -> bool:
    return rates[rung] <= capacity


def best_fitting_rate(rates: Sequence[int], capacity: float, cap: int = 0) -> int:
    """The rate of the highest allowed rung that fits ``capacity`` (else the lowest rung's)."""
    return next((r for r in rates[cap:] if r <= capacity), rates[-1])


def step_report(
    trace: ViewerTrace,
    capacity: Sequence[tuple[float, float]],
    end: float,
    *,
    cap: int = 0,
    fps: int = 30,
) -> StepReport:
    rates = trace.rates
    down: list[float] = []
    up: list[float] = []
    delivered_bits = best_bits = capacity_bits = 0.0
    bounds = [*capacity, (end, 0.0)]
    for (start, bps), (stop, _) in itertools.pairwise(bounds):
        previous = next((b for t, b in reversed(capacity) if t < start), None)
        if previous is not None and bps < previous:
            when = trace.first_time(start, functools.partial(_fits, rates, bps))
            down.append(math.inf if when is None else when - start)
        elif previous is not None and bps > previous:
            when = trace.first_time(start, lambda rung: rung == cap)
            up.append(math.inf if when is None else when - start)
        steady = start + SETTLE_S
        if steady < stop:
            delivered_bits += trace.delivered_bps(steady, stop) * (stop - steady)
            best_bits += best_fitting_rate(rates, bps, cap) * (stop - steady)
            capacity_bits += bps * (stop - steady)
    begin = capacity[0][0]
    return StepReport(
        down_s=[round(x, 3) for x in down],
        up_s=[round(x, 3) for x in up],
        utilisation=round(delivered_bits / best_bits, 3),
        link_utilisation=round(delivered_bits / capacity_bits, 3),
        stall_ratio=round(trace.stall_ratio(begin + SETTLE_S, end, fps), 4),
        switches_per_minute=round(trace.switches(begin, end) * 60 / (end - begin), 2),
        probe_clusters=trace.probe_clusters,
    )


def run_capacity_steps(
    *,
    capacity: Sequence[tuple[float, float]] = STEP_CAPACITY,
    end: float = STEP_END,
    rungs: Sequence[SimRung] = STEP_LADDER,
    start_rung: int | None = None,
    keyframe_factor: float = KEYFRAME_FACTOR,
    config: RungSelectorConfig | None = None,
) -> tuple[StepReport, ViewerTrace]:
    """One viewer through the capacity steps; its report and its trace."""
    link = LinkSpec(capacity_bps=capacity)
    viewer = ViewerSpec("viewer", link, start_rung=start_rung, config=config)
    sim = Simulation(rungs, [viewer], start=capacity[0][0], keyframe_factor=keyframe_factor)
    sim.run(end)
    trace = sim.viewers["viewer"].trace
    return step_report(trace, capacity, end, fps=rungs[0].fps), trace
