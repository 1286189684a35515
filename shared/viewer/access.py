"""The viewer's end of the control stream, sans-I/O: the hello it sends, what the server says.

:mod:`shared.auth.control` specifies the protocol; this is the client's half of it, shared by
the real viewer (:mod:`shared.viewer.client`) and the light one (:mod:`shared.viewer.light`).
:class:`ViewerAccess` makes the ``hello`` (with the token) that opens each connection's control
stream, cuts the server's bytes into messages and keeps what they say: the ``welcome`` (this
viewer's id, permissions and rungs), a ``pending`` approval request, a ``refused`` verdict, the
latest notices, the replies to quality and recording requests.  It reads no clock and touches
no socket; its shells write :meth:`~ViewerAccess.hello` on the control stream and feed
:meth:`~ViewerAccess.receive` what comes back.

Media never waits for any of it: a server older than the control stream (or one in open mode)
may never answer, and the viewer receives media exactly as before (state ``unanswered``).

Why a viewer was refused is said in the server's own words: the ``refused`` message's
``"<reason>: <text>"`` when it arrived, else the reason phrase of the CONNECTION_CLOSE when its
code is an :class:`~shared.auth.control.AccessErrorCode` (the spec makes the two the same).

The token is a bearer credential (``shared.auth.control``, "Secrets"): it is written only into
the hello's bytes, and never into a repr, a message or an error raised here.
"""

from __future__ import annotations

import collections
import enum
import logging
from typing import Final, Literal

from shared.auth.control import (
    PROTOCOL_VERSION,
    AccessErrorCode,
    Hello,
    Notice,
    Pending,
    QualityReply,
    QualityRequest,
    RecordReply,
    RecordRequest,
    Refused,
    ServerMessage,
    Welcome,
    encode_message,
    server_message_parser,
)
from shared.errors import ConfigError, ProtocolError

__all__ = ["MAX_NOTICES", "AccessState", "ViewerAccess", "refusal_reason"]

logger = logging.getLogger(__name__)

#: Notices a viewer keeps (the newest); older ones are only counted.
MAX_NOTICES: Final = 32
#: Limits of the hello's fields (``shared.auth.control``: the server refuses longer ones).
MAX_STREAM_ID, MAX_VIEWER_ID, MAX_NAME, MAX_TOKEN = 128, 64, 64, 4096

_ACCESS_CODES: Final = frozenset(int(code) for code in AccessErrorCode)


class AccessState(enum.StrEnum):
    """What the server has said about this viewer on the current connection."""

    #: The hello is sent and nothing came back (yet, or ever: an older server).
    UNANSWERED = "unanswered"
    #: Waiting for an operator's approval (:attr:`ViewerAccess.pending`).
    PENDING = "pending"
    #: Welcomed: media flows (:attr:`ViewerAccess.welcome`).
    ADMITTED = "admitted"
    #: Refused (:attr:`ViewerAccess.refusal`); the server closes the connection.
    REFUSED = "refused"


def refusal_reason(refusal: Refused | None, termination: tuple[int, str] | None) -> str | None:
    """Why the server refused or cut this viewer, in its own words, or None if it did not.

    The ``refused`` message's ``"<reason>: <text>"`` (the text can be longer than the close
    frame's phrase, which QUIC keeps short); failing that, the CONNECTION_CLOSE reason phrase
    when the code is an access error code (the spec gives it the same form).
    """
    if refusal is not None:
        return f"{refusal.reason}: {refusal.text}" if refusal.text else refusal.reason
    if termination is not None and termination[0] in _ACCESS_CODES:
        code, phrase = termination
        return phrase or f"{AccessErrorCode(code).name.lower()} (0x{code:x})"
    return None


def _check(field: str, value: str | None, longest: int, *, spaces: bool = True) -> None:
    if value is None:
        return
    if not (0 < len(value) <= longest and value.isprintable() and (spaces or " " not in value)):
        rule = "" if spaces else " without spaces"
        raise ConfigError(f"the {field} must be 1 to {longest} printable characters{rule}")


class ViewerAccess:
    """One viewer's control-stream state across its connections (module doc)."""

    def __init__(
        self,
        *,
        stream: str,
        token: str | None = None,
        viewer: str | None = None,
        name: str | None = None,
        max_notices: int = MAX_NOTICES,
    ) -> None:
        """``stream``: the stream id (the URL's path); ``token``: the viewer token, if any;
        ``viewer``: the viewer id to ask for (the URL's ``viewer``); ``name``: shown to the
        operator when this viewer asks for approval.  Checked here, before any connection,
        against the limits the server enforces."""
        if not stream:
            raise ConfigError("the stream URL names no stream (roq://HOST:PORT/STREAM)")
        _check("stream id", stream, MAX_STREAM_ID, spaces=False)
        _check("viewer id", viewer, MAX_VIEWER_ID)
        _check("name", name, MAX_NAME)
        if token is not None and not 0 < len(token) <= MAX_TOKEN:
            # The length only: the token itself is never quoted.
            raise ConfigError(
                f"the token is {len(token)} characters long; a token is 1 to {MAX_TOKEN}"
            )
        self.stream = stream
        self._token = token
        self.viewer = viewer
        self.name = name
        self._parser = server_message_parser()
        self._next_id = 0
        self.state = AccessState.UNANSWERED
        self.welcome: Welcome | None = None
        self.pending: Pending | None = None
        self.refusal: Refused | None = None
        #: The newest notices, oldest first; :attr:`notices_received` counts them all.
        self.notices: collections.deque[Notice] = collections.deque(maxlen=max_notices)
        self.notices_received = 0
        self.quality: QualityReply | None = None
        self.record: RecordReply | None = None
        #: Why the server's side of the control stream was given up on (it broke the framing
        #: or sent a message no server sends): media goes on, control messages are ignored.
        self.control_error: str | None = None
        #: Whether this connection's control stream has ended (the server sent FIN).
        self.ended = False

    def __repr__(self) -> str:
        # Never the token: a repr ends up in logs and tracebacks.
        token = "None" if self._token is None else "<redacted>"
        return (
            f"ViewerAccess(stream={self.stream!r}, token={token}, viewer={self.viewer!r}, "
            f"state={self.state.value})"
        )

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def hello(self) -> bytes:
        """The first message of a connection's control stream (which writing it opens)."""
        return encode_message(
            Hello(
                version=PROTOCOL_VERSION,
                stream=self.stream,
                token=self._token,
                viewer=self.viewer,
                name=self.name,
            )
        )

    def new_connection(self) -> None:
        """A new QUIC connection, so a new control stream: its hello comes next, and whatever
        the last connection was told no longer holds (the notices are kept)."""
        self._parser = server_message_parser()
        self.state = AccessState.UNANSWERED
        self.welcome = self.pending = self.refusal = None
        self.control_error = None
        self.ended = False

    def receive(self, data: bytes, *, end_stream: bool = False) -> list[ServerMessage]:
        """The server's control-stream bytes, in order: the messages they complete."""
        if self.control_error is not None:
            return []
        try:
            messages = self._parser.feed(data, end_stream=end_stream)
        except ProtocolError as exc:
            # The server is broken, not this viewer: keep watching, stop listening to it.
            self.control_error = str(exc)
            logger.warning("ignoring the server's control stream from now on: %s", exc)
            return []
        self.ended = self._parser.ended
        for message in messages:
            self._note(message)
        return messages

    def quality_request(
        self, *, rung: int | None = None, preset: str | None = None
    ) -> tuple[int, bytes]:
        """A ``quality`` request (``rung`` or ``preset``; neither: back to adaptive) and the id
        its reply will carry."""
        if rung is not None and preset is not None:
            raise ConfigError("ask for a rung or a preset, not both")
        if rung is not None and not 0 <= rung <= 255:
            raise ConfigError(f"rung {rung} is not a rung index (0 to 255)")
        if preset is not None and not 0 < len(preset) <= 16:
            raise ConfigError("a preset name is 1 to 16 characters")
        request_id = self._new_id()
        return request_id, encode_message(QualityRequest(id=request_id, rung=rung, preset=preset))

    def record_request(self, action: Literal["start", "stop"]) -> tuple[int, bytes]:
        """A ``record`` request (recording on the server) and the id its reply will carry."""
        if action not in ("start", "stop"):
            raise ConfigError(f"a recording request is start or stop, not {action!r}")
        request_id = self._new_id()
        return request_id, encode_message(RecordRequest(id=request_id, action=action))

    def refusal_reason(self, termination: tuple[int, str] | None) -> str | None:
        """Why the server refused this viewer, in its words (:func:`refusal_reason`)."""
        return refusal_reason(self.refusal, termination)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _note(self, message: ServerMessage) -> None:
        if isinstance(message, Welcome):
            self.state, self.welcome, self.pending = AccessState.ADMITTED, message, None
        elif isinstance(message, Pending):
            self.state, self.pending = AccessState.PENDING, message
        elif isinstance(message, Refused):
            self.state, self.refusal = AccessState.REFUSED, message
        elif isinstance(message, Notice):
            self.notices.append(message)
            self.notices_received += 1
        elif isinstance(message, QualityReply):
            self.quality = message
        else:
            self.record = message
