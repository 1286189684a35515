"""SharedPortActor: one UDP port, several streams' viewers, in one process.

Why a process of its own, and why it holds every stream of the port.  A stream's shards
normally share a port among themselves with ``SO_REUSEPORT``, and the kernel hashes each
client's 4-tuple to one of them; that is fine while every socket of the group serves the same
stream, and wrong as soon as two streams join one group (the kernel would hand a viewer of one
to the other's sender: ``shared.control.ports`` forbids it).  Nothing in front of the socket can
route by stream either: QUIC protects even its first packets (RFC 9001 §5), and the stream a
viewer wants is only said after the handshake, in the ``hello`` on its control stream
(:mod:`shared.auth.control`).  So the process that owns the socket must terminate every QUIC
connection itself and then give it to the right stream, which means it must also be the one
that sends that stream's media: connections do not move between processes.

Hence this actor: one :class:`~shared.roq.transport.RoqServer` on the port, one certificate
for the port (every stream on it presents the same fingerprint; the config loader insists
their ``tls_cert`` agree), and for each stream a whole :class:`SenderActor` object in this
process (its rings, its BroadcastSender, its admission, its send loop), opened with
:meth:`SenderActor.open_hosted` and fed the connections whose hello names it.  What a stream
does with a viewer (tokens, approvals, rungs, recording requests) is unchanged: the hello and
any bytes after it are replayed into that stream's own admission.  Which stream a connection
wants, and how an unknown stream, a broken control stream or a missing hello is refused, is the
sans-I/O :class:`shared.auth.stream_router.StreamRouter`; this shell moves bytes and arms one
timer for its deadline.

The supervisor sees each stream on the port as one shard of that stream
(:mod:`actors.port_listeners`): per-stream calls reach the stream's sender object through
:meth:`call_stream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import msgspec

from actors.stages.sender import SenderActor, SenderStats
from shared.auth.server import AccessSettings
from shared.auth.stream_router import Refuse, Route, StreamRouter
from shared.errors import ConfigError, StreamNotFoundError
from shared.models import StreamAccess, ViewerLimits
from shared.roq.tls import TlsIdentity
from shared.roq.transport import RoqConnection, RoqServer

if TYPE_CHECKING:
    from actors.handles import EncoderHandle

logger = logging.getLogger(__name__)


class SharedPortStats(msgspec.Struct, kw_only=True):
    pid: int
    host: str
    port: int
    streams: list[str]
    #: Connections that have not said which stream they want yet.
    waiting: int
    #: Connections refused before reaching a stream, by reason word (``unknown_stream``, ...).
    refusals: dict[str, int]


class SharedPortActor:
    def __init__(self) -> None:
        self._router = StreamRouter()
        self._senders: dict[str, SenderActor] = {}
        #: Each stream's hello timeout: the port waits for a hello as long as the most
        #: patient of its streams would.
        self._hello_timeouts: dict[str, float] = {}
        #: The stream each handed-over connection belongs to.
        self._routes: dict[RoqConnection, SenderActor] = {}
        self._server: RoqServer | None = None
        self._identity: TlsIdentity | None = None
        self._host = ""
        self._timer: asyncio.TimerHandle | None = None

    async def open(self, host: str, port: int, identity: TlsIdentity) -> int:
        """Listen on ``host:port`` (not shared with other processes); the port."""
        self._identity, self._host = identity, host
        self._server = RoqServer(
            identity,
            on_packet=self._on_packet,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            on_control=self._on_control,
        )
        await self._server.start(host, port)
        return self._server.port

    async def add_stream(
        self,
        session_id: str,
        ring_name: str | None,
        encoder: EncoderHandle | None,
        limits: ViewerLimits | None = None,
        access: AccessSettings | None = None,
        supervisor: Any = None,
    ) -> str:
        """Carry ``session_id`` on this port too; the URL its viewers connect to."""
        if self._server is None or self._identity is None:
            raise ConfigError("open the shared port before adding streams to it")
        if session_id in self._senders:
            raise ConfigError(f"stream {session_id} is already on port {self._server.port}")
        sender = SenderActor(
            session_id=session_id,
            viewer_id=f"port-{self._server.port}",
            ring_name=ring_name,
            encoder=encoder,
            limits=limits,
            access=access,
            supervisor=supervisor,
        )
        url = await sender.open_hosted(self._host, self._server.port, self._identity)
        self._senders[session_id] = sender
        self._router.streams.add(session_id)
        settings = access or AccessSettings(access=StreamAccess())
        self._hello_timeouts[session_id] = settings.access.hello_timeout_s
        self._router.hello_timeout_s = max(self._hello_timeouts.values())
        logger.info("port %d: stream %s added", self._server.port, session_id)
        return url

    async def remove_stream(self, session_id: str) -> SenderStats | None:
        """Stop carrying ``session_id`` (its viewers are closed; the others play on); its
        final stats, None if it was not here."""
        sender = self._senders.pop(session_id, None)
        if sender is None:
            return None
        self._router.streams.discard(session_id)
        self._hello_timeouts.pop(session_id, None)
        for connection in [c for c, s in self._routes.items() if s is sender]:
            del self._routes[connection]
        return await sender.stop()

    async def call_stream(self, session_id: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one of :class:`SenderActor`'s public methods on the stream's sender here (what
        a ``SenderHandle`` does on a shard of its own)."""
        sender = self._senders.get(session_id)
        if sender is None:
            raise StreamNotFoundError(f"this shared port carries no stream {session_id!r}")
        if method.startswith("_") or not callable(getattr(SenderActor, method, None)):
            raise ConfigError(f"{method!r} is not a sender call")
        if method == "stop":
            return await self.remove_stream(session_id)
        result = getattr(sender, method)(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result

    async def stats(self) -> SharedPortStats:
        return SharedPortStats(
            pid=os.getpid(),
            host=self._host,
            port=self._server.port if self._server is not None else 0,
            streams=sorted(self._senders),
            waiting=self._router.waiting,
            refusals=dict(self._router.refusals),
        )

    async def identity(self) -> TlsIdentity | None:
        """The port's certificate and key: a supervisor that restarted takes the port back
        with it, to start a new process on the port with the same fingerprint if need be."""
        return self._identity

    async def stop(self) -> None:
        """Stop every stream still here, then the socket."""
        for session_id in list(self._senders):
            with contextlib.suppress(Exception):
                await self.remove_stream(session_id)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._server is not None:
            await self._server.close()
            self._server = None

    # -- the server's callbacks ---------------------------------------------------------------

    def _on_connect(self, connection: RoqConnection) -> None:
        self._router.connect(connection, asyncio.get_running_loop().time())
        self._arm()

    def _on_control(self, connection: RoqConnection, data: bytes, end_stream: bool) -> None:
        sender = self._routes.get(connection)
        if sender is not None:
            sender._on_control(connection, data, end_stream)
            return
        self._carry_out(connection, self._router.receive(connection, data, end_stream))

    def _on_packet(self, connection: RoqConnection, flow_id: int, data: bytes) -> None:
        sender = self._routes.get(connection)
        if sender is not None:
            sender._on_packet(connection, flow_id, data)
        # else: RTCP before its hello was routed: nothing has been sent to it to report on.

    def _on_disconnect(self, connection: RoqConnection) -> None:
        self._router.forget(connection)
        sender = self._routes.pop(connection, None)
        if sender is not None:
            sender._on_disconnect(connection)

    def _carry_out(self, connection: RoqConnection, decision: Route | Refuse | None) -> None:
        match decision:
            case Route(stream=stream, control=control, end_stream=end):
                sender = self._senders[stream]
                self._routes[connection] = sender
                sender.adopt(connection, control, end)
            case Refuse():
                logger.info(
                    "port %s: %s refused: %s",
                    self._server.port if self._server is not None else "?",
                    connection.peer_id,
                    decision.close_reason,
                )
                if decision.write:
                    connection.send_control(decision.message)
                connection.close(decision.code, decision.close_reason)

    def _arm(self) -> None:
        """One timer, for the earliest hello deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self._router.next_deadline()
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        late: list[tuple[Hashable, Refuse]] = self._router.handle_timer(now)
        for connection, refusal in late:
            assert isinstance(connection, RoqConnection)
            self._carry_out(connection, refusal)
        self._arm()
