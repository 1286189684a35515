"""One viewer's rung and probing on the sending side, sans-I/O: the cores wired together.

The cores each do one job: :class:`shared.rtp.bandwidth.BandwidthEstimator` estimates the
path (GCC, draft-ietf-rmcat-gcc-02), :class:`shared.control.rung_choice.RungSelector` picks
the rung from the estimate, :class:`shared.control.probe.ProbeController` finds headroom
before the selector may go up.  :class:`PeerAdaptation` is the wiring between them that the
shard runs per viewer, as ``tests/netsim.py`` (``SimViewer._on_feedback``/``_on_timer``) runs it
on a simulated link:

- every transport-wide feedback goes to the estimator (the caller does that) and to the probe
  controller, whose result, once a cluster is complete, goes back to the estimator
  (:meth:`BandwidthEstimator.on_probe_result`) and to the selector
  (:meth:`RungSelector.on_probe_result`: it may answer a doubt); then the selector decides on
  the new estimate,
  and the probe controller learns the rate the selector wants confirmed;
- every packet sent (media, retransmission, padding) is reported to the probe controller, so a
  cluster measures the path, not only its padding;
- at :meth:`PeerAdaptation.next_deadline`, :meth:`PeerAdaptation.on_timer` judges an overdue
  cluster, lets the selector time out holds and feedback, and hands out the padding due;
- :meth:`PeerAdaptation.takes` says whether a frame of a rung goes to the viewer: frames of its
  rung, and the IDR of the rung it is switching to, which completes the switch (the viewer's
  decoder sees the new SPS/PPS there); from then on only the new rung.

Padding (:func:`padding_packets`): RFC 3550 §5.1 allows a packet whose payload is all padding
(P set, the last octet counts the padding octets, at most 255).  A probe packet of
:data:`shared.control.probe.PROBE_PACKET_SIZE` bytes is therefore sent as several padding-only
packets on the viewer's video SSRC, each with its own transport-wide sequence number
(draft-holmer-rmcat-transport-wide-cc-extensions-01 §2), which is all the probe needs.  They
repeat the sequence number and timestamp of the last media packet rather than take new ones:
a padding-only packet carries no media, the viewer's receiver drops it before its jitter
buffer (``shared.rtp.receiver``), and a fresh sequence number would look like a lost packet
there and draw a NACK.

Nothing here reads a clock; ``now`` is passed in (monotonic seconds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shared.control.probe import ProbeController, ProbeResult
from shared.control.rung_choice import RungSelector, RungSelectorConfig, RungSwitch
from shared.rtp.bandwidth import BandwidthEstimator
from shared.rtp.rtcp import RtcpTransportFeedback

__all__ = ["MAX_PADDING", "PeerAdaptation", "padding_sizes"]

#: The most padding one RTP packet can carry: the count is one octet (RFC 3550 §5.1).
MAX_PADDING = 255


def padding_sizes(size: int, header: int) -> list[int]:
    """How many padding octets each packet carries so that the packets, headers included,
    add up to about ``size`` bytes (each at most :data:`MAX_PADDING` octets of padding)."""
    if size <= header:
        return [1]
    count = math.ceil(size / (header + MAX_PADDING))
    each = max(1, min(MAX_PADDING, size // count - header))
    return [each] * count


class PeerAdaptation:
    """One viewer's rung choice and probing (module doc)."""

    def __init__(
        self,
        rates_bps: Sequence[int],
        *,
        now: float,
        cap: int = 0,
        start_rung: int | None = None,
        config: RungSelectorConfig | None = None,
    ) -> None:
        self.selector = RungSelector(
            rates_bps, now=now, cap=cap, start_rung=start_rung, config=config
        )
        self.probe = ProbeController(now=now)
        #: Padding packets sent for probes, and their bytes.
        self.padding_packets = 0
        self.padding_bytes = 0
        #: Why the last switch was wanted (for the logs and the stats).
        self.last_reason = ""

    @property
    def rung(self) -> int:
        return self.selector.rung

    def on_transport_feedback(
        self, estimator: BandwidthEstimator, feedback: RtcpTransportFeedback, now: float
    ) -> None:
        """One transport-wide feedback, after the estimator has taken it."""
        result = self.probe.on_transport_feedback(feedback.arrivals(), now)
        self._on_probe_result(estimator, result, now)

    def decide(
        self, estimator: BandwidthEstimator, now: float, *, sending_bps: int | None = None
    ) -> RungSwitch | None:
        """The selector on the estimator's new estimate (after a feedback); ``sending_bps``:
        the media rate the viewer is being sent (its hold checks need it)."""
        if sending_bps is not None:
            self.selector.set_sending(sending_bps)
        switch = self.selector.on_estimate(
            estimator.estimate_bps, loss=estimator.loss, rtt_s=estimator.rtt_s, now=now
        )
        self._note(switch)
        self._update_probe(estimator, now)
        return switch

    def on_timer(
        self, estimator: BandwidthEstimator, now: float, *, sending_bps: int | None = None
    ) -> RungSwitch | None:
        """Run at :meth:`next_deadline`: a cluster's result overdue, holds, timeouts, checks."""
        if sending_bps is not None:
            self.selector.set_sending(sending_bps)
        self._on_probe_result(estimator, self.probe.on_timer(now), now)
        switch = self.selector.on_timer(now)
        self._note(switch)
        self._update_probe(estimator, now)
        return switch

    def _on_probe_result(
        self, estimator: BandwidthEstimator, result: ProbeResult | None, now: float
    ) -> None:
        """A cluster's result: to the estimator (a rate the path carried lifts it) and to the
        selector (a cluster that found a doubted rung does not hold moves the viewer down)."""
        if result is None:
            return
        if result.estimate_bps is not None and not result.check:
            estimator.on_probe_result(result.estimate_bps, now)
        switch = self.selector.on_probe_result(
            result.estimate_bps,
            offered_bps=result.offered_bps,
            saturated=result.saturated,
            started_at=result.started_at,
            now=now,
            check=result.check,
        )
        if switch is not None and switch.capacity_bps is not None:
            # Down for what hold checks measured: the estimate must not stay above it.
            estimator.on_capacity(switch.capacity_bps, now)
        self._note(switch)

    def _note(self, switch: RungSwitch | None) -> None:
        if switch is not None:
            self.last_reason = switch.reason

    def _update_probe(self, estimator: BandwidthEstimator, now: float) -> None:
        self.probe.update(
            estimate_bps=estimator.estimate_bps,
            wanted_bps=self.selector.probe_target(now),
            check_bps=self.selector.check_target(now),
            now=now,
        )

    def set_cap(self, cap: int, estimator: BandwidthEstimator, now: float) -> None:
        self._note(self.selector.set_cap(cap, now))
        self._update_probe(estimator, now)

    def set_pin(self, rung: int | None, estimator: BandwidthEstimator, now: float) -> None:
        self._note(self.selector.set_pin(rung, now))
        self._update_probe(estimator, now)

    def next_deadline(self) -> float | None:
        pair = (self.selector.next_deadline(), self.probe.next_deadline())
        deadlines = [d for d in pair if d is not None]
        return min(deadlines, default=None)

    def probe_bytes_due(self, now: float) -> list[int]:
        """The probe packets due now, as sizes in bytes (the caller sends them as padding)."""
        return [packet.size for packet in self.probe.take_probes(now)]

    def on_packet_sent(self, transport_sequence: int, size: int, now: float) -> None:
        self.probe.on_packet_sent(transport_sequence, size, now)

    def keyframe_request(self, now: float) -> int | None:
        """The rung whose encoder must make an IDR for the pending switch, when it is time."""
        return self.selector.keyframe_request(now)

    def takes(self, rung: int, keyframe: bool, now: float) -> bool:
        """Whether this viewer is sent a video frame of ``rung`` (module doc)."""
        selector = self.selector
        if rung == selector.rung:
            if keyframe:
                selector.on_keyframe(rung, now)
            return True
        return keyframe and selector.wants_keyframe(rung) and selector.on_keyframe(rung, now)
