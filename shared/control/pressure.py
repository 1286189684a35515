"""Resource pressure, sans-I/O: shed encoder work in steps before frames are late, and restore it.

The design's "Resource Constraints" recovery strategy.  The node's CPU (``ResourceMonitor``'s
``cpu_percent``) and the count of frames that came out late are fed to
:class:`PressurePolicy`; it answers with :class:`PressureDecision` steps, each carrying the
reason to log and show in the stream's stats.  One job: when and what to shed; the shell
applies a decision (the encoder's frame rate, the rung selectors' caps and the encoder's
retired rungs).

Theory of operation
-------------------
*Steps*, in the order they are taken (and undone in reverse):

1. lower the top rung's frame rate to half (not below ``min_framerate``): the cheapest loss
   to a viewer, and it halves rung 0's encoder time, the largest share of the ladder's;
2. retire rung 0, then rung 1, ...: each removes one encoder (its viewers move down a rung,
   the shell caps their selectors).  The lowest rung is never retired.

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

from shared.errors import ConfigError

__all__ = ["PressureAction", "PressureConfig", "PressureDecision", "PressurePolicy"]


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
    """One step taken or undone, and the state after it."""

    at: float
    action: PressureAction
    #: Steps in force after this decision (0: nothing shed).
    level: int
    #: The top rung's frame rate after it.
    framerate: int
    #: Rungs retired after it.
    retired_rungs: tuple[int, ...]
    #: The smoothed CPU when it was decided.
    cpu_percent: float
    late_frames: int
    #: Why, in words: for the log and the stream's stats.
    reason: str


class _Step(msgspec.Struct, kw_only=True):
    action: PressureAction
    #: The rung retired (RETIRE_RUNG) or the frame rate set (LOWER_FRAMERATE).
    value: int


class _Taken(msgspec.Struct, kw_only=True):
    at: float
    cpu_before: float
    #: CPU points it saved, once measured (``settle_s`` after it).
    saved: float | None = None


class PressurePolicy:
    """The stream's resource-pressure steps (module doc)."""

    def __init__(
        self,
        *,
        framerate: int,
        rungs: int,
        now: float,
        config: PressureConfig | None = None,
        history: int = 32,
    ) -> None:
        if framerate < 1 or rungs < 1:
            raise ConfigError(f"need a frame rate and a rung, got {framerate} fps, {rungs} rungs")
        self.config = config or PressureConfig()
        self.framerate = framerate
        self._steps: list[_Step] = []
        lowered = max(self.config.min_framerate, framerate // 2)
        if lowered < framerate:
            self._steps.append(_Step(action=PressureAction.LOWER_FRAMERATE, value=lowered))
        self._steps.extend(
            _Step(action=PressureAction.RETIRE_RUNG, value=rung) for rung in range(rungs - 1)
        )
        self._taken: list[_Taken] = []
        self._smoothed: float | None = None
        self._last_sample: float | None = None
        self._above_since: float | None = None
        self._below_since: float | None = None
        self._last_step_at = -math.inf
        self._exit_hold = self.config.exit_hold_s
        self._restored_at: float | None = None
        #: The latest decisions, oldest first, for the stats.
        self.decisions: collections.deque[PressureDecision] = collections.deque(maxlen=history)

    # -- state ------------------------------------------------------------------------------

    @property
    def level(self) -> int:
        return len(self._taken)

    @property
    def current_framerate(self) -> int:
        lowered = [s.value for s in self._in_force() if s.action is PressureAction.LOWER_FRAMERATE]
        return lowered[0] if lowered else self.framerate

    @property
    def retired_rungs(self) -> tuple[int, ...]:
        return tuple(s.value for s in self._in_force() if s.action is PressureAction.RETIRE_RUNG)

    @property
    def saturated(self) -> bool:
        """Every step is taken: nothing more to shed."""
        return self.level == len(self._steps)

    @property
    def cpu_percent(self) -> float | None:
        """The smoothed CPU."""
        return self._smoothed

    def _in_force(self) -> list[_Step]:
        return self._steps[: len(self._taken)]

    # -- samples ----------------------------------------------------------------------------

    def on_sample(
        self, cpu_percent: float, now: float, *, late_frames: int = 0
    ) -> PressureDecision | None:
        """One CPU sample (0..100, the node's) and the frames that came out late since the
        previous one; a decision when a step is taken or undone."""
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
        if late_frames > 0 and not self.saturated:
            return self._shed(cpu, now, late_frames, f"{late_frames} frames came out late")
        above = self._above_since
        if above is not None and now - above >= config.enter_hold_s and not self.saturated:
            reason = (
                f"CPU {cpu:.0f}% at or above {config.enter_percent:.0f}% for {now - above:.1f} s"
            )
            return self._shed(cpu, now, late_frames, reason)
        below = self._below_since
        if below is not None and now - below >= self._exit_hold and self._taken:
            saved = self._taken[-1].saved or 0.0
            if cpu + saved < config.enter_percent - config.restore_margin:
                reason = (
                    f"CPU {cpu:.0f}% at or under {config.exit_percent:.0f}% for "
                    f"{now - below:.1f} s, and the {saved:.0f} points the step saved fit"
                )
                return self._restore(cpu, now, reason)
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
        if self._taken:
            last = self._taken[-1]
            if last.saved is None and now - last.at >= self.config.settle_s:
                last.saved = max(last.cpu_before - cpu, 0.0)

    def _decision(
        self, action: PressureAction, cpu: float, now: float, late: int, reason: str
    ) -> PressureDecision:
        decision = PressureDecision(
            at=now,
            action=action,
            level=self.level,
            framerate=self.current_framerate,
            retired_rungs=self.retired_rungs,
            cpu_percent=round(cpu, 1),
            late_frames=late,
            reason=reason,
        )
        self.decisions.append(decision)
        return decision

    def _shed(self, cpu: float, now: float, late: int, why: str) -> PressureDecision:
        config = self.config
        step = self._steps[self.level]
        if self._restored_at is not None and now - self._restored_at < config.revert_window_s:
            # The restore did not last: wait twice as long before the next one.
            self._exit_hold = min(self._exit_hold * 2, config.max_exit_hold_s)
            self._restored_at = None
        self._taken.append(_Taken(at=now, cpu_before=cpu))
        self._last_step_at = now
        self._above_since = None
        self._below_since = None
        if step.action is PressureAction.LOWER_FRAMERATE:
            what = f"frame rate {self.framerate} -> {step.value} fps"
        else:
            what = f"rung {step.value} retired"
        return self._decision(step.action, cpu, now, late, f"{why}: {what}")

    def _restore(self, cpu: float, now: float, why: str) -> PressureDecision:
        step = self._steps[self.level - 1]
        self._taken.pop()
        self._last_step_at = now
        self._restored_at = now
        self._above_since = None
        self._below_since = None
        if step.action is PressureAction.LOWER_FRAMERATE:
            action = PressureAction.RESTORE_FRAMERATE
            what = f"frame rate {step.value} -> {self.framerate} fps"
        else:
            action = PressureAction.RESTORE_RUNG
            what = f"rung {step.value} restored"
        return self._decision(action, cpu, now, 0, f"{why}: {what}")
