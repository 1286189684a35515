"""The WHEP endpoint (draft-ietf-wish-whep): browsers ask for a stream with an SDP offer.

Resources, all under ``/whep/<stream>``:

==========================  ==========================================================
``POST /whep/<stream>``      an SDP offer (``Content-Type: application/sdp``, §4.2) with
                             ``Authorization: Bearer <viewer token>`` (§4.5, RFC 6750
                             §2.1) -> ``201 Created``, the SDP answer, ``Location:`` the
                             session's URL
``DELETE <Location>``        ends the session (§4.3) -> ``200 OK``
``GET /whep/<stream>/player`` the browser player page (:mod:`shared.webrtc.player`)
==========================  ==========================================================

Errors are status codes with the reason as a ``text/plain`` body: 400 a malformed offer or one
without H.264 packetization-mode=1, 401 a missing, malformed, forged, expired, revoked or
other stream's token (with ``WWW-Authenticate: Bearer``, RFC 6750 §3), 403 a token without
``can_view`` or whose ``max_quality`` allows no rung served here, 404 an unknown stream or
session, 415 an offer that is not ``application/sdp``, 503 the endpoint is full.  Tokens are the
QUIC viewers' (:mod:`shared.auth.tokens`), checked against the stream's
:class:`~shared.auth.server.AccessSettings`; an open stream needs none.  A token stream's
"ask the operator" path has no WHEP form: a browser without a token is refused.

ICE is not trickled (no ``PATCH``, §4.4 is optional): aiortc's ``setLocalDescription`` gathers
every candidate before it returns, so the answer carries them all.  No STUN server is asked
(``iceServers=[]``): the server's host candidates are what a browser on the same network, or
one reaching a public address, connects to.

Media is encode-once: each peer gets :class:`~shared.webrtc.track.EncodedTrack` s subscribed
to the shared :class:`~shared.webrtc.feed.RingFeed` s, and the video transceiver is limited to
H.264 with packetization-mode=1 (RFC 6184 §6.2; STAP-A and FU-A are what aiortc's packer
emits) before the offer is applied, since aiortc negotiates codecs in setRemoteDescription.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Final

import msgspec
from aiohttp import web
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpCodecCapability,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc import sdp as aiortc_sdp
from aiortc.exceptions import InvalidStateError, OperationError

from shared.auth.admission import allowed_rungs
from shared.auth.server import AccessSettings
from shared.auth.tokens import MAX_TOKEN_LENGTH
from shared.errors import AuthError
from shared.models import AccessMode
from shared.webrtc.feed import RingFeed
from shared.webrtc.player import player_page
from shared.webrtc.track import EncodedTrack, forward_keyframe_requests

__all__ = ["WhepEndpoint", "WhepPeerStats", "h264_preferences"]

logger = logging.getLogger(__name__)

SDP_TYPE: Final = "application/sdp"
#: An offer larger than this is refused unread (a browser's is a few kilobytes).
MAX_OFFER_BYTES: Final = 64 * 1024


class WhepPeerStats(msgspec.Struct, kw_only=True):
    session: str
    viewer_id: str | None
    rung: int
    state: str
    """The RTCPeerConnection's connectionState (new, connecting, connected, ...)."""
    frames_sent: int
    bytes_sent: int
    """Media payload handed to aiortc (access units, Opus packets), before RTP headers."""
    frames_dropped: int
    created_at: float


class _Peer:
    def __init__(
        self,
        session: str,
        pc: RTCPeerConnection,
        tracks: list[EncodedTrack],
        viewer: str | None,
        rung: int,
        token_id: str | None = None,
    ) -> None:
        self.session, self.pc, self.tracks = session, pc, tracks
        self.viewer, self.rung, self.token_id = viewer, rung, token_id
        self.created_at = time.time()

    def stats(self) -> WhepPeerStats:
        return WhepPeerStats(
            session=self.session,
            viewer_id=self.viewer,
            rung=self.rung,
            state=self.pc.connectionState,
            frames_sent=sum(t.frames_sent for t in self.tracks),
            bytes_sent=sum(t.bytes_sent for t in self.tracks),
            frames_dropped=sum(t.frames_dropped for t in self.tracks),
            created_at=self.created_at,
        )


def h264_preferences() -> list[RTCRtpCodecCapability]:
    """aiortc's H.264 codecs with packetization-mode=1 (and their RTX), for
    ``setCodecPreferences``: mode 0 (single NAL unit) cannot carry our access units whole."""
    codecs = RTCRtpSender.getCapabilities("video").codecs
    return [
        codec
        for codec in codecs
        if (
            codec.mimeType.lower() == "video/h264"
            and str(codec.parameters.get("packetization-mode")) == "1"
        )
        or codec.mimeType.lower() == "video/rtx"
    ]


class _Refusal(Exception):
    def __init__(self, status: int, reason: str, word: str) -> None:
        super().__init__(reason)
        self.status, self.reason, self.word = status, reason, word


class WhepEndpoint:
    """One stream's WHEP resources and peers (module doc).

    ``video``: one feed per rung, rung 0 (the top) first (empty: an audio-only stream);
    ``clock``: the wall clock tokens' expiry is checked against.
    """

    def __init__(
        self,
        stream: str,
        access: AccessSettings,
        *,
        video: Sequence[RingFeed] = (),
        audio: RingFeed | None = None,
        max_peers: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stream = stream
        self._access = access
        self._video = list(video)
        self._audio = audio
        self._max_peers = max_peers
        self._clock = clock
        self._verifier = access.verifier()
        self.peers: dict[str, _Peer] = {}
        #: Offers refused, by reason word (``missing``, ``forged``, ``full``, ...).
        self.refusals: dict[str, int] = {}
        #: Peers that have left (their counters are kept in these totals).
        self.departed_frames = 0
        self.departed_bytes = 0

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/whep/{stream}", self._post),
            web.delete("/whep/{stream}/{session}", self._delete),
            web.get("/whep/{stream}/player", self._player),
        ]

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_OFFER_BYTES)
        app.add_routes(self.routes())
        return app

    def peer_stats(self) -> list[WhepPeerStats]:
        return [peer.stats() for peer in self.peers.values()]

    # -- HTTP

    async def _player(self, request: web.Request) -> web.Response:
        if request.match_info["stream"] != self.stream:
            return _error(404, f"no stream {request.match_info['stream']!r} here")
        return web.Response(text=player_page(self.stream), content_type="text/html")

    async def _post(self, request: web.Request) -> web.Response:
        try:
            return await self._answer(request)
        except _Refusal as refusal:
            self.refusals[refusal.word] = self.refusals.get(refusal.word, 0) + 1
            headers = {"WWW-Authenticate": 'Bearer realm="whep"'} if refusal.status == 401 else {}
            return _error(refusal.status, refusal.reason, headers)

    async def _answer(self, request: web.Request) -> web.Response:
        stream = request.match_info["stream"]
        if stream != self.stream:
            raise _Refusal(404, f"no stream {stream!r} here", "unknown_stream")
        viewer, token_id, rung = self._admit(request.headers.get("Authorization"))
        if request.content_type != SDP_TYPE:
            raise _Refusal(415, f"the offer must be {SDP_TYPE}", "media_type")
        if self._max_peers is not None and len(self.peers) >= self._max_peers:
            raise _Refusal(
                503, f"stream {stream} is full ({self._max_peers} WebRTC viewers)", "full"
            )
        offer = await request.text()
        try:
            kinds = {media.kind for media in aiortc_sdp.SessionDescription.parse(offer).media}
        except (ValueError, KeyError, IndexError) as exc:
            raise _Refusal(400, f"the offer is not SDP: {exc}", "bad_offer") from None
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        tracks: list[EncodedTrack] = []
        try:
            answer = await self._negotiate(pc, offer, kinds, rung, tracks)
        except BaseException:
            for track in tracks:
                track.stop()
            await pc.close()
            raise
        session = secrets.token_urlsafe(12)
        peer = self.peers[session] = _Peer(session, pc, tracks, viewer, rung, token_id)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self._end(peer)

        logger.info("stream %s: WebRTC viewer %s (session %s)", self.stream, viewer, session)
        return web.Response(
            status=201,
            body=answer.encode(),
            content_type=SDP_TYPE,
            headers={"Location": f"/whep/{self.stream}/{session}"},
        )

    def _admit(self, authorization: str | None) -> tuple[str | None, str | None, int]:
        """The viewer, token id and rung a request's credentials allow, or a refusal."""
        if self._access.access.mode == AccessMode.OPEN or self._verifier is None:
            return None, None, 0
        token = None
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or len(value) > MAX_TOKEN_LENGTH + 16:
                raise _Refusal(
                    401, "the Authorization header must be 'Bearer <token>'", "malformed"
                )
            token = value.strip()
        try:
            grant = self._verifier.verify(token, stream=self.stream, now=self._clock())
        except AuthError as exc:
            raise _Refusal(401, str(exc), str(exc.reason)) from None
        if not grant.permissions.can_view:
            raise _Refusal(403, "the token does not allow viewing", "cannot_view")
        rung = 0
        if self._access.rungs:
            allowed = allowed_rungs(self._access.rungs, grant.permissions.max_quality)
            if not allowed or allowed[0].index >= max(len(self._video), 1):
                raise _Refusal(
                    403, "no rung served here is within the token's max_quality", "max_quality"
                )
            rung = allowed[0].index
        return grant.viewer, grant.token_id, rung

    async def _negotiate(
        self,
        pc: RTCPeerConnection,
        offer: str,
        kinds: set[str],
        rung: int,
        tracks: list[EncodedTrack],
    ) -> str:
        # Transceivers first, with their codecs: aiortc negotiates in setRemoteDescription.
        if "video" in kinds and self._video:
            feed = self._video[rung]
            track = feed.subscribe()
            tracks.append(track)
            transceiver: RTCRtpTransceiver = pc.addTransceiver(track, direction="sendonly")
            transceiver.setCodecPreferences(h264_preferences())
            forward_keyframe_requests(transceiver.sender, feed.keyframe_needed)
        if "audio" in kinds and self._audio is not None:
            track = self._audio.subscribe()
            tracks.append(track)
            pc.addTransceiver(track, direction="sendonly")
        if not tracks:
            raise _Refusal(400, "the offer asks for no media this stream has", "bad_offer")
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            # Gathers every ICE candidate before it returns: the answer is complete (no trickle).
            await pc.setLocalDescription(await pc.createAnswer())
        except (OperationError, InvalidStateError, ValueError) as exc:
            raise _Refusal(
                400,
                f"cannot answer the offer (H.264 packetization-mode=1 needed): {exc}",
                "bad_offer",
            ) from None
        return str(pc.localDescription.sdp)

    async def _delete(self, request: web.Request) -> web.Response:
        peer = self.peers.get(request.match_info["session"])
        if request.match_info["stream"] != self.stream or peer is None:
            return _error(404, "no such WHEP session")
        await self._end(peer)
        return web.Response(status=200, text="session ended")

    async def _end(self, peer: _Peer) -> None:
        if self.peers.pop(peer.session, None) is None:
            return
        stats = peer.stats()
        self.departed_frames += stats.frames_sent
        self.departed_bytes += stats.bytes_sent
        for track in peer.tracks:
            track.stop()
        await peer.pc.close()
        logger.info("stream %s: WebRTC session %s ended", self.stream, peer.session)

    async def revoke(self, *, token_id: str | None = None, viewer: str | None = None) -> int:
        """Revoke a token or a viewer: its peers end now and its token is refused from now on
        (as the RoQ shards' ``AccessControl.revoke``); how many peers ended."""
        if self._verifier is not None:
            if token_id is not None:
                self._verifier.revocations.revoke_token(token_id)
            if viewer is not None:
                self._verifier.revocations.revoke_viewer(viewer)
        cut = [
            peer
            for peer in self.peers.values()
            if (token_id is not None and peer.token_id == token_id)
            or (viewer is not None and peer.viewer == viewer)
        ]
        for peer in cut:
            await self._end(peer)
        return len(cut)

    async def close_viewer(self, viewer: str) -> int:
        """End the peers of ``viewer`` (removed by the operator); how many."""
        leaving = [peer for peer in self.peers.values() if peer.viewer == viewer]
        for peer in leaving:
            await self._end(peer)
        return len(leaving)

    async def close(self) -> None:
        """End every peer (their feeds are the caller's)."""
        for peer in list(self.peers.values()):
            await self._end(peer)


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=reason, headers=headers)
