"""QualityController: one target bitrate for the shared encoder from every viewer's feedback.

Sans-I/O: feed it observations with ``now`` and read back a decision.  The encoder runs once
for all viewers, so the stream's target is the lowest sustainable rate across viewers, capped
by the stream's configured quality.  Each viewer's sustainable rate follows
additive-increase / multiplicative-decrease on the signals RoQ exposes without extensions
(draft-ietf-avtcore-rtp-over-quic-14 §6: QUIC's RTT and datagram loss), in the spirit of the
loss-based half of GCC (draft-ietf-rmcat-gcc-02 §6): above 10% loss back off, below 2% probe
upward, in between hold.
"""

from __future__ import annotations

import msgspec

from shared.models import ConnectionQuality

__all__ = ["QualityController", "ViewerFeedback", "classify_connection"]

#: Never go below this fraction of the configured bitrate: a picture at all beats none.
FLOOR_FRACTION = 0.1
#: Ignore changes smaller than this fraction (rebuilding rate control has a cost).
MIN_CHANGE_FRACTION = 0.05
DECREASE_FACTOR = 0.85
INCREASE_PER_SECOND = 0.08
HIGH_LOSS = 0.10
LOW_LOSS = 0.02


class ViewerFeedback(msgspec.Struct, frozen=True, kw_only=True):
    viewer_id: str
    rtt_ms: float
    #: Fraction of media lost or dropped for this viewer since the previous feedback.
    loss_rate: float
    connected: bool = True
    #: The sender's bandwidth estimate for this viewer (shared.rtp.bandwidth), if it has one.
    estimate_bps: int | None = None


def classify_connection(feedback: ViewerFeedback) -> ConnectionQuality:
    if not feedback.connected:
        return ConnectionQuality.DISCONNECTED
    if feedback.loss_rate < 0.01 and feedback.rtt_ms < 50:
        return ConnectionQuality.EXCELLENT
    if feedback.loss_rate < 0.03 and feedback.rtt_ms < 150:
        return ConnectionQuality.GOOD
    if feedback.loss_rate < 0.10 and feedback.rtt_ms < 400:
        return ConnectionQuality.FAIR
    return ConnectionQuality.POOR


class QualityController:
    def __init__(self, ceiling_bitrate: int, *, now: float) -> None:
        self._ceiling = ceiling_bitrate
        self._estimates: dict[str, float] = {}
        self._last_update = now
        self._applied = ceiling_bitrate

    @property
    def ceiling(self) -> int:
        return self._ceiling

    def set_ceiling(self, bitrate: int) -> None:
        """The user (or a viewer allowed to control quality) changed the stream's quality."""
        self._ceiling = bitrate
        for viewer in self._estimates:
            self._estimates[viewer] = min(self._estimates[viewer], bitrate)

    def remove_viewer(self, viewer_id: str) -> None:
        self._estimates.pop(viewer_id, None)

    def update(self, feedback: list[ViewerFeedback], *, now: float) -> int | None:
        """Fold in one round of feedback; returns a new target bitrate, or None to keep it."""
        elapsed = max(0.0, now - self._last_update)
        self._last_update = now
        floor = self._ceiling * FLOOR_FRACTION
        for item in feedback:
            if not item.connected:
                self.remove_viewer(item.viewer_id)
                continue
            estimate = self._estimates.get(item.viewer_id, float(self._ceiling))
            if item.loss_rate > HIGH_LOSS:
                estimate *= DECREASE_FACTOR
            elif item.loss_rate < LOW_LOSS:
                estimate *= 1.0 + INCREASE_PER_SECOND * min(elapsed, 2.0)
            if item.estimate_bps:
                # Never ask for more than the delay-based estimate says the path carries.
                estimate = min(estimate, float(item.estimate_bps))
            self._estimates[item.viewer_id] = min(max(estimate, floor), float(self._ceiling))
        target = int(min(self._estimates.values(), default=float(self._ceiling)))
        if target == self._applied:
            return None
        small = abs(target - self._applied) < self._applied * MIN_CHANGE_FRACTION
        # Small moves are not worth a rate-control reconfiguration, except onto a bound.
        if small and target not in (self._ceiling, int(floor)):
            return None
        self._applied = target
        return target
