"""Each rung's encoder target, from the viewers on it and from the content, sans-I/O.

The ladder is encoded once per rung (:mod:`shared.media.ladder`) and every viewer receives one
rung (:mod:`shared.control.rung_choice`).  :class:`RungTargets` decides, per rung, the bitrate
its encoder runs at and whether it runs at all.  One job: it does not choose viewers' rungs.

Theory of operation
-------------------
Per rung, on every :meth:`RungTargets.update` (the shell runs it on its stats tick, or when a
viewer's rung changes):

1. *Who is on it.*  A viewer counts for the rung it is *going to* (its pending switch's, else
   its current one); a rung is *watched* while some viewer is on it or going to it, since a
   viewer keeps receiving its old rung until the new one's IDR.
2. *Paused.*  A rung nobody watches is paused: its encoder stops, and the shell resumes it with
   an IDR (``resumed``) when a viewer is on its way to it, which the switch needs anyway.
   Rungs in ``keep_running`` (default: rung 0, the stream's own quality, which recordings and
   the stream's stats follow) are never paused.
3. *Target.*  A low percentile (``percentile``, nearest rank) of the estimates of the viewers
   counted for the rung, clamped to ``[min_bps, need]``.  A low percentile rather than the
   minimum: with many viewers one poor link does not lower the picture for all (that viewer's
   own selector moves it down a rung instead); with few, the rung does not overrun its
   weakest viewer.  Since a viewer stays on a rung only while its estimate is at least 95 %
   of the rung's rate, this only ever trims a rung, never halves it.  With no viewer counted,
   the target is the need: a stream nobody watches returns to its configured quality.
4. *Need, content-aware.*  The encoder's own complexity signal says when fewer bits suffice:
   x264 in CBR cannot spend bits a still or simple picture does not need (the rate adjuster
   in :mod:`shared.media.rate_control` measures 0.76 to 0.86 of the target on easy content, far
   less on a still one).  When a rung has produced under ``content_limited`` of its target
   for ``content_hold_s`` (and, if the encoder reports a QP, at a QP no higher than
   ``easy_qp``: a starved encoder at a high QP is not easy content), its need becomes
   ``content_headroom`` x what it produced (never under ``min_bps``); as soon as it
   produces ``content_recover`` of that need (the picture got harder), the need is the
   configured rate again, at once.  The need is what the rung's viewers' selectors should be
   given as its rate (:meth:`~shared.control.rung_choice.RungSelector.set_rates`): a still
   picture's top rung then fits a viewer whose path would not carry it in motion.
5. *Deadband.*  A target moves only by ``min_change`` or more of the current one (an encoder
   reconfiguration has a cost), except onto a bound.

Nothing here reads a clock; ``now`` is passed in (monotonic seconds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec

from shared.errors import ConfigError

__all__ = [
    "RungBounds",
    "RungComplexity",
    "RungTarget",
    "RungTargets",
    "RungTargetsConfig",
    "ViewerRung",
]

#: A rung's default floor, as a fraction of its configured rate: the ladder's rungs are about
#: 2x apart, so below half its rate a rung looks worse than the rung under it at full rate.
DEFAULT_MIN_FRACTION = 0.5


class RungBounds(msgspec.Struct, frozen=True, kw_only=True):
    configured_bps: int
    """The rung's planned bitrate (``Rung.bitrate``): its ceiling."""
    min_bps: int | None = None
    """Its floor (default: half the configured rate)."""

    @property
    def floor_bps(self) -> int:
        if self.min_bps is not None:
            return self.min_bps
        return int(self.configured_bps * DEFAULT_MIN_FRACTION)


class RungTargetsConfig(msgspec.Struct, frozen=True, kw_only=True):
    percentile: float = 0.2
    """Which estimate of a rung's viewers sets its target (0: the lowest)."""
    min_change: float = 0.05
    """Smaller moves of a target are not made (except onto a bound)."""
    content_limited: float = 0.5
    """Produced under this fraction of the target: the content does not need the target."""
    content_hold_s: float = 3.0
    """...for this long before the need is lowered."""
    content_headroom: float = 2.0
    """A lowered need is this multiple of what the encoder produced."""
    content_recover: float = 0.8
    """Produced at least this fraction of a lowered need: the need is the configured rate."""
    easy_qp: float = 30.0
    """Content counts as easy only at or below this QP, when the encoder reports one."""


class ViewerRung(msgspec.Struct, frozen=True, kw_only=True):
    """One viewer as the targets see it."""

    rung: int
    """The rung it receives now."""
    estimate_bps: int
    """Its bandwidth estimate."""
    pending_rung: int | None = None
    """The rung it is switching to (waiting for that rung's IDR), if any."""


class RungComplexity(msgspec.Struct, frozen=True, kw_only=True):
    """What one rung's encoder produced lately (``RungEncodeStats``: bitrate over 2 s)."""

    rung: int
    produced_bps: int
    qp: float | None = None
    """The average QP of those frames, when the encoder reports it."""


class RungTarget(msgspec.Struct, frozen=True, kw_only=True):
    rung: int
    target_bps: int
    """What its encoder should run at (its need while paused)."""
    need_bps: int
    """What its content needs (the configured rate unless the content is easy)."""
    paused: bool
    viewers: int
    """Viewers counted for it (going to it, or on it and staying)."""
    changed: bool
    """The target moved on this update: set the encoder's bitrate."""
    resumed: bool
    """It was paused and runs again: its first frame must be an IDR."""
    reason: str


class _RungState(msgspec.Struct, kw_only=True):
    target: int
    need: int
    paused: bool = False
    easy_since: float | None = None


class RungTargets:
    """The ladder's encoder targets (module doc)."""

    def __init__(
        self,
        bounds: Sequence[RungBounds],
        *,
        keep_running: Sequence[int] = (0,),
        config: RungTargetsConfig | None = None,
    ) -> None:
        if not bounds:
            raise ConfigError("a ladder has at least one rung")
        for index, bound in enumerate(bounds):
            if not 0 < bound.floor_bps <= bound.configured_bps:
                raise ConfigError(
                    f"rung {index}: need 0 < min {bound.floor_bps} <= configured "
                    f"{bound.configured_bps} bps"
                )
        for rung in keep_running:
            if not 0 <= rung < len(bounds):
                raise ConfigError(f"keep_running names rung {rung} of a {len(bounds)}-rung ladder")
        self.config = config or RungTargetsConfig()
        if not 0 <= self.config.percentile <= 1:
            raise ConfigError(f"percentile {self.config.percentile} must be in [0, 1]")
        self.bounds = tuple(bounds)
        self._keep = frozenset(keep_running)
        self._state = [_RungState(target=b.configured_bps, need=b.configured_bps) for b in bounds]

    def needs(self) -> list[int]:
        """Each rung's need, top first: the rates to give the viewers' selectors."""
        return [state.need for state in self._state]

    def update(
        self,
        viewers: Sequence[ViewerRung],
        *,
        now: float,
        complexity: Sequence[RungComplexity] = (),
    ) -> list[RungTarget]:
        """Every rung's target and state after this round (module doc)."""
        count = len(self.bounds)
        watched = [0] * count
        estimates: list[list[int]] = [[] for _ in range(count)]
        for viewer in viewers:
            going = viewer.rung if viewer.pending_rung is None else viewer.pending_rung
            for rung in (viewer.rung, going):
                if not 0 <= rung < count:
                    raise ConfigError(f"viewer on rung {rung} of a {count}-rung ladder")
            watched[viewer.rung] += 1
            if going != viewer.rung:
                watched[going] += 1
            estimates[going].append(viewer.estimate_bps)
        by_rung = {c.rung: c for c in complexity}
        return [
            self._update_rung(rung, watched[rung], estimates[rung], by_rung.get(rung), now)
            for rung in range(count)
        ]

    def _update_need(self, rung: int, signal: RungComplexity | None, now: float) -> str:
        config, bound, state = self.config, self.bounds[rung], self._state[rung]
        if signal is None or state.paused:
            state.easy_since = None
            return ""
        produced = signal.produced_bps
        if state.need < bound.configured_bps and produced >= config.content_recover * state.need:
            state.need = bound.configured_bps
            state.easy_since = None
            return f"content needs more: produced {produced} bps, need back to configured"
        easy = produced < config.content_limited * state.target and (
            signal.qp is None or signal.qp <= config.easy_qp
        )
        if not easy:
            state.easy_since = None
            return ""
        if state.easy_since is None:
            state.easy_since = now
        if now - state.easy_since < config.content_hold_s:
            return ""
        need = min(max(int(produced * config.content_headroom), bound.floor_bps), state.need)
        if need < state.need:
            state.need = need
            qp = "" if signal.qp is None else f" at QP {signal.qp:.0f}"
            return f"easy content: produced {produced} bps{qp}, need {need} bps"
        return ""

    def _update_rung(
        self,
        rung: int,
        watched: int,
        estimates: list[int],
        signal: RungComplexity | None,
        now: float,
    ) -> RungTarget:
        bound, state = self.bounds[rung], self._state[rung]
        reasons = [self._update_need(rung, signal, now)]
        was_paused = state.paused
        state.paused = watched == 0 and rung not in self._keep
        if state.paused and not was_paused:
            reasons.append("no viewer on it: paused")
        elif was_paused and not state.paused:
            reasons.append("a viewer is going to it: resumed")
        floor, ceiling = bound.floor_bps, state.need
        if estimates:
            ordered = sorted(estimates)
            # Nearest rank: the smallest value with at least that share of values at or below.
            rank = max(math.ceil(self.config.percentile * len(ordered)), 1)
            wanted = min(max(ordered[rank - 1], floor), ceiling)
            why = f"{self.config.percentile:.0%} of {len(ordered)} viewers' estimates"
        else:  # paused, or only watched by viewers leaving it: back to its need
            wanted = ceiling
            why = "no viewer: its need"
        changed = False
        if wanted != state.target:
            small = abs(wanted - state.target) < state.target * self.config.min_change
            if not small or wanted in (floor, ceiling):
                state.target = wanted
                changed = True
                reasons.append(f"target {wanted} bps ({why})")
        return RungTarget(
            rung=rung,
            target_bps=state.target,
            need_bps=state.need,
            paused=state.paused,
            viewers=len(estimates),
            changed=changed,
            resumed=was_paused and not state.paused,
            reason="; ".join(r for r in reasons if r),
        )
