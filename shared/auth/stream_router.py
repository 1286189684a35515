"""Which stream a connection on a shared port wants, from its hello, sans-I/O.

Several streams may listen on one UDP port (``serve --config`` with one ``listen`` for
several ``[[streams]]``).  QUIC encrypts everything a router in front of the socket could
read (RFC 9001 §5: even the ClientHello is in protected Initial packets, and the stream id is
not in it), so the process that owns the socket terminates every connection itself and only
then learns where it goes: from the viewer's ``hello`` on the control stream
(:mod:`shared.auth.control`), whose ``stream`` member every viewer sends, with a token or
without, before any media flows.  A token's ``stream`` claim must match that member anyway
(the stream's own admission checks it), so routing on the hello routes token viewers by their
claim too.

Theory of operation.  One :class:`StreamRouter` per shared port.  The shell calls
:meth:`~StreamRouter.connect` for each new connection, feeds its control-stream bytes to
:meth:`~StreamRouter.receive` until that returns a decision, and calls
:meth:`~StreamRouter.handle_timer` at :meth:`~StreamRouter.next_deadline`.  The decision is
either :class:`Route` (hand the connection to that stream, with every control byte received
so far, which that stream's own admission parses again from the start) or :class:`Refuse`
(write ``message`` on the control stream, then close with ``code`` and ``reason``): an
unknown stream (``UNKNOWN_STREAM``), a control stream that breaks the protocol or ends before
its hello (``PROTOCOL_ERROR``), or no hello in time (``HELLO_TIMEOUT``).  Nothing here does
I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Final, TypeVar

import msgspec

from shared.auth.control import (
    LENGTH_PREFIX,
    MAX_MESSAGE_SIZE,
    MAX_TEXT,
    AccessErrorCode,
    ClientMessage,
    ControlParser,
    Hello,
    Reason,
    Refused,
    client_message_parser,
    encode_message,
)
from shared.errors import ConfigError, ProtocolError

__all__ = ["Refuse", "Route", "StreamRouter"]

_D = TypeVar("_D", "Route", "Refuse")

#: QUIC puts the reason phrase in one packet with the close frame: keep it short.
MAX_CLOSE_REASON: Final = 200


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """Hand the connection to ``stream``; ``control`` is every control byte it sent so far."""

    stream: str
    control: bytes
    end_stream: bool = False


class Refuse(msgspec.Struct, frozen=True, kw_only=True):
    """Write ``message`` on the control stream (if the viewer opened it), then close."""

    code: int
    reason: str
    text: str
    #: Whether the viewer opened its control stream (RFC 9000 §2.1: stream 0 is the client's
    #: to open, so a server can write on it only after the viewer did): the close says why
    #: either way.
    write: bool = True

    @property
    def message(self) -> bytes:
        return encode_message(Refused(code=self.code, reason=self.reason, text=self.text))

    @property
    def close_reason(self) -> str:
        """The CONNECTION_CLOSE reason phrase: ``"<reason>: <text>"`` (the control protocol's)."""
        return f"{self.reason}: {self.text}"[:MAX_CLOSE_REASON]


class _Waiting:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.parser: ControlParser[ClientMessage] = client_message_parser()
        self.received = bytearray()


class StreamRouter:
    """The connections of one shared port that have not said which stream they want yet."""

    def __init__(self, *, hello_timeout_s: float = 5.0) -> None:
        if not 0 < hello_timeout_s <= 60:
            raise ConfigError(f"hello timeout {hello_timeout_s} s must be in (0, 60]")
        self.hello_timeout_s = hello_timeout_s
        #: The streams this port carries now (the shell adds and removes them).
        self.streams: set[str] = set()
        self._waiting: dict[Hashable, _Waiting] = {}
        #: Connections refused here, by reason word (stats).
        self.refusals: dict[str, int] = {}

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def connect(self, connection: Hashable, now: float) -> None:
        """A new connection: its hello is due within the timeout."""
        self._waiting[connection] = _Waiting(now + self.hello_timeout_s)

    def forget(self, connection: Hashable) -> None:
        """The connection closed before a decision (or the shell is done with it)."""
        self._waiting.pop(connection, None)

    def receive(self, connection: Hashable, data: bytes, end_stream: bool) -> Route | Refuse | None:
        """Control-stream bytes of a waiting connection: the decision once its hello is in
        (None: not yet, or the connection is not waiting here)."""
        waiting = self._waiting.get(connection)
        if waiting is None:
            return None
        # The parser holds at most one message; this copy at most the hello and what came
        # with it, bounded the same way.
        if len(waiting.received) + len(data) > 2 * (LENGTH_PREFIX + MAX_MESSAGE_SIZE):
            return self._decide(connection, self._protocol("the hello is too long"))
        waiting.received += data
        try:
            messages = waiting.parser.feed(data, end_stream=end_stream)
        except ProtocolError as exc:
            return self._decide(connection, self._protocol(str(exc)))
        if messages:
            first = messages[0]
            if not isinstance(first, Hello):
                return self._decide(connection, self._protocol("the first message must be hello"))
            if first.stream not in self.streams:
                # Which streams it does carry is not said: anyone can ask, token or not.
                return self._decide(
                    connection,
                    Refuse(
                        code=int(AccessErrorCode.UNKNOWN_STREAM),
                        reason=str(Reason.UNKNOWN_STREAM),
                        text=f"this port carries no stream {first.stream!r}"[:MAX_TEXT],
                    ),
                )
            return self._decide(
                connection,
                Route(stream=first.stream, control=bytes(waiting.received), end_stream=end_stream),
            )
        if end_stream:
            return self._decide(connection, self._protocol("the control stream ended before hello"))
        return None

    def next_deadline(self) -> float | None:
        return min((w.deadline for w in self._waiting.values()), default=None)

    def handle_timer(self, now: float) -> list[tuple[Hashable, Refuse]]:
        """The connections whose hello is overdue, each with its refusal."""
        late = [(c, bool(w.received)) for c, w in self._waiting.items() if w.deadline <= now]
        text = f"no hello within {self.hello_timeout_s:g} s"
        return [
            (
                connection,
                self._decide(
                    connection,
                    Refuse(
                        code=int(AccessErrorCode.HELLO_TIMEOUT),
                        reason=str(Reason.HELLO_TIMEOUT),
                        text=text,
                        write=opened,
                    ),
                ),
            )
            for connection, opened in late
        ]

    def _protocol(self, text: str) -> Refuse:
        return Refuse(
            code=int(AccessErrorCode.PROTOCOL_ERROR),
            reason=str(Reason.PROTOCOL),
            text=f"control stream: {text}"[:MAX_TEXT],
        )

    def _decide(self, connection: Hashable, decision: _D) -> _D:
        del self._waiting[connection]
        if isinstance(decision, Refuse):
            self.refusals[decision.reason] = self.refusals.get(decision.reason, 0) + 1
        return decision
