"""The receiving end of a relay connection: which packets go into the local rings.

Packets arrive in order (TCP), but not necessarily every one: the origin drops whole groups of
pictures when the link backs up (:mod:`shared.relay.uplink`), and its own reader may be lapped.
Each packet carries the origin ring's sequence number, so a gap is visible here.  After a gap a
track's local ring gets nothing until the next keyframe: the shards reading it then see what
they would see after an encoder skipped frames — a clean restart at an IDR — and never a
frame that references one they did not get.

The local ring numbers its packets itself (``PacketRing.append``); readers there are unaware
of the origin's numbering.
"""

from __future__ import annotations

import msgspec

from shared.pool.packet_ring import RingPacket

__all__ = ["DownlinkStats", "RelayDownlink"]


class DownlinkStats(msgspec.Struct, kw_only=True):
    packets_received: int = 0
    packets_appended: int = 0
    #: Origin sequences that never arrived.
    packets_lost: int = 0
    #: Packets received after a gap but before the next keyframe (not appended).
    packets_skipped: int = 0
    gaps: int = 0


class RelayDownlink:
    def __init__(self, tracks: int) -> None:
        self._expected: list[int | None] = [None] * tracks
        self._awaiting_keyframe = [True] * tracks
        self.stats = DownlinkStats()

    def accept(self, track: int, packet: RingPacket) -> bool:
        """Whether ``packet`` goes into ``track``'s local ring."""
        self.stats.packets_received += 1
        expected = self._expected[track]
        if expected is not None and packet.sequence != expected:
            if packet.sequence > expected:
                self.stats.packets_lost += packet.sequence - expected
            self.stats.gaps += 1
            self._awaiting_keyframe[track] = True
        self._expected[track] = packet.sequence + 1
        if self._awaiting_keyframe[track]:
            if not packet.keyframe:
                self.stats.packets_skipped += 1
                return False
            self._awaiting_keyframe[track] = False
        self.stats.packets_appended += 1
        return True
