"""The viewer control stream: how a viewer presents its token, and what the server says back.

Sans-I/O: :class:`ControlParser` cuts bytes into typed messages, :func:`encode_message` makes
bytes of one; opening streams and closing connections is the shell's job.

Specification (version 1)
=========================

This section is the whole protocol; a RoQ client (draft-ietf-avtcore-rtp-over-quic) that knows
QUIC and JSON can implement it from this text.

**Stream.**  After the QUIC handshake (ALPN ``rtp-mux-quic``) the viewer opens the first
client-initiated bidirectional stream (stream id 0, RFC 9000 §2.1) and keeps it open for the
life of the connection; it is the *control stream*.  Both sides send messages on it.  The server
sends no media (no RTP in DATAGRAM frames, no RoQ unidirectional stream) before its ``welcome``
message.  Other client-initiated bidirectional streams are not used; the server may reset them.
The viewer ending the control stream (FIN) means it is leaving.

**Framing.**  Each message is a 4-byte unsigned big-endian length ``N``, then ``N`` bytes of
UTF-8 JSON text (RFC 8259): one object whose ``"type"`` member names the message.
``1 <= N <= 16384``; a larger or zero length is a protocol error.  Members a receiver does not
know are ignored; an optional member may be absent or ``null``.  Example, a 44-byte message::

    00 00 00 2c  {"type":"hello","version":1,"stream":"cam1"}   (the length in hex, then JSON)

**Viewer to server.**

``hello``  (first message, exactly once, within 5 s of the handshake)
    ``version`` (int, 1), ``stream`` (string: the stream id, the path of the ``roq://`` URL),
    ``token`` (string, optional: a viewer token, a JWT), ``viewer`` (string, optional, 1 to 64
    characters: the viewer id to use when the token names none, or to ask approval under),
    ``name`` (string, optional, up to 64 characters: shown to the operator approving).
``quality``  (after ``welcome``)
    ``id`` (int, optional: echoed in the reply), and one of ``rung`` (int: a rung index from
    ``welcome``) or ``preset`` (string: the preset a rung was made from); neither means "choose
    for me again" (the server adapts the rung to the viewer's bandwidth).
``record``  (after ``welcome``)
    ``id`` (int, optional), ``action`` (``"start"`` or ``"stop"``): record the stream on the
    server.

**Server to viewer.**

``welcome``
    Media may flow from now on.  ``version`` (int), ``viewer`` (string: this viewer's id),
    ``stream`` (string), ``permissions`` (object: ``can_view``, ``can_record``,
    ``can_control_quality`` booleans, ``max_quality`` string), ``rungs`` (array of objects
    ``{index, width, height, framerate, bitrate, preset}``: the rungs this viewer may receive,
    best first; index 0 is the stream's own quality), ``expires_at`` (number or null: the
    token's expiry, seconds since the epoch).
``pending``
    The viewer has no token and waits for an operator to approve it: ``request`` (string: the
    request id the operator sees), ``expires_in`` (number: seconds until the request lapses).
    ``welcome`` follows on approval; the connection is closed on denial or expiry.
``refused``
    Sent just before the server closes the connection: ``code`` (int: the application error
    code of the CONNECTION_CLOSE, below), ``reason`` (string: a word from the reason table),
    ``text`` (string: a sentence for a person).  The CONNECTION_CLOSE frame carries the same
    code, and ``"<reason>: <text>"`` as its reason phrase, so a client that missed the message
    still knows why.
``notice``
    A message from the operator to every viewer of the stream: ``text`` (string), ``data``
    (object, possibly empty).
``quality``, ``record``
    The reply to a request: ``id`` (the request's), ``ok`` (bool), ``rung`` (``quality``: the
    rung now chosen, null for adaptive), ``action`` (``record``), ``reason`` and ``text`` (when
    ``ok`` is false).

**Closing.**  A refused or cut viewer gets CONNECTION_CLOSE (RFC 9000 §19.19, type 0x1d) with
one of these application error codes (chosen above the RoQ draft's registry, 0x00-0x07):

========  ==================  ================================================================
0x4B5A01  UNAUTHORIZED        no token (and approval not offered), or malformed or forged
0x4B5A02  FORBIDDEN           a valid token that does not allow this (``can_view`` false, other
                              stream, no rung within ``max_quality``)
0x4B5A03  EXPIRED             the token has expired
0x4B5A04  REVOKED             the token or the viewer was revoked (also cuts a live viewer)
0x4B5A05  PROTOCOL_ERROR      the control stream broke these rules
0x4B5A06  HELLO_TIMEOUT       no ``hello`` within 5 s
0x4B5A07  DENIED              the operator denied the approval request
0x4B5A08  APPROVAL_EXPIRED    nobody approved the request in time (60 s)
0x4B5A09  TOO_MANY            too many viewers waiting for approval
0x4B5A0A  UNKNOWN_STREAM      this server has no stream of that id
========  ==================  ================================================================

Reasons (``refused.reason``, the phrase's first word, and ``reason`` in replies): ``missing``,
``malformed``, ``forged``, ``expired``, ``wrong_stream``, ``revoked``, ``not_permitted``,
``quality_cap``, ``unknown_stream``, ``protocol``, ``version``, ``hello_timeout``, ``denied``,
``approval_expired``, ``too_many``; in ``quality``/``record`` replies also ``above_max_quality``,
``unknown_rung``, ``bad_request``, ``not_admitted``, ``failed``.

**Secrets.**  The token is a bearer credential: a client sends it only over the QUIC connection
(TLS 1.3) to a server whose certificate it has verified or pinned, and never puts it in a URL.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from enum import IntEnum
from typing import Annotated, Any, Final, Generic, Literal, NoReturn, Protocol, TypeVar

import msgspec

from shared.errors import ConfigError, ProtocolError
from shared.models import QualityPreset

__all__ = [
    "LENGTH_PREFIX",
    "MAX_MESSAGE_SIZE",
    "PROTOCOL_VERSION",
    "AccessErrorCode",
    "ClientMessage",
    "ControlParser",
    "Hello",
    "Notice",
    "Pending",
    "PermissionsInfo",
    "QualityReply",
    "QualityRequest",
    "Reason",
    "RecordReply",
    "RecordRequest",
    "Refused",
    "RungInfo",
    "ServerMessage",
    "Welcome",
    "client_message_parser",
    "encode_message",
    "notice",
    "server_message_parser",
]

PROTOCOL_VERSION: Final = 1
#: Bytes of the big-endian length before each message.
LENGTH_PREFIX: Final = 4
#: Largest message (the JSON text) either side accepts.
MAX_MESSAGE_SIZE: Final = 16 * 1024
#: Longest ``text`` a notice or refusal carries.
MAX_TEXT: Final = 1024


class AccessErrorCode(IntEnum):
    """Application error codes of CONNECTION_CLOSE when a viewer is refused or cut (module doc).

    ``0x4B5A`` is "KZ": far from the RoQ draft's registry (``RoqErrorCode``, 0x00-0x07), which
    shares this ALPN's code space and may grow.
    """

    UNAUTHORIZED = 0x4B5A01
    FORBIDDEN = 0x4B5A02
    EXPIRED = 0x4B5A03
    REVOKED = 0x4B5A04
    PROTOCOL_ERROR = 0x4B5A05
    HELLO_TIMEOUT = 0x4B5A06
    DENIED = 0x4B5A07
    APPROVAL_EXPIRED = 0x4B5A08
    TOO_MANY = 0x4B5A09
    UNKNOWN_STREAM = 0x4B5A0A


class Reason(enum.StrEnum):
    """The machine-readable words of refusals and refused requests (module doc)."""

    # A token's, as AuthReason spells them.
    MISSING = "missing"
    MALFORMED = "malformed"
    FORGED = "forged"
    EXPIRED = "expired"
    WRONG_STREAM = "wrong_stream"
    REVOKED = "revoked"
    # The connection's.
    NOT_PERMITTED = "not_permitted"
    QUALITY_CAP = "quality_cap"
    UNKNOWN_STREAM = "unknown_stream"
    PROTOCOL = "protocol"
    VERSION = "version"
    HELLO_TIMEOUT = "hello_timeout"
    DENIED = "denied"
    APPROVAL_EXPIRED = "approval_expired"
    TOO_MANY = "too_many"
    # A request's.
    ABOVE_MAX_QUALITY = "above_max_quality"
    UNKNOWN_RUNG = "unknown_rung"
    BAD_REQUEST = "bad_request"
    NOT_ADMITTED = "not_admitted"
    FAILED = "failed"


_Id = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
_ViewerId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]


class _Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type"):
    """Base of every control message: JSON objects told apart by their ``type`` member."""


# --- viewer to server -------------------------------------------------------------------------


class Hello(_Message, tag="hello", frozen=True):
    version: Annotated[int, msgspec.Meta(ge=0, le=2**31)]
    stream: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    #: A JWT (``shared.auth.tokens``); at most 4096 characters.
    token: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    viewer: _ViewerId | None = None
    name: Annotated[str, msgspec.Meta(max_length=64)] | None = None

    def __repr__(self) -> str:
        # The token is a credential: a repr ends up in logs and tracebacks.
        token = "None" if self.token is None else "<redacted>"
        return (
            f"Hello(version={self.version}, stream={self.stream!r}, token={token}, "
            f"viewer={self.viewer!r}, name={self.name!r})"
        )


class QualityRequest(_Message, tag="quality", frozen=True):
    id: _Id | None = None
    rung: Annotated[int, msgspec.Meta(ge=0, le=255)] | None = None
    preset: Annotated[str, msgspec.Meta(max_length=16)] | None = None


class RecordRequest(_Message, tag="record", frozen=True):
    action: Literal["start", "stop"]
    id: _Id | None = None


ClientMessage = Hello | QualityRequest | RecordRequest


# --- server to viewer -------------------------------------------------------------------------


class PermissionsInfo(msgspec.Struct, frozen=True, kw_only=True):
    """``ViewerPermissions`` as the welcome message spells it."""

    can_view: bool
    can_record: bool
    can_control_quality: bool
    max_quality: str


class _RungLike(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def framerate(self) -> int: ...
    @property
    def bitrate(self) -> int: ...
    @property
    def preset(self) -> QualityPreset: ...


class RungInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One rung of the stream's ladder, as a viewer is told of it."""

    index: int
    width: int
    height: int
    framerate: int
    bitrate: int
    #: The preset the rung was planned from (``custom`` for a rung 0 made without one).
    preset: str

    @classmethod
    def of(cls, rung: _RungLike) -> RungInfo:
        """From a :class:`shared.media.scaler.Rung` (taken by shape: no import of PyAV here)."""
        return cls(
            index=rung.index,
            width=rung.width,
            height=rung.height,
            framerate=rung.framerate,
            bitrate=rung.bitrate,
            preset=str(rung.preset),
        )


class Welcome(_Message, tag="welcome", frozen=True):
    version: int
    viewer: str
    stream: str
    permissions: PermissionsInfo
    rungs: tuple[RungInfo, ...]
    expires_at: float | None = None


class Pending(_Message, tag="pending", frozen=True):
    request: str
    expires_in: float


class Refused(_Message, tag="refused", frozen=True):
    code: int
    reason: str
    text: _Text = ""


class Notice(_Message, tag="notice", frozen=True):
    text: _Text
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class QualityReply(_Message, tag="quality", frozen=True):
    ok: bool
    id: _Id | None = None
    rung: int | None = None
    reason: str | None = None
    text: _Text | None = None


class RecordReply(_Message, tag="record", frozen=True):
    ok: bool
    action: str
    id: _Id | None = None
    reason: str | None = None
    text: _Text | None = None


ServerMessage = Welcome | Pending | Refused | Notice | QualityReply | RecordReply

M = TypeVar("M")


def encode_message(message: ClientMessage | ServerMessage) -> bytes:
    """One framed message: its length (4 bytes, big-endian), then its JSON."""
    payload = msgspec.json.encode(message)
    if len(payload) > MAX_MESSAGE_SIZE:
        raise ConfigError(
            f"a {type(message).__name__} message of {len(payload)} bytes is over the "
            f"control stream's {MAX_MESSAGE_SIZE}-byte limit"
        )
    return len(payload).to_bytes(LENGTH_PREFIX, "big") + payload


class ControlParser(Generic[M]):
    """Cuts one direction of the control stream into messages, however its bytes arrive.

    Feed the stream's bytes in order; each complete message comes back typed.  Anything that
    breaks the framing or the message rules raises :class:`ProtocolError` (whose message
    quotes nothing the peer sent: the peer's bytes may hold a token); the parser is then
    failed and raises again on any further input, so the caller closes the connection with
    ``PROTOCOL_ERROR``.  At most one message's worth of bytes (4 + 16384) is ever buffered:
    an oversize length is refused as soon as its 4 bytes arrive.
    """

    def __init__(self, decoder: msgspec.json.Decoder[M], *, peer: str) -> None:
        self._decoder = decoder
        self._peer = peer
        self._buffer = bytearray()
        self._size = 0  # of the message being read, once its length has arrived
        self._messages = 0
        self._error: str | None = None
        self._ended = False

    @property
    def buffered(self) -> int:
        """Bytes held for a message not yet complete."""
        return len(self._buffer)

    @property
    def ended(self) -> bool:
        return self._ended

    def feed(self, data: bytes, *, end_stream: bool = False) -> list[M]:
        if self._error is not None:
            raise ProtocolError(self._error)
        if self._ended and (data or end_stream):
            self._fail("data after the end of the control stream")
        messages: list[M] = []
        view = memoryview(data)
        while view:
            if len(self._buffer) < LENGTH_PREFIX:
                take = min(LENGTH_PREFIX - len(self._buffer), len(view))
                self._buffer += view[:take]
                view = view[take:]
                if len(self._buffer) < LENGTH_PREFIX:
                    break
                self._size = int.from_bytes(self._buffer, "big")
                if not 0 < self._size <= MAX_MESSAGE_SIZE:
                    self._fail(
                        f"message {self._messages + 1} claims {self._size} bytes; "
                        f"a message is 1 to {MAX_MESSAGE_SIZE} bytes"
                    )
            missing = LENGTH_PREFIX + self._size - len(self._buffer)
            self._buffer += view[:missing]
            view = view[missing:]
            if len(self._buffer) == LENGTH_PREFIX + self._size:
                messages.append(self._decode(bytes(self._buffer[LENGTH_PREFIX:])))
                self._buffer.clear()
        if end_stream:
            if self._buffer:
                self._fail("the control stream ended inside a message")
            self._ended = True
        return messages

    def _decode(self, payload: bytes) -> M:
        self._messages += 1
        try:
            return self._decoder.decode(payload)
        except msgspec.ValidationError as exc:  # a subclass of DecodeError: first
            self._fail(f"message {self._messages} {_problem(str(exc), self._peer)}")
        except msgspec.DecodeError:
            self._fail(f"message {self._messages} is not JSON")

    def _fail(self, message: str) -> NoReturn:
        self._buffer.clear()  # nothing more is read: drop what is held
        self._error = f"control stream: {message}"
        raise ProtocolError(self._error)


def _problem(text: str, peer: str) -> str:
    """msgspec's complaint, without the values it quotes (``Invalid value 'x'``)."""
    if text.startswith("Expected `object`"):
        return "is not a JSON object"
    if text == "Object missing required field `type`" or text.endswith("`$.type`"):
        return f"is not a message type a {peer} sends"
    if text.startswith("Object missing required field"):
        return "lacks " + text.removeprefix("Object missing required ")
    path = text.rpartition(" - at ")[2]
    return f"has a bad value at {path}" if path != text else "is not a valid message"


_CLIENT_DECODER: Final = msgspec.json.Decoder(ClientMessage)
_SERVER_DECODER: Final = msgspec.json.Decoder(ServerMessage)


def client_message_parser() -> ControlParser[ClientMessage]:
    """The server's parser: the messages a viewer sends."""
    return ControlParser(_CLIENT_DECODER, peer="viewer")


def server_message_parser() -> ControlParser[ServerMessage]:
    """The viewer's parser: the messages a server sends."""
    return ControlParser(_SERVER_DECODER, peer="server")


def notice(text: str, data: Mapping[str, Any] | None = None) -> Notice:
    """A notice to broadcast, checked to fit one message."""
    if len(text) > MAX_TEXT:
        raise ConfigError(f"a notice's text is at most {MAX_TEXT} characters")
    message = Notice(text=text, data=dict(data or {}))
    try:
        encode_message(message)  # raises ConfigError when text and data together are too big
    except TypeError as exc:
        raise ConfigError(f"a notice's data must be plain JSON values: {exc}") from None
    return message
