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
session, 415 an offer that is not ``application/sdp``, 503 the endpoint is full or the stream
has as many viewers as its limit allows (QUIC and WebRTC together: the endpoint's
:class:`Seats`, the supervisor's viewer registry, seat each peer, and free its seat when it
ends).  Tokens are the
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
With several rungs, a peer's video track is fed by every rung's feed and lets through the
rung its :class:`~shared.webrtc.feedback.BrowserRungChoice` picks from the browser's REMB and
receiver reports (seen on the video sender's RTCP, :func:`~shared.webrtc.track.observe_rtcp`),
switching at that rung's IDR.  A peer's data channel (:mod:`shared.webrtc.control`) carries its
quality requests, stats and notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

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
from aiortc import rtp as aiortc_rtp
from aiortc import sdp as aiortc_sdp
from aiortc.exceptions import InvalidStateError, OperationError

from shared.auth.admission import allowed_rungs
from shared.auth.server import AccessSettings
from shared.auth.tokens import MAX_TOKEN_LENGTH
from shared.control.quality import ViewerFeedback, classify_connection
from shared.errors import AuthError, ProtocolError
from shared.models import AccessMode, ConnectionQuality, ViewerPermissions
from shared.webrtc import control
from shared.webrtc.feed import RingFeed
from shared.webrtc.feedback import BrowserRungChoice
from shared.webrtc.player import player_page
from shared.webrtc.track import EncodedTrack, forward_keyframe_requests, observe_rtcp

__all__ = ["Seats", "WhepEndpoint", "WhepPeerStats", "h264_preferences"]

logger = logging.getLogger(__name__)

SDP_TYPE: Final = "application/sdp"
#: An offer larger than this is refused unread (a browser's is a few kilobytes).
MAX_OFFER_BYTES: Final = 64 * 1024
#: How often a peer's data channel gets its stats.
STATS_INTERVAL_S: Final = 1.0


class Seats(Protocol):
    """Where a WebRTC peer takes its seat among the stream's viewers: the supervisor's viewer
    registry and limits (``Supervisor.take_webrtc_seat``), shared with the QUIC viewers."""

    async def take(
        self, session: str, viewer: str | None, permissions: ViewerPermissions
    ) -> tuple[str | None, str]:
        """(a refusal's reason, or None; the viewer id the peer is registered under)."""
        ...

    async def release(self, viewer_id: str) -> None:
        """The peer is gone (DELETE, ICE failure, revocation): free its seat."""
        ...


class WhepPeerStats(msgspec.Struct, kw_only=True):
    session: str
    viewer_id: str | None
    """The id it is registered under among the stream's viewers (its token's viewer when it
    names one that is free, else ``whep-<session>``); the token's viewer without a registry."""
    rung: int
    state: str
    """The RTCPeerConnection's connectionState (new, connecting, connected, ...)."""
    frames_sent: int
    bytes_sent: int
    """Media payload handed to aiortc (access units, Opus packets), before RTP headers."""
    frames_dropped: int
    created_at: float
    rung_wanted: int = 0
    """The rung its choice is switching to (its ``rung`` when none is pending)."""
    rung_switches: int = 0
    remb_bps: int | None = None
    """The browser's last REMB (its receive-side estimate), if it sent one."""
    loss: float = 0.0
    """The last receiver report's fraction lost."""
    rtt_ms: float | None = None
    rtcp: dict[str, int] = msgspec.field(default_factory=dict)
    """RTCP packets the browser sent for the video, by kind (rr, remb, nack, pli, ...)."""
    connection_quality: ConnectionQuality = ConnectionQuality.DISCONNECTED
    pinned: int | None = None
    """The rung the viewer asked for over its data channel (``can_control_quality``)."""
    latency_ms: float | None = None
    """Capture to display as the browser last reported it (read off the picture's stamp)."""
    latency_p95_ms: float | None = None
    channel: str | None = None
    """Its control data channel's readyState (None: it opened none)."""


def _rtcp_kind(packet: Any) -> str:
    if isinstance(packet, aiortc_rtp.RtcpPsfbPacket):
        names = {
            aiortc_rtp.RTCP_PSFB_PLI: "pli",
            aiortc_rtp.RTCP_PSFB_FIR: "fir",
            aiortc_rtp.RTCP_PSFB_APP: "remb",
        }
        return names.get(packet.fmt, f"psfb{packet.fmt}")
    if isinstance(packet, aiortc_rtp.RtcpRtpfbPacket):
        # fmt 15: transport-wide feedback (draft-holmer-rmcat-transport-wide-cc-extensions-01 §3)
        return {aiortc_rtp.RTCP_RTPFB_NACK: "nack", 15: "transport-cc"}.get(
            packet.fmt, f"rtpfb{packet.fmt}"
        )
    return type(packet).__name__.removeprefix("Rtcp").removesuffix("Packet").lower()


class _Peer:
    """One browser: its peer connection, tracks, and (with several rungs) its rung choice
    fed by its RTCP (:mod:`shared.webrtc.feedback`)."""

    def __init__(
        self,
        session: str,
        pc: RTCPeerConnection,
        viewer: str | None,
        cap: int,
        token_id: str | None = None,
        viewer_id: str | None = None,
        permissions: ViewerPermissions | None = None,
        video: Sequence[RingFeed] = (),
        rungs: Sequence[control.RungEntry] = (),
    ) -> None:
        self.session, self.pc = session, pc
        self.rungs = list(rungs)
        self.channel: Any = None
        self.report: control.ViewerReport | None = None
        self.control_errors = 0
        self.viewer, self.cap, self.token_id = viewer, cap, token_id
        #: Its id in the stream's viewer registry (None: no registry).
        self.viewer_id = viewer_id
        self.permissions = permissions or ViewerPermissions()
        self.tracks: list[EncodedTrack] = []
        self.video = list(video)
        self.choice: BrowserRungChoice | None = None
        self.video_sender: RTCRtpSender | None = None
        self.rtcp: dict[str, int] = {}
        self.created_at = time.time()
        self._wake = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._stats_task: asyncio.Task[None] | None = None

    @property
    def rung(self) -> int:
        return self.cap if self.choice is None else self.choice.rung

    def named(self, viewer: str) -> bool:
        return viewer in (self.viewer, self.viewer_id)

    def keyframe_needed(self) -> None:
        """A PLI, or a backlog dropped: the IDR of the rung the peer is on."""
        if self.video:
            self.video[self.rung].keyframe_needed()

    def gate(self, rung: int, keyframe: bool) -> bool:
        assert self.choice is not None
        return self.choice.takes(rung, keyframe, time.monotonic())

    def on_rtcp(self, packet: Any) -> None:
        """One RTCP packet aiortc routed to the video sender (after aiortc handled it)."""
        kind = _rtcp_kind(packet)
        self.rtcp[kind] = self.rtcp.get(kind, 0) + 1
        choice, sender = self.choice, self.video_sender
        if choice is None or sender is None:
            return
        now = time.monotonic()
        ssrc = sender._ssrc
        if kind in ("remb", "rr", "sr"):
            nominal = choice.selector.rates
            measured = [feed.rate_bps(now) for feed in self.video]
            choice.set_rates([m or n for m, n in zip(measured, nominal, strict=True)])
        if kind == "remb":
            try:
                bitrate, ssrcs = aiortc_rtp.unpack_remb_fci(packet.fci)
            except ValueError:
                return
            if ssrc in ssrcs:
                choice.on_remb(bitrate, now)
        elif isinstance(packet, aiortc_rtp.RtcpRrPacket | aiortc_rtp.RtcpSrPacket):
            for report in packet.reports:
                if report.ssrc == ssrc:
                    # aiortc's smoothed RTT from this report's LSR/DLSR (RFC 3550 §6.4.1).
                    rtt = getattr(sender, "_RTCRtpSender__rtt", None)
                    choice.on_receiver_report(report.fraction_lost, rtt, now)
        self._ask_keyframe(now)
        self._wake.set()

    def pin(self, rung: int | None) -> None:
        if self.choice is not None:
            self.choice.set_pin(rung, time.monotonic())
            self._ask_keyframe(time.monotonic())
            self._wake.set()

    def _ask_keyframe(self, now: float) -> None:
        assert self.choice is not None
        rung = self.choice.keyframe_request(now)
        if rung is not None:
            self.video[rung].keyframe_needed()

    def start(self) -> None:
        if self.choice is not None:
            self._timer = asyncio.create_task(self._run_timer(), name=f"whep-{self.session}")

    # -- the control and stats channel (shared.webrtc.control)

    def attach_channel(self, channel: Any) -> None:
        """The browser opened its data channel: control messages in, stats out."""
        if channel.label != control.CHANNEL_LABEL or self.channel is not None:
            return
        self.channel = channel
        channel.on("message", self._on_message)
        self._stats_task = asyncio.create_task(self._send_stats(), name=f"stats-{self.session}")

    def _send(self, message: Any) -> bool:
        channel = self.channel
        if channel is None or channel.readyState != "open":
            return False
        channel.send(control.encode(message))
        return True

    def _on_message(self, data: str | bytes) -> None:
        try:
            message = control.parse_client(data)
        except ProtocolError as exc:
            self.control_errors += 1
            self._send(control.ErrorMessage(reason=str(exc)))
            return
        if isinstance(message, control.ViewerReport):
            self.report = message
            return
        reply = control.decide_quality(
            message, self.permissions, rungs=max(len(self.video), 1), cap=self.cap
        )
        if reply.ok:
            self.pin(message.rung)
        self._send(reply)

    def notify(self, text: str, data: dict[str, Any] | None) -> bool:
        """A ``broadcast_to_viewers`` notice; whether it went (the channel is open)."""
        return self._send(control.Notice(text=text, data=data))

    def stats_message(self) -> control.StatsMessage:
        stats = self.stats()
        return control.StatsMessage(
            rung=stats.rung,
            rung_wanted=stats.rung_wanted,
            pinned=stats.pinned,
            rungs=self.rungs,
            remb_bps=stats.remb_bps,
            loss=stats.loss,
            rtt_ms=stats.rtt_ms,
            frames_sent=stats.frames_sent,
            bytes_sent=stats.bytes_sent,
            can_control_quality=self.permissions.can_control_quality,
        )

    async def _send_stats(self) -> None:
        while True:
            self._send(self.stats_message())
            await asyncio.sleep(STATS_INTERVAL_S)

    async def _run_timer(self) -> None:
        choice = self.choice
        assert choice is not None
        while True:
            deadline = choice.next_deadline()
            sleep = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep):
                    await self._wake.wait()
            self._wake.clear()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                choice.on_timer(now)
                self._ask_keyframe(now)

    async def close(self) -> None:
        for task in (self._timer, self._stats_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for track in self.tracks:
            track.stop()
        await self.pc.close()

    def stats(self) -> WhepPeerStats:
        choice = self.choice
        rtt = None if choice is None or choice.rtt_s is None else choice.rtt_s * 1000
        loss = 0.0 if choice is None else choice.loss
        connected = self.pc.connectionState == "connected"
        return WhepPeerStats(
            session=self.session,
            viewer_id=self.viewer_id or self.viewer,
            rung=self.rung,
            state=self.pc.connectionState,
            frames_sent=sum(t.frames_sent for t in self.tracks),
            bytes_sent=sum(t.bytes_sent for t in self.tracks),
            frames_dropped=sum(t.frames_dropped for t in self.tracks),
            created_at=self.created_at,
            rung_wanted=self.rung if choice is None else choice.wanted,
            rung_switches=0 if choice is None else choice.selector.switches,
            remb_bps=None if choice is None else choice.remb_bps,
            loss=loss,
            rtt_ms=rtt,
            rtcp=dict(self.rtcp),
            connection_quality=classify_connection(
                ViewerFeedback(
                    viewer_id=self.viewer_id or self.session,
                    rtt_ms=rtt or 0.0,
                    loss_rate=loss,
                    connected=connected,
                )
            ),
            pinned=None if choice is None else choice.selector.pin,
            latency_ms=None if self.report is None else self.report.latency_ms,
            latency_p95_ms=None if self.report is None else self.report.latency_p95_ms,
            channel=None if self.channel is None else self.channel.readyState,
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
        seats: Seats | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stream = stream
        self._seats = seats
        self._access = access
        self._video = list(video)
        for index, feed in enumerate(self._video):
            feed.rung = index  # a feed's rung is its place in the ladder served here
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
        viewer, token_id, rung, permissions = self._admit(request.headers.get("Authorization"))
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
        session = secrets.token_urlsafe(12)
        viewer_id = None
        if self._seats is not None:
            # The stream's own limits, across QUIC and WebRTC viewers (the registry's seats).
            refusal, viewer_id = await self._seats.take(session, viewer, permissions)
            if refusal is not None:
                raise _Refusal(503, refusal, "full")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        peer = _Peer(
            session,
            pc,
            viewer,
            rung,
            token_id,
            viewer_id=viewer_id,
            permissions=permissions,
            video=self._video,
            rungs=[
                control.RungEntry(index=r.index, width=r.width, height=r.height, bitrate=r.bitrate)
                for r in sorted(self._access.rungs, key=lambda r: r.index)[: len(self._video)]
            ],
        )
        pc.on("datachannel", peer.attach_channel)
        try:
            answer = await self._negotiate(peer, offer, kinds)
        except BaseException:
            await peer.close()
            if self._seats is not None and viewer_id is not None:
                await self._seats.release(viewer_id)
            raise
        self.peers[session] = peer
        peer.start()

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

    def _admit(
        self, authorization: str | None
    ) -> tuple[str | None, str | None, int, ViewerPermissions]:
        """The viewer, token id, rung and permissions a request's credentials allow, or a
        refusal (an open stream: view only)."""
        if self._access.access.mode == AccessMode.OPEN or self._verifier is None:
            return None, None, 0, ViewerPermissions()
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
        return grant.viewer, grant.token_id, rung, grant.permissions

    def rates(self) -> list[int] | None:
        """The video rungs' rates, top first, from the stream's ladder (None: not known)."""
        rungs = sorted(self._access.rungs, key=lambda r: r.index)[: len(self._video)]
        if len(rungs) < len(self._video) or any(r.bitrate <= 0 for r in rungs):
            return None
        return [r.bitrate for r in rungs]

    async def _negotiate(self, peer: _Peer, offer: str, kinds: set[str]) -> str:
        pc = peer.pc
        # Transceivers first, with their codecs: aiortc negotiates in setRemoteDescription.
        if "video" in kinds and self._video:
            rates = self.rates()
            if rates is not None and len(rates) > 1:
                # Several rungs: the peer is fed by every rung's feed and its choice gates
                # them (shared.webrtc.feedback), starting on the best rung it may get.
                peer.choice = BrowserRungChoice(rates, now=time.monotonic(), cap=peer.cap)
                track = EncodedTrack(
                    "video", on_keyframe_needed=peer.keyframe_needed, gate=peer.gate
                )
                for feed in self._video:
                    feed.attach(track)
            else:
                track = EncodedTrack("video", on_keyframe_needed=peer.keyframe_needed)
                self._video[peer.cap].attach(track)
            peer.tracks.append(track)
            peer.keyframe_needed()
            transceiver: RTCRtpTransceiver = pc.addTransceiver(track, direction="sendonly")
            transceiver.setCodecPreferences(h264_preferences())
            peer.video_sender = transceiver.sender
            forward_keyframe_requests(transceiver.sender, peer.keyframe_needed)
            observe_rtcp(transceiver.sender, peer.on_rtcp)
        if "audio" in kinds and self._audio is not None:
            peer.tracks.append(self._audio.subscribe())
            pc.addTransceiver(peer.tracks[-1], direction="sendonly")
        if not peer.tracks:
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
        await peer.close()
        logger.info("stream %s: WebRTC session %s ended", self.stream, peer.session)
        if self._seats is not None and peer.viewer_id is not None:
            try:
                await self._seats.release(peer.viewer_id)
            except Exception as exc:  # the supervisor stopping meanwhile: its registry goes too
                logger.warning("stream %s: could not free %s's seat: %s", self.stream, peer, exc)

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
            or (viewer is not None and peer.named(viewer))
        ]
        for peer in cut:
            await self._end(peer)
        return len(cut)

    async def close_viewer(self, viewer: str) -> int:
        """End the peers of ``viewer`` (removed by the operator); how many."""
        leaving = [peer for peer in self.peers.values() if peer.named(viewer)]
        for peer in leaving:
            await self._end(peer)
        return len(leaving)

    def notify(self, text: str, data: dict[str, Any] | None = None) -> int:
        """A notice (``broadcast_to_viewers``) to every peer whose channel is open; how many."""
        return sum(peer.notify(text, data) for peer in self.peers.values())

    async def close(self) -> None:
        """End every peer (their feeds are the caller's)."""
        for peer in list(self.peers.values()):
            await self._end(peer)


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=reason, headers=headers)
