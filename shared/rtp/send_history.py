"""What a sender keeps to answer NACKs: recent packets, and a budget for resending them.

RFC 4585 §6.2.1 generic NACK asks for packets by sequence number.  :class:`SendHistory` keeps
the last packets of one RTP stream, bounded by count, bytes and age, so a NACK is answered
only while the packet can still be useful and memory stays bounded however the viewer behaves.
:class:`RetransmissionBudget` is a token bucket on resent bytes, so a flood of NACKs (a broken
or hostile viewer) costs at most a fixed share of the connection's rate.  Each packet is also
resent at most once per round trip: a second NACK inside one RTT is a duplicate, not a new loss.
Time is passed in (``now``, seconds); nothing here reads a clock.
"""

from __future__ import annotations

import collections
from typing import Generic, TypeVar

from shared.errors import ConfigError

__all__ = ["RetransmissionBudget", "SendHistory"]

#: What the caller keeps of each packet to resend it (whatever rebuilds it cheaply).
T = TypeVar("T")


class _Entry(Generic[T]):
    __slots__ = ("packet", "resent_at", "sent_at", "size")

    def __init__(self, packet: T, size: int, sent_at: float) -> None:
        self.packet, self.size, self.sent_at = packet, size, sent_at
        self.resent_at: float | None = None


class SendHistory(Generic[T]):
    """The last packets of one RTP stream by 16-bit sequence number."""

    def __init__(
        self, *, max_packets: int = 2048, max_bytes: int = 4 << 20, max_age_s: float = 1.0
    ) -> None:
        if max_packets < 1 or max_bytes < 1 or max_age_s <= 0:
            raise ConfigError("send history limits must be positive")
        self.max_packets, self.max_bytes, self.max_age_s = max_packets, max_bytes, max_age_s
        self._entries: collections.OrderedDict[int, _Entry[T]] = collections.OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, sequence: int, packet: T, size: int, now: float) -> None:
        """Keep ``packet`` (``size`` bytes on the wire) as RTP sequence number ``sequence``."""
        old = self._entries.pop(sequence, None)
        if old is not None:
            self._bytes -= old.size
        self._entries[sequence] = _Entry(packet, size, now)
        self._bytes += size
        # Count and bytes bound memory here; age is checked when a NACK asks (cheaper per packet).
        while len(self._entries) > self.max_packets or self._bytes > self.max_bytes:
            self._pop_oldest()

    def take_for_resend(self, sequence: int, now: float, rtt_s: float) -> T | None:
        """The packet to resend for a NACK of ``sequence``, or None (unknown, too old, or
        already resent within one round trip)."""
        self._expire(now)
        entry = self._entries.get(sequence & 0xFFFF)
        if entry is None:
            return None
        if entry.resent_at is not None and now - entry.resent_at < max(rtt_s, 0.005):
            return None
        entry.resent_at = now
        return entry.packet

    def _expire(self, now: float) -> None:
        while self._entries:
            entry = next(iter(self._entries.values()))
            if now - entry.sent_at <= self.max_age_s:
                return
            self._pop_oldest()

    def _pop_oldest(self) -> None:
        _, entry = self._entries.popitem(last=False)
        self._bytes -= entry.size


class RetransmissionBudget:
    """Token bucket on retransmitted bytes: ``share`` of ``rate_bps``, bursts of ``burst_s``."""

    def __init__(self, *, share: float = 0.5, burst_s: float = 0.25) -> None:
        if not 0 < share <= 1 or burst_s <= 0:
            raise ConfigError("retransmission share must be in (0, 1], burst positive")
        self.share, self.burst_s = share, burst_s
        self._tokens = 0.0
        self._last: float | None = None

    def allow(self, size: int, rate_bps: int, now: float) -> bool:
        capacity = rate_bps / 8 * self.share * self.burst_s
        if self._last is None:
            self._tokens = capacity
        else:
            refill = (now - self._last) * rate_bps / 8 * self.share
            self._tokens = min(capacity, self._tokens + max(refill, 0.0))
        self._last = now
        if size > self._tokens:
            return False
        self._tokens -= size
        return True
