"""The sender's bandwidth estimate for one viewer, from transport-wide feedback and RTCP.

The receiver half (what a viewer measures and reports) is :mod:`shared.rtp.feedback`.

Sender side, :class:`BandwidthEstimator`, in the manner of GCC (draft-ietf-rmcat-gcc-02) run at
the sender as libwebrtc does with transport-wide feedback:

- delay-based (§5): packets are grouped into bursts sent within 5 ms (§5.2); the change in
  one-way delay between groups, ``(arrival_i - arrival_j) - (send_i - send_j)``, is
  accumulated, smoothed and fitted with a least-squares line over the last 20 groups (the
  "trendline" variant of the §5.3 arrival-time filter); a slope above an adaptive threshold
  (§5.4) signals overuse, below its negative underuse.  The rate controller (§5.5) then
  decreases to 0.85 x the acknowledged rate, holds, or increases by 8 % per second.
- loss-based (§6): over each feedback interval, above 10 % loss back off by half the loss,
  below 2 % grow by 5 % (but not past the delay-based estimate), in between hold.
- the estimate is the smaller of the two, clamped to ``[min_bps, max_bps]``.
- probing: a sender limited by its application (a viewer on a low rung sends less than the
  path carries) never sees the path's capacity in its acknowledged rate, so both halves would
  stay near what it sends.  :meth:`BandwidthEstimator.on_probe_result` takes the delivery rate
  a probe cluster measured (:mod:`shared.control.probe`) and lifts both halves to it, as
  libwebrtc's GoogCcNetworkController does with a probe result (``DelayBasedBwe`` sets the AIMD
  estimate, ``SetSendBitrate`` the loss-based one).

QUIC's own RTT and the RTCP RTT (:class:`SenderReportTimes`) both feed
:attr:`BandwidthEstimator.rtt_s`.  Every method takes the time as an argument (``now``: the
sender's monotonic seconds, never the wall clock, which NTP can step; arrival times in the
receiver's microseconds, whose offset from ours cancels out of every delay difference);
nothing here reads a clock.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from enum import StrEnum

from shared.errors import ConfigError
from shared.rtp.rtcp import ReportBlock, RtcpTransportFeedback, ntp_middle

__all__ = ["BandwidthEstimator", "BandwidthUsage", "SenderReportTimes"]

# -- round-trip time (RFC 3550 §6.4.1) -------------------------------------------------------


class SenderReportTimes:
    """When this sender's recent SRs went out, for the RTT of the report blocks that echo them.

    RFC 3550 §6.4.1 gives RTT = A - LSR - DLSR, with A the block's arrival as an NTP time.
    Taking A from the wall clock would let an NTP step (or slew) turn into a wrong RTT, and the
    RTT feeds the bandwidth estimate and the NACK timing.  So, as libwebrtc does, each SR's
    send time is kept on the monotonic clock under the middle 32 bits of its NTP timestamp
    (what LSR echoes), and RTT = now - sent_at(LSR) - DLSR, all on one clock.  The wall clock
    only ever appears as data, inside the SR.  At most ``max_reports`` are kept (SRs go out
    every half second; a block echoing an older one is too stale to time anything).
    """

    def __init__(self, max_reports: int = 16) -> None:
        if max_reports < 1:
            raise ConfigError(f"max_reports must be positive, got {max_reports}")
        self.max_reports = max_reports
        self._sent: collections.OrderedDict[int, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._sent)

    def on_sent(self, ntp: int, now: float) -> None:
        """An SR with 64-bit NTP timestamp ``ntp`` went out at monotonic time ``now``."""
        middle = ntp_middle(ntp)
        self._sent.pop(middle, None)
        self._sent[middle] = now
        while len(self._sent) > self.max_reports:
            self._sent.popitem(last=False)

    def round_trip_time(self, block: ReportBlock, now: float) -> float | None:
        """RTT in seconds from a block that arrived at monotonic ``now``; None before the
        receiver has seen an SR (LSR = 0) or when LSR names no SR this sender remembers."""
        if not block.last_sr:
            return None
        sent_at = self._sent.get(block.last_sr)
        if sent_at is None:
            return None
        # DLSR rounding can make a sub-tick RTT slightly negative: that is a zero RTT.
        return max(now - sent_at - block.delay_since_last_sr / 65536, 0.0)


# -- sender: the estimate (draft-ietf-rmcat-gcc-02) ------------------------------------------


class BandwidthUsage(StrEnum):
    NORMAL = "normal"
    OVERUSE = "overuse"
    UNDERUSE = "underuse"


BURST_S = 0.005  # §5.2: packets sent within 5 ms form one group
TRENDLINE_WINDOW = 20
SMOOTHING = 0.9
TREND_GAIN = 4.0
THRESHOLD_INITIAL_MS = 12.5
THRESHOLD_MIN_MS, THRESHOLD_MAX_MS = 6.0, 600.0
K_UP, K_DOWN = 0.0087, 0.039  # §5.4
DECREASE_FACTOR = 0.85  # §5.5 beta
INCREASE_PER_SECOND = 0.08  # §5.5 eta - 1
ACKED_WINDOW_S = 0.5
HIGH_LOSS, LOW_LOSS = 0.10, 0.02  # §6
LOSS_MIN_PACKETS, LOSS_MAX_INTERVAL_S = 50, 1.0


class _Group:
    __slots__ = ("arrival", "first_send", "send")

    def __init__(self, send: float, arrival: float) -> None:
        self.first_send, self.send, self.arrival = send, send, arrival


class BandwidthEstimator:
    """Per-connection send-side estimate from transport-wide feedback and RTCP (module doc)."""

    def __init__(
        self,
        *,
        initial_bps: int,
        now: float,
        min_bps: int = 50_000,
        max_bps: int = 50_000_000,
        max_tracked: int = 8192,
    ) -> None:
        if not 0 < min_bps <= initial_bps <= max_bps:
            raise ConfigError(f"need 0 < min {min_bps} <= initial {initial_bps} <= max {max_bps}")
        self.min_bps, self.max_bps = min_bps, max_bps
        self._delay_bps = float(initial_bps)
        self._loss_bps = float(initial_bps)
        self._sent: collections.OrderedDict[int, tuple[float, int]] = collections.OrderedDict()
        self._max_tracked = max_tracked
        self._acked: collections.deque[tuple[float, int]] = collections.deque()
        self._acked_bytes = 0  # the sum of the sizes in _acked, kept as it changes
        self._group: _Group | None = None
        self._previous_group: _Group | None = None
        self._accumulated_ms = 0.0
        self._smoothed_ms = 0.0
        self._points: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=TRENDLINE_WINDOW
        )
        self._first_arrival: float | None = None
        self._deltas = 0
        self._threshold_ms = THRESHOLD_INITIAL_MS
        self._last_threshold_update: float | None = None
        self._previous_trend = 0.0
        self._overuse_count = 0
        self._last_update = now
        self._last_loss_update = now
        self._interval_received = self._interval_lost = 0
        self.usage = BandwidthUsage.NORMAL
        self.rtt_s = 0.0
        #: Loss fraction over the last feedback interval (transport-wide feedback, else RR).
        self.loss = 0.0
        self.packets_reported = 0
        self.packets_lost = 0

    @property
    def estimate_bps(self) -> int:
        value = min(self._delay_bps, self._loss_bps)
        return int(min(max(value, self.min_bps), self.max_bps))

    @property
    def acked_bps(self) -> int:
        if len(self._acked) < 2:
            return 0
        span = self._acked[-1][0] - self._acked[0][0]
        return int(self._acked_bytes * 8 / max(span, ACKED_WINDOW_S / 5))

    def on_packet_sent(self, transport_sequence: int, size: int, now: float) -> None:
        seq = transport_sequence & 0xFFFF
        self._sent.pop(seq, None)
        self._sent[seq] = (now, size)
        while len(self._sent) > self._max_tracked:
            self._sent.popitem(last=False)

    def on_rtt(self, rtt_s: float) -> None:
        self.rtt_s = rtt_s

    def on_transport_feedback(self, feedback: RtcpTransportFeedback, now: float) -> None:
        received = lost = 0
        for seq, arrival_us in feedback.arrivals():
            record = self._sent.pop(seq, None)
            if record is None:
                continue  # unknown, already reported, or too old to track
            if arrival_us is None:
                lost += 1
                continue
            received += 1
            arrival = arrival_us / 1e6
            self._acked.append((arrival, record[1]))
            self._acked_bytes += record[1]
            self._on_arrival(record[0], arrival, now)
        while self._acked and self._acked[-1][0] - self._acked[0][0] > ACKED_WINDOW_S:
            self._acked_bytes -= self._acked.popleft()[1]
        self.packets_reported += received + lost
        self.packets_lost += lost
        # §6 acts on loss over an RTCP interval; a few packets per feedback are too noisy, so
        # losses are pooled until LOSS_MIN_PACKETS or LOSS_MAX_INTERVAL_S.
        self._interval_received += received
        self._interval_lost += lost
        total = self._interval_received + self._interval_lost
        if total >= LOSS_MIN_PACKETS or (
            total and now - self._last_loss_update >= LOSS_MAX_INTERVAL_S
        ):
            self._on_loss(self._interval_lost / total, now)
            self._interval_received = self._interval_lost = 0
        self._update_delay_rate(now)

    def on_probe_result(self, probe_bps: int, now: float) -> None:
        """A probe cluster was delivered at ``probe_bps``: the path carries at least that.

        Only ever raises the estimate: a short cluster that met cross traffic measures less
        than the path carries, and congestion is the delay- and loss-based halves' to find.
        Not while the detector sees overuse (libwebrtc applies a probe only when not
        overusing), since then the queue that built up says the rate is too high already.
        """
        if probe_bps <= 0:
            raise ConfigError(f"a probe result must be positive, got {probe_bps} bps")
        if self.usage is BandwidthUsage.OVERUSE:
            return
        value = float(min(max(probe_bps, self.min_bps), self.max_bps))
        self._delay_bps = max(self._delay_bps, value)
        self._loss_bps = max(self._loss_bps, value)
        self._last_update = now

    def on_capacity(self, capacity_bps: int, now: float) -> None:
        """The path was measured to carry no more than ``capacity_bps`` (hold checks that
        saturated it, ``shared.control.rung_choice``): the estimate is lowered to it if above.

        An application-limited sender's estimate is not lowered by GCC itself while what it
        sends fits the path (§5.5 only holds it under 1.5x the acknowledged rate), so without
        this the estimate would stand above a capacity just measured, and the viewer moved
        down for it would be let straight back up."""
        if capacity_bps <= 0:
            raise ConfigError(f"a capacity must be positive, got {capacity_bps} bps")
        value = float(min(max(capacity_bps, self.min_bps), self.max_bps))
        self._delay_bps = min(self._delay_bps, value)
        self._loss_bps = min(self._loss_bps, value)
        self._last_update = now

    def on_receiver_report(self, fraction_lost: float, now: float) -> None:
        """RR loss, used only while no transport-wide feedback is coming."""
        if self.packets_reported == 0:
            self._on_loss(fraction_lost, now)

    # -- delay-based (§5) -------------------------------------------------------------------

    def _on_arrival(self, send: float, arrival: float, now: float) -> None:
        group = self._group
        if group is None:
            self._group = _Group(send, arrival)
            return
        if send - group.first_send <= BURST_S:
            group.send, group.arrival = max(group.send, send), max(group.arrival, arrival)
            return
        if send < group.first_send:
            return  # reordered across groups: ignored, as §5.2 does
        previous, self._previous_group = self._previous_group, group
        self._group = _Group(send, arrival)
        if previous is None:
            return
        delay_ms = ((group.arrival - previous.arrival) - (group.send - previous.send)) * 1000
        self._on_delay_delta(delay_ms, group.arrival, now)

    def _on_delay_delta(self, delay_ms: float, arrival: float, now: float) -> None:
        if self._first_arrival is None:
            self._first_arrival = arrival
        self._deltas += 1
        self._accumulated_ms += delay_ms
        self._smoothed_ms = SMOOTHING * self._smoothed_ms + (1 - SMOOTHING) * self._accumulated_ms
        self._points.append(((arrival - self._first_arrival) * 1000, self._smoothed_ms))
        if len(self._points) < TRENDLINE_WINDOW:
            return
        trend = _slope(self._points)
        modified = min(self._deltas, 60) * trend * TREND_GAIN
        if modified > self._threshold_ms:
            self._overuse_count += 1
            # Overuse needs persistence and a growing trend, not one noisy group.
            if self._overuse_count >= 2 and trend >= self._previous_trend:
                self.usage = BandwidthUsage.OVERUSE
        elif modified < -self._threshold_ms:
            self._overuse_count = 0
            self.usage = BandwidthUsage.UNDERUSE
        else:
            self._overuse_count = 0
            self.usage = BandwidthUsage.NORMAL
        self._previous_trend = trend
        self._adapt_threshold(modified, now)

    def _adapt_threshold(self, modified: float, now: float) -> None:
        # §5.4: gamma follows |m| slowly upward and faster downward; outliers are ignored.
        last = self._last_threshold_update
        self._last_threshold_update = now
        if last is None or abs(modified) > self._threshold_ms + 15:
            return
        k = K_DOWN if abs(modified) < self._threshold_ms else K_UP
        elapsed_ms = min((now - last) * 1000, 100.0)
        self._threshold_ms += k * (abs(modified) - self._threshold_ms) * elapsed_ms
        self._threshold_ms = min(max(self._threshold_ms, THRESHOLD_MIN_MS), THRESHOLD_MAX_MS)

    def _update_delay_rate(self, now: float) -> None:
        elapsed = min(max(now - self._last_update, 0.0), 1.0)
        self._last_update = now
        acked = self.acked_bps
        if self.usage is BandwidthUsage.OVERUSE:
            if acked:
                self._delay_bps = min(self._delay_bps, DECREASE_FACTOR * acked)
            # One decrease per overuse episode: hold until the signal changes (§5.5).
            self.usage = BandwidthUsage.NORMAL
            self._overuse_count = 0
            self._accumulated_ms = self._smoothed_ms = 0.0
            self._points.clear()
        elif self.usage is BandwidthUsage.NORMAL:
            grown = self._delay_bps * (1 + INCREASE_PER_SECOND) ** elapsed
            if acked:
                # §5.5: never more than 1.5x what actually got through.
                grown = min(grown, max(self._delay_bps, 1.5 * acked + 10_000))
            self._delay_bps = grown
        self._delay_bps = min(max(self._delay_bps, self.min_bps), self.max_bps)

    # -- loss-based (§6) ----------------------------------------------------------------------

    def _on_loss(self, loss: float, now: float) -> None:
        self.loss = loss
        self._last_loss_update = now
        if loss > HIGH_LOSS:
            self._loss_bps *= 1 - 0.5 * loss
        elif loss < LOW_LOSS:
            # Grown no further than the delay-based estimate, as libwebrtc caps its loss-based
            # target by the delay-based limit: a loss-based half left to grow 5 % per clean
            # interval would, after a minute without loss, sit at max_bps, and the next loss
            # burst would have to halve it a dozen times before it limited anything.
            self._loss_bps = min(self._loss_bps * 1.05, max(self._delay_bps, self._loss_bps))
        else:
            return
        self._loss_bps = min(max(self._loss_bps, self.min_bps), self.max_bps)


def _slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of ``(x, y)`` points (0 when x does not vary)."""
    count = len(points)
    mean_x = math.fsum(x for x, _ in points) / count
    mean_y = math.fsum(y for _, y in points) / count
    numerator = math.fsum((x - mean_x) * (y - mean_y) for x, y in points)
    denominator = math.fsum((x - mean_x) ** 2 for x, _ in points)
    return numerator / denominator if denominator else 0.0
