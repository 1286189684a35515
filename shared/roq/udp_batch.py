"""UDP datagrams out in as few syscalls as the kernel allows: generic segmentation offload.

Theory of operation
-------------------
aioquic's asyncio shell hands every QUIC packet to ``transport.sendto``: one syscall, and one
trip down the kernel's UDP/IP stack, per packet.  A sender shard sends a video frame to each
viewer as a handful of QUIC packets to the same address, all but the last of one size: the
H.264 fragments of a NAL unit are cut to one size and a shorter last one (RFC 6184 §5.8 FU-A,
:class:`shared.rtp.h264.H264Packetizer`), and each rides alone in a QUIC packet.

Linux (4.18 and later) takes such a run in one ``sendmsg`` with the ``UDP_SEGMENT`` ancillary
option (UDP GSO): one buffer and a segment size, cut into datagrams of that size, the last one
possibly shorter, each with its own UDP header, exactly as if sent one by one.  On loopback and
on NICs with UDP segmentation offload the stack is walked once per run instead of once per
packet.  :func:`gso_batches` groups a transmit's datagrams into such runs: consecutive, to one
address, every segment the size of the first except a shorter last one, at most
:data:`MAX_SEGMENTS` segments and :data:`MAX_GSO_BYTES` in all.  The segments are passed to
``sendmsg`` as separate buffers (scatter-gather), so nothing is joined in Python.  In
``perf.bench_sender`` (720p30 at 1.5 Mbps) a shard makes 1.8 send syscalls per viewer per
frame instead of 6.8; its CPU time hardly moves, as the kernel's share of it was under a tenth
(aioquic's packet building and receiving in Python is most of it).

Other batching was weighed.  ``sendmmsg`` would take datagrams to many viewers in one syscall,
but Python's socket module does not expose it; through ctypes each message needs its iovecs,
address and control buffer built as ctypes objects, more Python work than the ``sendmsg`` it
replaces, and the kernel still walks the stack once per datagram (measured on this project's
machine, one 6-packet frame to each of 20 viewers: 16 us per viewer with a GSO ``sendmsg``
each, 27 us with one ctypes ``sendmmsg`` for all; six ``sendto`` each, 37 us).  GSO saves the
kernel's per-packet work too, and needs nothing beyond the standard library.

GSO can be missing: an older kernel or another platform (``ENOPROTOOPT`` when probed, or no
``sendmsg``), or a route that cannot offload (``EIO``: no checksum offload, IPsec), or a segment
the device refuses (``EINVAL``).  :class:`UdpBatchSender` probes the socket once, and on the
first such error from a batched send it resends that batch one datagram at a time and never
tries GSO on that socket again.  Any other error is what asyncio's own ``sendto`` does with it:
the datagrams are dropped (QUIC's loss recovery resends what mattered) and counted.  A full
socket buffer (``EAGAIN``) hands the rest to the asyncio transport, which queues it and waits
for the socket to drain; while that queue is not empty, everything goes through it, in order.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = [
    "MAX_GSO_BYTES",
    "MAX_SEGMENTS",
    "Address",
    "QueueingTransport",
    "UdpBatchSender",
    "gso_batches",
    "gso_supported",
]

Address = Any
"""A socket address as the socket's family takes it (``(host, port)`` or the IPv6 4-tuple)."""

#: ``SOL_UDP`` and ``UDP_SEGMENT`` from linux/udp.h; Python's socket module names neither.
SOL_UDP = 17
UDP_SEGMENT = 103
#: Segments the kernel takes in one GSO send (UDP_MAX_SEGMENTS, 64 on every kernel with GSO).
MAX_SEGMENTS = 64
#: Bytes in one GSO send: the whole run is one UDP datagram inside the stack, so it must fit
#: a UDP length field with IPv6 and IPv4 headers to spare (65,535 less headers, rounded down).
MAX_GSO_BYTES = 65_000
#: What a batched send answers when this socket or route cannot segment (see the module doc).
GSO_UNAVAILABLE = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP})

_SEGMENT_SIZE = struct.Struct("=H")


class QueueingTransport(Protocol):
    """What :class:`UdpBatchSender` needs of the socket's asyncio transport (the selector
    loop's datagram transport has all three): a ``sendto`` that queues when the socket is
    full, and the size of that queue."""

    def sendto(self, data: bytes, addr: Address = None) -> None: ...

    def is_closing(self) -> bool: ...

    def get_write_buffer_size(self) -> int: ...


def gso_batches(
    datagrams: Sequence[tuple[bytes, Address]],
    *,
    max_segments: int = MAX_SEGMENTS,
    max_bytes: int = MAX_GSO_BYTES,
) -> list[tuple[Address, list[bytes]]]:
    """Cut ``(data, addr)`` into GSO runs, in order: each run goes to one address, and all its
    segments have the size of the first but the last, which may be shorter."""
    batches: list[tuple[Address, list[bytes]]] = []
    run: list[bytes] = []
    run_addr: Address = None
    size = total = 0
    for data, addr in datagrams:
        length = len(data)
        if (
            run
            and addr == run_addr
            and length <= size
            and len(run) < max_segments
            and total + length <= max_bytes
        ):
            run.append(data)
            total += length
            if length < size:  # a shorter segment can only be the last
                run = []
            continue
        run, run_addr, size, total = [data], addr, length, length
        batches.append((addr, run))
    return batches


def gso_supported(sock: socket.socket) -> bool:
    """Whether the kernel knows ``UDP_SEGMENT`` on this socket (a route may still refuse it)."""
    if not sys.platform.startswith("linux") or sock.type != socket.SOCK_DGRAM:
        return False
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


class UdpBatchSender:
    """Sends a transmit's datagrams on one UDP socket in GSO runs (see the module doc).

    ``gso`` forces the choice (False: one ``sendto`` per datagram); by default the socket is
    probed.  The counters cover every datagram handed in, whichever way it went.
    """

    def __init__(self, sock: socket.socket, *, gso: bool | None = None) -> None:
        self._sock = sock
        self.gso = gso_supported(sock) if gso is None else gso
        #: Calls of :meth:`send` with something to send (one per transmit that sent).
        self.flushes = 0
        #: Send syscalls made here (``sendto`` or ``sendmsg``), and the datagrams they carried.
        self.syscalls = 0
        self.datagrams = 0
        #: Datagrams left to the asyncio transport (a full socket buffer, or its own queue).
        self.handed_over = 0
        #: Datagrams dropped on an error other than a full buffer (asyncio drops them too).
        self.errors = 0
        #: The error that turned GSO off on this socket, if one did.
        self.gso_error: OSError | None = None

    def send(
        self, datagrams: Sequence[tuple[bytes, Address]], transport: QueueingTransport
    ) -> None:
        """Send ``(data, addr)`` pairs; ``transport`` is the asyncio transport of the same
        socket, which takes what the socket cannot take now."""
        if not datagrams or transport.is_closing():
            return
        self.flushes += 1
        if transport.get_write_buffer_size():
            self._hand_over(datagrams, transport)  # it holds earlier ones: stay behind them
            return
        batches = gso_batches(datagrams) if self.gso else [(a, [d]) for d, a in datagrams]
        sock = self._sock
        index = 0
        while index < len(batches):
            addr, segments = batches[index]
            try:
                if len(segments) == 1:
                    sock.sendto(segments[0], addr)
                else:
                    option = [(SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(len(segments[0])))]
                    sock.sendmsg(segments, option, 0, addr)
            except (BlockingIOError, InterruptedError):
                self._hand_over([(d, a) for a, run in batches[index:] for d in run], transport)
                return
            except OSError as exc:
                if len(segments) > 1 and exc.errno in GSO_UNAVAILABLE:
                    # This socket or route cannot segment: this run and all later sends go
                    # one datagram per syscall.
                    self.gso, self.gso_error = False, exc
                    batches[index:] = [(a, [d]) for a, run in batches[index:] for d in run]
                    continue
                self.errors += len(segments)
            else:
                self.syscalls += 1
                self.datagrams += len(segments)
            index += 1

    def _hand_over(
        self, datagrams: Sequence[tuple[bytes, Address]], transport: QueueingTransport
    ) -> None:
        for data, addr in datagrams:
            transport.sendto(data, addr)
        self.handed_over += len(datagrams)
