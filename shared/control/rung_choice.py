"""Which rung of the simulcast ladder one viewer receives, sans-I/O.

The stream is encoded once per rung (:mod:`shared.media.ladder`, rung 0 the top); each viewer
has its own send-side bandwidth estimate (:class:`shared.rtp.bandwidth.BandwidthEstimator`,
GCC as in draft-ietf-rmcat-gcc-02).  :class:`RungSelector` turns that viewer's estimate, loss
and RTT into the rung it should receive, and says when to switch: a viewer can only start
decoding another rung at an IDR of that rung, so a change of rung is a *pending switch* until
the encoder makes one.

Theory of operation
-------------------
Inputs, each with ``now`` (monotonic seconds): the rungs' rates (:meth:`RungSelector.set_rates`,
index 0 the top; the encoder's need for each, see :mod:`shared.control.rung_targets`), on every
transport-wide feedback the estimate with the loss and RTT (:meth:`RungSelector.on_estimate`),
the cap from the viewer's permissions (:meth:`RungSelector.set_cap`, the lowest index it may
get, see :func:`cap_for`), and a pin from a viewer allowed to control quality
(:meth:`RungSelector.set_pin`).  A rung *holds* while the estimate is at least
``(1 - down_tolerance)`` times its rate.  The rules, in order:

=================================  ==========================================================
condition                          wanted rung
=================================  ==========================================================
pinned                             the pin, but never above the cap (permission wins)
the rung is above the cap          the highest allowed rung that holds (else the lowest)
the rung does not hold, within     stay, and probe the rung's rate, for at most
``idr_grace_s`` of an IDR the      ``idr_grace_s`` (below: IDR bursts)
viewer got, and without loss
the rung does not hold             at once, on this feedback: the highest rung below that
                                   holds (else the lowest).  GCC's delay-based controller
                                   has already decided the path is over-used (§5.5: the
                                   estimate drops to 0.85x the received rate), so waiting
                                   longer would only lengthen the queue.
estimate >= ``up_headroom`` x the  up, to the highest such rung: only after the estimate has
rate of a higher allowed rung,     stayed there for that rung's hold (``up_hold_s``, longer
for that rung's hold               after failed attempts), while the loss is under GCC's 2 %
                                   (§6: between 2 and 10 % GCC holds its rate, so neither do
                                   we go up), the RTT is within ``queue_delay_s`` of its
                                   recent minimum (a standing queue: the estimate is about
                                   to fall), and ``settle_s`` after the last step down
no feedback for                    one rung down per timeout: the path is not confirming
``feedback_timeout_s``             delivery (libwebrtc lowers its estimate when feedback stops)
otherwise                          stay
=================================  ==========================================================

*Hysteresis.*  A rung is left downward below ``(1 - down_tolerance)`` x its rate, and entered
upward only above ``up_headroom`` x its rate, sustained: with 1.2 and 0.05 the estimate must move by
26 % between the two, more than GCC's own sawtooth (a decrease to 0.85x and the 8 %/s climb
back, §5.5), so the ripple of a steady estimate can never flip a viewer between two rungs.

*IDR bursts.*  An IDR carries 5 to 10 frames' bits (``shared.media.rate_control``) and the
sender sends a frame at once, so every IDR is a burst of queueing at the bottleneck that GCC's
trendline reads as overuse; its §5.5 decrease then takes the estimate to 0.85 x the rate
received over the last 500 ms, under the rung's hold (0.95 x its rate) by construction.
Measured in ``tests/netsim.py`` (4 Mbps path, 3 Mbps top rung, IDRs of 5 frames): after an
up-switch from 1.5 Mbps the estimate falls to 2.3 Mbps 0.3 s later, every time, and after an
IDR another viewer of the rung asked for, to 2.85 Mbps; each would pull the viewer down, and
one viewer's switch up would knock the others on its rung down.  So a fall of the estimate
under the rung within ``idr_grace_s`` of an IDR the viewer received, with no loss, is doubted
rather than acted on: the viewer stays, the selector asks for a probe at the rung's rate
(:meth:`RungSelector.probe_target`; libwebrtc's ProbeController likewise probes after a large
drop of its estimate), and the probe's result lifts the estimate back if the path carries the
rung.  The doubt ends, and the viewer steps down (after an up-switch that counts as a failed
one), at the first of: loss above ``low_loss``; a probe that answers it
(:meth:`RungSelector.on_probe_result`: a cluster sent since the fall that shows the path does
not carry the rung: it saturated the path under the rung's hold rate, or offered at least that
rate and came back under it or failed); or
``idr_grace_s`` after the fall (IDRs coming on meanwhile do not extend it).  A real drop of
capacity just after an IDR thus costs about one probe's round trip more, ``idr_grace_s`` at
worst.  (Measured on the real path of ``perf.abr_network``, a veth capped at 1 Mbps by
``tc tbf`` under a 1.5 Mbps rung: the estimate fell 0.54 s after the cap, 0.85 s after the
last periodic IDR, and the probe sent then came back at 0.94 Mbps 0.1 s later; waiting out
the grace instead moved the viewer 2.04 s after the cap, and ``down_s`` missed its 2 s.)

*Hold checks.*  GCC only sees a path's capacity when the sender fills it.  A rung whose
content is easy sends well under its rate between keyframes (the test pattern's 1.5 Mbps top
rung sends 0.5 to 1.0 Mbps), so when the path's capacity falls under the rung's rate but not
under what it sends, nothing queues, the estimate stays where probes put it, and the cap shows
only when the next periodic IDR overflows the bottleneck's queue: on the real path of
``perf.abr_network`` (1 Mbps under the 1.5 Mbps rung) the viewer moved 0.9 to 2.9 s after the
cap, depending on where in the GOP the cap fell.  So while the rung sends under
``app_limited`` of its rate (:meth:`RungSelector.set_sending`, the shell's last second of
media), is not the lowest, and no probing for a higher rung is wanted (that probing, at or
above this rate, answers the same question), the selector asks every ``check_interval_s``
for a *hold check* (:meth:`RungSelector.check_target`): one probe cluster at ``up_headroom``
x the rung's rate, sent whatever the estimate, as libwebrtc probes periodically while its
sender is application-limited (its ALR probes, every 5 s there; 1 s here so a step down
comes within the 2 s the project targets).  A check *comes back short* by the measure that
answers a doubt: delivered under the rung's hold rate with the path saturated, or offered at
least that rate (measured leaving, ``shared.control.probe``: a cluster the shell could not
pace says nothing) and came back under it or failed.  After a short check the next follows
``confirm_s`` later; ``checks_to_step_down`` short ones in a row move the viewer down at once,
to the highest rung the last check's delivery rate carries, and the switch carries that rate
(:attr:`RungSwitch.capacity_bps`) for the estimator to come down to, or the viewer would be let
straight back up by an estimate that never saw the cap.  One short check alone moves
nothing: on a loaded machine a receiver that stalled mid-cluster stretches its arrivals.  A
check costs one cluster, ``max(5, 30 ms)`` of padding at 1.2x the rung's rate (3.8 % of a
1.5 Mbps rung's rate, once a second), and only while the rung leaves that much unused.

*Back-off.*  An up-switch undone within ``revert_window_s`` (a step down from the rung it went
to) doubles that rung's hold, up to ``max_up_hold_s``; a rung kept through the window gets its
base hold back.  A path that passes the probes but not the switch (an IDR larger than its
bottleneck's queue, cross traffic that comes and goes) thus costs one failed attempt every
``max_up_hold_s`` at worst, not a flip every few seconds.  (A path whose capacity sits just
under a rung's need costs no attempts at all: its probes never clear the headroom.)

*Probing before going up.*  Delay- and loss-based GCC cannot see capacity the viewer is not
using (§5.5 bounds the increase to 1.5x the received rate), so an estimate on a low rung stays
near that rung's rate.  :meth:`RungSelector.probe_target` names the rate the selector would
need to reach the top rung it may get (its rate times ``up_headroom``);
:class:`shared.control.probe.ProbeController` sends probe clusters toward it and the estimator
takes the result (:meth:`shared.rtp.bandwidth.BandwidthEstimator.on_probe_result`), as
libwebrtc probes before its allocation goes up.  No probing while pinned, switching, at the
cap, or while going up is blocked (loss, queue, settling).

*Switching at the IDR.*  A new wanted rung becomes :attr:`RungSelector.pending`;
:meth:`RungSelector.keyframe_request` says which rung's encoder to ask for an IDR (at once,
then every ``keyframe_retry_s`` until it comes), and the shell, when it is about to send an IDR
of the viewer's rung or of the rung it is switching to, calls
:meth:`RungSelector.on_keyframe`: on the pending rung that completes the switch, and this IDR
is the first frame the viewer gets from the new rung; on its own rung it starts the IDR
grace.  A pending switch
up is dropped if the target stops holding; a pending switch down is never made less
conservative while it waits.

:meth:`RungSelector.next_deadline` says when :meth:`RungSelector.on_timer` must run (a hold
expiring, a keyframe request to repeat, a doubt running out, the feedback timeout).  Nothing
here reads a clock.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Final, Protocol

import msgspec

from shared.errors import ConfigError
from shared.models import QualityPreset, StreamQuality

__all__ = ["RungSelector", "RungSelectorConfig", "RungShape", "RungSwitch", "cap_for"]

_MBPS: Final = 1e6


class RungSelectorConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How one viewer's rung follows its estimate (module doc)."""

    down_tolerance: float = 0.05
    """A rung holds while the estimate is at least ``1 - down_tolerance`` times its rate."""
    up_headroom: float = 1.2
    """Going up to a rung needs an estimate of at least this times its rate."""
    up_hold_s: float = 1.0
    """...sustained this long (the base hold, before back-off)."""
    max_up_hold_s: float = 30.0
    """The longest hold back-off makes."""
    revert_window_s: float = 10.0
    """A step down from a rung this soon after going up to it counts as a failed up-switch."""
    low_loss: float = 0.02
    """No going up while the loss over the last feedback interval is above this (GCC §6)."""
    queue_delay_s: float = 0.1
    """No going up while the RTT is this much above its minimum over ``rtt_window_s``."""
    rtt_window_s: float = 10.0
    """The window of the RTT minimum."""
    settle_s: float = 1.0
    """No going up or probing this soon after a step down."""
    keyframe_retry_s: float = 0.5
    """Ask again for the IDR of a pending switch after this long without it."""
    feedback_timeout_s: float = 1.0
    """Without feedback this long, step down one rung (and again after each timeout)."""
    idr_grace_s: float = 1.5
    """A fall of the estimate (without loss) this soon after an IDR the viewer got is checked
    with a probe, for at most this long, before the viewer steps down (module doc)."""
    check_interval_s: float | None = 1.0
    """A rung sending under ``app_limited`` of its rate gets a hold check this often (module
    doc: hold checks); None: no hold checks."""
    app_limited: float = 0.8
    """A rung sending less than this fraction of its rate is checked."""
    confirm_s: float = 0.1
    """After a check that came back short, the next follows this soon (two checks in a row
    guard against a receiver stalled mid-cluster, which a moment later is unlikely to
    recur; waiting longer only delays the step down)."""
    checks_to_step_down: int = 2
    """Short checks in a row that move the viewer down."""

    def __post_init__(self) -> None:
        if not 0 <= self.down_tolerance < 1:
            raise ConfigError(f"down_tolerance {self.down_tolerance} must be in [0, 1)")
        if self.up_headroom * (1 - self.down_tolerance) <= 1:
            raise ConfigError(
                f"up_headroom {self.up_headroom} with down_tolerance {self.down_tolerance} "
                "leaves no hysteresis: a rung entered upward would not hold"
            )
        times = {
            "up_hold_s": self.up_hold_s,
            "revert_window_s": self.revert_window_s,
            "rtt_window_s": self.rtt_window_s,
            "keyframe_retry_s": self.keyframe_retry_s,
            "feedback_timeout_s": self.feedback_timeout_s,
        }
        if self.idr_grace_s < 0:
            raise ConfigError(f"idr_grace_s must not be negative, got {self.idr_grace_s}")
        for name, value in times.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.max_up_hold_s < self.up_hold_s:
            raise ConfigError(f"max_up_hold_s {self.max_up_hold_s} is under up_hold_s")
        if self.queue_delay_s <= 0 or self.settle_s < 0 or not 0 <= self.low_loss < 1:
            raise ConfigError("queue_delay_s must be positive, settle_s and low_loss not negative")
        if self.check_interval_s is not None and self.check_interval_s <= 0:
            raise ConfigError(f"check_interval_s must be positive, got {self.check_interval_s}")
        if not 0 < self.app_limited <= 1 or self.confirm_s <= 0 or self.checks_to_step_down < 1:
            raise ConfigError(
                "app_limited must be in (0, 1], confirm_s positive, checks_to_step_down >= 1"
            )


class RungSwitch(msgspec.Struct, frozen=True, kw_only=True):
    """A change of rung the selector wants, pending until an IDR of ``to_rung``."""

    from_rung: int
    to_rung: int
    requested_at: float
    #: Why, for the logs and the stats.
    reason: str
    #: What a hold check measured the path at, when that is why the viewer goes down: the
    #: estimate is not to stand above it (``shared.rtp.adaptation``).
    capacity_bps: int | None = None

    @property
    def up(self) -> bool:
        return self.to_rung < self.from_rung


class RungShape(Protocol):
    """What :func:`cap_for` needs of a rung (``shared.media.scaler.Rung`` has it)."""

    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def framerate(self) -> int: ...
    @property
    def bitrate(self) -> int: ...


def cap_for(max_quality: QualityPreset, rungs: Sequence[RungShape]) -> int:
    """The lowest rung index a viewer with ``ViewerPermissions.max_quality`` may receive.

    A rung is allowed when neither its pixel rate nor its bitrate is above the preset's (a
    ladder planned from a 4:3 source has a "low" rung of 640x480, under the preset's 854x480).
    ``CUSTOM`` caps nothing.  When no rung is allowed, the lowest rung is the cap: the viewer
    still sees the smallest picture the stream has.
    """
    if not rungs:
        raise ConfigError("a ladder has at least one rung")
    if max_quality is QualityPreset.CUSTOM:
        return 0
    limit = StreamQuality.from_preset(max_quality)
    pixels = limit.resolution.width * limit.resolution.height * limit.framerate
    for index, rung in enumerate(rungs):
        if rung.width * rung.height * rung.framerate <= pixels and rung.bitrate <= limit.bitrate:
            return index
    return len(rungs) - 1


class _Up(msgspec.Struct, kw_only=True):
    to_rung: int
    at: float


class RungSelector:
    """One viewer's rung (module doc)."""

    def __init__(
        self,
        rates_bps: Sequence[int],
        *,
        now: float,
        start_rung: int | None = None,
        cap: int = 0,
        pin: int | None = None,
        config: RungSelectorConfig | None = None,
    ) -> None:
        """``start_rung``: where the viewer starts (one remembered for its peer); None starts
        on the lowest allowed rung and lets probing climb, as GCC starts low."""
        self.config = config or RungSelectorConfig()
        self._rates: list[int] = []
        self.set_rates(rates_bps)
        count = len(self._rates)
        self._cap = self._check_rung(cap, "cap")
        self._pin = None if pin is None else self._check_rung(pin, "pin")
        if start_rung is not None:
            self._check_rung(start_rung, "start rung")
        start = count - 1 if start_rung is None else start_rung
        if self._pin is not None:
            start = self._pin
        self.rung = max(start, self._cap)
        self.pending: RungSwitch | None = None
        self._keyframe_asked_at: float | None = None
        self._estimate: int | None = None
        self._loss = 0.0
        #: Since when the rung has not held by the estimate but was kept, just after an IDR,
        #: while a probe checks it (None: no doubt).
        self._doubt_since: float | None = None
        #: Why a probe showed the doubted rung does not hold (None: no probe answered).
        self._doubt_answer: str | None = None
        #: When the viewer last got an IDR of its rung.
        self._idr_at: float | None = None
        self._rtt: float | None = None
        self._rtt_min: collections.deque[tuple[float, float]] = collections.deque()
        self._last_feedback_at = now
        self._last_down_at: float | None = None
        self._above_since: dict[int, float] = {}
        self._hold: dict[int, float] = {}
        self._last_up: _Up | None = None
        #: The media rate the viewer is being sent (None: not known, no hold checks).
        self._sending: int | None = None
        #: When the next hold check is due (None: none is planned).
        self._check_at: float | None = None
        #: A hold check is due and its result not yet in.
        self._check_due = False
        self._short_checks = 0
        #: Hold checks that came back short, in all.
        self.checks_short = 0
        self.switches_up = 0
        self.switches_down = 0
        self.failed_ups = 0
        self.last_switch: RungSwitch | None = None

    # -- inputs -----------------------------------------------------------------------------

    def _check_rung(self, rung: int, what: str) -> int:
        if not 0 <= rung < len(self._rates):
            raise ConfigError(f"{what} {rung} is not a rung of a {len(self._rates)}-rung ladder")
        return rung

    def set_rates(self, rates_bps: Sequence[int]) -> None:
        """Each rung's rate, top first (its encoder's need: it may fall on easy content)."""
        rates = [int(rate) for rate in rates_bps]
        if not rates or any(rate <= 0 for rate in rates):
            raise ConfigError(f"rung rates must be positive, one per rung, got {rates}")
        if self._rates and len(rates) != len(self._rates):
            raise ConfigError(f"{len(rates)} rates for a {len(self._rates)}-rung ladder")
        self._rates = rates

    def set_sending(self, rate_bps: int) -> None:
        """The media rate the viewer is being sent now (its last second): a rung sending
        well under its rate gets hold checks (module doc)."""
        if rate_bps < 0:
            raise ConfigError(f"a sending rate must not be negative, got {rate_bps} bps")
        self._sending = rate_bps

    @property
    def rates(self) -> tuple[int, ...]:
        return tuple(self._rates)

    @property
    def cap(self) -> int:
        return self._cap

    @property
    def pin(self) -> int | None:
        return self._pin

    @property
    def estimate_bps(self) -> int | None:
        return self._estimate

    def set_cap(self, cap: int, now: float) -> RungSwitch | None:
        """The viewer may get rungs ``cap`` and below only (``cap_for(max_quality, rungs)``)."""
        self._cap = self._check_rung(cap, "cap")
        return self._evaluate(now)

    def set_pin(self, rung: int | None, now: float) -> RungSwitch | None:
        """Pin a rung (a viewer with ``can_control_quality`` chose it), or unpin (None)."""
        self._pin = None if rung is None else self._check_rung(rung, "pin")
        self._above_since.clear()
        return self._evaluate(now)

    def on_estimate(
        self, estimate_bps: int, *, loss: float, rtt_s: float, now: float
    ) -> RungSwitch | None:
        """One feedback's worth: the estimator's estimate, loss fraction and RTT.  Returns the
        new pending switch when this feedback made one (also in :attr:`pending`)."""
        if estimate_bps <= 0:
            raise ConfigError(f"an estimate must be positive, got {estimate_bps} bps")
        if not 0 <= loss <= 1 or rtt_s < 0:
            raise ConfigError(f"loss {loss} must be a fraction and RTT {rtt_s} s not negative")
        self._estimate = estimate_bps
        self._loss = loss
        self._last_feedback_at = now
        if rtt_s > 0:
            self._rtt = rtt_s
            window = self._rtt_min
            while window and window[-1][1] >= rtt_s:
                window.pop()
            window.append((now, rtt_s))
            while now - window[0][0] > self.config.rtt_window_s:
                window.popleft()
        return self._evaluate(now)

    def on_probe_result(
        self,
        estimate_bps: int | None,
        *,
        offered_bps: int,
        saturated: bool,
        started_at: float,
        now: float,
        check: bool = False,
    ) -> RungSwitch | None:
        """A probe cluster's result (``shared.control.probe.ProbeResult``): its estimate (None
        when it failed), the rate it offered the path, whether the path saturated under it,
        and when it started.  While a fall just after an IDR is doubted, a cluster started
        since the fall answers the doubt when it shows the path does not carry the rung:
        delivered under the rung's hold rate with the path saturated, or offered at least that
        rate and came back under it or failed.  The viewer then steps down now, not at the end
        of the grace (module doc).  A result that lifts the estimate needs nothing here: the
        estimator takes it, and the selector sees it with the next estimate.  A hold check's
        result (``check``) is judged by the same measure (module doc: hold checks)."""
        if check:
            return self._on_check(estimate_bps, offered_bps, saturated, now)
        since = self._doubt_since
        if since is None or started_at < since or self._estimate is None:
            return None
        hold = self._rates[self.rung] * (1 - self.config.down_tolerance)
        if estimate_bps is not None and estimate_bps >= hold:
            return None  # the path carries the rung
        if not saturated and offered_bps < hold:
            return None  # offered too little to tell
        found = "failed" if estimate_bps is None else f"found {estimate_bps / _MBPS:.2f} Mbps"
        self._doubt_answer = f"a probe at {offered_bps / _MBPS:.2f} Mbps {found}"
        return self._evaluate(now)

    def _on_check(
        self, estimate_bps: int | None, offered_bps: int, saturated: bool, now: float
    ) -> RungSwitch | None:
        config = self.config
        if not self._check_due or config.check_interval_s is None:
            return None  # no longer checking (switched, pinned, sending its rate)
        self._check_due = False
        hold = self._rates[self.rung] * (1 - config.down_tolerance)
        if estimate_bps is not None and estimate_bps >= hold:
            self._short_checks = 0
            self._check_at = now + config.check_interval_s
            return None
        if not saturated and offered_bps < hold:
            self._check_at = now + config.check_interval_s  # offered too little to tell
            return None
        self._short_checks += 1
        self.checks_short += 1
        if self._short_checks < config.checks_to_step_down:
            self._check_at = now + config.confirm_s
            return None
        self._short_checks = 0
        self._check_at = None
        last = len(self._rates) - 1
        found = "failed" if estimate_bps is None else f"found {estimate_bps / _MBPS:.2f} Mbps"
        if estimate_bps is None:
            target = min(self.rung + 1, last)
            capacity = self._rates[target]
        else:
            capacity = estimate_bps
            holding = (
                r
                for r in range(self.rung + 1, last + 1)
                if capacity >= self._rates[r] * (1 - config.down_tolerance)
            )
            target = next(holding, last)
        reason = (
            f"{config.checks_to_step_down} hold checks of rung {self.rung}'s "
            f"{self._rates[self.rung] / _MBPS:.2f} Mbps came back short (the last at "
            f"{offered_bps / _MBPS:.2f} Mbps {found}) while it sent "
            f"{(self._sending or 0) / _MBPS:.2f} Mbps"
        )
        switch = self._want(target, now, reason, capacity_bps=capacity)
        self._update_check(now)
        return switch

    def check_target(self, now: float) -> int | None:
        """The rate of the hold check due (for the ProbeController), else None: asked for
        until its result comes back (:meth:`on_probe_result` with ``check``)."""
        if not self._check_due:
            return None
        return int(self._rates[self.rung] * self.config.up_headroom)

    def _update_check(self, now: float) -> None:
        """Start or stop the hold checks of the rung the viewer is on (module doc)."""
        config = self.config
        interval = config.check_interval_s
        sending = self._sending
        checked = (
            interval is not None
            and sending is not None
            and self._pin is None
            and self.pending is None
            and self._doubt_since is None
            and self.rung < len(self._rates) - 1
            and self._estimate is not None
            and self.probe_target(now) is None
        )
        if not checked:
            self._check_at = None
            self._check_due = False
            self._short_checks = 0
            return
        assert interval is not None and sending is not None
        if self._check_at is None and not self._check_due:
            self._check_at = now + interval
        elif self._check_at is not None and now >= self._check_at:
            if sending < config.app_limited * self._rates[self.rung]:
                self._check_at, self._check_due = None, True
            else:
                # Sending its rate for now (an IDR within the last second, the GOP is 2 s):
                # GCC sees the path itself.  Looked at again soon, not a whole interval on, or
                # a check would never fall between two IDRs.
                self._check_at = now + config.confirm_s

    def on_timer(self, now: float) -> RungSwitch | None:
        """Run at :meth:`next_deadline`: feedback timeout, holds expiring."""
        config = self.config
        if (
            self._pin is None
            and now - self._last_feedback_at >= config.feedback_timeout_s
            and self._floor() < len(self._rates) - 1
        ):
            self._last_feedback_at = now
            lower = self._floor() + 1
            silent = config.feedback_timeout_s
            return self._want(lower, now, f"no feedback for {silent:.1f} s: one rung down")
        return self._evaluate(now)

    def _floor(self) -> int:
        """The rung the viewer is on or on its way down to."""
        pending = self.pending
        return pending.to_rung if pending is not None and not pending.up else self.rung

    # -- the keyframe handshake --------------------------------------------------------------

    def keyframe_request(self, now: float) -> int | None:
        """The rung whose encoder must make an IDR for the pending switch, when it is time to
        ask (at once, then every ``keyframe_retry_s``); None otherwise."""
        pending = self.pending
        if pending is None:
            return None
        asked = self._keyframe_asked_at
        if asked is not None and now - asked < self.config.keyframe_retry_s:
            return None
        self._keyframe_asked_at = now
        return pending.to_rung

    def wants_keyframe(self, rung: int) -> bool:
        """Whether an IDR of ``rung`` would complete this viewer's pending switch."""
        return self.pending is not None and self.pending.to_rung == rung

    def on_keyframe(self, rung: int, now: float) -> bool:
        """An IDR of ``rung`` is about to be sent (the shell calls this for every IDR of the
        viewer's rung and of the rung it is switching to).  True: the switch is done, and the
        viewer gets this IDR and everything after it from ``rung`` (nothing more from the
        old one)."""
        if rung == self.rung:
            self._idr_at = now
        pending = self.pending
        if pending is None or pending.to_rung != rung:
            return False
        self.pending = None
        self._keyframe_asked_at = None
        self.rung = rung
        self.last_switch = pending
        self._idr_at = now
        self._doubt_since = self._doubt_answer = None
        self._check_at, self._check_due, self._short_checks = None, False, 0
        self._above_since.clear()
        if pending.up:
            self.switches_up += 1
            self._last_up = _Up(to_rung=rung, at=now)
        else:
            self.switches_down += 1
        return True

    @property
    def switches(self) -> int:
        return self.switches_up + self.switches_down

    @property
    def wanted(self) -> int:
        """The rung the viewer should be on (the pending switch's, else the current)."""
        return self.rung if self.pending is None else self.pending.to_rung

    @property
    def rung_to_remember(self) -> int:
        """The rung to start this peer on when it returns: the lower of where it is and
        where it is going (a viewer leaving mid-switch down must not come back too high)."""
        return max(self.rung, self.wanted)

    # -- probing -----------------------------------------------------------------------------

    def _up_blocked(self, now: float) -> str | None:
        config = self.config
        if self._loss > config.low_loss:
            return f"loss {self._loss:.1%} above {config.low_loss:.0%}"
        if self._rtt is not None and self._rtt_min:
            floor = self._rtt_min[0][1]
            if self._rtt > floor + config.queue_delay_s:
                return f"RTT {self._rtt * 1000:.0f} ms over its minimum {floor * 1000:.0f} ms"
        if self._last_down_at is not None and now - self._last_down_at < config.settle_s:
            return "settling after a step down"
        return None

    def probe_target(self, now: float) -> int | None:
        """The rate the selector wants the estimate to confirm (for the ProbeController):
        what the top allowed rung needs, when the viewer is below it and free to go up."""
        if self._pin is not None or self.pending is not None:
            return None
        if self._doubt_since is not None:
            # Confirm the rung the viewer is on (libwebrtc probes after a large drop of its
            # estimate, at the rate it had before).
            return int(self._rates[self.rung] * self.config.up_headroom)
        if self.rung <= self._cap or self._up_blocked(now) is not None:
            return None
        target = int(self._rates[self._cap] * self.config.up_headroom)
        if self._estimate is not None and self._estimate >= target:
            return None
        return target

    # -- deciding ----------------------------------------------------------------------------

    def _hold_s(self, rung: int) -> float:
        return self._hold.get(rung, self.config.up_hold_s)

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must run (None: nothing is timed)."""
        deadlines: list[float] = []
        if self.pending is not None:
            asked = self._keyframe_asked_at
            deadlines.append(
                self.pending.requested_at if asked is None else asked + self.config.keyframe_retry_s
            )
        if self._pin is None and self._floor() < len(self._rates) - 1:
            deadlines.append(self._last_feedback_at + self.config.feedback_timeout_s)
        deadlines.extend(since + self._hold_s(r) for r, since in self._above_since.items())
        if self._doubt_since is not None:
            deadlines.append(self._doubt_since + self.config.idr_grace_s)
        if self._check_at is not None:
            deadlines.append(self._check_at)
        return min(deadlines, default=None)

    def _holds(self, rung: int) -> bool:
        assert self._estimate is not None
        return self._estimate >= self._rates[rung] * (1 - self.config.down_tolerance)

    def _highest_holding(self, start: int) -> int:
        """The highest rung from ``start`` down that holds, else the lowest rung."""
        last = len(self._rates) - 1
        return next((r for r in range(start, last + 1) if self._holds(r)), last)

    def _evaluate(self, now: float) -> RungSwitch | None:
        switch = self._choose(now)
        self._update_check(now)
        return switch

    def _choose(self, now: float) -> RungSwitch | None:
        config = self.config
        last_up = self._last_up
        if last_up is not None and now - last_up.at >= config.revert_window_s:
            # The rung kept through the window: its hold is back to the base.
            self._hold.pop(last_up.to_rung, None)
            self._last_up = None
        if self._pin is not None:
            pin = max(self._pin, self._cap)
            return self._want(
                pin,
                now,
                f"pinned to rung {self._pin}"
                + (f", capped at rung {self._cap}" if pin != self._pin else ""),
            )
        estimate = self._estimate
        if self.rung < self._cap:
            target = self._cap if estimate is None else self._highest_holding(self._cap)
            return self._want(
                target, now, f"rung {self.rung} is above the viewer's cap {self._cap}"
            )
        if estimate is None:
            return self._want(self.rung, now, "")
        rate = self._rates[self.rung]
        pending = self.pending
        if self._holds(self.rung):
            self._doubt_since = self._doubt_answer = None
        elif (pending is None or pending.up) and self._doubted(now):
            return self._want(self.rung, now, "")
        else:
            answer, self._doubt_since, self._doubt_answer = self._doubt_answer, None, None
            target = self._highest_holding(self.rung + 1)
            if pending is not None and not pending.up:
                target = max(target, pending.to_rung)
            reason = (
                f"estimate {estimate / _MBPS:.2f} Mbps under rung {self.rung}'s "
                f"{rate / _MBPS:.2f} Mbps"
            ) + ("" if answer is None else f" ({answer})")
            return self._want(target, now, reason)
        target, reason = self._up_candidate(now)
        if pending is not None:
            if pending.up and target == self.rung and self._holds(pending.to_rung):
                return None  # still on its way up; its IDR is a frame away
            if not pending.up:
                return None  # never less conservative while a step down waits
        return self._want(target, now, reason)

    def _doubted(self, now: float) -> bool:
        """The rung does not hold: is the fall an IDR's burst, to be probed (module doc)?"""
        grace = self.config.idr_grace_s
        if self._loss > self.config.low_loss or self._doubt_answer is not None:
            return False
        if self._doubt_since is None:
            if self._idr_at is None or now - self._idr_at >= grace:
                return False
            self._doubt_since = now
        return now - self._doubt_since < grace

    def _up_candidate(self, now: float) -> tuple[int, str]:
        """The highest rung the estimate has cleared for its hold, else the current rung."""
        assert self._estimate is not None
        blocked = self._up_blocked(now)
        if blocked is not None:
            self._above_since.clear()
            return self.rung, ""
        headroom = self.config.up_headroom
        for rung in range(self._cap, self.rung):
            if self._estimate >= self._rates[rung] * headroom:
                self._above_since.setdefault(rung, now)
            else:
                self._above_since.pop(rung, None)
        for rung in range(self._cap, self.rung):
            since = self._above_since.get(rung)
            if since is not None and now - since >= self._hold_s(rung):
                reason = (
                    f"estimate {self._estimate / _MBPS:.2f} Mbps at least {headroom:g}x rung "
                    f"{rung}'s {self._rates[rung] / _MBPS:.2f} Mbps for {now - since:.1f} s"
                )
                return rung, reason
        return self.rung, ""

    def _want(
        self, target: int, now: float, reason: str, *, capacity_bps: int | None = None
    ) -> RungSwitch | None:
        if target == self.rung:
            self.pending = None
            self._keyframe_asked_at = None
            return None
        if self.pending is not None and self.pending.to_rung == target:
            return None
        switch = RungSwitch(
            from_rung=self.rung,
            to_rung=target,
            requested_at=now,
            reason=reason,
            capacity_bps=capacity_bps,
        )
        self.pending = switch
        self._keyframe_asked_at = None
        if not switch.up:
            self._last_down_at = now
            self._above_since.clear()
            last_up = self._last_up
            if (
                last_up is not None
                and last_up.to_rung == self.rung
                and now - last_up.at < self.config.revert_window_s
            ):
                # Undone within the window: that rung waits twice as long next time.
                self.failed_ups += 1
                doubled = min(self._hold_s(self.rung) * 2, self.config.max_up_hold_s)
                self._hold[self.rung] = doubled
                self._last_up = None
        return switch
