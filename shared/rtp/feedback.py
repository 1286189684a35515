"""What a viewer measures and reports back: reception statistics and transport-wide feedback.

The receiver half of the congestion feedback loop (the sender half is
:mod:`shared.rtp.bandwidth`), kept per QUIC connection by :class:`shared.rtp.receiver.ReceiverSession`:

- :class:`ReceptionStats` per source: RFC 3550 Appendix A.3 loss, A.8 interarrival jitter and
  the §6.4.1 LSR/DLSR echo, reported in receiver report blocks.
- :class:`TransportFeedbackRecorder`: the arrival time of every transport-wide sequence number
  (draft-holmer-rmcat-transport-wide-cc-extensions-01 §2), reported in transport-wide feedback
  packets (§3.1, :class:`shared.rtp.rtcp.RtcpTransportFeedback`) a few times a second.

Every method takes the time as an argument (monotonic seconds); nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.errors import ConfigError
from shared.rtp.packet import RtpSequenceExtender
from shared.rtp.rtcp import (
    ReportBlock,
    RtcpSenderReport,
    RtcpTransportFeedback,
    encode_status_chunks,
    ntp_middle,
    signed24,
)

__all__ = ["ReceptionStats", "TransportFeedbackRecorder", "build_transport_feedback"]

# -- receiver: reception statistics (RFC 3550 Appendix A.3, A.8, §6.4.1) ------------------


class ReceptionStats:
    """What a receiver knows about one source, and the report block it sends back.

    ``now`` is the receiver's monotonic seconds: the DLSR it reports is a difference of two of
    them, and the jitter is in RTP clock units, so only its rate matters.  The SR's NTP
    timestamp is only echoed (LSR), never compared with ``now``, so neither end's wall clock
    enters the RTT (RFC 3550 §6.4.1).
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
