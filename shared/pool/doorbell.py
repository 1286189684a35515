"""The wake-up that travels with a shared-memory segment: one writer rings, any readers hear.

Why a socket beside the memory
------------------------------
A reader of a frame pool or packet ring has to learn that something new was committed without
polling and without a round trip through Ray (an actor task per frame costs more CPU than the
copy it announces).  GStreamer's shmsink/shmsrc pair solves the same problem with a control
socket beside the shared memory; so does this module.  The writer of a segment listens on a
UNIX ``SOCK_SEQPACKET`` socket in Linux's abstract namespace (``unix(7)``), named after the
segment; each reader connects and hands its end to its event loop (``loop.add_reader``).  After
each commit the writer sends every connected reader one 8-byte message holding the newest
sequence number.

What each requirement costs
---------------------------
- *The writer never waits.*  Sends are non-blocking: a reader whose socket buffer is full
  (it stopped reading) makes ``send`` fail with ``EAGAIN`` and simply misses that ring; it still
  has older rings queued, and a reader always reads the segment up to its newest entry when it
  wakes, so a missed ring loses nothing.  The writer counts these as ``coalesced``.
- *A reader that dies never blocks or slows the writer.*  The kernel closes its socket; the
  writer's next send fails with ``EPIPE`` (``MSG_NOSIGNAL``: no SIGPIPE), and the writer drops
  it and counts it in ``departed``: that is how the writer learns a reader went away.
- *A reader can attach at any time and learns where to start.*  It connects whenever it likes
  (the writer accepts pending connections, without blocking, before each ring); where to start
  is in the segment itself (``FramePoolReader``, ``PacketRingReader(start=...)``), and the
  first ring it hears carries the newest sequence.
- *Nothing outlives the stream.*  An abstract socket has no file: it disappears with the last
  descriptor, so a writer that exits (or is killed) leaves no name behind, and its readers see
  end-of-file (``writer_gone``).

Abstract names are per network namespace: writer and readers of a segment must share one, as
every actor of a node does.  The name is ``\\0kizuna/<segment name>``, unique because segment
names are (creating a segment that exists fails first).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable
from typing import Final

from shared.errors import ResourceError

__all__ = ["Doorbell", "DoorbellListener", "doorbell_address"]

_MESSAGE: Final = struct.Struct("<q")
#: Connections waiting to be accepted; a reader beyond this waits for the writer's next ring.
_BACKLOG: Final = 64
#: How many queued rings one ``drain`` reads before it stops (they all say "read again").
_DRAIN_BATCH: Final = 1024
#: Send buffer of each reader's connection (the kernel doubles it and enforces a minimum): a
#: handful of rings.  Queued rings all mean "read the segment again", so a deep queue would only
#: hold kernel memory for a reader that stopped reading, and hide that it did.
_READER_SNDBUF: Final = 4096


def doorbell_address(segment: str) -> bytes:
    """The abstract socket address of ``segment``'s doorbell."""
    return b"\0kizuna/" + segment.encode()


class Doorbell:
    """The writer's side: rings every connected reader after a commit.

    Not thread-safe: ring it from the thread that writes the segment (one writer).
    """

    def __init__(self, segment: str) -> None:
        self.segment: Final = segment
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            listener.bind(doorbell_address(segment))
            listener.listen(_BACKLOG)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            if exc.errno == errno.EADDRINUSE:
                raise ResourceError(
                    f"the doorbell of segment {segment} is held by another live writer"
                ) from exc
            raise ResourceError(f"cannot open the doorbell of segment {segment}: {exc}") from exc
        self._listener: socket.socket | None = listener
        self._readers: list[socket.socket] = []
        #: Rings a reader missed because it had not read the earlier ones (it loses nothing).
        self.coalesced = 0
        #: Readers that went away (closed, exited or were killed).
        self.departed = 0
        #: Readers ever connected.
        self.attached = 0

    @property
    def readers(self) -> int:
        """Readers connected as of the last ring (or :meth:`accept`)."""
        return len(self._readers)

    @property
    def closed(self) -> bool:
        return self._listener is None

    def accept(self) -> None:
        """Take every pending reader connection (never blocks)."""
        listener = self._listener
        if listener is None:
            return
        while True:
            try:
                reader, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # closed under us by another thread's close(): nothing to take
                return
            reader.setblocking(False)
            reader.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _READER_SNDBUF)
            self._readers.append(reader)
            self.attached += 1

    def ring(self, sequence: int) -> None:
        """Tell every reader that ``sequence`` is committed.  Never blocks, never raises for a
        reader's sake: a slow reader misses this ring, a departed one is dropped."""
        if self._listener is None:
            return
        self.accept()
        message = _MESSAGE.pack(sequence)
        gone: list[socket.socket] = []
        for reader in self._readers:
            try:
                reader.send(message, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                self.coalesced += 1
            except OSError:  # EPIPE, ECONNRESET: the reader is gone
                gone.append(reader)
        for reader in gone:
            self._readers.remove(reader)
            reader.close()
            self.departed += 1

    def close(self) -> None:
        """Stop listening and hang up on every reader (they see end-of-file).  Idempotent."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.close()
        for reader in self._readers:
            reader.close()
        self._readers = []


class DoorbellListener:
    """A reader's side: a descriptor that becomes readable when the writer rings.

    Use :meth:`watch` to have an event loop call back on each ring, or :meth:`fileno` with
    your own selector, and :meth:`drain` after waking.
    """

    def __init__(self, segment: str) -> None:
        self.segment: Final = segment
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(doorbell_address(segment))
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                raise ResourceError(
                    f"segment {segment} has no writer to listen to (it stopped, or never began)"
                ) from exc
            raise ResourceError(f"cannot listen to segment {segment}: {exc}") from exc
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The newest sequence a ring announced (0 before the first).
        self.announced = 0
        #: The writer closed or died: no ring will come again.
        self.writer_gone = False

    def fileno(self) -> int:
        if self._sock is None:
            raise ResourceError(f"the doorbell listener of {self.segment} is closed")
        return self._sock.fileno()

    def drain(self) -> int:
        """Read the rings queued so far; the newest sequence announced (0: none yet).

        Sets :attr:`writer_gone` when the writer hung up.
        """
        sock = self._sock
        if sock is None:
            return self.announced
        for _ in range(_DRAIN_BATCH):
            try:
                data = sock.recv(_MESSAGE.size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._hang_up()
                break
            if not data:  # end-of-file: the writer closed its end
                self._hang_up()
                break
            if len(data) == _MESSAGE.size:
                self.announced = max(self.announced, _MESSAGE.unpack(data)[0])
        return self.announced

    def _hang_up(self) -> None:
        self.writer_gone = True
        if self._loop is not None and self._sock is not None:
            # A closed peer keeps the descriptor readable: stop the loop from spinning on it.
            self._loop.remove_reader(self._sock.fileno())
            self._loop = None

    def watch(self, loop: asyncio.AbstractEventLoop, on_ring: Callable[[], None]) -> None:
        """Have ``loop`` drain the rings and call ``on_ring`` whenever the writer rings (and once
        when it hangs up, with :attr:`writer_gone` set)."""
        if self._sock is None:
            raise ResourceError(f"the doorbell listener of {self.segment} is closed")

        def rung() -> None:
            self.drain()
            on_ring()

        self._loop = loop
        loop.add_reader(self._sock.fileno(), rung)

    def close(self) -> None:
        """Hang up (the writer drops this reader at its next ring).  Idempotent."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
            self._loop = None
        sock.close()
