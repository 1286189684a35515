"""UDP sends in GSO runs: how datagrams are grouped, what the wire gets, and the fallbacks."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any, cast

import pytest

from shared.roq.udp_batch import (
    MAX_GSO_BYTES,
    MAX_SEGMENTS,
    SOL_UDP,
    UDP_SEGMENT,
    UdpBatchSender,
    gso_batches,
    gso_supported,
)

A, B = ("127.0.0.1", 1000), ("127.0.0.1", 2000)


def datagram(size: int, tag: int = 0) -> bytes:
    return bytes([tag % 256]) * size


# -- grouping (pure) ------------------------------------------------------------------------


def sizes(batches: list[tuple[Any, list[bytes]]]) -> list[tuple[Any, list[int]]]:
    return [(addr, [len(d) for d in run]) for addr, run in batches]


def test_equal_datagrams_to_one_address_form_one_run_ending_at_a_shorter_one() -> None:
    out = [(datagram(n), A) for n in (1200, 1200, 1200, 700, 1200, 1200)]
    # A shorter segment can only be a run's last: the next equal ones start a new run.
    assert sizes(gso_batches(out)) == [(A, [1200, 1200, 1200, 700]), (A, [1200, 1200])]


def test_a_longer_datagram_or_another_address_starts_a_new_run() -> None:
    out = [(datagram(n), a) for n, a in ((600, A), (1200, A), (1200, A), (1200, B), (1199, B))]
    assert sizes(gso_batches(out)) == [(A, [600]), (A, [1200, 1200]), (B, [1200, 1199])]


def test_runs_keep_within_the_kernels_segment_and_byte_limits() -> None:
    many = [(datagram(100), A)] * (MAX_SEGMENTS + 3)
    assert sizes(gso_batches(many)) == [(A, [100] * MAX_SEGMENTS), (A, [100] * 3)]
    big = [(datagram(1200), A)] * 60
    runs = gso_batches(big)
    assert [len(run) for _, run in runs] == [MAX_GSO_BYTES // 1200, 60 - MAX_GSO_BYTES // 1200]
    assert all(sum(map(len, run)) <= MAX_GSO_BYTES for _, run in runs)


def test_grouping_keeps_every_datagram_in_order() -> None:
    out = [(datagram(n, i), (A, B)[i // 7 % 2]) for i, n in enumerate([1200, 1200, 900] * 9)]
    regrouped = [(d, addr) for addr, run in gso_batches(out) for d in run]
    assert regrouped == out
    assert gso_batches([]) == []


# -- on real loopback sockets ---------------------------------------------------------------


class FakeTransport:
    """The asyncio transport's part: a queue for what the socket cannot take now."""

    def __init__(self, backlog: int = 0) -> None:
        self.sent: list[tuple[bytes, Any]] = []
        self.backlog = backlog
        self.closing = False

    def sendto(self, data: bytes, addr: Any = None) -> None:
        self.sent.append((data, addr))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.backlog


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5.0)
    yield sender, receiver
    sender.close()
    receiver.close()


def frame_datagrams(addr: Any) -> list[tuple[bytes, Any]]:
    """Three frames as a shard sends them: near-equal fragments, a shorter last one."""
    out = []
    for frame, shape in enumerate(([1151] * 5 + [630], [1020, 1020, 1019, 1019], [34, 58])):
        out += [(datagram(size, 10 * frame + i), addr) for i, size in enumerate(shape)]
    return out


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "one-per-syscall"])
def test_the_receiver_gets_exactly_the_datagrams_sent(
    pair: tuple[socket.socket, socket.socket], gso: bool
) -> None:
    sender_sock, receiver = pair
    if gso and not gso_supported(sender_sock):
        pytest.skip("this kernel has no UDP GSO")
    out = frame_datagrams(receiver.getsockname())
    sender = UdpBatchSender(sender_sock, gso=gso)
    sender.send(out, FakeTransport())
    got = [receiver.recv(65536) for _ in out]
    assert got == [data for data, _ in out]
    assert sender.datagrams == len(out) and sender.errors == sender.handed_over == 0
    # GSO: [1151 x5, 630], [1020 x2, 1019], [1019, 34], [58]; otherwise one per datagram.
    assert sender.syscalls == (4 if gso else len(out))


def test_the_probe_finds_gso_on_linux_udp_and_not_elsewhere(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    stream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert not gso_supported(stream)
    finally:
        stream.close()
    sock = pair[0]
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        assert not UdpBatchSender(sock).gso
    else:
        assert UdpBatchSender(sock).gso


# -- fallbacks, with a socket that fails on cue ------------------------------------------------


class FlakySocket:
    """A UDP socket whose sends fail as told: ``gso_errno`` for every sendmsg, and
    ``fail_at`` maps a send's index (sendto and sendmsg counted together) to an exception."""

    type = socket.SOCK_DGRAM

    def __init__(self, gso_errno: int | None = None, fail_at: dict[int, OSError] | None = None):
        self.gso_errno = gso_errno
        self.fail_at = fail_at or {}
        self.calls: list[tuple[str, list[bytes]]] = []

    def _fail(self) -> None:
        error = self.fail_at.get(len(self.calls))
        if error is not None:
            self.calls.append(("failed", []))
            raise error

    def sendto(self, data: bytes, addr: Any) -> int:
        self._fail()
        self.calls.append(("sendto", [data]))
        return len(data)

    def sendmsg(self, buffers: list[bytes], ancdata: Any, flags: int, addr: Any) -> int:
        if self.gso_errno is not None:
            self.calls.append(("refused", list(buffers)))
            raise OSError(self.gso_errno, "no GSO here")
        self._fail()
        self.calls.append(("sendmsg", list(buffers)))
        return sum(map(len, buffers))

    def sent(self) -> list[bytes]:
        return [d for kind, run in self.calls if kind in ("sendto", "sendmsg") for d in run]


@pytest.mark.parametrize("code", [errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP])
def test_a_route_without_gso_is_detected_once_and_remembered(code: int) -> None:
    sock = FlakySocket(gso_errno=code)
    sender = UdpBatchSender(cast(socket.socket, sock), gso=True)
    out = frame_datagrams(A)
    sender.send(out, FakeTransport())
    # The first run was refused, then resent one datagram per syscall, as was all the rest.
    assert sock.sent() == [data for data, _ in out]
    assert [kind for kind, _ in sock.calls].count("refused") == 1
    assert not sender.gso and sender.gso_error is not None and sender.gso_error.errno == code
    assert sender.syscalls == sender.datagrams == len(out)
    sender.send(out, FakeTransport())  # remembered: no second try
    assert [kind for kind, _ in sock.calls].count("refused") == 1
    assert sock.sent() == [data for data, _ in out] * 2


def test_a_full_socket_hands_the_rest_to_the_transport_in_order() -> None:
    sock = FlakySocket(fail_at={1: BlockingIOError(errno.EAGAIN, "full")})
    sender = UdpBatchSender(cast(socket.socket, sock), gso=True)
    transport = FakeTransport()
    out = frame_datagrams(A)
    sender.send(out, transport)
    # The first run (six datagrams) went; the socket was full for the second: the transport
    # queues it and everything after it, in order.
    assert sock.sent() == [data for data, _ in out[:6]]
    assert transport.sent == out[6:]
    assert sender.handed_over == len(out) - 6 and sender.datagrams == 6


def test_while_the_transport_holds_a_queue_everything_stays_behind_it() -> None:
    sock = FlakySocket()
    sender = UdpBatchSender(cast(socket.socket, sock), gso=True)
    transport = FakeTransport(backlog=1200)
    out = frame_datagrams(A)
    sender.send(out, transport)
    assert sock.calls == [] and transport.sent == out


def test_other_errors_drop_that_run_only_and_a_closed_transport_sends_nothing() -> None:
    sock = FlakySocket(fail_at={0: OSError(errno.ENOBUFS, "no buffer space")})
    sender = UdpBatchSender(cast(socket.socket, sock), gso=True)
    out = frame_datagrams(A)
    sender.send(out, FakeTransport())
    assert sock.sent() == [data for data, _ in out[6:]]
    assert sender.errors == 6 and sender.gso  # not a GSO problem: GSO stays on
    closed = FakeTransport()
    closed.closing = True
    sender.send(out, closed)
    assert sock.sent() == [data for data, _ in out[6:]] and closed.sent == []
