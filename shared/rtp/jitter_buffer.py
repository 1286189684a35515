"""The viewer's jitter buffer: RTP packets of one track -> whole frames, in order, or nothing.

Theory of operation
-------------------
Sequence numbers are extended (RFC 3550 Appendix A.1) and every packet at or above the *floor*
waits in the buffer until its frame leaves.  A frame is a run of consecutive sequence numbers
sharing one RTP timestamp that ends with the marker bit (RFC 6184 §5.1; for a payload format
with independent frames, such as Opus (RFC 7587 §4.2), each packet is one frame).

Frames leave strictly in sequence order.  Where the next frame starts is *proven* once the one
before it has left (one past its end); only then is a frame complete when every packet from
that start to its marker is present.  A gap in the sequence numbers is a missing packet: it is
NACKed (RFC 4585 §6.2.1) at once, again after each round trip, and waited for until
``latency_budget_s`` after it was noticed.  Frames behind it wait too, so nothing is reordered
or skipped while a retransmission can still arrive.

"At once" means with no timed reordering allowance: a packet that was merely overtaken is
NACKed too, and the sender resends one packet it need not have (its resend budget bounds what
that costs).  A timed allowance would delay the repair of every real loss by the same amount,
which a latency budget of a few hundred milliseconds cannot spare, while on one QUIC path
reordering is the exception (and in stream mode it cannot happen).  The allowance that costs nothing is kept: a shell hands over every packet
already queued before it asks for feedback, so a gap that a queued packet fills is never NACKed.

When the budget runs out the buffer *gives up*: everything up to the missing packet is
discarded, the start of the next frame is no longer known, and (unless frames are independent)
the decoding chain is broken: later frames reference the lost picture.  :attr:`keyframe_needed`
is set, the viewer sends a PLI (RFC 4585 §6.3.1), and only a frame whose first packet proves
it begins an access unit on its own (for H.264: starts with SPS or an access unit delimiter,
as this project's keyframes do) and that arrives whole is accepted next.  A frame whose
payloads do not depacketize is dropped the same way.  So the decoder only ever sees whole,
well-formed frames whose references it already has.

Memory is bounded by ``max_packets`` and ``max_bytes`` (the oldest frame is evicted) and by
refusing sequence jumps larger than ``max_packets`` (treated as a new start).  Time is passed
in as ``now`` (seconds, any monotonic clock); nothing here reads a clock.
:meth:`next_deadline` says when :meth:`poll` or :meth:`nacks` next has work (aioquic's
``get_timer()``); both compare ``now`` with the very sums it returns, so a shell that calls
them at that time finds the work done and the next deadline later.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.errors import ConfigError, ProtocolError
from shared.rtp.packet import RtpPacket, RtpSequenceExtender

__all__ = ["MIN_NACK_RETRY_S", "BufferedFrame", "JitterBuffer", "PayloadFormat"]

#: A NACK is repeated no sooner than this, however short the round trip (loopback).
MIN_NACK_RETRY_S = 0.01


class PayloadFormat(Protocol):
    """What the jitter buffer needs to know about an RTP payload format."""

    @property
    def independent_frames(self) -> bool:
        """Every packet is a whole frame that decodes on its own (audio)."""
        ...

    def starts_frame(self, payload: bytes) -> bool:
        """Whether a packet with this payload begins a self-contained access unit."""
        ...

    def assemble(self, payloads: Sequence[bytes]) -> tuple[list[bytes], bool]:
        """A frame's payloads -> (its units, keyframe); ProtocolError when malformed."""
        ...


@dataclass(frozen=True, slots=True)
class BufferedFrame:
    """One whole frame, ready for the decoder."""

    rtp_timestamp: int
    units: list[bytes]
    """NAL units (H.264) or the codec packet (Opus)."""
    keyframe: bool
    first_sequence: int
    last_sequence: int
    ssrc: int
    first_arrival: float
    """``now`` when its first packet arrived."""
    recovered: bool
    """Whether a retransmitted packet completed it."""


@dataclass(slots=True)
class _Packet:
    timestamp: int
    marker: bool
    payload: bytes
    arrival: float
    recovered: bool


@dataclass(slots=True)
class _Missing:
    detected: float
    nacks: int = 0
    last_nack: float = 0.0


class JitterBuffer:
    """Reorders, waits for retransmissions within a budget, and drops what cannot decode."""

    def __init__(
        self,
        payload_format: PayloadFormat,
        *,
        latency_budget_s: float = 0.2,
        max_packets: int = 2048,
        max_bytes: int = 8 << 20,
        max_nacks: int = 8,
        wait_for_keyframe: bool = True,
    ) -> None:
        if latency_budget_s < 0 or max_packets < 16 or max_bytes < 1 or max_nacks < 0:
            raise ConfigError("jitter buffer limits out of range")
        self.format = payload_format
        self.latency_budget_s = latency_budget_s
        self.max_packets, self.max_bytes, self.max_nacks = max_packets, max_bytes, max_nacks
        self._wait_for_keyframe = wait_for_keyframe
        self._ssrc: int | None = None
        self.rtt_s = 0.0
        self.frames_delivered = 0
        self.frames_dropped = 0
        self.frames_recovered = 0
        self.packets_received = 0
        self.packets_duplicate = 0
        self.packets_late = 0
        self.packets_malformed = 0
        self.packets_recovered = 0
        self.packets_given_up = 0
        self.nacks_sent = 0
        self._reset()

    def _reset(self) -> None:
        self._extender = RtpSequenceExtender()
        self._packets: dict[int, _Packet] = {}
        self._bytes = 0
        self._missing: dict[int, _Missing] = {}
        self._highest: int | None = None
        self._floor = 0
        self._next: int | None = None
        self._chain_ok = not self._wait_for_keyframe or self.format.independent_frames
        # Waiting for the first keyframe is not a loss: ask only once something was dropped.
        self._keyframe_wanted = False

    @property
    def keyframe_needed(self) -> bool:
        """True while the chain is broken by a loss or a dropped frame: send a PLI."""
        return not self._chain_ok and self._keyframe_wanted

    @property
    def pending_packets(self) -> int:
        return len(self._packets)

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    @property
    def missing(self) -> int:
        return len(self._missing)

    def push(self, packet: RtpPacket, now: float) -> list[BufferedFrame]:
        """Add one packet; return the frames it completes, oldest first.  Never raises."""
        self.packets_received += 1
        if packet.ssrc != self._ssrc:  # a new source (sender restarted): a new sequence space
            if self._ssrc is not None:
                self._discard_below(None)
                self._reset()
            self._ssrc = packet.ssrc
        if not packet.payload:
            self.packets_malformed += 1
            return []
        seq = self._extender.extend(packet.sequence_number)
        if self._highest is None:
            self._highest = self._floor = seq
        if seq < self._floor:
            self.packets_late += 1
            return []
        if seq in self._packets:
            self.packets_duplicate += 1
            return []
        recovered = False
        if seq > self._highest:
            if seq - self._highest > self.max_packets:  # a jump no buffer could bridge
                self._discard_below(None)
                self._missing.clear()
                self._floor, self._next = seq, None
                self._break_chain()
            else:
                for lost in range(self._highest + 1, seq):
                    self._missing[lost] = _Missing(now)
            self._highest = seq
        else:
            missing = self._missing.pop(seq, None)
            if missing is not None and missing.nacks:
                recovered = True
                self.packets_recovered += 1
        self._packets[seq] = _Packet(
            packet.timestamp, packet.marker, packet.payload, now, recovered
        )
        self._bytes += len(packet.payload)
        frames = self._deliver()
        while self._packets and (
            len(self._packets) > self.max_packets or self._bytes > self.max_bytes
        ):
            self._evict_oldest_frame()
            frames += self._deliver()
        return frames

    def poll(self, now: float) -> list[BufferedFrame]:
        """Give up on packets whose budget ran out; return frames that can now leave."""
        frames: list[BufferedFrame] = []
        while self._missing:
            oldest = min(self._missing)
            if now < self._missing[oldest].detected + self.latency_budget_s:
                break  # the same sum next_deadline() returns: no rounding between the two
            del self._missing[oldest]
            self.packets_given_up += 1
            if oldest < self._floor:
                continue
            dropped = self._discard_below(oldest + 1)
            self.frames_dropped += max(dropped, 1)
            self._floor = oldest + 1
            if self.format.independent_frames:
                self._next = oldest + 1
            else:
                self._next = None
                self._break_chain()
            frames += self._deliver()
        return frames

    def nacks(self, now: float, limit: int = 256) -> list[int]:
        """16-bit sequence numbers to NACK now: new losses, and old ones a round trip later."""
        due: list[int] = []
        for seq, missing in self._missing.items():
            if len(due) >= limit:
                break
            if seq < self._floor:
                continue
            when = self._nack_time(missing)
            if when is None or now < when:
                continue
            if now > self._last_useful_nack(missing):
                # A resend asked for now could not arrive in time, nor could a later one.
                missing.nacks = self.max_nacks
                continue
            missing.nacks += 1
            missing.last_nack = now
            due.append(seq & 0xFFFF)
        self.nacks_sent += len(due)
        return due

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next gives up on a packet or :meth:`nacks` next has one to ask
        for (None: nothing is missing).  A time already past means "now"."""
        if not self._missing:
            return None
        lowest = min(self._missing)  # poll() gives up on the lowest first, as here
        deadline = self._missing[lowest].detected + self.latency_budget_s
        for seq, missing in self._missing.items():
            when = self._nack_time(missing) if seq >= self._floor else None
            if when is not None and when < deadline:
                deadline = when
        return deadline

    def _nack_time(self, missing: _Missing) -> float | None:
        """When ``missing`` is next due for a NACK; None when it never will be again."""
        if missing.nacks >= self.max_nacks:
            return None
        if missing.nacks:
            # A retransmission takes a round trip: ask again only once it is overdue.
            when = missing.last_nack + max(1.5 * self.rtt_s, MIN_NACK_RETRY_S)
        else:
            when = missing.detected
        return when if when <= self._last_useful_nack(missing) else None

    def _last_useful_nack(self, missing: _Missing) -> float:
        """After this a resend (half a round trip away) would land past the budget."""
        return missing.detected + self.latency_budget_s - self.rtt_s / 2

    # -- internals ------------------------------------------------------------------------------

    def _break_chain(self) -> None:
        if not self.format.independent_frames:
            self._chain_ok = False
            self._keyframe_wanted = True

    def _deliver(self) -> list[BufferedFrame]:
        frames: list[BufferedFrame] = []
        while True:
            start = self._next if self._next is not None else self._find_start()
            if start is None:
                return frames
            end = self._frame_end(start)
            if end is None:
                return frames
            self._emit(start, end, frames)

    def _frame_end(self, start: int) -> int | None:
        """The last sequence number of the frame starting at ``start`` if all of it is here."""
        first = self._packets.get(start)
        if first is None:
            return None
        if self.format.independent_frames:
            return start
        seq = start
        while True:
            packet = self._packets.get(seq)
            if packet is None:
                return None
            if packet.timestamp != first.timestamp:
                return seq - 1  # the timestamp changed: the frame ended without its marker bit
            if packet.marker:
                return seq
            seq += 1

    def _find_start(self) -> int | None:
        """Lowest complete frame whose start is known, when the next frame's start is not.

        A start is known when the packet before it ended its frame (marker bit, or another
        timestamp), or when the payload format says its first packet begins an access unit on
        its own.  A start known only from its predecessor is not taken while an earlier packet
        is still being waited for: that packet may belong to the keyframe being repaired.
        """
        lowest_missing = min(self._missing, default=None)
        for seq in sorted(self._packets):
            packet, previous = self._packets[seq], self._packets.get(seq - 1)
            if (
                previous is not None
                and not previous.marker
                and previous.timestamp == packet.timestamp
            ):
                continue  # inside a frame
            waiting = lowest_missing is not None and lowest_missing < seq
            if not self.format.starts_frame(packet.payload) and (previous is None or waiting):
                continue
            if self._frame_end(seq) is not None:
                dropped = self._discard_below(seq)
                self.frames_dropped += dropped
                self._keyframe_wanted |= dropped > 0
                self._floor = seq
                return seq
        return None

    def _emit(self, start: int, end: int, frames: list[BufferedFrame]) -> None:
        packets = [self._packets.pop(seq) for seq in range(start, end + 1)]
        self._bytes -= sum(len(p.payload) for p in packets)
        self._floor = self._next = end + 1
        for seq in [s for s in self._missing if s <= end]:
            del self._missing[seq]
        try:
            units, keyframe = self.format.assemble([p.payload for p in packets])
        except ProtocolError:
            self.packets_malformed += 1
            self.frames_dropped += 1
            self._break_chain()
            return
        if not self._chain_ok and not keyframe:
            self.frames_dropped += 1
            self._keyframe_wanted = True  # e.g. joined mid-GOP
            return
        self._chain_ok = True
        self._keyframe_wanted = False
        recovered = any(p.recovered for p in packets)
        self.frames_delivered += 1
        self.frames_recovered += recovered
        assert self._ssrc is not None
        frames.append(
            BufferedFrame(
                rtp_timestamp=packets[0].timestamp,
                units=units,
                keyframe=keyframe,
                first_sequence=start,
                last_sequence=end,
                ssrc=self._ssrc,
                first_arrival=min(p.arrival for p in packets),
                recovered=recovered,
            )
        )

    def _discard_below(self, limit: int | None) -> int:
        """Drop pending packets below ``limit`` (None: all); returns how many frames they were."""
        doomed = [seq for seq in self._packets if limit is None or seq < limit]
        timestamps = {self._packets[seq].timestamp for seq in doomed}
        for seq in doomed:
            self._bytes -= len(self._packets.pop(seq).payload)
        for seq in [s for s in self._missing if limit is None or s < limit]:
            del self._missing[seq]
        return len(timestamps)

    def _evict_oldest_frame(self) -> None:
        oldest = min(self._packets)
        timestamp = self._packets[oldest].timestamp
        last = max(s for s, p in self._packets.items() if p.timestamp == timestamp)
        self.frames_dropped += self._discard_below(last + 1)
        self._floor, self._next = last + 1, None
        self._break_chain()
