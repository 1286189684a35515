"""The congestion feedback loop: what a viewer measures, and the sender's bandwidth estimate.

Theory of operation
-------------------
Receiver side (the viewer, per QUIC connection):

- :class:`ReceptionStats` per source: RFC 3550 Appendix A.3 loss, A.8 interarrival jitter and
  the §6.4.1 LSR/DLSR echo, reported in receiver report blocks.
- :class:`TransportFeedbackRecorder`: the arrival time of every transport-wide sequence number
  (draft-holmer-rmcat-transport-wide-cc-extensions-01 §2), reported in transport-wide feedback
  packets (§3.1, :class:`shared.rtcp.RtcpTransportFeedback`) a few times a second.

Sender side, :class:`BandwidthEstimator`, in the manner of GCC (draft-ietf-rmcat-gcc-02) run at
the sender as libwebrtc does with transport-wide feedback:

- delay-based (§5): packets are grouped into bursts sent within 5 ms (§5.2); the change in
  one-way delay between groups, ``(arrival_i - arrival_j) - (send_i - send_j)``, is
  accumulated, smoothed and fitted with a least-squares line over the last 20 groups (the
  "trendline" variant of the §5.3 arrival-time filter); a slope above an adaptive threshold
  (§5.4) signals overuse, below its negative underuse.  The rate controller (§5.5) then
  decreases to 0.85 x the acknowledged rate, holds, or increases by 8 % per second.
- loss-based (§6): over each feedback interval, above 10 % loss back off by half the loss,
  below 2 % grow by 5 %, in between hold.
- the estimate is the smaller of the two, clamped to ``[min_bps, max_bps]``.

QUIC's own RTT and the RTCP RTT both feed :attr:`BandwidthEstimator.rtt_s`.  Every method takes
the time as an argument (``now``: seconds on any monotonic clock; arrival times in the
receiver's microseconds); nothing here reads a clock.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from enum import StrEnum

from shared.errors import ConfigError
from shared.rtcp import (
    ReportBlock,
    RtcpSenderReport,
    RtcpTransportFeedback,
    encode_status_chunks,
    ntp_middle,
    ntp_timestamp,
    signed24,
)
from shared.rtp import RtpSequenceExtender

__all__ = [
    "BandwidthEstimator",
    "BandwidthUsage",
    "ReceptionStats",
    "TransportFeedbackRecorder",
    "build_transport_feedback",
    "round_trip_time",
]

# -- receiver: reception statistics (RFC 3550 Appendix A.3, A.8, §6.4.1) ------------------


class ReceptionStats:
    """What a receiver knows about one source, and the report block it sends back.

    ``now`` is Unix seconds here: the DLSR it reports is a difference of two of them, and the
    jitter is in RTP clock units, so only its rate matters.
    """

    def __init__(self, ssrc: int, clock_rate: int) -> None:
        self.ssrc = ssrc
        self.clock_rate = clock_rate
        self._extender = RtpSequenceExtender()
        self._base: int | None = None
        self._received = 0
        self._expected_prior = 0
        self._received_prior = 0
        self._transit: float | None = None
        self._jitter = 0.0
        self._last_sr = 0
        self._last_sr_at = 0.0
        #: Fraction (0..1) lost in the last reported interval.
        self.fraction_lost = 0.0

    def on_packet(self, sequence: int, timestamp: int, now: float) -> None:
        extended = self._extender.extend(sequence)
        self._base = extended if self._base is None else min(self._base, extended)
        self._received += 1
        # A.8: interarrival jitter from the change in relative transit time, in RTP units.
        transit = now * self.clock_rate - timestamp
        if self._transit is not None:
            # The RTP timestamp wraps at 2**32; keep the transit difference near zero.
            delta = (transit - self._transit + 2**31) % 2**32 - 2**31
            self._jitter += (abs(delta) - self._jitter) / 16
        self._transit = transit

    def on_sender_report(self, report: RtcpSenderReport, now: float) -> None:
        self._last_sr = ntp_middle(report.ntp_timestamp)
        self._last_sr_at = now

    @property
    def jitter_s(self) -> float:
        return self._jitter / self.clock_rate

    @property
    def packets_lost(self) -> int:
        """Cumulative loss (A.3): expected minus received; duplicates can make it negative."""
        if self._base is None or self._extender.highest is None:
            return 0
        return self._extender.highest - self._base + 1 - self._received

    def report_block(self, now: float) -> ReportBlock | None:
        """The block for the next SR/RR (None before the first packet); starts a new interval."""
        highest = self._extender.highest
        if self._base is None or highest is None:
            return None
        expected = highest - self._base + 1
        expected_interval = expected - self._expected_prior
        lost_interval = expected_interval - (self._received - self._received_prior)
        self._expected_prior, self._received_prior = expected, self._received
        fraction = 0
        if expected_interval > 0 and lost_interval > 0:
            fraction = min((lost_interval << 8) // expected_interval, 255)
        self.fraction_lost = fraction / 256
        dlsr = int((now - self._last_sr_at) * 65536) if self._last_sr else 0
        return ReportBlock(
            ssrc=self.ssrc,
            fraction_lost=fraction,
            cumulative_lost=max(-0x800000, min(self.packets_lost, 0x7FFFFF)),
            highest_sequence=highest & 0xFFFF_FFFF,
            jitter=min(int(self._jitter), 0xFFFF_FFFF),
            last_sr=self._last_sr,
            delay_since_last_sr=min(max(dlsr, 0), 0xFFFF_FFFF),
        )


def round_trip_time(block: ReportBlock, now: float) -> float | None:
    """RTT in seconds from a report block about this sender's SRs (RFC 3550 §6.4.1).

    ``now`` is the sender's Unix time when the block arrived; None before the receiver has
    seen an SR (LSR = 0).
    """
    if not block.last_sr:
        return None
    ticks = ntp_middle(ntp_timestamp(now)) - block.last_sr - block.delay_since_last_sr
    ticks &= 0xFFFF_FFFF
    if ticks >= 0x8000_0000:  # "negative": DLSR rounding on a sub-tick RTT
        return 0.0
    return ticks / 65536


# -- receiver: transport-wide feedback (draft-holmer-...-01 §3.1) ------------------------------


def build_transport_feedback(
    *,
    sender_ssrc: int,
    media_ssrc: int,
    base_sequence: int,
    arrivals_us: Sequence[int | None],
    feedback_count: int,
) -> RtcpTransportFeedback:
    """Feedback for ``len(arrivals_us)`` packets from ``base_sequence`` on (None: lost).

    Arrival times are microseconds on the receiver's clock.  At least one must be set, and
    consecutive ones must lie within the ±8.19 s a 16-bit delta holds.
    """
    received = [t for t in arrivals_us if t is not None]
    if not received or len(arrivals_us) > 0xFFFF:
        raise ConfigError("transport feedback needs 1..65535 packets, at least one received")
    reference = received[0] // 64_000  # §3.1: reference time in multiples of 64 ms
    previous = reference * 64_000
    symbols: list[int] = []
    deltas: list[int] = []
    for arrival in arrivals_us:
        if arrival is None:
            symbols.append(0)
            continue
        delta = round((arrival - previous) / 250)  # §3.1.5: 250 µs ticks
        if not -0x8000 <= delta <= 0x7FFF:
            raise ConfigError(f"receive delta of {delta * 250} µs does not fit 16 bits")
        symbols.append(1 if 0 <= delta <= 0xFF else 2)
        deltas.append(delta)
        previous += delta * 250  # accumulate the quantized value, so no drift builds up
    chunks = encode_status_chunks(symbols)
    size = 4 + 16 + 2 * len(chunks) + sum(1 if s == 1 else 2 for s in symbols if s)
    pad = -size % 4  # aligned with RTCP padding (P bit), as libwebrtc does
    return RtcpTransportFeedback(
        sender_ssrc=sender_ssrc,
        media_ssrc=media_ssrc,
        base_sequence=base_sequence & 0xFFFF,
        status_count=len(arrivals_us),
        reference_time=signed24(reference & 0xFFFFFF),
        feedback_count=feedback_count & 0xFF,
        chunks=chunks,
        deltas=deltas,
        padding=bytes(pad - 1) + bytes([pad]) if pad else b"",
    )


class TransportFeedbackRecorder:
    """Arrival times by transport-wide sequence number, drained into feedback packets.

    Each packet is reported once.  A packet arriving after the feedback that reported it lost
    stays reported lost (the sender's loss figure errs high by the reordered ones).  Memory is
    bounded: at most ``max_pending`` packets wait for feedback; beyond that the oldest are
    reported in a burst of feedback packets.
    """

    MAX_STATUSES = 2000

    def __init__(self, sender_ssrc: int, *, max_pending: int = 8192) -> None:
        self.sender_ssrc = sender_ssrc
        self.max_pending = max_pending
        self._extender = RtpSequenceExtender()
        self._arrivals: dict[int, int] = {}
        self._next: int | None = None
        self._count = 0
        self.packets_late = 0

    def on_packet(self, transport_sequence: int, arrival_us: int) -> None:
        extended = self._extender.extend(transport_sequence & 0xFFFF)
        if self._next is None:
            self._next = extended
        if extended < self._next or extended in self._arrivals:
            self.packets_late += 1
            return
        self._arrivals[extended] = arrival_us
        if len(self._arrivals) > self.max_pending:
            del self._arrivals[min(self._arrivals)]

    def build(self, media_ssrc: int = 0) -> list[RtcpTransportFeedback]:
        """Feedback for every packet up to the highest received (empty when none is new)."""
        packets: list[RtcpTransportFeedback] = []
        while self._arrivals and self._next is not None:
            # Packets from the last one reported on are lost unless they arrived; after a
            # gap wider than one feedback packet holds, the gap itself is not reported.
            first = min(self._arrivals)
            base = first if first - self._next >= self.MAX_STATUSES else self._next
            end = min(max(self._arrivals), base + self.MAX_STATUSES - 1)
            arrivals = [self._arrivals.pop(seq, None) for seq in range(base, end + 1)]
            # Cut where a receive delta would not fit 16 bits (an 8 s gap): report up to there.
            previous = next(t for t in arrivals if t is not None) // 64_000 * 64_000
            for index, arrival in enumerate(arrivals):
                if arrival is not None:
                    if abs(arrival - previous) >= 8_000_000:
                        for seq, late in enumerate(arrivals[index:], base + index):
                            if late is not None:
                                self._arrivals[seq] = late
                        arrivals, end = arrivals[:index], base + index - 1
                        break
                    previous = arrival
            packets.append(
                build_transport_feedback(
                    sender_ssrc=self.sender_ssrc,
                    media_ssrc=media_ssrc,
                    base_sequence=base,
                    arrivals_us=arrivals,
                    feedback_count=self._count,
                )
            )
            self._count += 1
            self._next = end + 1
        return packets


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
        return int(sum(size for _, size in self._acked) * 8 / max(span, ACKED_WINDOW_S / 5))

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
            self._on_arrival(record[0], arrival, now)
        while self._acked and self._acked[-1][0] - self._acked[0][0] > ACKED_WINDOW_S:
            self._acked.popleft()
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
            self._loss_bps *= 1.05
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
