"""SenderActor: a QUIC server for a stream's viewers, fed from the shared packet rings.

It is the sending half of the design's NetworkStreamer (the receiving half is
``shared/viewer/client.py``):

- ``start_streaming(peer, stream)`` is ``StreamManager.add_viewer``, which starts this actor;
  each viewer that connects to its URL gets a connection and its own RTP state;
- ``adjust_bitrate(connection, bitrate)`` is :meth:`SenderActor.adjust_bitrate` (a cap on that
  connection's bandwidth estimate; the shared encoder's target is the QualityActor's);
- ``get_stream_stats(connection)`` is :meth:`SenderActor.get_stream_stats`;
- ``close_stream(connection)`` is :meth:`SenderActor.close_stream` (or ``remove_viewer``).

The actor is its own process and event loop, so viewers fan out in parallel across cores and
one slow viewer never delays the others.  Several actors can serve one listen address: each
binds the port with ``SO_REUSEPORT`` and the kernel keeps each client on one of them.

Tracks are generic: video from the encoder's rings (H.264, flows 0/1, 90 kHz) and, when the
stream has audio, Opus from the ``audio`` ring (flows 2/3, 48 kHz).  With a simulcast ladder
the shard reads every rung's ring (rung n's is ``video{n}``, rates from the encoder's
``ladder()``) and each viewer receives one rung, chosen per viewer from its own bandwidth
estimate (:mod:`shared.rtp.adaptation`), capped by ``set_rung_cap`` (its permissions'
``max_quality``) or pinned by ``pin_rung``; a switch waits for an IDR of the new rung, which
the shard asks that rung's encoder for, and the viewer keeps one SSRC and sequence space.
Each frame is packetized once per rung and handed to every connection on that rung through
:class:`shared.rtp.sender.BroadcastSender`, which
answers RTCP (NACK from a bounded history, PLI, RR, transport-wide feedback for the bandwidth
estimate).  What to skip when the actor falls behind, and when a PLI (or a newcomer, or a
viewer resuming after congestion) becomes a keyframe request to the encoder, is decided by
:class:`shared.rtp.keyframes.KeyframePolicy`; this shell reads the rings, moves bytes, and
sleeps until a ring's doorbell rings (:mod:`shared.pool.doorbell`: the encoder's and the audio
pipeline's commits wake it, with no Ray call per frame) or the earliest of the cores' deadlines
comes (SRs, a held keyframe request), arming one timer for it as aioquic's shells do.  The cores run on ``time.monotonic()``; the
wall clock is read only for what is wall-clock data (the SRs' NTP timestamps, stats stamps).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import ray

from shared.auth.server import AccessControl, AccessSettings
from shared.control.balancer import ConnectionRateLimiter
from shared.errors import ConfigError, ResourceError
from shared.models import StreamAccess, StreamStats, ViewerLimits, ViewerPermissions
from shared.pool.doorbell import DoorbellListener
from shared.pool.packet_ring import PacketRing, PacketRingReader
from shared.pool.shm import segment_name
from shared.roq.framing import RoqErrorCode
from shared.roq.tls import TlsIdentity, generate_self_signed
from shared.roq.transport import PeerStats, RoqConnection, RoqServer
from shared.roq.url import StreamUrl, advertised_host
from shared.rtp.keyframes import KeyframePolicy
from shared.rtp.sender import AUDIO_TRACK, VIDEO_TRACK, BroadcastSender, MediaTrack

if TYPE_CHECKING:
    from actors.handles import EncoderHandle
    from shared.auth.admission import RecordCommand
    from shared.auth.pending import PendingRequest
    from shared.auth.tokens import ViewerGrant

logger = logging.getLogger(__name__)

#: Departed viewers whose last rung a shard remembers, the least recent forgotten first.
REMEMBERED_VIEWERS = 4096
#: Where each viewer's bandwidth estimate starts (it adapts within a few seconds).
INITIAL_ESTIMATE_BPS = 2_000_000


class PeerStatus(PeerStats, kw_only=True):
    """A connection's transport counters and what its viewer's feedback says."""

    loss: float = 0.0
    """Fraction lost over the last feedback interval (transport-wide feedback, else RR)."""
    jitter_ms: float = 0.0
    estimate_bps: int = 0
    """The send-side bandwidth estimate for this viewer (GCC-style, ``shared.rtp.bandwidth``)."""
    nacks_received: int = 0
    retransmissions: int = 0
    keyframe_requests: int = 0
    viewer_id: str | None = None
    """Its viewer: the one its token or the operator's approval named, else the ticket it
    named in its RTCP CNAME (None before either)."""
    access: str = "open"
    """``open`` (open stream), or its admission state: ``awaiting_hello``,
    ``pending_approval``, ``admitted`` (only an admitted connection gets media)."""
    rung: int = 0
    """The rung of the ladder it receives (0: the top, the stream's own quality).
    ``frames_dropped`` counts, per viewer, the frames dropped rather than queued under
    congestion (skipped before sending, or expired in its send queue)."""
    rung_wanted: int = 0
    """The rung it is switching to (its IDR pending), else ``rung``."""
    rung_cap: int = 0
    """The highest rung it may get (``set_rung_cap``)."""
    rung_pin: int | None = None
    rung_switches: int = 0
    probe_clusters: int = 0
    padding_bytes: int = 0
    """Probe padding sent to it (``shared.rtp.adaptation``)."""
    probe_restarts: int = 0
    """Probe clusters started again after a late timer (``shared.control.probe``)..."""
    probes_unpaced: int = 0
    """...and given up, unpaced."""
    checks_short: int = 0
    """Hold checks of its rung that came back short (``shared.control.rung_choice``)."""
    rung_reason: str = ""
    """Why its last change of rung was wanted."""


class SenderStats(msgspec.Struct, kw_only=True):
    pid: int
    viewer_id: str
    url: str
    peers: list[PeerStatus]
    frames_sent: int
    frames_missed: int
    packets_sent: int
    bytes_sent: int
    """Every connection's, including those that have left."""
    keyframe_requests: int
    tracks: list[str] = msgspec.field(default_factory=list)
    #: The ladder's rungs this shard reads (1: no per-viewer rungs) and their rates.
    rungs: int = 1
    rung_rates: list[int] = msgspec.field(default_factory=list)
    error: str | None = None
    #: Connections closed at once for a limit (this shard's viewers, the arrival rate).
    connections_refused: int = 0
    #: Connections closed by access control, by reason (``expired``, ``forged``, ...).
    access_refusals: dict[str, int] = msgspec.field(default_factory=dict)
    #: Viewers waiting here for an operator's approval.
    pending_requests: int = 0
    #: Every port it takes viewers on: its own first, then those taken over from shards that
    #: died (``listen_also``).
    ports: list[int] = msgspec.field(default_factory=list)


class _TrackSource:
    def __init__(
        self,
        index: int,
        spec: MediaTrack,
        ring: PacketRing,
        start: Literal["next", "latest_keyframe"],
        rung: int = 0,
        *,
        history: bool = False,
    ) -> None:
        """``history``: send what the ring holds from ``start`` on (a ring re-created by a
        restarted writer, whose first keyframe viewers are waiting for)."""
        self.index, self.spec, self.ring, self.rung = index, spec, ring, rung
        #: Listening before the reader takes its position: nothing committed after it is missed.
        self.bell: DoorbellListener = ring.listen()
        self.reader = PacketRingReader(ring, start=start)
        if not history:
            # Nobody is connected yet: what is in the ring now is history, not something to send.
            self.reader.read_available()


class SenderActor:
    def __init__(
        self,
        session_id: str,
        viewer_id: str,
        ring_name: str | None,
        encoder: EncoderHandle | None,
        audio_ring_name: str | None = None,
        limits: ViewerLimits | None = None,
        access: AccessSettings | None = None,
        supervisor: Any = None,
        rung_rates: Sequence[int] | None = None,
        ring_prefix: str = "",
    ) -> None:
        """``limits``: this shard refuses connections beyond ``max_viewers_per_shard`` and
        above the connection rate (None: no limit).  ``access``: who may watch (None: an
        open stream, as ``StreamAccess()``).  ``supervisor``: the handle recording requests
        of viewers with ``can_record`` go to (None: refused).  ``rung_rates``: each rung's
        bitrate, top first, when the encoder writes a ladder (None: asked of the encoder when
        the rings of rungs 1.. exist, see :meth:`open`).  ``ring_prefix``: rung n's ring and
        the default audio ring are ``segment_name(session_id, ring_prefix + role)``: empty
        on the encoder's node, ``<node tag>-`` where the shard reads a relay's copies
        (:mod:`actors.stages.relay`)."""
        self._supervisor = supervisor
        self._record_tasks: set[asyncio.Task[None]] = set()
        #: The admitted viewer of each connection (its access may end before the connection).
        self._admitted: dict[RoqConnection, str] = {}
        #: The rung each recently departed viewer (by its admitted id) last received.
        self._last_rung: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._session_id = session_id
        self._viewer_id = viewer_id
        self._ring_name = ring_name
        self._ring_prefix = ring_prefix
        self._audio_ring_name = audio_ring_name or segment_name(session_id, ring_prefix + "audio")
        self._encoder = encoder
        self._max_viewers = limits.max_viewers_per_shard if limits else None
        self._limiter = (
            ConnectionRateLimiter(limits.connect_rate_per_s, limits.connect_burst)
            if limits
            else None
        )
        self._refused = 0
        self._access_settings = access or AccessSettings(access=StreamAccess())
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sources: list[_TrackSource] = []
        #: The flows viewers send RTCP on, fixed once the rings are attached.
        self._rtcp_flows: frozenset[int] = frozenset()
        self._keyframes = KeyframePolicy()
        #: Per rung: when a viewer's IDR request goes to that rung's encoder (rung 0's is
        #: ``_keyframes``, which also counts what the shard missed).
        self._rung_keyframes = [self._keyframes]
        self._rung_rates = list(rung_rates) if rung_rates is not None else None
        self._url = ""
        self._error: str | None = None
        self._started = time.monotonic()
        self._departed_bytes = 0
        #: Every address this shard listens on (the first, and those taken over from shards
        #: that died).
        self._servers: list[RoqServer] = []
        #: Connections handed over by the process that owns a port several streams share
        #: (:meth:`open_hosted`, :mod:`actors.stages.shared_port`), and that port.
        self._hosted: set[RoqConnection] = set()
        self._hosted_port: int | None = None

    async def open(
        self,
        host: str,
        port: int,
        identity: TlsIdentity | None = None,
        reuse_port: bool | None = None,
    ) -> str:
        """Listen for viewers; returns the URL they connect to.

        ``reuse_port`` (default: whenever a fixed port is given) lets several senders share
        the port; a port held by a socket without SO_REUSEPORT is still "already in use".
        """
        identity = identity or generate_self_signed(host)
        await self._prepare(identity)
        self._server = self._new_server()
        try:
            await self._server.start(
                host, port, reuse_port=port != 0 if reuse_port is None else reuse_port
            )
        except BaseException:
            self._close_sources()
            raise
        self._servers.append(self._server)
        return self._begin(host, self._server.port)

    async def open_hosted(self, host: str, port: int, identity: TlsIdentity) -> str:
        """Serve the viewers another object's server hands over (:meth:`adopt`): the stream
        on a port it shares with other streams, in the process that owns that port
        (:mod:`actors.stages.shared_port`); returns the URL its viewers connect to."""
        await self._prepare(identity)
        self._hosted_port = port
        return self._begin(host, port)

    def adopt(self, connection: RoqConnection, control: bytes, end_stream: bool) -> None:
        """A connection of the shared port whose hello named this stream: connect it, then
        feed it every control byte it sent (the hello first, which admission parses)."""
        self._hosted.add(connection)
        refused = self._refused
        self._on_connect(connection)
        if self._refused == refused:  # not closed at once for a limit
            self._on_control(connection, control, end_stream)

    async def _prepare(self, identity: TlsIdentity) -> None:
        """Everything but the socket: the rings, the broadcast core, admission."""
        if self._ring_name is not None:  # None: an audio-only stream
            await self._attach_rungs()
        try:
            audio = PacketRing.attach(self._audio_ring_name)
        except ResourceError:
            if not self._sources:
                raise  # no video and no audio: nothing to send
        else:
            try:
                index = 1 if self._sources else 0  # after the video track, if any
                self._sources.append(_TrackSource(index, AUDIO_TRACK, audio, "next"))
            except BaseException:
                audio.close()
                self._close_sources()
                raise
        loop = asyncio.get_running_loop()
        for source in self._sources:
            source.bell.watch(loop, self._wakeup.set)
        self._rtcp_flows = frozenset(source.spec.rtcp_flow_id for source in self._sources)
        rates = self._rung_rates or []
        self._broadcast = BroadcastSender(
            [source.spec for source in self._sources if source.rung == 0],
            initial_bps=INITIAL_ESTIMATE_BPS,
            rung_rates=rates if len(rates) > 1 else (),
        )
        self._rung_keyframes += [KeyframePolicy() for _ in range(1, len(rates))]
        self._access = AccessControl(
            self._session_id,
            self._access_settings,
            admit=self._admit_viewer,
            rungs=self._access_settings.rungs,
            on_record=self._on_record_request,
            on_select_rung=self._on_select_rung,
        )
        self._identity = identity

    def _begin(self, host: str, port: int) -> str:
        """Start sending; the URL viewers connect to."""
        self._task = asyncio.create_task(self._run(), name="send")
        self._url = str(
            StreamUrl(
                host=advertised_host(host, ray.util.get_node_ip_address),
                port=port,
                session_id=self._session_id,
                fingerprint=self._identity.fingerprint,
            )
        )
        return self._url

    async def _attach_rungs(self) -> None:
        """Every rung's ring: rung 0's is ``ring_name``, rung n's the encoder's
        ``ladder_ring_names`` (``video{n}``), attached while they exist.  A ladder of several
        rungs needs their rates, for the viewers' rung choice."""
        assert self._ring_name is not None
        rings = [PacketRing.attach(self._ring_name)]
        try:
            while True:
                name = segment_name(self._session_id, f"{self._ring_prefix}video{len(rings)}")
                try:
                    rings.append(PacketRing.attach(name))
                except ResourceError:
                    break
            if self._rung_rates is None:
                if len(rings) > 1 and self._encoder is not None:
                    self._rung_rates = [rung.bitrate for rung in await self._encoder.ladder()]
                else:
                    self._rung_rates = []
            if len(self._rung_rates) > 1:
                # A rung the encoder does not name has no rate to choose it by.
                for ring in rings[len(self._rung_rates) :]:
                    ring.close()
                rings = rings[: len(self._rung_rates)]
                if len(rings) != len(self._rung_rates):
                    raise ConfigError(
                        f"stream {self._session_id}: {len(self._rung_rates)} rung rates for "
                        f"{len(rings)} rung rings"
                    )
            else:
                for ring in rings[1:]:
                    ring.close()
                rings = rings[:1]
        except BaseException:
            for ring in rings:
                ring.close()
            raise
        for rung, ring in enumerate(rings):
            try:
                self._sources.append(_TrackSource(0, VIDEO_TRACK, ring, "latest_keyframe", rung))
            except BaseException:
                ring.close()
                for rest in rings[rung + 1 :]:
                    rest.close()
                self._close_sources()
                raise

    def _new_server(self) -> RoqServer:
        return RoqServer(
            self._identity,
            on_packet=self._on_packet,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            on_control=self._on_control,
        )

    async def listen_also(self, host: str, port: int) -> None:
        """Also take viewers on ``host:port``: a shard that died listened there, and its
        viewers reconnect to the same address (same certificate: the stream's)."""
        server = self._new_server()
        await server.start(host, port, reuse_port=True)
        self._servers.append(server)

    async def reattach(self, names: list[str]) -> int:
        """The rings named were re-created by a restarted writer (``actors.recovery``): read
        the new ones from their first keyframe on; how many were re-attached.  Viewers stay
        connected: the restarted encoder continues the stream's pts, so their RTP timestamps
        run on."""
        count = 0
        loop = asyncio.get_running_loop()
        for position, old in enumerate(self._sources):
            if old.ring.name not in names:
                continue
            ring = PacketRing.attach(old.ring.name)
            try:
                start: Literal["next", "latest_keyframe"] = (
                    "latest_keyframe" if old.spec.kind == "video" else "next"
                )
                new = _TrackSource(old.index, old.spec, ring, start, old.rung, history=True)
            except BaseException:
                ring.close()
                raise
            new.bell.watch(loop, self._wakeup.set)
            self._sources[position] = new
            old.bell.close()
            old.ring.close()
            count += 1
        self._wakeup.set()
        return count

    @property
    def _connections(self) -> list[RoqConnection]:
        return [c for server in self._servers for c in server.connections] + list(self._hosted)

    def _close_sources(self) -> None:
        for source in self._sources:
            source.bell.close()
            source.ring.close()
        self._sources = []

    def _sleep_s(self, now: float) -> float:
        """Until the earliest core deadline (a ring's doorbell may wake the loop sooner)."""
        deadline = self._broadcast.next_poll()
        for policy in self._rung_keyframes:
            held = policy.next_deadline()
            if held is not None:
                deadline = min(deadline, held)
        admission = self._access.next_deadline()  # hello timeouts, lapsing requests
        if admission is not None:
            deadline = min(deadline, admission)
        return max(deadline - now, 0.0)

    async def _run(self) -> None:
        try:
            while True:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel.
                sleep = self._sleep_s(time.monotonic())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if sleep == float("inf") else sleep):
                        await self._wakeup.wait()
                self._wakeup.clear()
                now, wall_now = time.monotonic(), time.time()
                self._access.handle_timers(now)
                self._send_available(now, wall_now)
                self._broadcast.poll(now, wall_now)
                # The loop re-reads the held request's deadline in _sleep_s: no wake-up needed.
                self._forward_keyframe_request(now, wake=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("sender %s failed", self._viewer_id)
            self._error = f"{type(exc).__name__}: {exc}"

    def _send_available(self, now: float, wall_now: float) -> None:
        for source in self._sources:
            batch = source.reader.read_available()
            # Skipped frames never get sequence numbers, so viewers see no gap, only a jump
            # to a keyframe.
            packets = self._rung_keyframes[source.rung].select(
                batch.packets, missed=batch.missed, video=source.spec.kind == "video"
            )
            for packet in packets:
                self._broadcast.send(
                    source.index,
                    packet.data,
                    pts=packet.pts,
                    capture_us=packet.capture_us,
                    keyframe=packet.keyframe,
                    now=now,
                    wall_now=wall_now,
                    rung=source.rung,
                )

    def _on_connect(self, connection: RoqConnection) -> None:
        now = time.monotonic()
        refusal = self._refusal(now)
        if refusal is not None:
            # Closed with the reason, which the viewer prints (``kizuna-stream view``).
            self._refused += 1
            connection.close(RoqErrorCode.ROQ_GENERAL_ERROR, f"refused: {refusal}")
            return
        # Open streams send media at once; in token mode only once the viewer is admitted.
        if self._access.on_connect(connection, connection.stats.address, now):
            self._broadcast.add(connection, now)
            self._forward_keyframe_request(now)
        else:
            self._wakeup.set()  # its hello timeout: the loop re-arms its timer

    def _admit_viewer(self, connection: object, grant: ViewerGrant, rungs: tuple[int, ...]) -> None:
        """Access control let a viewer in (``rungs``: those within its ``max_quality``)."""
        assert isinstance(connection, RoqConnection)
        now = time.monotonic()
        logger.info("stream %s: viewer %s admitted", self._session_id, grant.viewer)
        # max_quality, enforced here: the best rung it may get is the best of those allowed.
        ladder = len(self._rung_rates or []) > 1
        cap = min(rungs) if ladder and rungs else 0
        start = self._rung_of_viewer(grant.viewer) if grant.viewer is not None else None
        if grant.viewer is not None:
            self._admitted[connection] = grant.viewer
        self._broadcast.add(
            connection, now, cap=cap, start_rung=None if start is None else max(start, cap)
        )
        self._forward_keyframe_request(now)

    def _rung_of_viewer(self, viewer: str) -> int | None:
        """Where a returning viewer starts: the rung of its connection still here (a
        reconnect often arrives before the old connection's close), else the one it left on."""
        for connection, admitted in self._admitted.items():
            peer = self._broadcast.peers.get(connection)
            if admitted == viewer and peer is not None and peer.adaptation is not None:
                return peer.rung
        return self._last_rung.get(viewer)

    def _on_select_rung(self, connection: object, rung: int | None) -> None:
        """A viewer with ``can_control_quality`` chose a rung (None: adaptive again); the
        admission core checked it against the viewer's cap."""
        assert isinstance(connection, RoqConnection)
        now = time.monotonic()
        self._broadcast.set_pin(connection, rung, now)
        self._forward_keyframe_request(now)

    def _on_record_request(
        self, connection: object, command: RecordCommand
    ) -> tuple[bool, str | None] | None:
        """A permitted viewer asks to start or stop a server-side recording: the supervisor
        does it (a Ray call, off the media path); the reply follows when it answers."""
        viewer = self._access.viewer_of(connection)  # type: ignore[arg-type]
        if self._supervisor is None or viewer is None:
            return (False, "this server does not record on a viewer's request")

        async def ask() -> None:
            try:
                ok, text = await self._supervisor.viewer_recording.remote(
                    self._session_id, viewer, command.action
                )
            except Exception as exc:
                ok, text = False, f"the server could not {command.action} recording: {exc}"
            self._access.recording_done(connection, command, ok=ok, text=text)  # type: ignore[arg-type]

        task = asyncio.create_task(ask())
        self._record_tasks.add(task)
        task.add_done_callback(self._record_tasks.discard)
        return None

    def _on_control(self, connection: RoqConnection, data: bytes, end_stream: bool) -> None:
        self._access.on_control(connection, data, end_stream, time.monotonic(), time.time())
        self._wakeup.set()  # a deadline may have moved (a pending request, a cut)

    def _refusal(self, now: float) -> str | None:
        """Why a new connection is refused (this shard's viewer limit, the arrival rate)."""
        if self._max_viewers is not None and len(self._broadcast.peers) >= self._max_viewers:
            return f"this sender of stream {self._session_id} is full ({self._max_viewers} viewers)"
        if self._limiter is not None and not self._limiter.admit(now):
            return self._limiter.refusal(now, stream_name=self._session_id).reason
        return None

    def _on_disconnect(self, connection: RoqConnection) -> None:
        self._hosted.discard(connection)
        self._departed_bytes += connection.stats.bytes_sent
        viewer = self._admitted.pop(connection, None)
        self._access.on_disconnect(connection)
        peer = self._broadcast.remove(connection)
        if viewer is not None and peer is not None and peer.adaptation is not None:
            # Where it ended is where a returning viewer starts, rather than climbing again
            # from the lowest rung (a reconnect after a blip keeps its picture).
            self._last_rung[viewer] = peer.rung
            self._last_rung.move_to_end(viewer)
            while len(self._last_rung) > REMEMBERED_VIEWERS:
                self._last_rung.popitem(last=False)

    def _on_packet(self, connection: RoqConnection, flow_id: int, data: bytes) -> None:
        if flow_id not in self._rtcp_flows:
            connection.stats.unknown_flows += 1  # counted and dropped; the connection goes on
            return
        now = time.monotonic()
        self._broadcast.on_rtcp(connection, data, now)
        self._forward_keyframe_request(now)

    def _forward_keyframe_request(self, now: float, *, wake: bool = True) -> None:
        """Viewers' IDR requests (PLIs, newcomers, rung switches) to each rung's encoder,
        each rung throttled on its own."""
        for rung in self._broadcast.take_keyframe_rungs():
            if rung < len(self._rung_keyframes):
                self._rung_keyframes[rung].request()
        for rung, policy in enumerate(self._rung_keyframes):
            if policy.poll(now):
                if self._encoder is not None:  # None: an audio-only stream
                    self._encoder.request_keyframe(rung)
            elif wake and policy.next_deadline() is not None:
                self._wakeup.set()  # held by the throttle: let the loop re-arm its timer

    # -- the design's NetworkStreamer, per connection --------------------------------------

    def _connection(self, peer_id: str | None) -> list[RoqConnection]:
        return [c for c in self._connections if peer_id is None or c.peer_id == peer_id]

    async def adjust_bitrate(self, bitrate: int, peer_id: str | None = None) -> None:
        """Cap the bandwidth estimate of one connection (or all) at ``bitrate``."""
        for connection in self._connection(peer_id):
            peer = self._broadcast.peers.get(connection)
            if peer is not None:
                estimator = peer.estimator
                estimator.max_bps = max(bitrate, estimator.min_bps)

    def _viewer_connections(self, peer_or_viewer: str) -> list[RoqConnection]:
        """The connections of a peer id, or of the viewer that named itself in its CNAME."""
        return [
            connection
            for connection in self._connections
            if connection.peer_id == peer_or_viewer
            or self._access.viewer_of(connection) == peer_or_viewer
            or (
                (peer := self._broadcast.peers.get(connection)) is not None
                and peer.feedback.cname == peer_or_viewer
            )
        ]

    def _check_rung(self, rung: int, what: str) -> None:
        count = max(len(self._rung_rates or []), 1)
        if not 0 <= rung < count:
            raise ConfigError(f"{what} {rung} is not a rung of this {count}-rung stream")

    async def set_rung_cap(self, peer_or_viewer: str, cap: int) -> int:
        """Let a viewer (a peer id or the viewer id in its CNAME) get rungs ``cap`` and below
        only (``cap_for(ViewerPermissions.max_quality, rungs)``): above it, it moves down at
        once, at the allowed rung's IDR.  How many connections it applied to."""
        self._check_rung(cap, "cap")
        connections = self._viewer_connections(peer_or_viewer)
        now = time.monotonic()
        for connection in connections:
            self._broadcast.set_cap(connection, cap, now)
        self._forward_keyframe_request(now)
        return len(connections)

    async def set_rung_floor(self, floor: int) -> None:
        """Retire the rungs above ``floor`` for every viewer here (the quality actor, under
        CPU pressure); 0 gives each viewer its own cap back."""
        if len(self._rung_rates or []) < 2:
            return  # one rung: nothing to retire
        self._check_rung(floor, "floor")
        now = time.monotonic()
        self._broadcast.set_floor(floor, now)
        self._forward_keyframe_request(now)

    async def set_rung_rates(self, rates: list[int]) -> None:
        """Each rung's need now, top first (the quality actor's content-aware targets,
        ``RungTargets.needs``): every viewer's rung choice, present and future, compares its
        estimate with what its rung really needs, not the configured rate."""
        if len(self._rung_rates or []) < 2:
            return  # one rung: no choice to inform
        self._broadcast.set_rung_rates(rates)

    async def pin_rung(self, peer_or_viewer: str, rung: int | None) -> int:
        """Pin a viewer to ``rung`` (``ViewerPermissions.can_control_quality``), or unpin it
        (None); its cap still wins.  How many connections it applied to."""
        if rung is not None:
            self._check_rung(rung, "rung")
        connections = self._viewer_connections(peer_or_viewer)
        now = time.monotonic()
        for connection in connections:
            self._broadcast.set_pin(connection, rung, now)
        self._forward_keyframe_request(now)
        return len(connections)

    async def get_stream_stats(self, peer_id: str | None = None) -> StreamStats:
        """StreamStats for one connection (or all of this actor's), sender side."""
        peers = [self._peer_stats(c) for c in self._connection(peer_id)]
        sent = sum(p.bytes_sent for p in peers)
        elapsed = max(time.monotonic() - self._started, 1e-3)
        return StreamStats(
            bytes_sent=sent,
            bytes_received=sum(p.bytes_received for p in peers),
            frames_dropped=sum(p.frames_dropped for p in peers),
            current_bitrate=sum(p.estimate_bps for p in peers),
            average_bitrate=int(sent * 8 / elapsed),
            latency_ms=int(max((p.rtt_ms for p in peers), default=0.0) / 2),
            jitter_ms=int(max((p.jitter_ms for p in peers), default=0.0)),
            packet_loss_rate=max((p.loss for p in peers), default=0.0),
            last_updated=time.time(),
        )

    async def close_stream(self, peer_id: str) -> bool:
        """Close one viewer's connection; False if no such connection."""
        connections = self._connection(peer_id)
        for connection in connections:
            connection.close(RoqErrorCode.ROQ_NO_ERROR, "stream stopped")
        return bool(connections)

    async def close_viewer(self, viewer_id: str, reason: str = "viewer removed") -> int:
        """Close the connections whose viewer named ``viewer_id``; how many there were."""
        closing = [
            connection
            for connection, peer in self._broadcast.peers.items()
            if peer.feedback.cname == viewer_id and isinstance(connection, RoqConnection)
        ]
        for connection in closing:
            connection.close(RoqErrorCode.ROQ_NO_ERROR, reason)
        return len(closing)

    def _peer_stats(self, connection: RoqConnection) -> PeerStatus:
        stats = PeerStatus(**msgspec.structs.asdict(connection.refresh()))
        peer = self._broadcast.peers.get(connection)
        if peer is not None:
            peer.set_transport_rtt(connection.transport_rtt_s)
            feedback = peer.feedback
            stats.rtt_ms = peer.rtt_s * 1000
            stats.loss = feedback.loss
            stats.jitter_ms = feedback.jitter_ms
            stats.estimate_bps = peer.estimator.estimate_bps
            # Frames dropped under congestion, per viewer: skipped before sending (congested)
            # or expired in the send queue.
            stats.frames_dropped = feedback.frames_skipped + stats.frames_expired
            stats.nacks_received = feedback.nacks_received
            stats.retransmissions = feedback.retransmissions
            stats.keyframe_requests = feedback.keyframe_requests
            stats.viewer_id = feedback.cname
            adaptation = peer.adaptation
            if adaptation is not None:
                selector = adaptation.selector
                stats.rung = selector.rung
                stats.rung_wanted = selector.wanted
                stats.rung_cap = selector.cap
                stats.rung_pin = selector.pin
                stats.rung_switches = selector.switches
                stats.probe_clusters = adaptation.probe.clusters_sent
                stats.padding_bytes = adaptation.padding_bytes
                stats.probe_restarts = adaptation.probe.cluster_restarts
                stats.probes_unpaced = adaptation.probe.clusters_unpaced
                stats.checks_short = selector.checks_short
                stats.rung_reason = adaptation.last_reason
        stats.viewer_id = self._access.viewer_of(connection) or stats.viewer_id
        stats.access = self._access.state_of(connection)
        return stats

    async def watch(self) -> None:
        """Returns never: the supervisor keeps this call in flight, and Ray fails it the
        moment this process dies, so a dead shard's port is handed on at once, not at the
        next health round (``actors.shards``)."""
        await asyncio.Event().wait()

    async def stats(self) -> SenderStats:
        peers = [self._peer_stats(c) for c in self._connections]
        return SenderStats(
            pid=os.getpid(),
            viewer_id=self._viewer_id,
            url=self._url,
            peers=peers,
            frames_sent=self._broadcast.frames_sent,
            frames_missed=sum(policy.frames_missed for policy in self._rung_keyframes),
            packets_sent=self._broadcast.packets_sent,
            bytes_sent=self._departed_bytes + sum(p.bytes_sent for p in peers),
            keyframe_requests=sum(p.requests_forwarded for p in self._rung_keyframes),
            tracks=[source.spec.kind for source in self._sources if source.rung == 0],
            rungs=max(len(self._rung_rates or []), 1),
            rung_rates=list(self._rung_rates or []),
            error=self._error,
            connections_refused=self._refused,
            ports=[server.port for server in self._servers]
            + ([self._hosted_port] if self._hosted_port is not None else []),
            access_refusals=dict(self._access.refusals),
            pending_requests=len(self._access.pending),
        )

    # -- access control (the supervisor's ViewerManager calls these) ------------------------

    async def pending_requests(self) -> list[PendingRequest]:
        """Viewers without a token waiting here for an operator."""
        return self._access.requests(time.monotonic())

    async def approve_request(
        self,
        request_id: str,
        permissions: ViewerPermissions | None = None,
        viewer_id: str | None = None,
    ) -> bool:
        """Let a waiting viewer in; False if no connection here waits with that request."""
        approved = self._access.approve(
            request_id, time.monotonic(), permissions=permissions, viewer=viewer_id
        )
        self._wakeup.set()
        return approved

    async def deny_request(self, request_id: str, text: str = "") -> bool:
        denied = self._access.deny(request_id, time.monotonic(), text=text)
        self._wakeup.set()
        return denied

    async def revoke(self, token_id: str | None = None, viewer_id: str | None = None) -> int:
        """Revoke a token or a viewer here: its connections are closed now; how many."""
        cut = self._access.revoke(time.monotonic(), token_id=token_id, viewer=viewer_id)
        self._wakeup.set()
        return cut

    async def notify(self, text: str, data: dict[str, Any] | None = None) -> int:
        """A notice to every viewer here (``broadcast_to_viewers``); how many got it."""
        return self._access.notify(text, data)

    async def stop(self) -> SenderStats:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        stats = await self.stats()
        for server in self._servers:
            await server.close()
        # A shared port's server stays open for the other streams: close only this one's.
        for connection in list(self._hosted):
            connection.close(RoqErrorCode.ROQ_NO_ERROR, "stream stopped")
            self._on_disconnect(connection)
        # Give aioquic a moment to put the CONNECTION_CLOSE on the wire.
        await asyncio.sleep(0.05)
        self._close_sources()
        return stats
