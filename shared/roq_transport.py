"""RTP over QUIC on real sockets: the thin asyncio shell around aioquic.

Everything protocol-shaped (RoQ framing, RTP, H.264 payloads) is sans-I/O in other modules;
this one only moves datagrams between aioquic and those cores, the way aioquic's own asyncio
layer moves bytes between a socket and ``QuicConnection``.

Media travels in QUIC DATAGRAM frames (RFC 9221), each prefixed by its RoQ flow identifier
(draft-ietf-avtcore-rtp-over-quic-14 §5.3).  DATAGRAM frames share the connection's congestion
controller, so a viewer that cannot keep up makes aioquic queue them; :class:`RoqServer` bounds
that queue per viewer and, once it overflows, drops whole frames until the next keyframe rather
than letting latency grow without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import msgspec
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    QuicEvent,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shared.errors import NetworkError, ProtocolError
from shared.roq import ALPN, RoqErrorCode, decode_datagram, encode_datagram
from shared.tls import TlsIdentity, certificate_fingerprint

__all__ = ["PeerStats", "RoqClient", "RoqServer"]

#: Largest DATAGRAM frame payload we accept or send (RFC 9221 §3 transport parameter).
MAX_DATAGRAM_FRAME_SIZE = 65536
#: Datagrams queued in aioquic for one viewer before we start dropping frames for it
#: (about 1.3 MB, several seconds of 720p video).
MAX_PENDING_DATAGRAMS = 1200
#: A viewer silent for this long is gone (QUIC idle timeout, RFC 9000 §10.1).
IDLE_TIMEOUT_S = 10.0

RtcpHandler = Callable[["PeerStats", int, bytes], None]


class PeerStats(msgspec.Struct, kw_only=True):
    peer_id: str
    address: str
    connected_at: float
    bytes_sent: int = 0
    datagrams_sent: int = 0
    datagrams_received: int = 0
    datagrams_malformed: int = 0
    frames_dropped: int = 0
    rtt_ms: float = 0.0


def _rtt_ms(protocol: QuicConnectionProtocol) -> float:
    # aioquic keeps the smoothed RTT (RFC 9002 §5.3) on its loss recovery object; it has no
    # public accessor, so read it defensively.
    recovery = getattr(protocol._quic, "_loss", None)
    return float(getattr(recovery, "_rtt_smoothed", 0.0)) * 1000.0


class _ServerProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, owner: RoqServer, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner
        self.stats: PeerStats | None = None
        self.dropping_until_keyframe = False
        # A viewer that joins mid-GOP could not decode anything before the next IDR.
        self.awaiting_first_keyframe = True

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self._owner._connected(self)
        elif isinstance(event, DatagramFrameReceived):
            self._owner._received(self, event.data)
        elif isinstance(event, ConnectionTerminated):
            self._owner._disconnected(self)


class RoqServer:
    """A QUIC server that fans RoQ datagrams out to every connected viewer."""

    def __init__(self, identity: TlsIdentity, *, on_rtcp: RtcpHandler | None = None) -> None:
        self._identity = identity
        self._on_rtcp = on_rtcp
        self._server: QuicServer | None = None
        self._peers: dict[_ServerProtocol, PeerStats] = {}
        self._next_peer = 0
        self.port = 0
        self.host = ""
        self.on_connect: Callable[[PeerStats], None] | None = None

    async def start(self, host: str, port: int) -> None:
        configuration = QuicConfiguration(
            is_client=False,
            alpn_protocols=[ALPN],
            max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
            idle_timeout=IDLE_TIMEOUT_S,
        )
        configuration.certificate = x509.load_pem_x509_certificate(self._identity.certificate_pem)
        configuration.private_key = cast(
            Any, serialization.load_pem_private_key(self._identity.private_key_pem, password=None)
        )
        try:
            self._server = await serve(
                host,
                port,
                configuration=configuration,
                create_protocol=lambda *a, **kw: _ServerProtocol(*a, owner=self, **kw),
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise NetworkError(
                    f"cannot listen on {host}:{port}: the port is already in use"
                ) from exc
            raise NetworkError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        transport = self._server._transport
        assert transport is not None
        self.host, self.port = transport.get_extra_info("sockname")[:2]

    @property
    def peers(self) -> list[PeerStats]:
        for protocol, stats in self._peers.items():
            stats.rtt_ms = _rtt_ms(protocol)
        return list(self._peers.values())

    def send_frame(self, datagrams: Sequence[bytes], *, keyframe: bool) -> None:
        """Queue one frame's datagrams to every viewer and flush once per viewer."""
        size = sum(len(d) for d in datagrams)
        for protocol, stats in self._peers.items():
            if protocol.awaiting_first_keyframe:
                if not keyframe:
                    continue
                protocol.awaiting_first_keyframe = False
            pending = len(getattr(protocol._quic, "_datagrams_pending", ()))
            if pending > MAX_PENDING_DATAGRAMS:
                protocol.dropping_until_keyframe = True
            if protocol.dropping_until_keyframe:
                if not keyframe or pending > MAX_PENDING_DATAGRAMS // 2:
                    stats.frames_dropped += 1
                    continue
                protocol.dropping_until_keyframe = False
            for datagram in datagrams:
                protocol._quic.send_datagram_frame(datagram)
            protocol.transmit()
            stats.bytes_sent += size
            stats.datagrams_sent += len(datagrams)

    def _connected(self, protocol: _ServerProtocol) -> None:
        self._next_peer += 1
        host, port = protocol._quic._network_paths[0].addr[:2]
        stats = PeerStats(
            peer_id=f"peer-{self._next_peer}", address=f"{host}:{port}", connected_at=time.time()
        )
        protocol.stats = stats
        self._peers[protocol] = stats
        if self.on_connect is not None:
            self.on_connect(stats)

    def _received(self, protocol: _ServerProtocol, data: bytes) -> None:
        stats = protocol.stats
        if stats is None:
            return
        stats.datagrams_received += 1
        try:
            flow_id, packet = decode_datagram(data)
        except ProtocolError:
            stats.datagrams_malformed += 1
            return
        if self._on_rtcp is not None:
            self._on_rtcp(stats, flow_id, packet)

    def _disconnected(self, protocol: _ServerProtocol) -> None:
        self._peers.pop(protocol, None)

    async def close(self) -> None:
        for protocol in list(self._peers):
            protocol.close(error_code=RoqErrorCode.ROQ_NO_ERROR, reason_phrase="stream stopped")
        self._peers.clear()
        if self._server is not None:
            self._server.close()
            self._server = None


class _ClientProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.datagrams: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4096)
        self.overflow = 0
        self.peer_fingerprint: str | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            certificate = getattr(self._quic.tls, "_peer_certificate", None)
            if certificate is not None:
                der = certificate.public_bytes(serialization.Encoding.DER)
                self.peer_fingerprint = certificate_fingerprint(der)
        elif isinstance(event, DatagramFrameReceived):
            try:
                self.datagrams.put_nowait(event.data)
            except asyncio.QueueFull:
                self.overflow += 1
        elif isinstance(event, ConnectionTerminated):
            with contextlib.suppress(asyncio.QueueFull):
                self.datagrams.put_nowait(None)


class RoqClient:
    """The viewer's end: one QUIC connection, datagrams in, RTCP feedback out."""

    def __init__(self, stack: contextlib.AsyncExitStack, protocol: _ClientProtocol) -> None:
        self._stack = stack
        self._protocol = protocol

    @classmethod
    async def connect(
        cls, host: str, port: int, *, fingerprint: str | None, timeout: float = 10.0
    ) -> RoqClient:
        configuration = QuicConfiguration(
            is_client=True,
            alpn_protocols=[ALPN],
            max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
            idle_timeout=IDLE_TIMEOUT_S,
            server_name="localhost",
        )
        # The certificate is self-signed: instead of a CA chain we pin its fingerprint below.
        configuration.verify_mode = ssl.CERT_NONE
        stack = contextlib.AsyncExitStack()
        try:
            protocol = await asyncio.wait_for(
                stack.enter_async_context(
                    connect(
                        host, port, configuration=configuration, create_protocol=_ClientProtocol
                    )
                ),
                timeout,
            )
        except (TimeoutError, ConnectionError, OSError) as exc:
            await stack.aclose()
            raise NetworkError(f"cannot connect to {host}:{port}: {exc or 'timed out'}") from exc
        client_protocol = cast(_ClientProtocol, protocol)
        if fingerprint is not None and client_protocol.peer_fingerprint != fingerprint:
            client_protocol.close(
                error_code=RoqErrorCode.ROQ_EXPECTATION_UNMET, reason_phrase="certificate mismatch"
            )
            await stack.aclose()
            raise NetworkError(
                f"server {host}:{port} presented certificate {client_protocol.peer_fingerprint}, "
                f"expected {fingerprint}"
            )
        return cls(stack, client_protocol)

    async def receive(self) -> tuple[int, bytes] | None:
        """The next (flow id, packet), or None once the connection has closed."""
        while True:
            data = await self._protocol.datagrams.get()
            if data is None:
                return None
            try:
                return decode_datagram(data)
            except ProtocolError:
                continue

    def send(self, flow_id: int, packet: bytes) -> None:
        self._protocol._quic.send_datagram_frame(encode_datagram(flow_id, packet))
        self._protocol.transmit()

    @property
    def rtt_ms(self) -> float:
        return _rtt_ms(self._protocol)

    async def close(self) -> None:
        self._protocol.close(error_code=RoqErrorCode.ROQ_NO_ERROR, reason_phrase="viewer left")
        await self._stack.aclose()
