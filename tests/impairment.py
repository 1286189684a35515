"""A userspace network impairment relay for tests (this kernel has no netem).

The relay listens on a local UDP port and forwards each client's datagrams to the server from
a socket of its own (so the server sees one address per client), and the server's replies back.
Each direction has its own :class:`Impairment`: random loss, bursty loss (a Gilbert-Elliott
two-state chain), fixed delay, uniform jitter (which reorders, as netem's does), extra
reordering delay, and duplication.  Every random choice comes from one seeded generator, so a
run with the same seed and the same packet sequence loses the same packets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from typing import Any

__all__ = ["Impairment", "ImpairmentRelay"]

Address = tuple[str, int]


@dataclasses.dataclass(frozen=True, slots=True)
class Impairment:
    loss: float = 0.0
    """Probability that a datagram is dropped (in the good state of a burst chain)."""
    burst_enter: float = 0.0
    """Gilbert-Elliott: probability per datagram of entering the bad state."""
    burst_exit: float = 0.3
    """Probability per datagram of leaving the bad state (every datagram in it is lost)."""
    delay_s: float = 0.0
    jitter_s: float = 0.0
    reorder: float = 0.0
    """Probability that a datagram is held back an extra ``reorder_delay_s``."""
    reorder_delay_s: float = 0.01
    duplicate: float = 0.0


@dataclasses.dataclass(slots=True)
class DirectionStats:
    forwarded: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0


class _Direction:
    def __init__(self, impairment: Impairment, rng: random.Random) -> None:
        self.impairment, self.rng = impairment, rng
        self.bad = False
        self.stats = DirectionStats()

    def plan(self) -> list[float]:
        """Delays (seconds) of the copies of the next datagram: [] lost, two duplicated."""
        imp, rng = self.impairment, self.rng
        if self.bad:
            self.bad = rng.random() >= imp.burst_exit
        elif imp.burst_enter and rng.random() < imp.burst_enter:
            self.bad = True
        if self.bad or (imp.loss and rng.random() < imp.loss):
            self.stats.dropped += 1
            return []
        copies = 2 if imp.duplicate and rng.random() < imp.duplicate else 1
        self.stats.duplicated += copies - 1
        delays = []
        for _ in range(copies):
            delay = imp.delay_s + (rng.uniform(0, imp.jitter_s) if imp.jitter_s else 0.0)
            if imp.reorder and rng.random() < imp.reorder:
                delay += imp.reorder_delay_s
                self.stats.reordered += 1
            delays.append(delay)
        self.stats.forwarded += copies
        return delays


class _Upstream(asyncio.DatagramProtocol):
    """The relay's socket towards the server for one client."""

    def __init__(self, relay: ImpairmentRelay, client: Address) -> None:
        self.relay, self.client = relay, client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.relay._forward(self.relay.down, data, self.relay._listen, self.client)


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, relay: ImpairmentRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.relay._from_client(data, addr)


class ImpairmentRelay:
    """Relay ``client <-> relay port <-> target`` with impairments in each direction."""

    def __init__(
        self,
        target: Address,
        *,
        down: Impairment | None = None,
        up: Impairment | None = None,
        seed: int = 1,
    ) -> None:
        self.target = target
        rng = random.Random(seed)
        #: Server -> client (media) and client -> server (feedback).
        self.down = _Direction(down or Impairment(), rng)
        self.up = _Direction(up or Impairment(), rng)
        self._clients: dict[Address, _Upstream] = {}
        self._pending: dict[Address, list[bytes]] = {}
        self._listen: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        #: While True every datagram is dropped both ways (a cut cable).
        self.cut = False

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._loop = asyncio.get_running_loop()
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _Listener(self), local_addr=(host, port)
        )
        self._listen = transport
        self.port = transport.get_extra_info("sockname")[1]
        return self.port

    def set_impairment(
        self, *, down: Impairment | None = None, up: Impairment | None = None
    ) -> None:
        if down is not None:
            self.down.impairment = down
        if up is not None:
            self.up.impairment = up

    def _from_client(self, data: bytes, client: Address) -> None:
        upstream = self._clients.get(client)
        if upstream is None:
            upstream = self._clients[client] = _Upstream(self, client)
            self._pending[client] = [data]
            assert self._loop is not None
            self._loop.create_task(self._open_upstream(upstream))
            return
        if upstream.transport is None:
            self._pending[client].append(data)
            return
        self._forward(self.up, data, upstream.transport, self.target)

    async def _open_upstream(self, upstream: _Upstream) -> None:
        assert self._loop is not None
        await self._loop.create_datagram_endpoint(lambda: upstream, remote_addr=self.target)
        for data in self._pending.pop(upstream.client, []):
            assert upstream.transport is not None
            self._forward(self.up, data, upstream.transport, None)

    def _forward(
        self,
        direction: _Direction,
        data: bytes,
        transport: asyncio.DatagramTransport | None,
        addr: Address | None,
    ) -> None:
        if transport is None or self.cut:
            return
        assert self._loop is not None
        for delay in direction.plan():
            if delay <= 0:
                self._send(transport, data, addr)
            else:
                self._loop.call_later(delay, self._send, transport, data, addr)

    @staticmethod
    def _send(transport: asyncio.DatagramTransport, data: bytes, addr: Address | None) -> None:
        if not transport.is_closing():
            if addr is None or transport.get_extra_info("peername") is not None:
                transport.sendto(data)
            else:
                transport.sendto(data, addr)

    def close(self) -> None:
        for upstream in self._clients.values():
            if upstream.transport is not None:
                upstream.transport.close()
        self._clients.clear()
        if self._listen is not None:
            self._listen.close()
            self._listen = None
