"""The server's access-control shell: one :class:`ViewerAdmission` per connection of a RoQ server.

A sender shard holds one :class:`AccessControl`.  It does the I/O the admission core asks for
(``shared.auth.admission``'s actions: write on the connection's control stream, admit, close)
and keeps the shard's pending requests.  Media is the shard's business: :meth:`on_connect`
says whether a new connection may get media at once (open mode) and ``admit`` is called when a
token or an operator lets a viewer in (token mode); until then the shard sends it nothing.

Open mode keeps the control stream useful without any credential: a hello is answered with a
welcome (view-only permissions) and notices reach every viewer that said hello.

Like the other shells here, nothing reads a clock: the caller passes ``now`` (monotonic
seconds, for deadlines; and the wall clock where a token's expiry is checked) and arms a timer
for :meth:`next_deadline`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec

from shared.auth.admission import (
    Action,
    AdmissionPolicy,
    AdmitViewer,
    CloseConnection,
    RecordCommand,
    RequestApproval,
    SelectRung,
    SendControl,
    ViewerAdmission,
    WithdrawApproval,
)
from shared.auth.control import (
    PROTOCOL_VERSION,
    Hello,
    PermissionsInfo,
    RungInfo,
    Welcome,
    client_message_parser,
    encode_message,
    notice,
)
from shared.auth.pending import PeerIdentity, PendingRequest, PendingRequests
from shared.auth.tokens import Revocations, TokenKey, TokenVerifier, ViewerGrant
from shared.errors import ConfigError, ProtocolError
from shared.models import AccessMode, StreamAccess, ViewerPermissions

__all__ = ["AccessControl", "AccessSettings", "ControlledConnection"]

logger = logging.getLogger(__name__)


class ControlledConnection(Protocol):
    """What this shell needs of a connection (``shared.roq.transport.RoqConnection``)."""

    @property
    def peer_id(self) -> str: ...
    @property
    def peer_fingerprint(self) -> str | None: ...
    def send_control(self, data: bytes) -> None: ...
    def close(self, code: int = ..., reason: str = "") -> None: ...


class AccessSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A stream's access policy and the key its tokens are checked with, as a shard gets it."""

    access: StreamAccess
    #: The HS256 secret tokens are signed with (token mode).
    secret: bytes | None = None
    revoked_tokens: tuple[str, ...] = ()
    revoked_viewers: tuple[str, ...] = ()
    #: The stream's rungs, as the welcome tells them and ``max_quality`` caps them.
    rungs: tuple[RungInfo, ...] = ()

    def __post_init__(self) -> None:
        if self.access.mode == AccessMode.TOKEN and not self.secret:
            raise ConfigError("token access needs the secret the tokens are signed with")

    def verifier(self) -> TokenVerifier | None:
        """A verifier of this stream's tokens with its revocations (None: no secret, an open
        stream); every endpoint of the stream (RoQ shards, WHEP) checks tokens with one."""
        if not self.secret:
            return None
        revocations = Revocations()
        for token_id in self.revoked_tokens:
            revocations.revoke_token(token_id)
        for viewer in self.revoked_viewers:
            revocations.revoke_viewer(viewer)
        return TokenVerifier(TokenKey.hs256(self.secret), revocations=revocations)

    def __repr__(self) -> str:
        # The secret signs tokens: a repr ends up in logs and Ray's error messages.
        return f"AccessSettings(access={self.access!r}, secret=<redacted>)"


class _OpenConnection:
    """Open mode's control stream: a hello gets a welcome; notices once it said hello."""

    def __init__(self) -> None:
        self.parser = client_message_parser()
        self.hello: Hello | None = None


class AccessControl:
    """Admission for every connection of one shard (module doc).

    ``on_record`` answers at once with ``(ok, text)``, or returns None and the caller
    answers later with :meth:`recording_done`.  ``admit(connection, grant, rungs)`` is called when a viewer may get media (``rungs``: the
    indexes within its ``max_quality``, best first); ``on_select_rung`` and
    ``on_record`` carry out permitted requests (the reply is sent here).
    """

    def __init__(
        self,
        stream: str,
        settings: AccessSettings,
        *,
        admit: Callable[[Any, ViewerGrant, tuple[int, ...]], None],
        rungs: Sequence[RungInfo] = (),
        on_select_rung: Callable[[Any, int | None], None] | None = None,
        on_record: Callable[[Any, RecordCommand], tuple[bool, str | None] | None] | None = None,
    ) -> None:
        self.stream = stream
        self.mode = AccessMode(settings.access.mode)
        self._admit = admit
        self._streams: dict[str, Sequence[RungInfo]] = {stream: tuple(rungs)}
        self._on_select_rung = on_select_rung
        self._on_record = on_record
        access = settings.access
        self.policy = AdmissionPolicy(
            hello_timeout_s=access.hello_timeout_s,
            approval_timeout_s=access.approval_timeout_s,
            allow_approval_requests=access.allow_requests,
        )
        self._verifier = settings.verifier()
        self.pending = PendingRequests()
        self._admissions: dict[ControlledConnection, ViewerAdmission] = {}
        self._open: dict[ControlledConnection, _OpenConnection] = {}
        #: Connections whose viewer opened the control stream: only there can the server
        #: write (RFC 9000 §2.1: stream 0 is the client's to open).
        self._opened: set[ControlledConnection] = set()
        #: Connections closed for access reasons, by reason word (stats).
        self.refusals: dict[str, int] = {}

    # -- connections

    def on_connect(self, connection: ControlledConnection, address: str, now: float) -> bool:
        """A new connection; True if it may get media now (open mode)."""
        if self.mode == AccessMode.OPEN:
            self._open[connection] = _OpenConnection()
            return True
        assert self._verifier is not None  # AccessSettings insists on a secret in token mode
        peer = PeerIdentity(address=address, certificate_fingerprint=connection.peer_fingerprint)
        admission = ViewerAdmission(
            verifier=self._verifier, streams=self._streams, peer=peer, now=now, policy=self.policy
        )
        self._admissions[connection] = admission
        return False

    def on_disconnect(self, connection: ControlledConnection) -> None:
        self._open.pop(connection, None)
        self._opened.discard(connection)
        admission = self._admissions.pop(connection, None)
        if admission is not None:
            self._carry_out(connection, admission, admission.connection_lost())

    def on_control(
        self,
        connection: ControlledConnection,
        data: bytes,
        end_stream: bool,
        now: float,
        wall_now: float,
    ) -> None:
        """Control-stream bytes; ``wall_now`` (seconds since the epoch) checks token expiry."""
        self._opened.add(connection)
        admission = self._admissions.get(connection)
        if admission is not None:
            self._carry_out(
                connection,
                admission,
                admission.receive(data, now, end_stream=end_stream, wall_now=wall_now),
            )
            return
        opened = self._open.get(connection)
        if opened is not None:
            self._open_control(connection, opened, data, end_stream)

    def _open_control(
        self, connection: ControlledConnection, opened: _OpenConnection, data: bytes, end: bool
    ) -> None:
        try:
            messages = opened.parser.feed(data, end_stream=end)
        except ProtocolError as exc:
            # Open mode lets anyone watch; a garbled control stream only loses the notices.
            logger.info(
                "stream %s: %s: control stream ignored: %s", self.stream, connection.peer_id, exc
            )
            self._open.pop(connection, None)
            return
        for message in messages:
            if isinstance(message, Hello) and opened.hello is None:
                opened.hello = message
                permissions = ViewerPermissions()
                connection.send_control(
                    encode_message(
                        Welcome(
                            version=PROTOCOL_VERSION,
                            viewer=message.viewer or connection.peer_id,
                            stream=self.stream,
                            permissions=PermissionsInfo(
                                can_view=permissions.can_view,
                                can_record=permissions.can_record,
                                can_control_quality=permissions.can_control_quality,
                                max_quality=str(permissions.max_quality),
                            ),
                            rungs=tuple(self._streams[self.stream]),
                        )
                    )
                )

    # -- timers

    def next_deadline(self) -> float | None:
        deadlines = [d for a in self._admissions.values() if (d := a.next_deadline()) is not None]
        return min(deadlines, default=None)

    def handle_timers(self, now: float) -> None:
        for connection, admission in list(self._admissions.items()):
            deadline = admission.next_deadline()
            if deadline is not None and deadline <= now:
                self._carry_out(connection, admission, admission.handle_timer(now))

    # -- the operator's side

    def requests(self, now: float) -> list[PendingRequest]:
        self.pending.expire(now)
        return self.pending.list(now)

    def approve(
        self,
        request_id: str,
        now: float,
        *,
        permissions: ViewerPermissions | None = None,
        viewer: str | None = None,
    ) -> bool:
        """Let a pending viewer in; False if no connection here waits with that request."""
        found = self._waiting(request_id)
        if found is None:
            return False
        approval = self.pending.approve(request_id, now, permissions=permissions, viewer=viewer)
        connection, admission = found
        self._carry_out(connection, admission, admission.approve(approval, now))
        return True

    def deny(self, request_id: str, now: float, *, text: str = "") -> bool:
        found = self._waiting(request_id)
        if found is None:
            return False
        denial = self.pending.deny(request_id, now, text=text)
        connection, admission = found
        self._carry_out(connection, admission, admission.deny(denial, now))
        return True

    def revoke(self, now: float, *, token_id: str | None = None, viewer: str | None = None) -> int:
        """Revoke a token or a viewer; its connections are cut now.  How many were cut."""
        if self._verifier is None:
            return 0
        if token_id is not None:
            self._verifier.revocations.revoke_token(token_id)
        if viewer is not None:
            self._verifier.revocations.revoke_viewer(viewer)
        cut = 0
        for connection, admission in list(self._admissions.items()):
            actions = admission.recheck(now)
            cut += any(isinstance(action, CloseConnection) for action in actions)
            self._carry_out(connection, admission, actions)
        return cut

    def notify(self, text: str, data: dict[str, Any] | None = None) -> int:
        """Send a notice to every admitted viewer (open mode: every one that said hello)."""
        message = notice(text, data)
        sent = 0
        for connection, admission in list(self._admissions.items()):
            actions = admission.notice(message)
            sent += bool(actions)
            self._carry_out(connection, admission, actions)
        payload = encode_message(message)
        for connection, opened in self._open.items():
            if opened.hello is not None:
                connection.send_control(payload)
                sent += 1
        return sent

    def recording_done(
        self,
        connection: ControlledConnection,
        command: RecordCommand,
        *,
        ok: bool,
        text: str | None,
    ) -> None:
        """The answer to a recording request ``on_record`` deferred."""
        admission = self._admissions.get(connection)
        if admission is not None:
            self._carry_out(
                connection, admission, admission.recording_done(command, ok=ok, text=text)
            )

    def viewer_of(self, connection: ControlledConnection) -> str | None:
        """The admitted viewer's id (its token's, or the operator's approval), or None."""
        admission = self._admissions.get(connection)
        if admission is not None and admission.grant is not None:
            return admission.grant.viewer
        opened = self._open.get(connection)
        return opened.hello.viewer if opened is not None and opened.hello is not None else None

    def state_of(self, connection: ControlledConnection) -> str:
        admission = self._admissions.get(connection)
        return str(admission.state) if admission is not None else "open"

    # -- carrying out the core's actions, in order

    def _waiting(self, request_id: str) -> tuple[ControlledConnection, ViewerAdmission] | None:
        for connection, admission in self._admissions.items():
            request = admission.pending_request
            if request is not None and request.request_id == request_id:
                return connection, admission
        return None

    def _carry_out(
        self,
        connection: ControlledConnection,
        admission: ViewerAdmission,
        actions: list[Action],
    ) -> None:
        for action in actions:
            match action:
                case SendControl():
                    # A viewer that never wrote gets no message; a close still says why.
                    if connection in self._opened:
                        connection.send_control(action.data)
                case AdmitViewer(grant=grant, rungs=rungs):
                    self._admit(connection, grant, rungs)
                case CloseConnection(code=code, reason=reason):
                    word = admission.close_reason or "closed"
                    self.refusals[word] = self.refusals.get(word, 0) + 1
                    self._admissions.pop(connection, None)
                    self._opened.discard(connection)
                    connection.close(int(code), reason)
                case SelectRung(rung=rung):
                    if self._on_select_rung is not None:
                        self._on_select_rung(connection, rung)
                case RecordCommand():
                    answer = (
                        self._on_record(connection, action)
                        if self._on_record is not None
                        else (False, "this server does not record on a viewer's request")
                    )
                    if answer is not None:
                        ok, text = answer
                        self._carry_out(
                            connection,
                            admission,
                            admission.recording_done(action, ok=ok, text=text),
                        )
                case RequestApproval(request=request):
                    denial = self.pending.add(request, request.requested_at)
                    if denial is not None:
                        self._carry_out(
                            connection, admission, admission.deny(denial, request.requested_at)
                        )
                case WithdrawApproval(request_id=request_id):
                    self.pending.withdraw(request_id)
