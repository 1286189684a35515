"""RTP over QUIC on real sockets: the thin asyncio shell around aioquic.

Everything protocol-shaped is sans-I/O elsewhere (RoQ framing in ``shared.roq.framing``); this moves
packets between aioquic and those cores.  Both modes of draft-ietf-avtcore-rtp-over-quic-14:
datagram mode (§5.3, QUIC DATAGRAM frames of RFC 9221: ``flow id || packet``) and stream mode
(§5.2: one unidirectional stream per media frame, ``flow id`` then ``length || packet``
frames, a stale frame cancelled with ROQ_FRAME_CANCELLED; RTCP on one stream per flow).  The
mode follows the ``max_datagram_frame_size`` transport parameter (RFC 9221 §3): datagrams when
both ends offer them, else streams.  A viewer pins the certificate fingerprint from the stream
URL, or trusts a CA file.  :class:`RoqServer` can share its UDP port (``SO_REUSEPORT``): the
kernel keeps each client's 4-tuple, so each QUIC connection, on one of the sharing servers.
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

from shared.errors import NetworkError, ProtocolError
from shared.roq.framing import (
    ALPN,
    RoqErrorCode,
    RoqStreamDemux,
    StaleFrames,
    decode_datagram,
    encode_datagram,
    encode_stream_header,
    encode_stream_packet,
)
from shared.roq.tls import TlsIdentity, certificate_fingerprint

__all__ = ["PeerStats", "RoqClient", "RoqConnection", "RoqServer"]

#: Largest DATAGRAM frame payload we accept (RFC 9221 §3 transport parameter).
MAX_DATAGRAM_FRAME_SIZE = 65536
#: A peer silent for this long is gone (QUIC idle timeout, RFC 9000 §10.1).
IDLE_TIMEOUT_S = 10.0
#: A media frame's stream still unsent after this long is cancelled (stream mode).
STALE_FRAME_S = 0.3
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


class _RoqProtocol(QuicConnectionProtocol):
    """Both ends: turns QUIC events into ``(flow id, packet)`` for a handler."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Packets that arrive before the owner sets its handler wait here (bounded).
        self.early: list[tuple[int, bytes]] = []
        self.on_packet: Callable[[int, bytes], None] = lambda flow, packet: (
            self.early.append((flow, packet)) if len(self.early) < MAX_RECEIVE_QUEUE else None
        )
        self.on_handshake: Callable[[], None] = lambda: None
        self.on_closed: Callable[[], None] = lambda: None
        self.malformed = 0
        #: Why the connection ended: (error code, reason phrase), None while it is open.
        self.termination: tuple[int, str] | None = None
        self._demux = RoqStreamDemux(max_streams=MAX_INBOUND_STREAMS)
        self._stale = StaleFrames(STALE_FRAME_S)
        self._rtcp_streams: dict[int, int] = {}
        self.peer_fingerprint: str | None = None
        self.streams_opened = 0
        self.frames_cancelled = 0

    @property
    def datagrams_ok(self) -> bool:
        """Both ends offered DATAGRAM frames (RFC 9221 §3), so both agree on datagram mode."""
        quic = self._quic
        offered = quic._configuration.max_datagram_frame_size is not None
        return offered and quic._remote_max_datagram_frame_size is not None

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
            self.on_closed()

    def _stream_data(self, event: StreamDataReceived) -> None:
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
    ) -> int:
        """Send one frame's packets; returns the bytes queued.

        ``urgent`` packets (retransmissions) go to the head of the datagram queue: when QUIC's
        congestion window holds media back, a repair is worth more than the next frame.
        """
        if self.datagrams_ok:
            size = 0
            pending = self._quic._datagrams_pending
            for packet in reversed(packets) if urgent else packets:
                datagram = encode_datagram(flow_id, packet)
                if urgent:
                    pending.appendleft(datagram)
                else:
                    pending.append(datagram)
                size += len(datagram)
            return size
        now = time.monotonic()
        for stale in self._stale.to_cancel(now, keyframe=keyframe, state=self._stream_state):
            self._quic.reset_stream(stale, RoqErrorCode.ROQ_FRAME_CANCELLED)
            self.frames_cancelled += 1
        stream_id = self._quic.get_next_available_stream_id(is_unidirectional=True)
        data = encode_stream_header(flow_id) + b"".join(map(encode_stream_packet, packets))
        self._quic.send_stream_data(stream_id, data, end_stream=True)
        self._stale.opened(stream_id, now)
        self.streams_opened += 1
        return len(data)

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
        """Datagrams (or stream frames) queued and not yet sent."""
        if self.datagrams_ok:
            return len(self._quic._datagrams_pending)
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
        size = self._protocol.send_frame(flow_id, packets, keyframe=keyframe, urgent=urgent)
        self.stats.bytes_sent += size
        self.stats.datagrams_sent += len(packets)
        self._protocol.transmit()

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
        stats.datagrams_malformed = max(stats.datagrams_malformed, protocol.malformed)
        return stats

    def close(self, code: int = RoqErrorCode.ROQ_NO_ERROR, reason: str = "") -> None:
        self._protocol.close(error_code=code, reason_phrase=reason)


PacketHandler = Callable[[RoqConnection, int, bytes], None]


class RoqServer:
    """A QUIC server for RoQ viewers: callbacks on connect, packet and disconnect."""

    def __init__(
        self,
        identity: TlsIdentity,
        *,
        on_packet: PacketHandler | None = None,
        on_connect: Callable[[RoqConnection], None] | None = None,
        on_disconnect: Callable[[RoqConnection], None] | None = None,
    ) -> None:
        self._identity = identity
        self.on_packet = on_packet
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self._server: QuicServer | None = None
        self._connections: dict[_RoqProtocol, RoqConnection] = {}
        self._next_peer = 0
        self.port = 0
        self.host = ""

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Listen on ``host:port``; ``reuse_port`` shares the port with other servers."""
        configuration = _configuration(is_client=False, idle_timeout=IDLE_TIMEOUT_S)
        configuration.certificate = x509.load_pem_x509_certificate(self._identity.certificate_pem)
        configuration.private_key = cast(
            Any, serialization.load_pem_private_key(self._identity.private_key_pem, password=None)
        )

        def create_protocol(*args: Any, **kwargs: Any) -> _RoqProtocol:
            protocol = _RoqProtocol(*args, **kwargs)
            protocol.on_handshake = lambda: self._connected(protocol)
            protocol.on_closed = lambda: self._disconnected(protocol)
            return protocol

        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            # aioquic's serve() is this call without reuse_port.
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: QuicServer(configuration=configuration, create_protocol=create_protocol),
                local_addr=(host, port),
                family=family,
                reuse_port=reuse_port or None,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise NetworkError(
                    f"cannot listen on {host}:{port}: the port is already in use"
                ) from exc
            raise NetworkError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._server = protocol
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
        if self.on_connect is not None:
            self.on_connect(connection)

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
        protocol.on_packet = self._enqueue
        protocol.on_closed = self._on_closed
        for flow_id, packet in protocol.early:
            self._enqueue(flow_id, packet)
        protocol.early.clear()

    def _enqueue(self, flow_id: int, packet: bytes) -> None:
        if len(self._queue) >= self.max_queued:
            self._queue.popleft()  # the oldest is the least useful to a live viewer
            self.overflow += 1
        self._queue.append((flow_id, packet, time.monotonic()))
        self._ready.set()

    def _on_closed(self) -> None:
        self.closed = True
        self._queue.append(None)
        self._ready.set()

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
            raise NetworkError(f"cannot connect to {host}:{port}: {exc or 'timed out'}") from exc
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

    async def close(self) -> None:
        if not self.closed:
            self._protocol.close(error_code=RoqErrorCode.ROQ_NO_ERROR, reason_phrase="viewer left")
        await self._stack.aclose()
