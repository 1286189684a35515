"""RTP over QUIC on real sockets: the thin asyncio shell around aioquic.

Everything protocol-shaped is sans-I/O elsewhere (RoQ framing in ``shared.roq.framing``); this moves
packets between aioquic and those cores.  Both modes of draft-ietf-avtcore-rtp-over-quic-14:
datagram mode (§5.3, QUIC DATAGRAM frames of RFC 9221: ``flow id || packet``) and stream mode
(§5.2: one unidirectional stream per media frame, ``flow id`` then ``length || packet``
frames, a stale frame cancelled with ROQ_FRAME_CANCELLED; RTCP on one stream per flow).  In
datagram mode media waits in an age-bounded :class:`shared.roq.media_queue.MediaQueue` and is
handed to aioquic only as fast as aioquic sends it; both modes share one latency budget.  The
mode follows the ``max_datagram_frame_size`` transport parameter (RFC 9221 §3): datagrams when
both ends offer them, else streams.  A viewer pins the certificate fingerprint from the stream
URL, or trusts a CA file.  :class:`RoqServer` can share its UDP port (``SO_REUSEPORT``): the
kernel keeps each client's 4-tuple, so each QUIC connection, on one of the sharing servers.

The per-viewer cost is what a sender shard pays per viewer, so the server owns its UDP socket
and sends the QUIC packets of one ``transmit()`` together, in UDP GSO runs where the kernel
can (:mod:`shared.roq.udp_batch`: a video frame to one viewer is one ``sendmsg``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import msgspec
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import NetworkAddress
from aioquic.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shared.errors import ConfigError, NetworkError, ProtocolError
from shared.roq.framing import (
    ALPN,
    VIDEO_FLOW_ID,
    RoqErrorCode,
    RoqStreamDemux,
    StaleFrames,
    decode_datagram,
    encode_datagram,
    encode_stream_header,
    encode_stream_packet,
    encode_varint,
)
from shared.roq.media_queue import AUDIO, MEDIA_LATENCY_BUDGET_S, VIDEO, MediaQueue
from shared.roq.tls import TlsIdentity, certificate_fingerprint
from shared.roq.udp_batch import Address, QueueingTransport, UdpBatchSender

__all__ = ["PeerStats", "RoqClient", "RoqConnection", "RoqServer"]

#: Largest DATAGRAM frame payload we accept (RFC 9221 §3 transport parameter).
MAX_DATAGRAM_FRAME_SIZE = 65536
#: A peer silent for this long is gone (QUIC idle timeout, RFC 9000 §10.1).
IDLE_TIMEOUT_S = 10.0
#: The access-control stream (``shared.auth.control``): the viewer's first client-initiated
#: bidirectional stream (RFC 9000 §2.1: stream ID 0).  RoQ media and RTCP use unidirectional
#: streams, so it never meets the RoQ stream demultiplexer.
CONTROL_STREAM_ID = 0
#: Control bytes held for a handler that is not set yet (a hello is far smaller).
MAX_EARLY_CONTROL = 64 * 1024
#: Media datagrams aioquic's own queue is topped up to.  The rest waits in the age-bounded
#: media queue, where staleness is cut; so few that aioquic sends them within its next flight.
HANDOVER_DATAGRAMS = 4
#: Packets a viewer's queue holds before the oldest are dropped (memory bound).
MAX_RECEIVE_QUEUE = 4096
#: Open inbound streams per connection beyond which new ones are refused.
MAX_INBOUND_STREAMS = 64

MODE_DATAGRAM, MODE_STREAM = "datagram", "stream"


class PeerStats(msgspec.Struct, kw_only=True):
    """One viewer connection's transport counters (``actors.stages.sender`` adds its feedback)."""

    peer_id: str
    address: str
    connected_at: float
    mode: str = MODE_DATAGRAM
    bytes_sent: int = 0
    datagrams_sent: int = 0
    streams_opened: int = 0
    frames_cancelled: int = 0
    datagrams_received: int = 0
    bytes_received: int = 0
    datagrams_malformed: int = 0
    unknown_flows: int = 0
    frames_dropped: int = 0
    """Video frames this viewer did not get (joined mid-GOP, or congested)."""
    frames_expired: int = 0
    """Frames the send queue dropped: older than the latency budget, or video after such a
    frame up to a keyframe (datagram mode; stream mode counts ``frames_cancelled``)."""
    bytes_expired: int = 0
    """Their bytes: counted in ``bytes_sent`` (handed to the transport), never on the wire."""
    repairs_refused: int = 0
    """Retransmissions not sent because the send queue had dropped their frame."""
    rtt_ms: float = 0.0


def _configuration(*, is_client: bool, datagrams: bool = True, **options: Any) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE if datagrams else None,
        **options,
    )


def _rtt_s(protocol: QuicConnectionProtocol) -> float:
    # The smoothed RTT (RFC 9002 §5.3) has no public accessor in aioquic: read it defensively.
    recovery = getattr(protocol._quic, "_loss", None)
    return float(getattr(recovery, "_rtt_smoothed", 0.0))


def _kind(flow_id: int) -> str:
    # This project's flow ids (shared.roq.framing) say which track a frame belongs to; only
    # H.264 frames depend on the frames before them.
    return VIDEO if flow_id == VIDEO_FLOW_ID else AUDIO


class _DatagramCollector:
    """Stands in for the datagram transport inside aioquic's ``transmit()``: it keeps the QUIC
    packets aioquic would send one ``sendto`` each, for :class:`UdpBatchSender` to send
    together."""

    __slots__ = ("datagrams",)

    def __init__(self) -> None:
        self.datagrams: list[tuple[bytes, Address]] = []

    def sendto(self, data: bytes, addr: Address = None) -> None:
        self.datagrams.append((data, addr))


class _RoqProtocol(QuicConnectionProtocol):
    """Both ends: turns QUIC events into ``(flow id, packet)`` for a handler, and sends media
    through the age-bounded queue (datagram mode) or one stream per frame (stream mode).

    With a ``batch`` sender (the server's), the QUIC packets of one :meth:`transmit` leave
    together, in as few syscalls as :mod:`shared.roq.udp_batch` can manage."""

    def __init__(
        self,
        *args: Any,
        latency_budget_s: float = MEDIA_LATENCY_BUDGET_S,
        batch: UdpBatchSender | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._batch = batch
        self._collector = _DatagramCollector()
        self._udp: QueueingTransport | None = None
        # Packets that arrive before the owner sets its handler wait here (bounded).
        self.early: list[tuple[int, bytes]] = []
        self.on_packet: Callable[[int, bytes], None] = lambda flow, packet: (
            self.early.append((flow, packet)) if len(self.early) < MAX_RECEIVE_QUEUE else None
        )
        self.on_handshake: Callable[[], None] = lambda: None
        self.on_closed: Callable[[], None] = lambda: None
        #: Control-stream bytes (data, end of stream); until an owner sets it they wait in
        #: ``early_control`` (bounded: past MAX_EARLY_CONTROL the rest is counted malformed).
        self.early_control: list[tuple[bytes, bool]] = []
        self.on_control: Callable[[bytes, bool], None] = self._hold_control
        self.malformed = 0
        #: Why the connection ended: (error code, reason phrase), None while it is open.
        self.termination: tuple[int, str] | None = None
        self._demux = RoqStreamDemux(max_streams=MAX_INBOUND_STREAMS)
        #: Datagram mode's send queue; stream mode cancels frames on the same budget.
        self.media = MediaQueue(latency_budget_s)
        self._media_timer: asyncio.TimerHandle | None = None
        self._stale = StaleFrames(latency_budget_s)
        self._rtcp_streams: dict[int, int] = {}
        self.peer_fingerprint: str | None = None
        self.streams_opened = 0
        self.frames_cancelled = 0
        #: When the newest UDP datagram of this connection arrived (monotonic): any sign of
        #: life from the peer, an ACK included (``shared.viewer.liveness``).
        self.last_received_at = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._batch is not None:
            # Every path by which aioquic sends (a datagram received, its timer, close, ping)
            # goes through transmit(), which sends what the collector holds.
            self._udp = cast(QueueingTransport, transport)
            self._transport = cast(asyncio.DatagramTransport, self._collector)

    def datagram_received(self, data: bytes | str, addr: NetworkAddress) -> None:
        self.last_received_at = time.monotonic()
        super().datagram_received(data, addr)

    @property
    def datagrams_ok(self) -> bool:
        """Both ends offered DATAGRAM frames (RFC 9221 §3), so both agree on datagram mode."""
        quic = self._quic
        offered = quic._configuration.max_datagram_frame_size is not None
        return offered and quic._remote_max_datagram_frame_size is not None

    async def wait_connected(self) -> None:
        try:
            await super().wait_connected()
        finally:
            # aioquic waits on a shielded future: when a connect times out that future stays
            # behind and later fails with ConnectionError, which asyncio would log as never
            # retrieved.  Nobody waits for it any more: retrieve it when it ends.
            waiter = self._connected_waiter
            if waiter is not None:
                waiter.add_done_callback(lambda done: done.cancelled() or done.exception())

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            certificate = getattr(self._quic.tls, "_peer_certificate", None)
            if certificate is not None:
                der = certificate.public_bytes(serialization.Encoding.DER)
                self.peer_fingerprint = certificate_fingerprint(der)
            self.on_handshake()
        elif isinstance(event, DatagramFrameReceived):
            try:
                flow_id, packet = decode_datagram(event.data)
            except ProtocolError:
                self.malformed += 1
                return
            self.on_packet(flow_id, packet)
        elif isinstance(event, StreamDataReceived):
            self._stream_data(event)
        elif isinstance(event, StreamReset):
            self._demux.reset(event.stream_id)  # a cancelled frame: its packets are lost
        elif isinstance(event, ConnectionTerminated):
            self.termination = (event.error_code, event.reason_phrase)
            self.media.clear()
            if self._media_timer is not None:
                self._media_timer.cancel()
                self._media_timer = None
            self.on_closed()

    def _hold_control(self, data: bytes, end_stream: bool) -> None:
        if sum(len(d) for d, _ in self.early_control) + len(data) > MAX_EARLY_CONTROL:
            self.malformed += 1
            return
        self.early_control.append((data, end_stream))

    def send_control_stream(self, data: bytes, *, end_stream: bool = False) -> None:
        """Write on the control stream (the client opens it by writing first)."""
        self._quic.send_stream_data(CONTROL_STREAM_ID, data, end_stream)
        self.transmit()

    def _stream_data(self, event: StreamDataReceived) -> None:
        if event.stream_id == CONTROL_STREAM_ID:
            self.on_control(event.data, event.end_stream)
            return
        if event.stream_id % 4 in (0, 1):
            # Another bidirectional stream: nothing in RoQ or the control protocol uses one.
            self.malformed += 1
            with contextlib.suppress(ValueError):
                self._quic.stop_stream(event.stream_id, RoqErrorCode.ROQ_STREAM_CREATION_ERROR)
            return
        if not self._demux.accepts(event.stream_id):
            self.malformed += 1
            self._quic.stop_stream(event.stream_id, RoqErrorCode.ROQ_STREAM_CREATION_ERROR)
            return
        try:
            packets = self._demux.feed(event.stream_id, event.data, event.end_stream)
        except ProtocolError:
            self.malformed += 1
            with contextlib.suppress(ValueError):
                self._quic.stop_stream(event.stream_id, RoqErrorCode.ROQ_PACKET_ERROR)
            return
        for flow_id, packet in packets:
            self.on_packet(flow_id, packet)

    def send_frame(
        self, flow_id: int, packets: Sequence[bytes], *, keyframe: bool, urgent: bool = False
    ) -> tuple[int, int]:
        """Send one frame's packets; returns the (bytes, datagrams or stream frames) queued.

        Media waits in :attr:`media` until :meth:`transmit` hands it to aioquic.  ``urgent``
        packets (retransmissions) skip that queue and go to the head of aioquic's: when QUIC's
        congestion window holds media back, a repair is worth more than the next frame.
        """
        if self.datagrams_ok:
            if not all(packets):
                raise ConfigError("cannot send an empty RTP/RTCP packet")
            prefix = encode_varint(flow_id)  # what encode_datagram() puts first, made once
            datagrams = [prefix + packet for packet in packets]
            if urgent:
                datagrams = self.media.repairs(flow_id, datagrams)
                self._pending_datagrams.extendleft(reversed(datagrams))
            else:
                now = self._loop.time()
                self.media.push(now, flow_id, datagrams, keyframe=keyframe, kind=_kind(flow_id))
            return sum(map(len, datagrams)), len(datagrams)
        now = self._loop.time()
        for stale in self._stale.to_cancel(now, keyframe=keyframe, state=self._stream_state):
            self._quic.reset_stream(stale, RoqErrorCode.ROQ_FRAME_CANCELLED)
            self.frames_cancelled += 1
        stream_id = self._quic.get_next_available_stream_id(is_unidirectional=True)
        data = encode_stream_header(flow_id) + b"".join(map(encode_stream_packet, packets))
        self._quic.send_stream_data(stream_id, data, end_stream=True)
        self._stale.opened(stream_id, now)
        self.streams_opened += 1
        return len(data), len(packets)

    @property
    def _pending_datagrams(self) -> collections.deque[bytes]:
        """aioquic's own DATAGRAM queue, the one private part of aioquic this shell touches.

        It is read for its length (aioquic has no public count; the top-up and :attr:`backlog`
        need it) and written only by a repair, which goes to its head: a NACKed packet
        completes a frame the viewer already waits for, so it must not queue behind the next
        frames, and the public ``send_datagram_frame`` has no priority (it only appends).
        """
        return self._quic._datagrams_pending

    def transmit(self) -> None:
        """Top aioquic's datagram queue up from the media queue, then let aioquic send.

        aioquic calls this whenever it may send: after each datagram received (ACKs open the
        congestion window, RFC 9002 §7) and each timer (loss detection, pacing); senders call it
        after queueing; the media queue's deadline timer calls it too.  A round hands over at
        most :data:`HANDOVER_DATAGRAMS` (stale media is dropped first, in ``pop``), and another
        round follows only when aioquic sent them all: aioquic never holds back more than that,
        so media waits where its age is bounded.  What aioquic sends in all rounds leaves
        together at the end (with a batch sender).
        """
        media = self.media
        if not media:
            super().transmit()
        else:
            pending, now = self._pending_datagrams, self._loop.time()
            while True:
                for datagram in media.pop(now, HANDOVER_DATAGRAMS - len(pending)):
                    self._quic.send_datagram_frame(datagram)
                super().transmit()
                if pending or not media:
                    break
        collected = self._collector.datagrams
        if collected and self._batch is not None and self._udp is not None:
            self._collector.datagrams = []
            self._batch.send(collected, self._udp)
        self._arm_media_timer()

    def _arm_media_timer(self) -> None:
        """One timer for the media queue's next deadline (an earlier one already armed stays)."""
        deadline = self.media.next_deadline()
        timer = self._media_timer
        if deadline is None or (timer is not None and timer.when() <= deadline):
            return
        if timer is not None:
            timer.cancel()
        self._media_timer = self._loop.call_at(deadline, self._media_due, deadline)

    def _media_due(self, deadline: float) -> None:
        self._media_timer = None
        # asyncio may run a timer a clock tick early; the deadline has come all the same.
        self.media.expire(max(deadline, self._loop.time()))
        self.transmit()

    def send_control(self, flow_id: int, packet: bytes) -> int:
        """Send one RTCP packet: a datagram, or a frame on the flow's long-lived stream."""
        if self.datagrams_ok:
            datagram = encode_datagram(flow_id, packet)
            self._quic.send_datagram_frame(datagram)
            return len(datagram)
        stream_id = self._rtcp_streams.get(flow_id)
        data = encode_stream_packet(packet)
        if stream_id is None:
            stream_id = self._quic.get_next_available_stream_id(is_unidirectional=True)
            self._rtcp_streams[flow_id] = stream_id
            data = encode_stream_header(flow_id) + data
        self._quic.send_stream_data(stream_id, data)
        return len(data)

    def _stream_state(self, stream_id: int) -> str:
        stream = self._quic._streams.get(stream_id)
        if stream is None or stream.sender.is_finished:
            return "done"
        return "sent" if stream.sender.buffer_is_empty else "unsent"

    @property
    def backlog(self) -> int:
        """Datagrams (or stream frames) queued and not yet sent; stale media is not counted."""
        if self.datagrams_ok:
            self.media.expire(self._loop.time())
            return len(self.media) + len(self._pending_datagrams)
        return self._stale.unsent(self._stream_state)


class RoqConnection:
    """One viewer's connection on the server; what :class:`shared.rtp.sender.BroadcastSender`
    sends through."""

    def __init__(self, protocol: _RoqProtocol, stats: PeerStats) -> None:
        self._protocol = protocol
        self.stats = stats

    @property
    def peer_id(self) -> str:
        return self.stats.peer_id

    @property
    def backlog(self) -> int:
        return self._protocol.backlog

    @property
    def transport_rtt_s(self) -> float:
        return _rtt_s(self._protocol)

    def send_media(
        self, flow_id: int, packets: Sequence[bytes], *, keyframe: bool, urgent: bool = False
    ) -> None:
        size, count = self._protocol.send_frame(flow_id, packets, keyframe=keyframe, urgent=urgent)
        self.stats.bytes_sent += size
        self.stats.datagrams_sent += count
        self._protocol.transmit()

    def take_keyframe_needed(self) -> bool:
        """Whether the send queue dropped video and the viewer, drained, now needs a keyframe
        (:class:`shared.rtp.sender.KeyframeSignal`)."""
        return self._protocol.media.take_keyframe_needed()

    def send_rtcp(self, flow_id: int, packet: bytes) -> None:
        self.stats.bytes_sent += self._protocol.send_control(flow_id, packet)
        self._protocol.transmit()

    def refresh(self) -> PeerStats:
        stats, protocol = self.stats, self._protocol
        stats.rtt_ms = _rtt_s(protocol) * 1000
        stats.streams_opened, stats.frames_cancelled = (
            protocol.streams_opened,
            protocol.frames_cancelled,
        )
        media = protocol.media
        stats.frames_expired, stats.bytes_expired = media.frames_expired, media.bytes_expired
        stats.repairs_refused = media.repairs_refused
        stats.datagrams_malformed = max(stats.datagrams_malformed, protocol.malformed)
        return stats

    def send_control(self, data: bytes) -> None:
        """Write on the viewer's control stream (``shared.auth.control`` messages)."""
        self.stats.bytes_sent += len(data)
        self._protocol.send_control_stream(data)

    @property
    def peer_fingerprint(self) -> str | None:
        """The viewer's client certificate fingerprint, when it presented one."""
        return self._protocol.peer_fingerprint

    def close(self, code: int = RoqErrorCode.ROQ_NO_ERROR, reason: str = "") -> None:
        self._protocol.close(error_code=code, reason_phrase=reason)


PacketHandler = Callable[[RoqConnection, int, bytes], None]
ControlHandler = Callable[[RoqConnection, bytes, bool], None]


async def _bind_udp(
    loop: asyncio.AbstractEventLoop, host: str, port: int, *, reuse_port: bool
) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` (what ``create_datagram_endpoint``
    makes from ``local_addr``), with ``SO_REUSEPORT`` when asked."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise NetworkError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind(infos[0][4])
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise NetworkError(
                f"cannot listen on {host}:{port}: the port is already in use"
            ) from exc
        raise NetworkError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


class RoqServer:
    """A QUIC server for RoQ viewers: callbacks on connect, packet and disconnect."""

    def __init__(
        self,
        identity: TlsIdentity,
        *,
        on_packet: PacketHandler | None = None,
        on_connect: Callable[[RoqConnection], None] | None = None,
        on_disconnect: Callable[[RoqConnection], None] | None = None,
        on_control: ControlHandler | None = None,
        latency_budget_s: float = MEDIA_LATENCY_BUDGET_S,
        gso: bool | None = None,
    ) -> None:
        """``latency_budget_s``: how long media may wait to be sent (both modes).  ``gso``:
        whether to send in UDP GSO runs (default: when the socket can, see
        :mod:`shared.roq.udp_batch`); False sends one datagram per syscall."""
        if not latency_budget_s > 0:
            raise ConfigError(f"latency budget must be positive, got {latency_budget_s}")
        self.latency_budget_s = latency_budget_s
        self._identity = identity
        self.on_packet = on_packet
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        #: Control-stream bytes of a connection (data, end of stream); None: ignored.
        self.on_control = on_control
        self._gso = gso
        self._server: QuicServer | None = None
        self._connections: dict[_RoqProtocol, RoqConnection] = {}
        self._next_peer = 0
        self.port = 0
        self.host = ""
        #: How this server's packets leave (its counters: syscalls, datagrams); set by start().
        self.udp: UdpBatchSender | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Listen on ``host:port``; ``reuse_port`` shares the port with other servers."""
        configuration = _configuration(is_client=False, idle_timeout=IDLE_TIMEOUT_S)
        configuration.certificate = x509.load_pem_x509_certificate(self._identity.certificate_pem)
        configuration.private_key = cast(
            Any, serialization.load_pem_private_key(self._identity.private_key_pem, password=None)
        )
        loop = asyncio.get_running_loop()
        sock = await _bind_udp(loop, host, port, reuse_port=reuse_port)
        udp = UdpBatchSender(sock, gso=self._gso)

        def create_protocol(*args: Any, **kwargs: Any) -> _RoqProtocol:
            protocol = _RoqProtocol(
                *args,
                latency_budget_s=self.latency_budget_s,
                batch=udp,
                **kwargs,
            )
            protocol.on_handshake = lambda: self._connected(protocol)
            protocol.on_closed = lambda: self._disconnected(protocol)
            return protocol

        try:
            # aioquic's serve() is this call, on a socket of its own; this one is ours, so the
            # batch sender can use sendmsg on it.
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: QuicServer(configuration=configuration, create_protocol=create_protocol),
                sock=sock,
            )
        except BaseException:
            sock.close()
            raise
        self._server = protocol
        self.udp = udp
        self.host, self.port = transport.get_extra_info("sockname")[:2]

    @property
    def connections(self) -> list[RoqConnection]:
        return list(self._connections.values())

    @property
    def peers(self) -> list[PeerStats]:
        return [connection.refresh() for connection in self._connections.values()]

    def _connected(self, protocol: _RoqProtocol) -> None:
        self._next_peer += 1
        host, port = protocol._quic._network_paths[0].addr[:2]
        stats = PeerStats(
            peer_id=f"peer-{self._next_peer}",
            address=f"{host}:{port}",
            connected_at=time.time(),
            mode=MODE_DATAGRAM if protocol.datagrams_ok else MODE_STREAM,
        )
        connection = self._connections[protocol] = RoqConnection(protocol, stats)

        def received(flow_id: int, packet: bytes) -> None:
            stats.datagrams_received += 1
            stats.bytes_received += len(packet)
            if self.on_packet is not None:
                self.on_packet(connection, flow_id, packet)

        protocol.on_packet = received

        def control(data: bytes, end_stream: bool) -> None:
            stats.bytes_received += len(data)
            if self.on_control is not None:
                self.on_control(connection, data, end_stream)

        early, protocol.early_control = protocol.early_control, []
        protocol.on_control = control
        if self.on_connect is not None:
            self.on_connect(connection)
        for data, end_stream in early:
            control(data, end_stream)

    def _disconnected(self, protocol: _RoqProtocol) -> None:
        connection = self._connections.pop(protocol, None)
        if connection is not None and self.on_disconnect is not None:
            self.on_disconnect(connection)

    async def close(self) -> None:
        for protocol in list(self._connections):
            protocol.close(error_code=RoqErrorCode.ROQ_NO_ERROR, reason_phrase="stream stopped")
        self._connections.clear()
        if self._server is not None:
            self._server.close()
            self._server = None


class RoqClient:
    """The viewer's end: one QUIC connection, media in, RTCP feedback out."""

    def __init__(
        self,
        stack: contextlib.AsyncExitStack,
        protocol: _RoqProtocol,
        *,
        max_queued: int = MAX_RECEIVE_QUEUE,
    ) -> None:
        self._stack = stack
        self._protocol = protocol
        self.max_queued = max_queued
        self._queue: collections.deque[tuple[int, bytes, float] | None] = collections.deque()
        self._ready = asyncio.Event()
        self.overflow = 0
        self.closed = False
        #: Why this end gave up on the connection (:meth:`abandon`), None if it has not.
        self.abandoned: str | None = None
        protocol.on_packet = self._enqueue
        protocol.on_closed = self._on_closed
        for flow_id, packet in protocol.early:
            self._enqueue(flow_id, packet)
        protocol.early.clear()
        #: The server's control-stream bytes (``shared.auth.control``), in order; the owner
        #: replaces it to take them as they come.  Until then they are kept.
        self._control: collections.deque[tuple[bytes, bool]] = collections.deque(
            protocol.early_control
        )
        self._control_ready = asyncio.Event()
        if self._control:
            self._control_ready.set()
        protocol.early_control = []
        protocol.on_control = self._on_control

    def _enqueue(self, flow_id: int, packet: bytes) -> None:
        if len(self._queue) >= self.max_queued:
            self._queue.popleft()  # the oldest is the least useful to a live viewer
            self.overflow += 1
        self._queue.append((flow_id, packet, time.monotonic()))
        self._ready.set()

    def _on_closed(self) -> None:
        if self.closed:
            return  # abandoned first: the reader already has its end
        self.closed = True
        self._queue.append(None)
        self._ready.set()
        self._control_ready.set()

    def _on_control(self, data: bytes, end_stream: bool) -> None:
        self._control.append((data, end_stream))
        self._control_ready.set()

    def send_control(self, data: bytes, *, end_stream: bool = False) -> None:
        """Write on the control stream (the first write opens it: stream 0)."""
        if not self.closed:
            self._protocol.send_control_stream(data, end_stream=end_stream)

    async def receive_control(self) -> tuple[bytes, bool] | None:
        """The server's next control-stream bytes and whether the stream ended there; None
        once the connection has closed with nothing left to read."""
        while not self._control:
            if self.closed:
                return None
            self._control_ready.clear()
            await self._control_ready.wait()
        return self._control.popleft()

    def receive_control_nowait(self) -> tuple[bytes, bool] | None:
        return self._control.popleft() if self._control else None

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        fingerprint: str | None = None,
        ca_file: str | None = None,
        server_name: str | None = None,
        datagrams: bool = True,
        timeout: float = 10.0,
        idle_timeout: float = IDLE_TIMEOUT_S,
        max_queued: int = MAX_RECEIVE_QUEUE,
    ) -> RoqClient:
        """Connect; pin ``fingerprint`` (self-signed server) or verify against ``ca_file``.

        ``datagrams=False`` does not offer DATAGRAM support, so the server uses stream mode.
        ``max_queued`` packets wait for the reader; beyond that the oldest are dropped.
        """
        configuration = _configuration(
            is_client=True,
            datagrams=datagrams,
            idle_timeout=idle_timeout,
            server_name=server_name or host,
        )
        if fingerprint is not None:
            # A self-signed certificate: instead of a CA chain we pin its fingerprint below.
            configuration.verify_mode = ssl.CERT_NONE
        elif ca_file is not None:
            configuration.load_verify_locations(cafile=ca_file)
        stack = contextlib.AsyncExitStack()
        try:
            protocol = await asyncio.wait_for(
                stack.enter_async_context(
                    connect(host, port, configuration=configuration, create_protocol=_RoqProtocol)
                ),
                timeout,
            )
        except (TimeoutError, ConnectionError, OSError) as exc:
            await stack.aclose()
            # TimeoutError and aioquic's ConnectionError (the connection ended during the
            # handshake, e.g. on its idle timeout) carry no message of their own.
            why = str(exc) or (
                "timed out"
                if isinstance(exc, TimeoutError)
                else "the connection closed during the handshake"
            )
            raise NetworkError(f"cannot connect to {host}:{port}: {why}") from exc
        client = cls(stack, cast(_RoqProtocol, protocol), max_queued=max_queued)
        presented = client._protocol.peer_fingerprint
        if fingerprint is not None and presented != fingerprint:
            client._protocol.close(RoqErrorCode.ROQ_EXPECTATION_UNMET, "certificate mismatch")
            await stack.aclose()
            raise NetworkError(
                f"server {host}:{port} presented certificate {presented}, expected {fingerprint}"
            )
        return client

    @property
    def mode(self) -> str:
        return MODE_DATAGRAM if self._protocol.datagrams_ok else MODE_STREAM

    @property
    def malformed(self) -> int:
        return self._protocol.malformed

    async def receive(self) -> tuple[int, bytes] | None:
        """The next ``(flow id, packet)``, or None once the connection has closed."""
        return None if (item := await self.receive_timed()) is None else item[:2]

    async def receive_timed(self) -> tuple[int, bytes, float] | None:
        """The next ``(flow id, packet, arrival)`` (``time.monotonic()`` when it arrived)."""
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        item = self._queue.popleft()
        if item is None:
            self._queue.append(None)  # stay closed for every later call
        return item

    def receive_nowait(self) -> tuple[int, bytes, float] | None:
        """A queued packet without waiting (None when there is none, or when closed)."""
        if not self._queue or self._queue[0] is None:
            return None
        return self._queue.popleft()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def termination(self) -> tuple[int, str] | None:
        return self._protocol.termination

    def send(self, flow_id: int, packet: bytes) -> None:
        """Send one RTCP packet on ``flow_id``."""
        if not self.closed:
            self._protocol.send_control(flow_id, packet)
            self._protocol.transmit()

    @property
    def rtt_ms(self) -> float:
        return _rtt_s(self._protocol) * 1000

    @property
    def last_received_at(self) -> float:
        """When the newest datagram from the server arrived (monotonic)."""
        return self._protocol.last_received_at

    @property
    def probe_timeout_s(self) -> float:
        """QUIC's probe timeout without backoff (RFC 9002 §6.2.1), 0 if aioquic hides it."""
        recovery = getattr(self._protocol._quic, "_loss", None)
        probe_timeout = getattr(recovery, "get_probe_timeout", None)
        return float(probe_timeout()) if callable(probe_timeout) else 0.0

    def abandon(self, reason: str) -> None:
        """Give up on a connection whose server has gone silent: close it (a CONNECTION_CLOSE
        the server gets if it is alive after all) and end the reader's packets now, not after
        QUIC's closing period.  :attr:`abandoned` says why; the viewer counts it a drop."""
        if self.closed:
            return
        self.abandoned = reason
        self._protocol.close(error_code=RoqErrorCode.ROQ_NO_ERROR, reason_phrase=reason)
        self._on_closed()

    async def close(self) -> None:
        if not self.closed:
            self._protocol.close(error_code=RoqErrorCode.ROQ_NO_ERROR, reason_phrase="viewer left")
        await self._stack.aclose()
