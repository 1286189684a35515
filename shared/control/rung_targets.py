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
4. *Need, content-aware.*  The encoder's own complexity signal says when fewer bits suffice.
   Per running rung, from the encoder's stats (``actors.stages.quality.rung_complexity``):
   what it produced over the last two seconds and, where the encoder reports it, the
   average QP of those frames (``shared.media.codec.packet_qp``: libx264 and NVENC do).

   *With a QP* (the rate a capped CRF would spend).  H.264's quantiser step doubles every
   6 QP, and the bits of a frame roughly halve with it, so the rate at which this content
   would be coded at ``reference_qp`` is ``produced x 2 ** ((qp - reference_qp) / 6)``:
   the *content's rate*, clamped to ``[min_bps, configured]``.  ``reference_qp`` 18 is
   where x264's own documentation puts "visually lossless" (its CRF scale); bits that take
   a picture below it buy nothing a viewer sees.  The bits alone cannot tell this: x264's
   one-pass ABR spends a still picture's spare bits refining it towards QP 0 (measured,
   libx264 veryfast zerolatency, 640x360 at 15 fps, 2 s GOP: a still picture produced the
   whole 300 kbps at QP 7, the moving test pattern the same 300 kbps at QP 15; at 150 kbps,
   QP 21 against 28).  The need is lowered to the content's rate (the highest it reached
   meanwhile) once it has stayed more than ``min_change`` under the need for
   ``content_hold_s``; it is raised at once, to the content's rate, when that passes
   ``need / content_recover`` (the picture got harder: at the lowered rate its QP rose
   about 2 over the reference).

   *Without a QP* (an encoder that does not report one), the bits alone: a rung that
   produced under ``content_limited`` of its target for ``content_hold_s`` cannot use its
   rate, and its need becomes ``content_headroom`` x what it produced (never under
   ``min_bps``); as soon as it produces ``content_recover`` of that need, the need is the
   configured rate again, at once.

   The need caps the target.  It is also the rate the viewers' selectors weigh their
   estimates against (:meth:`needs`; the quality actor gives it to every shard, which hands
   it to :meth:`~shared.control.rung_choice.RungSelector.set_rates`): a still picture's top
   rung then fits a viewer whose path would not carry it in motion.
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

#: H.264's quantiser step doubles every 6 QP (ITU-T H.264 §8.5.12.1 scales a coefficient by
#: ``LevelScale(qP % 6) << (qP / 6)``), and a frame's bits roughly halve with it.
QP_PER_DOUBLING = 6.0
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
    reference_qp: float = 18.0
    """With a QP: the need is the rate at which the content would be coded at this QP."""
    content_hold_s: float = 3.0
    """The content must need less for this long before the need is lowered."""
    content_recover: float = 0.8
    """The need rises at once when the content needs at least ``need / content_recover``
    (with a QP), or produces at least this fraction of a lowered need (without)."""
    content_limited: float = 0.5
    """Without a QP: produced under this fraction of the target, the content does not need
    the target."""
    content_headroom: float = 2.0
    """Without a QP: a lowered need is this multiple of what the encoder produced."""


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
    #: The highest content rate (with a QP) since ``easy_since``: what a lowered need becomes.
    easy_bps: int = 0


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
        state = self._state[rung]
        if signal is None or state.paused:
            state.easy_since = None
            return ""
        if signal.qp is None:
            return self._need_by_bits(rung, signal.produced_bps, now)
        return self._need_by_qp(rung, signal.produced_bps, signal.qp, now)

    def _need_by_qp(self, rung: int, produced: int, qp: float, now: float) -> str:
        """The content's rate at ``reference_qp`` against the need (module doc, 4)."""
        config, bound, state = self.config, self.bounds[rung], self._state[rung]
        scaled = produced * 2 ** ((qp - config.reference_qp) / QP_PER_DOUBLING)
        content = min(max(int(scaled), bound.floor_bps), bound.configured_bps)
        why = f"produced {produced} bps at QP {qp:.0f}"
        if scaled * config.content_recover >= state.need and content > state.need:
            state.need, state.easy_since = content, None
            return f"content needs more: {why}, need {content} bps"
        if content > state.need * (1 - config.min_change):
            state.easy_since = None
            return ""
        if state.easy_since is None:
            state.easy_since, state.easy_bps = now, content
        state.easy_bps = max(state.easy_bps, content)
        if now - state.easy_since < config.content_hold_s:
            return ""
        state.need, state.easy_since = state.easy_bps, None
        return f"easy content: {why}, need {state.need} bps"

    def _need_by_bits(self, rung: int, produced: int, now: float) -> str:
        """Without a QP: what the encoder produced against its target (module doc, 4)."""
        config, bound, state = self.config, self.bounds[rung], self._state[rung]
        if state.need < bound.configured_bps and produced >= config.content_recover * state.need:
            state.need = bound.configured_bps
            state.easy_since = None
            return f"content needs more: produced {produced} bps, need back to configured"
        if produced >= config.content_limited * state.target:
            state.easy_since = None
            return ""
        if state.easy_since is None:
            state.easy_since = now
        if now - state.easy_since < config.content_hold_s:
            return ""
        need = min(max(int(produced * config.content_headroom), bound.floor_bps), state.need)
        if need < state.need:
            state.need = need
            return f"easy content: produced {produced} bps, need {need} bps"
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
