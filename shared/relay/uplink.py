"""The origin's side of one relay connection: forward each packet, or drop to a keyframe.

A relay connection must never delay a remote node's viewers by more than a bound, and never
make the encoder wait.  The shell writes each forwarded message into its socket's buffer and
tells this core, for every packet, how many bytes are still unsent (``backlog_bytes``: asyncio's
``transport.get_write_buffer_size()``).  From the moments it forwarded each byte, the core knows
how long the oldest unsent byte has waited: that is the relay's queueing delay.

When the delay passes ``max_delay_s`` (or the backlog passes ``max_backlog_bytes``, the memory
bound), the link cannot carry the stream now: every track drops what follows until its next
keyframe, and the next group of pictures goes out whole.  Dropping whole groups is the loss a
decoder recovers from without asking; dropping single packets would corrupt every frame until
the next keyframe anyway.  Audio packets are all keyframes (each Opus packet decodes alone), so
audio resumes at once.

Time is passed in (``now``, monotonic seconds).
"""

from __future__ import annotations

from collections import deque

import msgspec

from shared.errors import ConfigError
from shared.pool.packet_ring import RingPacket

__all__ = ["RelayUplink", "UplinkStats"]


class UplinkStats(msgspec.Struct, kw_only=True):
    packets_forwarded: int = 0
    bytes_forwarded: int = 0
    #: Packets not sent: while the link was backed up, or waiting for a keyframe after.
    packets_dropped: int = 0
    #: Times the link backed up past the bound (each drops to the next keyframe).
    congestion_events: int = 0
    #: The queueing delay the last packet found (seconds).
    delay_s: float = 0.0


class RelayUplink:
    def __init__(
        self, tracks: int, *, max_delay_s: float = 0.5, max_backlog_bytes: int = 8 * 1024 * 1024
    ) -> None:
        if tracks < 1:
            raise ConfigError("a relay carries at least one track")
        if max_delay_s <= 0 or max_backlog_bytes <= 0:
            raise ConfigError("max_delay_s and max_backlog_bytes must be positive")
        self._max_delay_s = max_delay_s
        self._max_backlog = max_backlog_bytes
        # A new subscriber starts at a keyframe on every track.
        self._awaiting_keyframe = [True] * tracks
        self._queued_total = 0  # bytes handed to the socket, ever
        #: (position of a message's last byte, when it was handed over), oldest first.
        self._handed: deque[tuple[int, float]] = deque()
        self.stats = UplinkStats()

    def queueing_delay(self, now: float, backlog_bytes: int) -> float:
        """How long the oldest byte still unsent has waited."""
        sent_up_to = self._queued_total - backlog_bytes
        handed = self._handed
        while handed and handed[0][0] <= sent_up_to:
            handed.popleft()
        return now - handed[0][1] if handed else 0.0

    def admit(self, track: int, packet: RingPacket, now: float, backlog_bytes: int) -> bool:
        """Whether to forward ``packet`` of ``track`` now (if so, call :meth:`sent`)."""
        delay = self.queueing_delay(now, backlog_bytes)
        self.stats.delay_s = delay
        if delay > self._max_delay_s or backlog_bytes > self._max_backlog:
            if not all(self._awaiting_keyframe):
                self.stats.congestion_events += 1
            self._awaiting_keyframe = [True] * len(self._awaiting_keyframe)
            self.stats.packets_dropped += 1
            return False
        if self._awaiting_keyframe[track]:
            if not packet.keyframe:
                self.stats.packets_dropped += 1
                return False
            self._awaiting_keyframe[track] = False
        return True

    def lost_at_origin(self, track: int) -> None:
        """The origin's reader was lapped on ``track`` (it resumes at a keyframe itself)."""
        self._awaiting_keyframe[track] = True

    def sent(self, packets: int, payload_bytes: int, message_bytes: int, now: float) -> None:
        """``packets`` (``payload_bytes`` of media) went into the socket as one message of
        ``message_bytes``."""
        self._queued_total += message_bytes
        self._handed.append((self._queued_total, now))
        self.stats.packets_forwarded += packets
        self.stats.bytes_forwarded += payload_bytes
