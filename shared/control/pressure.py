"""Resource pressure, sans-I/O: shed encoder work in steps before frames are late, and restore it.

The design's "Resource Constraints" recovery strategy.  The node's CPU (``ResourceMonitor``'s
``cpu_percent``) and the count of frames that came out late are fed to :class:`NodePressure`,
which holds every stream of the node that sheds under pressure; it answers with
:class:`PressureDecision` steps, each naming its stream and carrying the reason to log and
show in that stream's stats.  One job: when, and whose, and what to shed; the shell (the
supervisor, ``actors.node_pressure``) applies a decision through the stream's quality
controller (the encoder's frame rate, the rung selectors' caps and the encoder's retired
rungs).  :class:`PressurePolicy` is the same policy for one stream alone.

Theory of operation
-------------------
*Steps* of one stream, in the order they are taken (and undone in reverse):

1. lower the top rung's frame rate to half (not below ``min_framerate``): the cheapest loss
   to a viewer, and it halves rung 0's encoder time, the largest share of the ladder's;
2. retire rung 0, then rung 1, ...: each removes one encoder (its viewers move down a rung,
   the shell caps their selectors).  The lowest rung is never retired.

*Whose step.*  Each stream has a ``priority`` (higher is more important).  The next step shed
is the next step of the lowest-priority stream that has one left (among equals, the one with
the fewest steps taken, then the first added), so a stream of higher priority loses nothing
while one below it can still give way.  The next step restored is the last step of the
highest-priority stream that has one taken (among equals, the one with the most taken, then
the latest), so the lowest priorities get their work back last.  A new stream that wants to
run while the node is under pressure (:meth:`NodePressure.admit`) is refused with
:class:`~shared.errors.ResourceError`, naming why, unless a stream of its priority or lower
still has a step to shed for it.

*Shedding.*  The CPU is smoothed (exponential, time constant ``smoothing_s``, so one busy
sample does not act).  A step is taken when the smoothed CPU has stayed at or above
``enter_percent`` for ``enter_hold_s``: below saturation, so work is shed *before* frames come
out late.  Frames already late shed a step at once (no hold).  After any step, no other for
``settle_s``: the step's effect takes that long to show in the measurements.

*Restoring.*  The last step is undone when the smoothed CPU has stayed at or under
``exit_percent`` for the restore hold, and only if the CPU the step saved, measured when it was
taken (the smoothed CPU before it, less the smoothed CPU ``settle_s`` after it), would fit back
under ``enter_percent - restore_margin``.  A step that saved 30 points is not restored at 60 %
only to be shed again at 90 %.

*Hysteresis and back-off.*  The gap between ``enter_percent`` and ``exit_percent``, the
separate holds, and the measured cost keep the policy from flipping.  Should a restored step be
shed again within ``revert_window_s`` anyway (the load moved), the restore hold doubles, up to
``max_exit_hold_s``; a restore that lasts the window resets it.

Time is passed in (``now``, monotonic seconds).  The policy acts only on samples: its shell
feeds it on the monitor's own period, so it has no timer of its own.
"""

from __future__ import annotations

import collections
import enum
import math

import msgspec

from shared.errors import ConfigError, ResourceError

__all__ = [
    "NodePressure",
    "PressureAction",
    "PressureConfig",
    "PressureDecision",
    "PressurePolicy",
]


class PressureAction(enum.StrEnum):
    LOWER_FRAMERATE = "lower_framerate"
    RETIRE_RUNG = "retire_rung"
    RESTORE_RUNG = "restore_rung"
    RESTORE_FRAMERATE = "restore_framerate"


class PressureConfig(msgspec.Struct, frozen=True, kw_only=True):
    enter_percent: float = 85.0
    """Shed a step when the smoothed CPU stays at or above this..."""
    enter_hold_s: float = 2.0
    """...for this long."""
    exit_percent: float = 60.0
    """Restore a step when the smoothed CPU stays at or under this..."""
    exit_hold_s: float = 10.0
    """...for this long (the base restore hold, before back-off)."""
    max_exit_hold_s: float = 120.0
    restore_margin: float = 5.0
    """A step is restored only if the CPU it saved fits under ``enter_percent`` less this."""
    settle_s: float = 3.0
    """No step for this long after another; a step's saving is measured this long after it."""
    revert_window_s: float = 30.0
    """A step shed again this soon after its restore doubles the restore hold."""
    smoothing_s: float = 1.0
    """Time constant of the CPU's exponential smoothing (a third of ``settle_s``, so a step's
    saving, measured on the smoothed CPU ``settle_s`` after it, is 95 % measured)."""
    min_framerate: int = 15
    """The frame rate step never goes below this."""

    def __post_init__(self) -> None:
        if not 0 < self.exit_percent < self.enter_percent <= 100:
            raise ConfigError(
                f"need 0 < exit {self.exit_percent}% < enter {self.enter_percent}% <= 100%"
            )
        for name in ("enter_hold_s", "exit_hold_s", "settle_s", "revert_window_s", "smoothing_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_exit_hold_s < self.exit_hold_s:
            raise ConfigError(f"max_exit_hold_s {self.max_exit_hold_s} is under exit_hold_s")
        if self.min_framerate < 1 or self.restore_margin < 0:
            raise ConfigError("min_framerate must be positive and restore_margin not negative")


class PressureDecision(msgspec.Struct, frozen=True, kw_only=True):
    """One step taken or undone, and the state of its stream after it."""

    at: float
    action: PressureAction
    #: The stream's steps in force after this decision (0: nothing shed).
    level: int
    #: The stream's top rung's frame rate after it.
    framerate: int
    #: The stream's rungs retired after it.
    retired_rungs: tuple[int, ...]
    #: The smoothed CPU when it was decided.
    cpu_percent: float
    late_frames: int
    #: Why, in words: for the log and the stream's stats.
    reason: str
    #: The stream it applies to ("" for a :class:`PressurePolicy`) and its priority.
    stream: str = ""
    priority: int = 0


class _Step(msgspec.Struct, kw_only=True):
    action: PressureAction
    #: The rung retired (RETIRE_RUNG) or the frame rate set (LOWER_FRAMERATE).
    value: int


class _Taken(msgspec.Struct, kw_only=True):
    at: float
    cpu_before: float
    #: CPU points it saved, once measured (``settle_s`` after it).
    saved: float | None = None


class _StreamSteps:
    """One stream's steps (module doc) and those of them in force."""

    __slots__ = ("framerate", "label", "order", "paused", "priority", "steps", "stream", "taken")

    def __init__(
        self,
        stream: str,
        *,
        priority: int,
        framerate: int,
        rungs: int,
        order: int,
        minimum: int,
        label: str = "",
    ) -> None:
        if framerate < 1 or rungs < 1:
            raise ConfigError(f"need a frame rate and a rung, got {framerate} fps, {rungs} rungs")
        self.stream = stream
        self.label = label or stream
        #: A paused stream encodes nothing: shedding its work would save nothing.
        self.paused = False
        self.priority = priority
        self.framerate = framerate
        self.order = order
        self.steps: list[_Step] = []
        lowered = max(minimum, framerate // 2)
        if lowered < framerate:
            self.steps.append(_Step(action=PressureAction.LOWER_FRAMERATE, value=lowered))
        self.steps.extend(
            _Step(action=PressureAction.RETIRE_RUNG, value=rung) for rung in range(rungs - 1)
        )
        self.taken: list[_Taken] = []

    @property
    def level(self) -> int:
        return len(self.taken)

    @property
    def saturated(self) -> bool:
        return self.level == len(self.steps)

    @property
    def current_framerate(self) -> int:
        in_force = self.steps[: self.level]
        lowered = [s.value for s in in_force if s.action is PressureAction.LOWER_FRAMERATE]
        return lowered[0] if lowered else self.framerate

    @property
    def retired_rungs(self) -> tuple[int, ...]:
        in_force = self.steps[: self.level]
        return tuple(s.value for s in in_force if s.action is PressureAction.RETIRE_RUNG)

    def describe(self) -> str:
        if self.paused:
            return f"{self.label} (priority {self.priority}) is paused"
        if self.saturated:
            return f"{self.label} (priority {self.priority}) has shed all it can"
        return f"{self.label} (priority {self.priority})"


class NodePressure:
    """The pressure steps of every stream on one node that sheds (module doc)."""

    def __init__(self, *, config: PressureConfig | None = None, history: int = 32) -> None:
        self.config = config or PressureConfig()
        self._streams: dict[str, _StreamSteps] = {}
        self._added = 0
        self._smoothed: float | None = None
        self._last_sample: float | None = None
        self._above_since: float | None = None
        self._below_since: float | None = None
        self._last_step_at = -math.inf
        self._exit_hold = self.config.exit_hold_s
        self._restored_at: float | None = None
        #: The latest decisions, oldest first, for the stats.
        self.decisions: collections.deque[PressureDecision] = collections.deque(maxlen=history)
        #: Each stream's latest decision: its steps in force (:meth:`state`).
        self._last: dict[str, PressureDecision] = {}

    # -- members ------------------------------------------------------------------------------

    def add_stream(
        self, stream: str, *, priority: int, framerate: int, rungs: int, label: str = ""
    ) -> None:
        """A stream that sheds under pressure, its top rung at ``framerate``, ``rungs`` rungs;
        ``label`` names it in refusals (default: ``stream``)."""
        if stream in self._streams:
            raise ConfigError(f"stream {stream} is already under the pressure policy")
        self._added += 1
        self._streams[stream] = _StreamSteps(
            stream,
            priority=priority,
            framerate=framerate,
            rungs=rungs,
            order=self._added,
            minimum=self.config.min_framerate,
            label=label,
        )

    def reconfigure(self, config: PressureConfig) -> None:
        """New thresholds from now on (the steps in force stay; the restore hold restarts)."""
        self.config = config
        self._exit_hold = config.exit_hold_s
        self._restored_at = None

    def set_paused(self, stream: str, paused: bool) -> None:
        """A paused stream costs no encoder time: it is never picked to shed (nor counted as
        able to give way), until it resumes.  Its steps in force stay."""
        steps = self._streams.get(stream)
        if steps is not None:
            steps.paused = paused

    def remove_stream(self, stream: str) -> None:
        """The stream stopped: its steps go with it (nothing to undo)."""
        self._streams.pop(stream, None)
        self._last.pop(stream, None)

    def __contains__(self, stream: object) -> bool:
        return stream in self._streams

    def state(self, stream: str) -> PressureDecision:
        """The stream's steps in force now, as a decision (a shell re-applies it to a
        restarted actor): its latest, or one with nothing shed before its first."""
        steps = self._streams[stream]
        last = self._last.get(stream)
        if last is not None:
            return last
        return PressureDecision(
            at=self._last_sample or 0.0,
            action=PressureAction.RESTORE_FRAMERATE,
            level=steps.level,
            framerate=steps.current_framerate,
            retired_rungs=steps.retired_rungs,
            cpu_percent=round(self._smoothed or 0.0, 1),
            late_frames=0,
            reason="nothing shed",
            stream=stream,
            priority=steps.priority,
        )

    # -- state ----------------------------------------------------------------------------------

    @property
    def level(self) -> int:
        """Steps in force, every stream's together."""
        return sum(steps.level for steps in self._streams.values())

    @property
    def saturated(self) -> bool:
        """Every stream has shed every step: nothing more to shed."""
        return all(steps.saturated for steps in self._streams.values())

    @property
    def cpu_percent(self) -> float | None:
        """The smoothed CPU."""
        return self._smoothed

    @property
    def under_pressure(self) -> bool:
        """The smoothed CPU is at or above ``enter_percent``."""
        return self._smoothed is not None and self._smoothed >= self.config.enter_percent

    def _to_shed(self) -> _StreamSteps | None:
        candidates = [s for s in self._streams.values() if not s.saturated and not s.paused]
        return min(candidates, key=lambda s: (s.priority, s.level, s.order), default=None)

    def _to_restore(self) -> _StreamSteps | None:
        candidates = [s for s in self._streams.values() if s.taken]
        return max(
            candidates, key=lambda s: (s.priority, s.level, s.taken[-1].at, s.order), default=None
        )

    def admit(self, stream: str, priority: int) -> None:
        """Whether a new stream of ``priority`` may start now: always, unless the node is under
        pressure and no stream of that priority or lower has a step left to shed to make room
        for it (then :class:`ResourceError` says why).  Streams of its own priority count: they
        would take turns with it, as equals do when shedding."""
        if not self.under_pressure:
            return
        lower = [s for s in self._streams.values() if s.priority <= priority]
        if any(not s.saturated and not s.paused for s in lower):
            return  # they give way first
        cpu, enter = self._smoothed or 0.0, self.config.enter_percent
        if lower:
            why = "; ".join(s.describe() for s in sorted(lower, key=lambda s: s.order))
            what = f"no stream of its priority or lower has work left to give ({why})"
        else:
            what = f"no running stream of priority {priority} or lower can give way to it"
        raise ResourceError(
            f"cannot start stream {stream}: the node's CPU is {cpu:.0f}%, at or above "
            f"{enter:.0f}%, and {what}"
        )

    # -- samples --------------------------------------------------------------------------------

    def on_sample(
        self, cpu_percent: float, now: float, *, late_frames: int = 0
    ) -> PressureDecision | None:
        """One CPU sample (0..100, the node's) and the frames that came out late since the
        previous one (any stream's); a decision when a step is taken or undone."""
        if not 0 <= cpu_percent <= 100 or late_frames < 0:
            raise ConfigError(f"CPU {cpu_percent}% or late frames {late_frames} out of range")
        config = self.config
        cpu = self._smooth(cpu_percent, now)
        self._measure_saving(cpu, now)
        if self._restored_at is not None and now - self._restored_at >= config.revert_window_s:
            self._exit_hold = config.exit_hold_s  # the restore held: back to the base hold
            self._restored_at = None
        if cpu < config.enter_percent:
            self._above_since = None
        elif self._above_since is None:
            self._above_since = now
        if cpu > config.exit_percent:
            self._below_since = None
        elif self._below_since is None:
            self._below_since = now
        if now - self._last_step_at < config.settle_s:
            return None
        shed = self._to_shed()
        if late_frames > 0 and shed is not None:
            return self._shed(shed, cpu, now, late_frames, f"{late_frames} frames came out late")
        above = self._above_since
        if above is not None and now - above >= config.enter_hold_s and shed is not None:
            reason = (
                f"CPU {cpu:.0f}% at or above {config.enter_percent:.0f}% for {now - above:.1f} s"
            )
            return self._shed(shed, cpu, now, late_frames, reason)
        below = self._below_since
        restore = self._to_restore()
        if below is not None and now - below >= self._exit_hold and restore is not None:
            saved = restore.taken[-1].saved or 0.0
            if cpu + saved < config.enter_percent - config.restore_margin:
                reason = (
                    f"CPU {cpu:.0f}% at or under {config.exit_percent:.0f}% for "
                    f"{now - below:.1f} s, and the {saved:.0f} points the step saved fit"
                )
                return self._restore(restore, cpu, now, reason)
        return None

    def _smooth(self, cpu: float, now: float) -> float:
        if self._smoothed is None or self._last_sample is None:
            self._smoothed = cpu
        else:
            elapsed = max(now - self._last_sample, 0.0)
            weight = 1 - math.exp(-elapsed / self.config.smoothing_s)
            self._smoothed += weight * (cpu - self._smoothed)
        self._last_sample = now
        return self._smoothed

    def _measure_saving(self, cpu: float, now: float) -> None:
        for steps in self._streams.values():
            if steps.taken:
                last = steps.taken[-1]
                if last.saved is None and now - last.at >= self.config.settle_s:
                    last.saved = max(last.cpu_before - cpu, 0.0)

    def _decision(
        self,
        steps: _StreamSteps,
        action: PressureAction,
        cpu: float,
        now: float,
        late: int,
        reason: str,
    ) -> PressureDecision:
        decision = PressureDecision(
            at=now,
            action=action,
            level=steps.level,
            framerate=steps.current_framerate,
            retired_rungs=steps.retired_rungs,
            cpu_percent=round(cpu, 1),
            late_frames=late,
            reason=reason,
            stream=steps.stream,
            priority=steps.priority,
        )
        self.decisions.append(decision)
        self._last[steps.stream] = decision
        return decision

    def _others(self, steps: _StreamSteps) -> str:
        """Why this stream and not another: said when others share the node."""
        higher = [s for s in self._streams.values() if s.priority > steps.priority]
        if not higher:
            return ""
        return f" (priority {steps.priority}, below {len(higher)} other stream(s))"

    def _shed(
        self, steps: _StreamSteps, cpu: float, now: float, late: int, why: str
    ) -> PressureDecision:
        config = self.config
        step = steps.steps[steps.level]
        if self._restored_at is not None and now - self._restored_at < config.revert_window_s:
            # The restore did not last: wait twice as long before the next one.
            self._exit_hold = min(self._exit_hold * 2, config.max_exit_hold_s)
            self._restored_at = None
        steps.taken.append(_Taken(at=now, cpu_before=cpu))
        self._last_step_at = now
        self._above_since = None
        self._below_since = None
        if step.action is PressureAction.LOWER_FRAMERATE:
            what = f"frame rate {steps.framerate} -> {step.value} fps"
        else:
            what = f"rung {step.value} retired"
        reason = f"{why}: {what}{self._others(steps)}"
        return self._decision(steps, step.action, cpu, now, late, reason)

    def _restore(self, steps: _StreamSteps, cpu: float, now: float, why: str) -> PressureDecision:
        step = steps.steps[steps.level - 1]
        steps.taken.pop()
        self._last_step_at = now
        self._restored_at = now
        self._above_since = None
        self._below_since = None
        if step.action is PressureAction.LOWER_FRAMERATE:
            action = PressureAction.RESTORE_FRAMERATE
            what = f"frame rate {step.value} -> {steps.framerate} fps"
        else:
            action = PressureAction.RESTORE_RUNG
            what = f"rung {step.value} restored"
        return self._decision(steps, action, cpu, now, 0, f"{why}: {what}")


class PressurePolicy:
    """The pressure steps of one stream alone: a :class:`NodePressure` of that one stream."""

    def __init__(
        self,
        *,
        framerate: int,
        rungs: int,
        now: float,
        config: PressureConfig | None = None,
        history: int = 32,
    ) -> None:
        self._node = NodePressure(config=config, history=history)
        self._node.add_stream("", priority=0, framerate=framerate, rungs=rungs)
        self._steps = self._node._streams[""]
        self.config = self._node.config
        self.framerate = framerate

    @property
    def decisions(self) -> collections.deque[PressureDecision]:
        return self._node.decisions

    @property
    def level(self) -> int:
        return self._steps.level

    @property
    def current_framerate(self) -> int:
        return self._steps.current_framerate

    @property
    def retired_rungs(self) -> tuple[int, ...]:
        return self._steps.retired_rungs

    @property
    def saturated(self) -> bool:
        """Every step is taken: nothing more to shed."""
        return self._steps.saturated

    @property
    def cpu_percent(self) -> float | None:
        """The smoothed CPU."""
        return self._node.cpu_percent

    def on_sample(
        self, cpu_percent: float, now: float, *, late_frames: int = 0
    ) -> PressureDecision | None:
        """One CPU sample (0..100, the node's) and the frames that came out late since the
        previous one; a decision when a step is taken or undone."""
        return self._node.on_sample(cpu_percent, now, late_frames=late_frames)
