"""The WebRTC viewer's control and stats channel: its messages and rules, sans-I/O.

The seed's "WebRTC DataChannels" protocol layer.  The player page opens one reliable, ordered
data channel (RFC 8831 §6.1; label :data:`CHANNEL_LABEL`) in its offer; each message is one
JSON object whose ``type`` says what it is (msgspec tagged unions, as the QUIC control
stream's messages are, ``shared.auth.control``).

Browser to server:

- ``{"type": "quality", "rung": N}`` asks for rung N (0 the top), ``"rung": null`` gives the
  choice back to the bandwidth: honoured only with the token's ``can_control_quality``, and
  never above the token's ``max_quality`` (the selector's pin never passes its cap);
  answered by a ``quality`` reply saying so, or why not.
- ``{"type": "report", ...}``: the viewer's own view, about once a second: the latency it
  read off the picture's stamp (``shared.capture.stamp``) when the stream carries one, the
  decoded size and frames.  The server keeps the last one in the peer's stats.

Server to browser: ``stats`` about once a second (its rung, the rung it is switching to, the
ladder, the browser's estimate, loss and RTT, what was sent), ``notice`` for each
``broadcast_to_viewers``, ``quality`` replies and ``error`` for what cannot be parsed.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from shared.errors import ProtocolError
from shared.models import ViewerPermissions

__all__ = [
    "CHANNEL_LABEL",
    "MAX_MESSAGE_BYTES",
    "ClientMessage",
    "ErrorMessage",
    "Notice",
    "QualityReply",
    "QualityRequest",
    "RungEntry",
    "StatsMessage",
    "ViewerReport",
    "decide_quality",
    "encode",
    "parse_client",
]

CHANNEL_LABEL: Final = "kizuna"
#: A browser's message is a few hundred bytes; anything much larger is refused unparsed.
MAX_MESSAGE_BYTES: Final = 4096


class QualityRequest(msgspec.Struct, frozen=True, kw_only=True, tag="quality", tag_field="type"):
    rung: int | None = None
    """The rung wanted (0: the top); None: back to the bandwidth's choice."""


class ViewerReport(msgspec.Struct, frozen=True, kw_only=True, tag="report", tag_field="type"):
    latency_ms: float | None = None
    """Capture to display, read off the decoded picture's stamp (None: no stamp read)."""
    latency_p95_ms: float | None = None
    width: int = 0
    height: int = 0
    frames_decoded: int = 0


ClientMessage = QualityRequest | ViewerReport


class QualityReply(msgspec.Struct, frozen=True, kw_only=True, tag="quality", tag_field="type"):
    ok: bool
    rung: int | None
    reason: str = ""


class RungEntry(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    width: int
    height: int
    bitrate: int


class StatsMessage(msgspec.Struct, frozen=True, kw_only=True, tag="stats", tag_field="type"):
    rung: int
    rung_wanted: int
    pinned: int | None
    rungs: list[RungEntry]
    remb_bps: int | None
    loss: float
    rtt_ms: float | None
    frames_sent: int
    bytes_sent: int
    can_control_quality: bool


class Notice(msgspec.Struct, frozen=True, kw_only=True, tag="notice", tag_field="type"):
    text: str
    data: dict[str, Any] | None = None


class ErrorMessage(msgspec.Struct, frozen=True, kw_only=True, tag="error", tag_field="type"):
    reason: str


_decoder: Final = msgspec.json.Decoder(ClientMessage)


def parse_client(data: str | bytes) -> ClientMessage:
    """One message from the browser; :class:`ProtocolError` with the reason if it is none."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"a control message of {len(raw)} bytes is over {MAX_MESSAGE_BYTES}")
    try:
        return _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"not a control message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"control messages are JSON: {exc}") from None


def decide_quality(
    request: QualityRequest, permissions: ViewerPermissions, *, rungs: int, cap: int
) -> QualityReply:
    """Whether a viewer may have the rung it asked for: it needs ``can_control_quality``, a
    rung the stream has, and one its token's ``max_quality`` allows (``cap``: the best)."""
    rung = request.rung
    if not permissions.can_control_quality:
        return QualityReply(
            ok=False, rung=rung, reason="the token does not allow choosing the quality"
        )
    if rung is not None and not 0 <= rung < rungs:
        return QualityReply(ok=False, rung=rung, reason=f"the stream has rungs 0 to {rungs - 1}")
    if rung is not None and rung < cap:
        return QualityReply(
            ok=False, rung=rung, reason=f"the token's max_quality allows rung {cap} at best"
        )
    return QualityReply(ok=True, rung=rung)


def encode(message: QualityReply | StatsMessage | Notice | ErrorMessage) -> str:
    return msgspec.json.encode(message).decode()
