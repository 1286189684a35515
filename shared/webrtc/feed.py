"""RingFeed: one packet ring read once and fanned out to every WebRTC peer's track.

A shell, as the sender shard's ring loop is (``actors/stages/sender.py``): it listens on the
ring's doorbell (:mod:`shared.pool.doorbell`), so the encoder's commit wakes it with no
polling, reads what was committed with one :class:`~shared.pool.packet_ring.PacketRingReader`
and pushes each packet to the tracks subscribed to it.  However many peers there are, the ring
is read once and nothing is encoded: each peer's aiortc sender only packetizes.

Video peers start at a keyframe; a newcomer asks for one (``request_keyframe``, throttled by
:class:`~shared.rtp.keyframes.KeyframePolicy` as the RoQ shards' requests are) so it does not
wait for the encoder's periodic one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from typing import Final, Literal

from shared.pool.packet_ring import PacketRing, PacketRingReader
from shared.rtp.keyframes import KeyframePolicy
from shared.webrtc.track import EncodedTrack

__all__ = ["RATE_WINDOW_S", "RingFeed"]

#: The window a ring's bitrate is measured over (two of the encoder's keyframe intervals at
#: 30 frames per keyframe would be steadier; one second follows a change of content).
RATE_WINDOW_S: Final = 2.0


class RingFeed:
    """Reads ``ring`` on its doorbell and pushes every packet to the subscribed tracks."""

    def __init__(
        self,
        ring: PacketRing,
        kind: Literal["video", "audio"],
        *,
        request_keyframe: Callable[[], None] | None = None,
        rung: int = 0,
    ) -> None:
        self.ring = ring
        self.kind = kind
        #: The ladder rung this ring carries (0: the top), told to the tracks with each packet.
        self.rung = rung
        self._request_keyframe = request_keyframe
        self._keyframes = KeyframePolicy()
        #: Listening before the reader takes its position: no commit after it is missed.
        self._bell = ring.listen()
        self._reader = PacketRingReader(ring, start="next")
        self._tracks: set[EncodedTrack] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.packets_read = 0
        self.bytes_read = 0
        self.packets_missed = 0
        #: (monotonic time, bytes) of the packets read over the last RATE_WINDOW_S.
        self._sizes: collections.deque[tuple[float, int]] = collections.deque()

    def start(self) -> None:
        self._bell.watch(asyncio.get_running_loop(), self._wakeup.set)
        self._task = asyncio.create_task(self._run(), name=f"feed-{self.kind}")

    def subscribe(self) -> EncodedTrack:
        """A new peer's track, fed from the next packet on (video: from the next keyframe)."""
        track = EncodedTrack(self.kind, on_keyframe_needed=self.keyframe_needed)
        self.attach(track)
        if self.kind == "video":
            self.keyframe_needed()
        return track

    def attach(self, track: EncodedTrack) -> None:
        """Feed a track made elsewhere (a peer's video track, fed by every rung's feed and
        choosing among them with its gate) until it ends."""
        self._tracks.add(track)
        track.on("ended", lambda: self._tracks.discard(track))

    def rate_bps(self, now: float) -> int | None:
        """What the ring carries, in bits per second over the last :data:`RATE_WINDOW_S`
        (None until it has been read for most of that window, or while it carries nothing):
        a rung's real rate, under its target on easy content, is what a viewer's estimate is
        to be compared with."""
        sizes = self._sizes
        while sizes and now - sizes[0][0] > RATE_WINDOW_S:
            sizes.popleft()
        if len(sizes) < 2 or now - sizes[0][0] < RATE_WINDOW_S / 2:
            return None
        total = sum(size for _, size in sizes)
        return int(total * 8 / RATE_WINDOW_S) or None

    @property
    def tracks(self) -> int:
        return len(self._tracks)

    def keyframe_needed(self) -> None:
        """A peer joined, lost its backlog or sent a PLI: ask the encoder (throttled)."""
        self._keyframes.request()
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            deadline = self._keyframes.next_deadline()
            sleep = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep):
                    await self._wakeup.wait()
            self._wakeup.clear()
            if self._keyframes.poll(time.monotonic()) and self._request_keyframe is not None:
                self._request_keyframe()
            batch = self._reader.read_available()
            self.packets_missed += batch.missed
            if batch.missed and self.kind == "video":
                # Lapped: every peer is past a gap and needs a keyframe to decode again.
                self.keyframe_needed()
            now = time.monotonic()
            for packet in batch.packets:
                self.packets_read += 1
                self.bytes_read += len(packet.data)
                self._sizes.append((now, len(packet.data)))
                for track in list(self._tracks):
                    track.push(packet.data, packet.pts, keyframe=packet.keyframe, rung=self.rung)

    def reattach(self) -> None:
        """The ring's writer (the encoder) restarted and created its ring anew under the same
        name (``actors.recovery``): read the new one, from its latest keyframe on (audio: its
        next packet).  The peers' tracks stay subscribed; video asks for a keyframe."""
        ring = PacketRing.attach(self.ring.name)
        try:
            bell = ring.listen()
            start: Literal["next", "latest_keyframe"] = (
                "latest_keyframe" if self.kind == "video" else "next"
            )
            reader = PacketRingReader(ring, start=start)
        except BaseException:
            ring.close()
            raise
        old_bell, old_ring = self._bell, self.ring
        self.ring, self._bell, self._reader = ring, bell, reader
        if self._task is not None:
            bell.watch(asyncio.get_running_loop(), self._wakeup.set)
        old_bell.close()
        old_ring.close()
        if self.kind == "video":
            self.keyframe_needed()
        self._wakeup.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for track in list(self._tracks):
            track.stop()
        self._bell.close()
        self.ring.close()
