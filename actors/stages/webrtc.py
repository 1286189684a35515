"""WebRTCShardActor: a stream's browser viewers over WebRTC, fed from the shared packet rings.

The WebRTC counterpart of the RoQ sender shard (``actors/stages/sender.py``): it attaches the
encoder's rings the same way (rung 0's ``video``, rung n's ``video{n}`` while they exist, and
the ``audio`` ring when the stream has one), reads each once with a
:class:`~shared.webrtc.feed.RingFeed` woken by the ring's doorbell, and serves the WHEP endpoint
(:class:`~shared.webrtc.whep.WhepEndpoint`) on ``HOST:PORT`` over HTTP.  Each browser's
aiortc peer packetizes the encoder's access units as they are: no encoder per viewer (the
``shared.webrtc.track`` module doc cites where aiortc passes ``av.Packet`` s through).

A viewer's PLI, a newcomer and a peer that lost its backlog become a keyframe request to that
rung's encoder, throttled per rung.  The actor is its own process and event loop, so the
peers' DTLS/SRTP work does not share a core with the RoQ shards.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from shared.auth.server import AccessSettings
from shared.errors import ResourceError
from shared.models import StreamAccess, ViewerPermissions
from shared.pool.packet_ring import PacketRing
from shared.pool.shm import segment_name
from shared.webrtc.feed import RingFeed
from shared.webrtc.whep import WhepEndpoint, WhepPeerStats

if TYPE_CHECKING:
    from actors.handles import EncoderHandle

logger = logging.getLogger(__name__)


class SupervisorSeats:
    """:class:`~shared.webrtc.whep.Seats` on the supervisor actor (its Ray handle): a WebRTC
    peer is admitted, registered and released by the same registry and limits as a QUIC
    viewer's ticket."""

    def __init__(self, supervisor: Any, session_id: str) -> None:
        # Imported here: the supervisor module imports this one.
        from actors.handles import Handle
        from actors.supervisor import Supervisor

        self._supervisor = Handle[Supervisor](supervisor)
        self._session_id = session_id

    async def take(
        self, session: str, viewer: str | None, permissions: ViewerPermissions
    ) -> tuple[str | None, str]:
        from actors.supervisor import Supervisor

        return await self._supervisor.call(
            Supervisor.take_webrtc_seat, self._session_id, session, viewer, permissions
        )

    async def release(self, viewer_id: str) -> None:
        from actors.supervisor import Supervisor

        await self._supervisor.call(Supervisor.release_webrtc_seat, self._session_id, viewer_id)


class WebRTCStats(msgspec.Struct, kw_only=True):
    pid: int
    url: str
    """The WHEP endpoint (``POST`` an offer here); the player page is ``url + "/player"``."""
    peers: list[WhepPeerStats]
    frames_sent: int
    """Every peer's, including those that have left."""
    bytes_sent: int
    """Media payload handed to the peers' RTP senders, every peer's."""
    packets_read: int
    """Packets read from the rings: once each, however many peers."""
    rungs: int
    tracks: list[str]
    refusals: dict[str, int] = msgspec.field(default_factory=dict)


class WebRTCShardActor:
    def __init__(
        self,
        session_id: str,
        ring_name: str | None,
        encoder: EncoderHandle | None,
        audio_ring_name: str | None = None,
        access: AccessSettings | None = None,
        max_peers: int | None = None,
        supervisor: Any | None = None,
    ) -> None:
        """``ring_name``: rung 0's ring (None: an audio-only stream); ``access``: who may
        watch (None: an open stream); ``max_peers``: beyond it an offer gets 503;
        ``supervisor``: its actor handle, whose registry seats the peers (None: no registry,
        the endpoint alone)."""
        self._session_id = session_id
        self._ring_name = ring_name
        self._encoder = encoder
        self._audio_ring_name = audio_ring_name or segment_name(session_id, "audio")
        self._access = access or AccessSettings(access=StreamAccess())
        self._max_peers = max_peers
        self._seats = None if supervisor is None else SupervisorSeats(supervisor, session_id)
        self._video: list[RingFeed] = []
        self._audio: RingFeed | None = None
        self._runner: web.AppRunner | None = None
        self._endpoint: WhepEndpoint | None = None
        self._url = ""

    def _keyframe_request(self, rung: int) -> Callable[[], None]:
        def request() -> None:
            if self._encoder is not None:
                self._encoder.request_keyframe(rung)

        return request

    def _attach(self) -> None:
        if self._ring_name is not None:
            rings = [PacketRing.attach(self._ring_name)]
            while True:
                try:
                    rings.append(
                        PacketRing.attach(segment_name(self._session_id, f"video{len(rings)}"))
                    )
                except ResourceError:
                    break
            for rung, ring in enumerate(rings):
                self._video.append(
                    RingFeed(
                        ring, "video", request_keyframe=self._keyframe_request(rung), rung=rung
                    )
                )
        try:
            self._audio = RingFeed(PacketRing.attach(self._audio_ring_name), "audio")
        except ResourceError:
            if not self._video:
                raise  # no video and no audio: nothing to send

    async def open(self, host: str, port: int) -> str:
        """Serve WHEP on ``host:port`` (0: a free port); the endpoint's URL."""
        try:
            self._attach()
            for feed in self._feeds:
                feed.start()
            self._endpoint = WhepEndpoint(
                self._session_id,
                self._access,
                video=self._video,
                audio=self._audio,
                max_peers=self._max_peers,
                seats=self._seats,
            )
            self._runner = web.AppRunner(self._endpoint.app(), access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, host, port).start()
        except BaseException:
            await self._close()
            raise
        bound = self._runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self._url = f"http://{shown}:{bound}/whep/{self._session_id}"
        logger.info("stream %s: WHEP at %s", self._session_id, self._url)
        return self._url

    @property
    def _feeds(self) -> list[RingFeed]:
        return self._video + ([self._audio] if self._audio is not None else [])

    async def stats(self) -> WebRTCStats:
        endpoint = self._endpoint
        peers = endpoint.peer_stats() if endpoint is not None else []
        return WebRTCStats(
            pid=os.getpid(),
            url=self._url,
            peers=peers,
            frames_sent=sum(p.frames_sent for p in peers)
            + (endpoint.departed_frames if endpoint else 0),
            bytes_sent=sum(p.bytes_sent for p in peers)
            + (endpoint.departed_bytes if endpoint else 0),
            packets_read=sum(feed.packets_read for feed in self._feeds),
            rungs=len(self._video),
            tracks=(["video"] if self._video else []) + (["audio"] if self._audio else []),
            refusals=dict(endpoint.refusals) if endpoint else {},
        )

    async def revoke(self, token_id: str | None = None, viewer_id: str | None = None) -> int:
        """Revoke a token or a viewer here: its peers end now; how many."""
        if self._endpoint is None:
            return 0
        return await self._endpoint.revoke(token_id=token_id, viewer=viewer_id)

    async def notify(self, text: str, data: dict[str, Any] | None = None) -> int:
        """A notice to every browser here over its data channel; how many got it."""
        return 0 if self._endpoint is None else self._endpoint.notify(text, data)

    async def close_viewer(self, viewer_id: str) -> int:
        """End the peers of a removed viewer; how many."""
        return 0 if self._endpoint is None else await self._endpoint.close_viewer(viewer_id)

    async def reattach(self, names: list[str]) -> int:
        """The rings named were re-created by a restarted encoder (``actors.recovery``): each
        feed of one reads the new ring; browsers stay connected.  How many were re-attached."""
        feeds = [feed for feed in self._feeds if feed.ring.name in names]
        for feed in feeds:
            feed.reattach()
        return len(feeds)

    async def _close(self) -> None:
        if self._endpoint is not None:
            await self._endpoint.close()
        if self._runner is not None:
            await self._runner.cleanup()
        for feed in self._feeds:
            with contextlib.suppress(Exception):
                await feed.close()
        self._video, self._audio = [], None

    async def stop(self) -> WebRTCStats:
        stats = await self.stats()
        await self._close()
        return stats
