"""EncodedTrack: an aiortc track whose frames are already encoded (encode once, send to many).

aiortc 1.16's ``RTCRtpSender._next_encoded_frame`` (``aiortc/rtcrtpsender.py``) awaits
``track.recv()`` and branches on what it gets: an ``av.Frame`` is encoded
(``self.__encoder.encode`` in an executor), anything else is taken as an ``av.Packet`` and only
packed (``self.__encoder.pack(data)``).  ``H264Encoder.pack`` splits the Annex B access unit
into NAL units and packetizes them (RFC 6184 §5.7.1 STAP-A / §5.8 FU-A, i.e.
packetization-mode=1); its libx264 context is created lazily in ``_encode_frame`` only, so a
track that returns packets never creates an encoder.  (``OpusEncoder.__init__`` does open a
libopus context up front, but ``pack`` never uses it: audio is passed through as well.)  The
RTP timestamp is ``packet.pts`` rescaled from ``packet.time_base`` to the codec's clock.

One such sender ignores a PLI/FIR for packets (``_send_keyframe`` only flags the next *encode*),
so :func:`forward_keyframe_requests` hooks it to ask the shared encoder instead.

The track holds a short queue: the feed pushes each packet as the ring gives it; a peer that
falls behind by more than ``max_queue`` packets loses its backlog and waits for the next
keyframe (a decoder cannot use anything after a gap until then), asking for one.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from fractions import Fraction
from typing import Any, Final, Literal

import av
from aiortc import MediaStreamTrack, RTCRtpSender
from aiortc.mediastreams import MediaStreamError

__all__ = [
    "AUDIO_TIME_BASE",
    "VIDEO_TIME_BASE",
    "EncodedTrack",
    "forward_keyframe_requests",
    "observe_rtcp",
]

#: The encoder's pts clock (RFC 6184 §8.2.1: H.264 over RTP runs at 90 kHz).
VIDEO_TIME_BASE: Final = Fraction(1, 90_000)
#: The audio ring's pts clock (RFC 7587 §4.1: Opus over RTP counts 48 kHz samples).
AUDIO_TIME_BASE: Final = Fraction(1, 48_000)
#: Packets a peer may lag behind the ring before its backlog is dropped (about 2 s of video).
MAX_QUEUE: Final = 60


class EncodedTrack(MediaStreamTrack):
    """A track of encoded packets pushed by a feed (module doc)."""

    def __init__(
        self,
        kind: Literal["video", "audio"],
        *,
        on_keyframe_needed: Callable[[], None] | None = None,
        max_queue: int = MAX_QUEUE,
        gate: Callable[[int, bool], bool] | None = None,
    ) -> None:
        """``gate(rung, keyframe)``: whether a packet of that rung is for this peer (a peer
        fed by every rung's feed, following its rung choice); None: every packet."""
        super().__init__()
        self.kind = kind
        self._gate = gate
        self.time_base = VIDEO_TIME_BASE if kind == "video" else AUDIO_TIME_BASE
        self._on_keyframe_needed = on_keyframe_needed
        self._max_queue = max_queue
        self._queue: collections.deque[tuple[bytes, int]] = collections.deque()
        self._ready = asyncio.Event()
        #: Video starts at a keyframe, and restarts at one after a dropped backlog.
        self._want_keyframe = kind == "video"
        self.frames_sent = 0
        self.bytes_sent = 0
        self.frames_dropped = 0

    def push(self, data: bytes, pts: int, *, keyframe: bool, rung: int = 0) -> None:
        """One encoded packet (an access unit, or an Opus packet) of ``rung`` for this peer."""
        if self.readyState != "live":
            return
        if self._gate is not None and not self._gate(rung, keyframe):
            return
        if self._want_keyframe:
            if not keyframe:
                self.frames_dropped += 1
                return
            self._want_keyframe = False
        if len(self._queue) >= self._max_queue:
            self.frames_dropped += len(self._queue) + 1
            self._queue.clear()
            if self.kind == "video":
                self._want_keyframe = True
                if self._on_keyframe_needed is not None:
                    self._on_keyframe_needed()
                return
        self._queue.append((data, pts))
        self._ready.set()

    async def recv(self) -> av.Packet[Any]:
        """The next packet for aiortc's sender (module doc: it packs, never encodes)."""
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        data, pts = self._queue.popleft()
        packet = av.Packet(data)
        packet.pts = pts
        packet.time_base = self.time_base
        self.frames_sent += 1
        self.bytes_sent += len(data)
        return packet

    def stop(self) -> None:
        super().stop()
        self._queue.clear()
        self._ready.set()  # a pending recv() ends with MediaStreamError


def forward_keyframe_requests(sender: RTCRtpSender, request: Callable[[], None]) -> None:
    """Send a peer's PLI/FIR (RFC 4585 §6.3.1, RFC 5104 §4.3.1) to ``request`` (the shared
    encoder), since aiortc's own handling only flags an encode this sender never does."""
    original = sender._send_keyframe

    def send_keyframe() -> None:
        original()
        request()

    sender._send_keyframe = send_keyframe  # type: ignore[method-assign]


def observe_rtcp(sender: RTCRtpSender, observe: Callable[[Any], None]) -> None:
    """Show ``observe`` every RTCP packet aiortc routes to ``sender`` (receiver reports,
    REMB, NACK, PLI: see :mod:`shared.webrtc.feedback`), after aiortc has handled it (so the
    RTT it derives from a report is up to date)."""
    original = sender._handle_rtcp_packet

    async def handle(packet: Any) -> None:
        await original(packet)
        observe(packet)

    sender._handle_rtcp_packet = handle  # type: ignore[method-assign]
