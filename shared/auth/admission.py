"""Admission of one viewer connection, sans-I/O: whether, and from when, media may flow to it.

Theory of operation.  One :class:`ViewerAdmission` per QUIC connection, made when the handshake
completes.  The shell feeds it the control stream's bytes (:meth:`~ViewerAdmission.receive`),
calls :meth:`~ViewerAdmission.handle_timer` at :meth:`~ViewerAdmission.next_deadline`, passes on
the operator's decisions (:meth:`~ViewerAdmission.approve`, :meth:`~ViewerAdmission.deny`) and
revocations (:meth:`~ViewerAdmission.recheck`), and carries out the actions each call returns,
in order (as aioquic's and h11's events, nothing here does I/O or reads a clock):

- :class:`SendControl`: write ``action.data`` on the control stream;
- :class:`AdmitViewer`: the viewer may now get media (only after this, and only the rungs named);
- :class:`SelectRung`, :class:`RecordCommand`: a permitted request to carry out;
- :class:`RequestApproval`, :class:`WithdrawApproval`: add to or drop from the operator's
  :class:`~shared.auth.pending.PendingRequests` (the supervisor's);
- :class:`CloseConnection`: flush the control stream, then close the connection with
  ``action.code`` and ``action.reason`` at once (a cut must land within 1 s).

States (``shared.auth.control`` specifies the messages)::

    state              input                                   next              actions
    awaiting_hello     hello with a token the verifier accepts admitted          welcome, admit
                       hello without token (approvals allowed)  pending_approval  request, pending
                       hello refused; another message; bad bytes closed          refused, close
                       hello_timeout_s passes                  closed            refused, close
    pending_approval   approve (not revoked, can view)         admitted          welcome, admit
                       deny; approval_timeout_s passes; revoked closed           refused, close
    admitted           quality / record request                admitted          reply (+ command)
                       recheck finds the token or viewer revoked closed          refused, close
    any but closed     the viewer ends the control stream      closed            close
    closed             anything                                closed            none

A token is checked when presented; an admitted connection outlives the token's ``exp`` (as in
LiveKit), and revocation is how a live viewer is cut.  Permissions are enforced on every request:
``can_view`` at admission, ``max_quality`` caps the rungs offered and chosen,
``can_control_quality`` gates quality requests and ``can_record`` recording requests, and each
refusal says why.
"""

from __future__ import annotations

import enum
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Literal

import msgspec

from shared.auth.control import (
    MAX_TEXT,
    PROTOCOL_VERSION,
    AccessErrorCode,
    ClientMessage,
    Hello,
    Notice,
    Pending,
    PermissionsInfo,
    QualityReply,
    QualityRequest,
    Reason,
    RecordReply,
    RecordRequest,
    Refused,
    RungInfo,
    ServerMessage,
    Welcome,
    client_message_parser,
    encode_message,
)
from shared.auth.pending import Approval, Denial, PeerIdentity, PendingRequest
from shared.auth.tokens import TokenVerifier, ViewerGrant
from shared.errors import (
    AuthError,
    AuthReason,
    ConfigError,
    ProtocolError,
    StreamStateError,
)
from shared.models import QualityPreset, StreamQuality, check_access_timeouts
from shared.roq.framing import RoqErrorCode

__all__ = [
    "Action",
    "AdmissionPolicy",
    "AdmissionState",
    "AdmitViewer",
    "CloseConnection",
    "RecordCommand",
    "RequestApproval",
    "SelectRung",
    "SendControl",
    "ViewerAdmission",
    "WithdrawApproval",
    "allowed_rungs",
    "rung_within",
]

logger = logging.getLogger(__name__)

#: QUIC puts the reason phrase in one packet with the close frame: keep it short.
MAX_CLOSE_REASON: Final = 200

_RANK: Final = {
    QualityPreset.LOW: 0,
    QualityPreset.MEDIUM: 1,
    QualityPreset.HIGH: 2,
    QualityPreset.ULTRA: 3,
}

#: The close code of each token refusal.
_CODE_OF: Final = {
    AuthReason.MISSING: AccessErrorCode.UNAUTHORIZED,
    AuthReason.MALFORMED: AccessErrorCode.UNAUTHORIZED,
    AuthReason.FORGED: AccessErrorCode.UNAUTHORIZED,
    AuthReason.EXPIRED: AccessErrorCode.EXPIRED,
    AuthReason.WRONG_STREAM: AccessErrorCode.FORBIDDEN,
    AuthReason.REVOKED: AccessErrorCode.REVOKED,
}


class AdmissionState(enum.StrEnum):
    AWAITING_HELLO = "awaiting_hello"
    PENDING_APPROVAL = "pending_approval"
    ADMITTED = "admitted"
    CLOSED = "closed"


_TRANSITIONS: Final[dict[AdmissionState, frozenset[AdmissionState]]] = {
    AdmissionState.AWAITING_HELLO: frozenset(
        {AdmissionState.PENDING_APPROVAL, AdmissionState.ADMITTED, AdmissionState.CLOSED}
    ),
    AdmissionState.PENDING_APPROVAL: frozenset({AdmissionState.ADMITTED, AdmissionState.CLOSED}),
    AdmissionState.ADMITTED: frozenset({AdmissionState.CLOSED}),
    AdmissionState.CLOSED: frozenset(),
}


class AdmissionPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How long a connection may take, and whether viewers without a token may ask."""

    #: A connection that sends no hello within this long after its handshake is closed.
    hello_timeout_s: float = 5.0
    #: An approval request nobody answers within this long lapses (the connection is closed).
    approval_timeout_s: float = 60.0
    #: False: a hello without a token is refused (``missing``) instead of waiting for approval.
    allow_approval_requests: bool = True

    def __post_init__(self) -> None:
        check_access_timeouts(self.hello_timeout_s, self.approval_timeout_s)


# --- actions ----------------------------------------------------------------------------------


class Action(msgspec.Struct, frozen=True, kw_only=True):
    """Something the shell must do (module doc)."""


class SendControl(Action, frozen=True):
    message: ServerMessage

    @property
    def data(self) -> bytes:
        """The framed bytes to write on the control stream."""
        return encode_message(self.message)


class CloseConnection(Action, frozen=True):
    #: An ``AccessErrorCode``, or ``RoqErrorCode.ROQ_NO_ERROR`` when the viewer left.
    code: int
    #: The reason phrase: ``"<reason>: <text>"``.
    reason: str


class AdmitViewer(Action, frozen=True):
    #: Its ``viewer`` is always set: the token's, the one the viewer asked for, or a new one.
    grant: ViewerGrant
    #: The rung indexes it may receive (within ``max_quality``), best first.
    rungs: tuple[int, ...]


class SelectRung(Action, frozen=True):
    #: The rung the viewer asked for; None: back to choosing by bandwidth.
    rung: int | None


class RecordCommand(Action, frozen=True):
    """A permitted recording request; answer it with :meth:`ViewerAdmission.recording_done`."""

    action: Literal["start", "stop"]
    request_id: int | None = None


class RequestApproval(Action, frozen=True):
    request: PendingRequest


class WithdrawApproval(Action, frozen=True):
    request_id: str


# --- rungs ------------------------------------------------------------------------------------


def _preset(name: str) -> QualityPreset | None:
    try:
        return QualityPreset(name)
    except ValueError:
        return None


def rung_within(rung: RungInfo, cap: QualityPreset) -> bool:
    """Whether ``rung`` is no better than the preset ``cap`` (a viewer's ``max_quality``).

    A rung planned from a preset is compared by preset (the planner never makes it better than
    its preset, and a wide source's 480p rung is still "low"); a custom rung by its height and
    frame rate against the preset's.
    """
    if cap not in _RANK:
        return False
    named = _preset(rung.preset)
    if named is not None and named in _RANK:
        return _RANK[named] <= _RANK[cap]
    reference = StreamQuality.from_preset(cap)
    return rung.height <= reference.resolution.height and rung.framerate <= reference.framerate


def allowed_rungs(rungs: Sequence[RungInfo], cap: QualityPreset) -> tuple[RungInfo, ...]:
    """The rungs a viewer capped at ``cap`` may receive, best (lowest index) first."""
    return tuple(sorted((r for r in rungs if rung_within(r, cap)), key=lambda r: r.index))


def _new_id() -> str:
    # 48 random bits: ids of requests waiting at once (tens) never collide in practice.
    return secrets.token_hex(6)


# --- one connection ---------------------------------------------------------------------------


class ViewerAdmission:
    """The admission state machine of one viewer connection (module doc)."""

    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        streams: Mapping[str, Sequence[RungInfo]],
        peer: PeerIdentity,
        now: float,
        policy: AdmissionPolicy | None = None,
        new_id: Callable[[], str] = _new_id,
    ) -> None:
        """``streams``: the streams this endpoint serves and their rungs, read on every hello
        and request (the shell may update it); ``now``: when the handshake completed."""
        self._verifier = verifier
        self._streams = streams
        self.peer = peer
        self.policy = policy or AdmissionPolicy()
        self._new_id = new_id
        self._parser = client_message_parser()
        self._state = AdmissionState.AWAITING_HELLO
        self._deadline: float | None = now + self.policy.hello_timeout_s
        self._stream: str | None = None
        self._grant: ViewerGrant | None = None
        self._request: PendingRequest | None = None
        self._rung: int | None = None
        self._wall_now = now
        #: Why the connection was closed (the reason word), once it is.
        self.close_reason: str | None = None

    # -- what the shell reads

    @property
    def state(self) -> AdmissionState:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is AdmissionState.CLOSED

    @property
    def media_allowed(self) -> bool:
        """The one check the shell makes before sending this connection any media packet."""
        return self._state is AdmissionState.ADMITTED

    @property
    def grant(self) -> ViewerGrant | None:
        """The admitted viewer's grant (its ``viewer`` set); None until admitted."""
        return self._grant

    @property
    def stream(self) -> str | None:
        return self._stream

    @property
    def pending_request(self) -> PendingRequest | None:
        return self._request if self._state is AdmissionState.PENDING_APPROVAL else None

    @property
    def rung(self) -> int | None:
        """The rung the viewer chose (None: chosen by bandwidth within :attr:`allowed_rungs`)."""
        return self._rung

    @property
    def allowed_rungs(self) -> tuple[int, ...]:
        """The rungs the admitted viewer may receive now, best first (empty until admitted)."""
        if self._grant is None or self._state is not AdmissionState.ADMITTED:
            return ()
        return tuple(r.index for r in self._allowed(self._grant))

    @property
    def buffered(self) -> int:
        """Control-stream bytes held for an incomplete message (bounded by the parser)."""
        return self._parser.buffered

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` must next run (None: no timer needed)."""
        if self._state in (AdmissionState.AWAITING_HELLO, AdmissionState.PENDING_APPROVAL):
            return self._deadline
        return None

    # -- inputs

    def receive(
        self, data: bytes, now: float, *, end_stream: bool = False, wall_now: float | None = None
    ) -> list[Action]:
        """Bytes from the control stream (``end_stream``: the viewer sent FIN).

        ``now`` times the deadlines (a shell passes its monotonic clock); a token's ``exp``
        and ``iat`` are wall-clock seconds since the epoch (RFC 7519 §4.1.4), checked against
        ``wall_now`` (default ``now``, for a caller whose ``now`` is the wall clock)."""
        self._wall_now = now if wall_now is None else wall_now
        actions = self.handle_timer(now)  # a hello arriving after its deadline is too late
        if self._state is AdmissionState.CLOSED:
            return actions
        try:
            messages = self._parser.feed(data, end_stream=end_stream)
        except ProtocolError as exc:
            return actions + self._refuse(
                AccessErrorCode.PROTOCOL_ERROR, Reason.PROTOCOL, str(exc), now
            )
        for message in messages:
            actions += self._on_message(message, now)
            if self.closed:
                return actions
        if end_stream:
            actions += self._withdraw()
            self._close_quietly("left")
            actions.append(
                CloseConnection(code=RoqErrorCode.ROQ_NO_ERROR, reason="the viewer left")
            )
        return actions

    def handle_timer(self, now: float) -> list[Action]:
        if self._deadline is None or now < self._deadline:
            return []
        if self._state is AdmissionState.AWAITING_HELLO:
            return self._refuse(
                AccessErrorCode.HELLO_TIMEOUT,
                Reason.HELLO_TIMEOUT,
                f"no hello on the control stream within {self.policy.hello_timeout_s:g} s",
                now,
            )
        if self._state is AdmissionState.PENDING_APPROVAL:
            return self._withdraw() + self._refuse(
                AccessErrorCode.APPROVAL_EXPIRED,
                Reason.APPROVAL_EXPIRED,
                f"nobody approved the request within {self.policy.approval_timeout_s:g} s",
                now,
            )
        return []

    def approve(self, approval: Approval, now: float) -> list[Action]:
        """The operator's approval of this connection's request (stale ones are ignored)."""
        actions = self.handle_timer(now)
        request = self.pending_request
        if request is None or approval.request_id != request.request_id:
            return actions
        grant = approval.grant
        if grant.stream != request.stream or grant.viewer is None:
            raise ConfigError("an approval must name the request's stream and a viewer id")
        self._request = None
        return actions + self._admit(grant, now)

    def deny(self, denial: Denial, now: float) -> list[Action]:
        """The operator's (or the registry's) refusal of this connection's request."""
        actions = self.handle_timer(now)
        request = self.pending_request
        if request is None or denial.request_id != request.request_id:
            return actions
        return actions + self._refuse(denial.code, denial.reason, denial.text, now)

    def recheck(self, now: float) -> list[Action]:
        """Call after the verifier's revocations change: a revoked viewer is cut at once."""
        actions = self.handle_timer(now)
        revocations = self._verifier.revocations
        if self._state is AdmissionState.ADMITTED and self._grant is not None:
            grant = self._grant
            if revocations.revoked(token_id=grant.token_id, viewers=(grant.viewer,)):
                actions += self._refuse(
                    AccessErrorCode.REVOKED,
                    Reason.REVOKED,
                    "this viewer's access was revoked",
                    now,
                )
        elif (request := self.pending_request) is not None and revocations.revoked(
            viewers=(request.viewer,)
        ):
            actions += self._withdraw() + self._refuse(
                AccessErrorCode.REVOKED, Reason.REVOKED, "this viewer was revoked", now
            )
        return actions

    def notice(self, message: Notice) -> list[Action]:
        """A notice for every viewer of the stream (``broadcast_to_viewers``): admitted only."""
        return [SendControl(message=message)] if self.media_allowed else []

    def recording_done(
        self, command: RecordCommand, *, ok: bool, text: str | None = None
    ) -> list[Action]:
        """The reply to a :class:`RecordCommand` the shell carried out (or could not)."""
        if not self.media_allowed:
            return []
        reply = RecordReply(
            ok=ok,
            action=command.action,
            id=command.request_id,
            reason=None if ok else Reason.FAILED,
            text=text,
        )
        return [SendControl(message=reply)]

    def connection_lost(self) -> list[Action]:
        """The connection is gone (idle timeout, peer closed): forget it."""
        actions = self._withdraw()
        self._close_quietly("lost")
        return actions

    # -- messages

    def _on_message(self, message: ClientMessage, now: float) -> list[Action]:
        state = self._state
        if state is AdmissionState.AWAITING_HELLO:
            if isinstance(message, Hello):
                return self._on_hello(message, now)
            return self._protocol_error("the first message must be hello", now)
        if isinstance(message, Hello):
            return self._protocol_error("hello may be sent only once", now)
        if state is AdmissionState.PENDING_APPROVAL:
            text = "wait for the welcome: the request has not been approved yet"
            if isinstance(message, QualityRequest):
                reply: ServerMessage = QualityReply(
                    ok=False, id=message.id, reason=Reason.NOT_ADMITTED, text=text
                )
            else:
                reply = RecordReply(
                    ok=False,
                    action=message.action,
                    id=message.id,
                    reason=Reason.NOT_ADMITTED,
                    text=text,
                )
            return [SendControl(message=reply)]
        if isinstance(message, QualityRequest):
            return self._on_quality(message)
        return self._on_record(message)

    def _on_hello(self, hello: Hello, now: float) -> list[Action]:
        if hello.version != PROTOCOL_VERSION:
            return self._refuse(
                AccessErrorCode.PROTOCOL_ERROR,
                Reason.VERSION,
                f"this server speaks control protocol version {PROTOCOL_VERSION}, "
                f"not {hello.version}",
                now,
            )
        if not all(f is None or f.isprintable() for f in (hello.viewer, hello.name)):
            # The name is shown on the operator's terminal: no control characters (escapes).
            return self._protocol_error("viewer and name must be printable text", now)
        if hello.stream not in self._streams:
            return self._refuse(
                AccessErrorCode.UNKNOWN_STREAM,
                Reason.UNKNOWN_STREAM,
                f"this server has no stream {hello.stream!r}",
                now,
            )
        self._stream = hello.stream
        if hello.token is None:
            return self._ask_approval(hello, now)
        try:
            grant = self._verifier.verify(hello.token, stream=hello.stream, now=self._wall_now)
            viewer = grant.viewer or hello.viewer or self._new_id()
            # The token named no viewer and the viewer named itself: that id may be revoked.
            self._verifier.check_revoked(grant, viewer=viewer)
        except AuthError as exc:
            return self._refuse(_CODE_OF[exc.reason], Reason(exc.reason), str(exc), now)
        return self._admit(msgspec.structs.replace(grant, viewer=viewer), now)

    def _ask_approval(self, hello: Hello, now: float) -> list[Action]:
        if not self.policy.allow_approval_requests:
            return self._refuse(
                AccessErrorCode.UNAUTHORIZED,
                Reason.MISSING,
                "this stream needs a token (kizuna-stream token --stream ID, on the server)",
                now,
            )
        if self._verifier.revocations.revoked(viewers=(hello.viewer,)):
            return self._refuse(
                AccessErrorCode.REVOKED, Reason.REVOKED, "this viewer was revoked", now
            )
        timeout = self.policy.approval_timeout_s
        request = PendingRequest(
            request_id=self._new_id(),
            stream=hello.stream,
            viewer=hello.viewer,
            name=hello.name,
            peer=self.peer,
            requested_at=now,
            expires_at=now + timeout,
        )
        self._move(AdmissionState.PENDING_APPROVAL)
        self._request = request
        self._deadline = request.expires_at
        logger.info(
            "viewer at %s asks to watch stream %s: request %s",
            self.peer.address,
            hello.stream,
            request.request_id,
        )
        return [
            RequestApproval(request=request),
            SendControl(message=Pending(request=request.request_id, expires_in=timeout)),
        ]

    def _admit(self, grant: ViewerGrant, now: float) -> list[Action]:
        assert grant.viewer is not None
        permissions = grant.permissions
        if not permissions.can_view:
            return self._refuse(
                AccessErrorCode.FORBIDDEN,
                Reason.NOT_PERMITTED,
                "this viewer may not view (can_view is false)",
                now,
            )
        if self._verifier.revocations.revoked(token_id=grant.token_id, viewers=(grant.viewer,)):
            return self._refuse(
                AccessErrorCode.REVOKED, Reason.REVOKED, "this viewer was revoked", now
            )
        rungs = self._allowed(grant)
        # An audio-only stream has no rungs to cap; one with rungs must offer one that fits.
        if not rungs and self._streams.get(grant.stream):
            return self._refuse(
                AccessErrorCode.FORBIDDEN,
                Reason.QUALITY_CAP,
                f"no rung of this stream is within this viewer's max_quality "
                f"{permissions.max_quality}",
                now,
            )
        self._move(AdmissionState.ADMITTED)
        self._grant = grant
        self._deadline = None
        logger.info(
            "viewer %s at %s admitted to stream %s",
            grant.viewer,
            self.peer.address,
            grant.stream,
        )
        welcome = Welcome(
            version=PROTOCOL_VERSION,
            viewer=grant.viewer,
            stream=grant.stream,
            permissions=PermissionsInfo(
                can_view=permissions.can_view,
                can_record=permissions.can_record,
                can_control_quality=permissions.can_control_quality,
                max_quality=str(permissions.max_quality),
            ),
            rungs=rungs,
            expires_at=grant.expires_at,
        )
        # Welcome first: the spec promises no media before it.
        return [
            SendControl(message=welcome),
            AdmitViewer(grant=grant, rungs=tuple(r.index for r in rungs)),
        ]

    def _on_quality(self, request: QualityRequest) -> list[Action]:
        assert self._grant is not None and self._stream is not None
        permissions = self._grant.permissions

        def refuse(reason: Reason, text: str) -> list[Action]:
            reply = QualityReply(ok=False, id=request.id, rung=self._rung, reason=reason, text=text)
            return [SendControl(message=reply)]

        if not permissions.can_control_quality:
            return refuse(
                Reason.NOT_PERMITTED,
                "this viewer may not choose its quality (can_control_quality is false)",
            )
        if request.rung is not None and request.preset is not None:
            return refuse(Reason.BAD_REQUEST, "ask for a rung or a preset, not both")
        rung: int | None = None
        if request.rung is not None or request.preset is not None:
            rungs = self._streams.get(self._stream, ())
            matches = [
                r
                for r in rungs
                if (request.rung is not None and r.index == request.rung)
                or (request.preset is not None and r.preset == request.preset)
            ]
            if not matches:
                wanted = (
                    f"rung {request.rung}" if request.rung is not None else "a rung of that preset"
                )
                return refuse(Reason.UNKNOWN_RUNG, f"this stream has no {wanted}")
            allowed = [r for r in matches if rung_within(r, permissions.max_quality)]
            if not allowed:
                return refuse(
                    Reason.ABOVE_MAX_QUALITY,
                    f"rung {matches[0].index} is above this viewer's max_quality "
                    f"{permissions.max_quality}",
                )
            rung = allowed[0].index
        self._rung = rung
        return [
            SelectRung(rung=rung),
            SendControl(message=QualityReply(ok=True, id=request.id, rung=rung)),
        ]

    def _on_record(self, request: RecordRequest) -> list[Action]:
        assert self._grant is not None
        if not self._grant.permissions.can_record:
            reply = RecordReply(
                ok=False,
                action=request.action,
                id=request.id,
                reason=Reason.NOT_PERMITTED,
                text="this viewer may not record on the server (can_record is false)",
            )
            return [SendControl(message=reply)]
        return [RecordCommand(action=request.action, request_id=request.id)]

    # -- helpers

    def _allowed(self, grant: ViewerGrant) -> tuple[RungInfo, ...]:
        return allowed_rungs(self._streams.get(grant.stream, ()), grant.permissions.max_quality)

    def _move(self, state: AdmissionState) -> None:
        if state not in _TRANSITIONS[self._state]:
            raise StreamStateError(f"admission cannot go from {self._state} to {state}")
        self._state = state

    def _withdraw(self) -> list[Action]:
        request = self.pending_request
        return [WithdrawApproval(request_id=request.request_id)] if request else []

    def _close_quietly(self, why: str) -> None:
        if self._state is not AdmissionState.CLOSED:
            self._move(AdmissionState.CLOSED)
            self.close_reason = why
        self._deadline = None

    def _protocol_error(self, text: str, now: float) -> list[Action]:
        return self._refuse(
            AccessErrorCode.PROTOCOL_ERROR, Reason.PROTOCOL, f"control stream: {text}", now
        )

    def _refuse(self, code: AccessErrorCode, reason: Reason, text: str, now: float) -> list[Action]:
        text = text[:MAX_TEXT]
        self._close_quietly(str(reason))
        logger.info(
            "viewer at %s refused (%s, 0x%x): %s", self.peer.address, reason, int(code), text
        )
        return [
            SendControl(message=Refused(code=int(code), reason=str(reason), text=text)),
            CloseConnection(code=int(code), reason=f"{reason}: {text}"[:MAX_CLOSE_REASON]),
        ]
