"""Encoded packets in shared memory: one writer (the encoder), many readers (senders, recorder).

Theory of operation
-------------------
Packet bytes go into a byte ring of ``capacity`` bytes, each packet contiguous: one that would
straddle the end starts over at offset 0 instead.  Positions are absolute byte counts (int64,
they never wrap), so "has packet P been overwritten?" is one subtraction: P's bytes are intact
while ``head - P.start <= capacity``, where ``head`` is the end of the range the writer has
claimed.  An index of ``index_slots`` entries, entry ``(seq - 1) % index_slots``, records each
packet's sequence, start, length and flags, pts, two capture stamps, duration and a seqlock
generation.

A packet carries its capture time on two clocks: ``capture_us`` on the wall clock, which is
data (viewers measure latency from it; a scheduled recording starts and stops by it), and
``monotonic_us`` on the monotonic clock, which times things (a recording's file time, its
duration limit, pre-roll and motion hold), since NTP may step the wall clock.

Writer, for packet ``seq`` (it never waits for readers):

1. make the entry's generation odd (the packet it held is now gone);
2. publish ``head = start + length`` *before* touching the bytes, so a reader copying a packet
   that is about to be overwritten will see the claim when it re-checks;
3. copy the bytes, fill in the entry, make the generation even;
4. publish ``last_seq = seq``, then ring the doorbell (:mod:`shared.pool.doorbell`) so
   readers wake without polling.

Reader, for sequence ``s <= last_seq``: note the generation (odd: gone), check the entry holds
``s``, copy the bytes, then re-check generation and ``head``.  Since an entry and its bytes only
change when the packet is being overwritten, a failed check always means "gone": the reader was
lapped.  It then resynchronises at the oldest keyframe still present, because a decoder cannot
use anything after a gap until the next keyframe, and counts everything skipped as ``missed``.

Memory ordering is as in :mod:`shared.pool.frame_pool`: aligned int64 words through
``memoryview.cast("q")``, accessed in program order, relying on x86-64 TSO.

Layout after the common shm header (offsets multiples of 64)::

    ring header   64 B                 capacity, index_slots, head, last_seq
    index         index_slots x 64 B   gen, seq, start, length << 8 | flags, pts, capture_us,
                                       monotonic_us, duration
    data          capacity B

An entry is one cache line, so the flags share a word with the length (a packet is far
shorter than 2**55 bytes).
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from shared.errors import ConfigError, ResourceError
from shared.pool.shm import Segment, SegmentHandle, SegmentKind, attach_segment, create_segment

__all__ = ["PacketBatch", "PacketReaderStats", "PacketRing", "PacketRingReader", "RingPacket"]

_LINE: Final = 64
_WORDS_PER_LINE: Final = _LINE // 8
# Ring header words.
_H_CAPACITY, _H_INDEX_SLOTS, _H_HEAD, _H_LAST_SEQ = 0, 1, 2, 3
# Index entry words.
_E_GEN, _E_SEQ, _E_START, _E_LENGTH_FLAGS, _E_PTS, _E_CAPTURE_US, _E_MONOTONIC_US, _E_DURATION = (
    range(8)
)
# The length word is ``length << _FLAG_BITS | flags``.
_FLAG_BITS: Final = 8
_FLAG_KEYFRAME: Final = 1


class RingPacket(msgspec.Struct, frozen=True, kw_only=True):
    """One encoded packet (an H.264 access unit) copied out of the ring."""

    sequence: int
    pts: int
    #: Wall-clock capture time (µs): data, for viewers and a schedule's start and stop.
    capture_us: int
    #: The same moment on the monotonic clock (µs): what a recording is timed by.
    monotonic_us: int
    keyframe: bool
    duration: int
    data: bytes


class PacketBatch(msgspec.Struct, frozen=True):
    """Packets newer than a reader's position, in order, and how many it lost before them."""

    packets: list[RingPacket]
    missed: int


class PacketReaderStats(msgspec.Struct, kw_only=True):
    packets_read: int = 0
    packets_missed: int = 0
    #: Times this reader was lapped and jumped forward to a keyframe.
    resyncs: int = 0


class PacketRing(SegmentHandle):
    """A packet ring segment.  The creating handle appends; attached handles only read."""

    kind_name = "packet ring"

    def __init__(self, segment: Segment) -> None:
        super().__init__(segment)
        buf = segment.buf
        head_words = buf[:_LINE].cast("q")
        self.capacity: Final = head_words[_H_CAPACITY]
        self.index_slots: Final = head_words[_H_INDEX_SLOTS]
        head_words.release()
        data_offset = _LINE * (1 + self.index_slots)
        if self.capacity <= 0 or self.index_slots <= 0 or data_offset + self.capacity > len(buf):
            raise ResourceError(f"packet ring {segment.name} has a corrupt header")
        self._words: memoryview = buf[:data_offset].cast("q")
        self._index: npt.NDArray[np.int64] = np.ndarray(
            (self.index_slots, _WORDS_PER_LINE), dtype=np.int64, buffer=buf, offset=_LINE
        )
        self._data: memoryview = buf[data_offset : data_offset + self.capacity]
        self._head = self._words[_H_HEAD]
        self._last_seq = self._words[_H_LAST_SEQ]

    @classmethod
    def create(cls, name: str, *, capacity_bytes: int, index_slots: int = 1024) -> PacketRing:
        """Create the ring segment ``name``; the returned handle is its only writer."""
        if capacity_bytes < _LINE or index_slots < 4:
            raise ConfigError(
                f"packet ring {name}: need capacity_bytes >= {_LINE} and index_slots >= 4"
            )

        def init(buf: memoryview) -> None:
            words = buf[:_LINE].cast("q")
            words[_H_CAPACITY], words[_H_INDEX_SLOTS] = capacity_bytes, index_slots
            words.release()

        size = _LINE * (1 + index_slots) + -(-capacity_bytes // _LINE) * _LINE
        return cls(create_segment(name, size, SegmentKind.PACKET_RING, init=init))

    @classmethod
    def attach(cls, name: str) -> PacketRing:
        """Attach to an existing ring for reading."""
        segment = attach_segment(name, SegmentKind.PACKET_RING)
        try:
            return cls(segment)
        except BaseException:
            segment.close()
            raise

    @property
    def max_packet_bytes(self) -> int:
        """Largest packet accepted: a quarter of the ring, so at least four always fit."""
        return int(self.capacity) // 4

    def last_sequence(self) -> int:
        """Newest committed sequence number (0 before the first packet)."""
        return int(self._words[_H_LAST_SEQ])

    def append(
        self,
        data: bytes | bytearray | memoryview,
        *,
        pts: int,
        capture_us: int,
        monotonic_us: int,
        keyframe: bool,
        duration: int = 0,
    ) -> int:
        """Store one packet and publish it.  Returns its sequence number (the first is 1).

        ``capture_us`` and ``monotonic_us`` are the packet's capture time on the wall clock and
        on the monotonic clock (see the module doc).
        """
        if not self.is_writer:
            raise ConfigError(f"packet ring {self.name} was attached read-only; its creator writes")
        source = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        length = len(source)
        if length > self.max_packet_bytes:
            raise ConfigError(
                f"packet of {length} bytes is larger than a quarter of packet ring {self.name} "
                f"({self.max_packet_bytes} bytes); give the ring more capacity"
            )
        start = self._head
        offset = start % self.capacity
        if offset + length > self.capacity:  # keep packets contiguous: skip the ring's tail
            start += self.capacity - offset
            offset = 0
        sequence = self._last_seq + 1
        words = self._words
        base = (1 + (sequence - 1) % self.index_slots) * _WORDS_PER_LINE
        generation = words[base + _E_GEN]
        words[base + _E_GEN] = generation + 1
        words[_H_HEAD] = self._head = start + length  # never moves back, even if we fail below
        try:
            self._data[offset : offset + length] = source
            words[base + _E_SEQ] = sequence
            words[base + _E_START] = start
            words[base + _E_LENGTH_FLAGS] = length << _FLAG_BITS | (
                _FLAG_KEYFRAME if keyframe else 0
            )
            words[base + _E_PTS] = pts
            words[base + _E_CAPTURE_US] = capture_us
            words[base + _E_MONOTONIC_US] = monotonic_us
            words[base + _E_DURATION] = duration
        except BaseException as exc:
            # Leave the entry even (a later append must start from even) and holding no packet.
            words[base + _E_SEQ] = 0
            words[base + _E_GEN] = generation + 2
            if isinstance(exc, TypeError | ValueError):
                raise ConfigError(
                    "pts, capture_us, monotonic_us and duration must be int64 integers"
                ) from exc
            raise
        words[base + _E_GEN] = generation + 2
        words[_H_LAST_SEQ] = sequence
        self._last_seq = sequence
        self._ring(sequence)
        return sequence

    def _read(self, sequence: int) -> RingPacket | None:
        """Packet ``sequence`` (committed, <= last_seq) if still intact, else None (gone)."""
        words = self._words
        base = (1 + (sequence - 1) % self.index_slots) * _WORDS_PER_LINE
        generation = words[base + _E_GEN]
        if generation & 1 or words[base + _E_SEQ] != sequence:
            return None
        start = words[base + _E_START]
        if words[_H_HEAD] - start > self.capacity:
            return None
        offset = start % self.capacity
        length_flags = words[base + _E_LENGTH_FLAGS]
        # Garbage if torn (the re-check below then fails): clamp it to the ring.
        length = min(max(length_flags >> _FLAG_BITS, 0), self.capacity - offset)
        pts = words[base + _E_PTS]
        capture_us = words[base + _E_CAPTURE_US]
        monotonic_us = words[base + _E_MONOTONIC_US]
        duration = words[base + _E_DURATION]
        data = self._data[offset : offset + length].tobytes()
        if words[base + _E_GEN] != generation or words[_H_HEAD] - start > self.capacity:
            return None
        return RingPacket(
            sequence=sequence,
            pts=pts,
            capture_us=capture_us,
            monotonic_us=monotonic_us,
            keyframe=bool(length_flags & _FLAG_KEYFRAME),
            duration=duration,
            data=data,
        )

    def _keyframe_sequences(self, at_least: int) -> npt.NDArray[np.int64]:
        """Sequences >= ``at_least`` of keyframes that look intact in an index snapshot.

        The snapshot may be torn; callers confirm a candidate with a real read.
        """
        snapshot = self._index.copy()
        head = self._words[_H_HEAD]
        usable = (
            (snapshot[:, _E_GEN] & 1 == 0)
            & (snapshot[:, _E_SEQ] >= max(at_least, 1))
            & (snapshot[:, _E_LENGTH_FLAGS] & _FLAG_KEYFRAME != 0)
            & (head - snapshot[:, _E_START] <= self.capacity)
        )
        sequences: npt.NDArray[np.int64] = snapshot[usable, _E_SEQ]
        return sequences

    def _release_views(self) -> None:
        self._index = np.empty((0, _WORDS_PER_LINE), np.int64)
        self._words.release()
        self._data.release()


class PacketRingReader:
    """One consumer's position in a ring.

    ``start="next"`` delivers every packet appended after the reader was made.
    ``start="latest_keyframe"`` begins at the newest keyframe in the ring, or at the next one
    to arrive; what it skips before its first packet does not count as missed.
    """

    def __init__(
        self, ring: PacketRing, *, start: Literal["next", "latest_keyframe"] = "next"
    ) -> None:
        if start not in ("next", "latest_keyframe"):
            raise ConfigError(f"start must be 'next' or 'latest_keyframe', not {start!r}")
        self.ring: Final = ring
        self._stats = PacketReaderStats()
        self._next = ring.last_sequence() + 1
        self._awaiting_keyframe = start == "latest_keyframe"
        self._count_skips = start == "next"
        if start == "latest_keyframe":
            keyframes = ring._keyframe_sequences(1)
            if keyframes.size:
                self._next = min(int(keyframes.max()), self._next)

    @property
    def stats(self) -> PacketReaderStats:
        """A snapshot of this reader's counters."""
        return msgspec.structs.replace(self._stats)

    @property
    def next_sequence(self) -> int:
        """The sequence this reader will try next."""
        return self._next

    def read_available(self, max_packets: int | None = None) -> PacketBatch:
        """Every packet newer than this reader's position (at most ``max_packets``), in order."""
        packets: list[RingPacket] = []
        missed = 0
        last = self.ring.last_sequence()
        while self._next <= last and (max_packets is None or len(packets) < max_packets):
            packet = self.ring._read(self._next)
            if packet is None:  # lapped: jump to the oldest keyframe still present
                keyframes = self.ring._keyframe_sequences(self._next + 1)
                target = int(keyframes.min()) if keyframes.size else last + 1
                if self._count_skips:
                    missed += target - self._next
                self._stats.resyncs += 1
                self._next = target
                self._awaiting_keyframe = True
                continue
            self._next += 1
            if self._awaiting_keyframe and not packet.keyframe:
                if self._count_skips:
                    missed += 1
                continue
            self._awaiting_keyframe = False
            self._count_skips = True
            packets.append(packet)
        self._stats.packets_read += len(packets)
        self._stats.packets_missed += missed
        return PacketBatch(packets, missed)
