"""The relay's asyncio shells: the origin serves its rings, a remote node copies them.

:class:`RelayServer` runs on the node whose encoder writes a stream's rings.  It listens on a
TCP port; each connection is one remote node (:class:`RelayReceiver`), which subscribes to some
of the stream's tracks.  Per connection the server reads each ring once — woken by the ring's
doorbell, never polling — and writes the packets the uplink core admits, batched per wake-up,
without ever awaiting the socket: a node whose link backs up loses whole groups of pictures
(:mod:`shared.relay.uplink`), and neither the encoder nor the other nodes wait for it.

:class:`RelayReceiver` runs on a remote node: it creates rings of the origin's shapes under
local names and appends what the downlink core accepts.  It is those rings' writer, so it
unlinks them when it closes; the node's shards attach to them as they would to the origin's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Mapping
from typing import Final

import msgspec

from shared.errors import NetworkError, ProtocolError, ResourceError
from shared.pool.doorbell import DoorbellListener
from shared.pool.packet_ring import PacketRing, PacketRingReader, RingPacket
from shared.relay.downlink import DownlinkStats, RelayDownlink
from shared.relay.uplink import RelayUplink, UplinkStats
from shared.relay.wire import (
    VERSION,
    Goodbye,
    MessageDecoder,
    Packets,
    RelayMessage,
    Subscribe,
    Tracks,
    TrackShape,
    encode_message,
)

__all__ = ["ReceiverStats", "RelayReceiver", "RelayServer", "ServerStats"]

log = logging.getLogger(__name__)

#: A connection that has not subscribed by then is closed.
SUBSCRIBE_TIMEOUT_S: Final = 5.0
_READ_BYTES: Final = 256 * 1024
#: Relay delays kept for the receiver's percentiles.
_DELAY_SAMPLES: Final = 2048


class ServerStats(msgspec.Struct, kw_only=True):
    port: int
    #: One entry per connected node: its id and its uplink's counters.
    nodes: dict[str, UplinkStats]
    connections_refused: int = 0


class ReceiverStats(msgspec.Struct, kw_only=True):
    origin: str
    connected: bool
    downlink: DownlinkStats
    #: Local ring segment names, by track.
    rings: dict[str, str]
    #: Capture-to-local-ring delay of the recent packets captured since the subscription
    #: (ms, wall clock on both ends: meaningful across nodes whose clocks are synchronised).
    delay_p50_ms: float | None = None
    delay_p99_ms: float | None = None
    closed_reason: str | None = None


def _no_delay(writer: asyncio.StreamWriter) -> None:
    # A frame's packets go out as they come, not held back by Nagle's algorithm (RFC 896).
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Subscription:
    """One remote node's connection at the origin."""

    def __init__(
        self,
        node: str,
        tracks: list[PacketRing],
        writer: asyncio.StreamWriter,
        max_delay_s: float,
        max_backlog_bytes: int,
    ) -> None:
        self.node = node
        self.writer = writer
        self.rings = tracks
        # Listening before the reader takes its position: nothing committed after is missed.
        self.bells: list[DoorbellListener] = [ring.listen() for ring in tracks]
        self.readers = [PacketRingReader(ring, start="latest_keyframe") for ring in tracks]
        self.uplink = RelayUplink(
            len(tracks), max_delay_s=max_delay_s, max_backlog_bytes=max_backlog_bytes
        )
        self.wake = asyncio.Event()

    def pump(self) -> bool:
        """Forward what the rings hold; False once every ring's writer is gone."""
        transport = self.writer.transport
        for index, reader in enumerate(self.readers):
            batch = reader.read_available()
            if batch.missed:
                self.uplink.lost_at_origin(index)
            if not batch.packets:
                continue
            now = time.monotonic()
            backlog = transport.get_write_buffer_size()
            admitted = [p for p in batch.packets if self.uplink.admit(index, p, now, backlog)]
            if admitted:
                message = encode_message(Packets(track=index, packets=admitted))
                self.writer.write(message)
                payload = sum(len(p.data) for p in admitted)
                self.uplink.sent(len(admitted), payload, len(message), now)
        return not all(bell.writer_gone for bell in self.bells)

    def close(self) -> None:
        for bell in self.bells:
            bell.close()
        for ring in self.rings:
            ring.close()


class RelayServer:
    """Serves a stream's rings to remote nodes.  ``rings``: track name → ring segment name."""

    def __init__(
        self,
        stream: str,
        rings: Mapping[str, str],
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        max_delay_s: float = 0.5,
        max_backlog_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.stream = stream
        self._rings = dict(rings)
        self._host, self._port = host, port
        self._max_delay_s = max_delay_s
        self._max_backlog = max_backlog_bytes
        self._server: asyncio.Server | None = None
        self._subscriptions: dict[asyncio.Task[None], _Subscription | None] = {}
        self._refused = 0

    @property
    def port(self) -> int:
        if self._server is None:
            raise ResourceError("the relay server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._host, self._port)

    def stats(self) -> ServerStats:
        nodes = {
            sub.node: msgspec.structs.replace(sub.uplink.stats)
            for sub in self._subscriptions.values()
            if sub is not None
        }
        return ServerStats(port=self.port, nodes=nodes, connections_refused=self._refused)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._subscriptions[task] = None
        _no_delay(writer)
        try:
            await self._serve(task, reader, writer)
        except (ProtocolError, ConnectionError, TimeoutError) as exc:
            log.info("relay connection of stream %s ended: %s", self.stream, exc)
        finally:
            sub = self._subscriptions.pop(task, None)
            if sub is not None:
                sub.close()
            writer.close()

    async def _refuse(self, writer: asyncio.StreamWriter, reason: str) -> None:
        self._refused += 1
        writer.write(encode_message(Goodbye(reason=reason)))
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _serve(
        self, task: asyncio.Task[None], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        decoder = MessageDecoder(max_message_bytes=64 * 1024)
        messages: list[RelayMessage] = []
        async with asyncio.timeout(SUBSCRIBE_TIMEOUT_S):
            while not messages:
                data = await reader.read(_READ_BYTES)
                if not data:
                    return
                messages = decoder.feed(data)
        first = messages[0]
        if not isinstance(first, Subscribe):
            return await self._refuse(writer, "the first message must be a subscribe")
        if first.version != VERSION:
            return await self._refuse(
                writer, f"relay protocol version {first.version} (this origin speaks {VERSION})"
            )
        if first.stream != self.stream:
            return await self._refuse(writer, f"this relay serves stream {self.stream}")
        unknown = [t for t in first.tracks if t not in self._rings]
        if unknown or not first.tracks:
            return await self._refuse(
                writer, f"unknown tracks {unknown}; this stream has {sorted(self._rings)}"
            )
        rings: list[PacketRing] = []
        try:
            for track in first.tracks:
                rings.append(PacketRing.attach(self._rings[track]))
            sub = _Subscription(first.node, rings, writer, self._max_delay_s, self._max_backlog)
        except ResourceError as exc:
            for ring in rings:
                ring.close()
            return await self._refuse(writer, f"the stream's rings are gone: {exc}")
        self._subscriptions[task] = sub
        shapes = [
            TrackShape(name=name, capacity_bytes=int(ring.capacity), index_slots=ring.index_slots)
            for name, ring in zip(first.tracks, rings, strict=True)
        ]
        writer.write(encode_message(Tracks(tracks=shapes)))
        loop = asyncio.get_running_loop()
        for bell in sub.bells:
            bell.watch(loop, sub.wake.set)
        # The receiver sends nothing more but a goodbye; its end-of-file ends the subscription.
        closed = asyncio.ensure_future(reader.read(_READ_BYTES))
        try:
            while sub.pump():
                sub.wake.clear()
                waiting = asyncio.ensure_future(sub.wake.wait())
                done, _ = await asyncio.wait({waiting, closed}, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                if closed in done:
                    return
            writer.write(encode_message(Goodbye(reason=f"stream {self.stream} ended")))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            closed.cancel()

    async def close(self) -> None:
        """Stop listening and end every connection (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._subscriptions)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()


class RelayReceiver:
    """Copies tracks of a remote stream into this node's rings.

    ``rings``: track name → local segment name (they must differ from the origin's names
    where nodes share one /dev/shm, as the nodes of a test cluster on one machine do).
    """

    def __init__(
        self, origin: tuple[str, int], stream: str, rings: Mapping[str, str], *, node: str = ""
    ) -> None:
        if not rings:
            raise ValueError("subscribe to at least one track")
        self.origin = origin
        self.stream = stream
        self._names = dict(rings)
        self._node = node
        self._rings: list[PacketRing] = []
        self._downlink = RelayDownlink(len(self._names))
        self._delays: deque[float] = deque(maxlen=_DELAY_SAMPLES)
        #: Packets captured before this (wall clock, µs) are the history a subscriber starts
        #: with (from the newest keyframe): their age is not the relay's delay.
        self._subscribed_us = 0.0
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ready = asyncio.Event()
        self.closed_reason: str | None = None

    async def start(self, *, timeout_s: float = 5.0) -> None:
        """Connect, subscribe and create the local rings; then copy in the background."""
        host, port = self.origin
        self._subscribed_us = time.time() * 1e6
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            raise NetworkError(f"cannot reach the relay origin {host}:{port}: {exc}") from exc
        self._writer = writer
        _no_delay(writer)
        subscribe = Subscribe(
            version=VERSION, stream=self.stream, tracks=list(self._names), node=self._node
        )
        writer.write(encode_message(subscribe))
        decoder = MessageDecoder()
        try:
            async with asyncio.timeout(timeout_s):
                pending = await self._first_reply(reader, decoder)
        except BaseException:
            writer.close()
            raise
        self._task = asyncio.create_task(self._copy(reader, decoder, pending))

    async def _first_reply(
        self, reader: asyncio.StreamReader, decoder: MessageDecoder
    ) -> list[RelayMessage]:
        messages: list[RelayMessage] = []
        while not messages:
            data = await reader.read(_READ_BYTES)
            if not data:
                raise NetworkError("the relay origin closed the connection")
            messages = decoder.feed(data)
        first = messages[0]
        if isinstance(first, Goodbye):
            raise NetworkError(f"the relay origin refused: {first.reason}")
        if not isinstance(first, Tracks) or [t.name for t in first.tracks] != list(self._names):
            raise ProtocolError(f"the relay origin answered {first!r}")
        try:
            for shape in first.tracks:
                self._rings.append(
                    PacketRing.create(
                        self._names[shape.name],
                        capacity_bytes=shape.capacity_bytes,
                        index_slots=shape.index_slots,
                    )
                )
        except BaseException:
            self._close_rings()
            raise
        self._ready.set()
        return messages[1:]

    async def _copy(
        self, reader: asyncio.StreamReader, decoder: MessageDecoder, pending: list[RelayMessage]
    ) -> None:
        try:
            messages = pending
            while True:
                for message in messages:
                    if isinstance(message, Packets):
                        self._append(message)
                    elif isinstance(message, Goodbye):
                        self.closed_reason = message.reason
                        return
                data = await reader.read(_READ_BYTES)
                if not data:
                    self.closed_reason = "the relay origin closed the connection"
                    return
                messages = decoder.feed(data)
        except (ProtocolError, ConnectionError) as exc:
            self.closed_reason = f"relay connection failed: {exc}"

    def _append(self, message: Packets) -> None:
        if not 0 <= message.track < len(self._rings):
            raise ProtocolError(f"packets for track {message.track}, which was not subscribed")
        ring = self._rings[message.track]
        now_us = time.time() * 1e6
        for packet in message.packets:
            if self._downlink.accept(message.track, packet):
                self._write(ring, packet)
                if packet.capture_us >= self._subscribed_us:
                    self._delays.append((now_us - packet.capture_us) / 1000)

    @staticmethod
    def _write(ring: PacketRing, packet: RingPacket) -> None:
        ring.append(
            packet.data,
            pts=packet.pts,
            capture_us=packet.capture_us,
            monotonic_us=packet.monotonic_us,
            keyframe=packet.keyframe,
            duration=packet.duration,
        )

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def wait_closed(self) -> str | None:
        """Until the origin ends the relay; why it ended."""
        if self._task is not None:
            await asyncio.shield(self._task)
        return self.closed_reason

    def stats(self) -> ReceiverStats:
        delays = sorted(self._delays)

        def pick(q: float) -> float | None:
            return delays[min(len(delays) - 1, int(q * len(delays)))] if delays else None

        return ReceiverStats(
            origin=f"{self.origin[0]}:{self.origin[1]}",
            connected=self.running,
            downlink=msgspec.structs.replace(self._downlink.stats),
            rings={name: ring.name for name, ring in zip(self._names, self._rings, strict=False)},
            delay_p50_ms=pick(0.5),
            delay_p99_ms=pick(0.99),
            closed_reason=self.closed_reason,
        )

    def _close_rings(self) -> None:
        rings, self._rings = self._rings, []
        for ring in rings:
            try:
                ring.unlink()
            finally:
                ring.close()

    async def close(self) -> None:
        """Hang up and remove the local rings (idempotent)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
            self._writer = None
        self._close_rings()
