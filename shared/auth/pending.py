"""Viewers without a token waiting for an operator's approval, and the operator's answers.

Pure, the time passed in.  A connection's :class:`~shared.auth.admission.ViewerAdmission` makes a
:class:`PendingRequest` (with the peer's identity: its address and, when it presented a client
certificate, that certificate's fingerprint) and asks its shell to hand it to the supervisor's
:class:`PendingRequests`; the operator lists the requests and approves or denies them there
(``StreamManager.approve_viewer_request`` / ``deny_viewer_request``, ``kizuna-stream viewers
approve|deny``), and the :class:`Approval` or :class:`Denial` goes back to the connection.  A
request nobody answers lapses at its ``expires_at`` on both sides.
"""

from __future__ import annotations

import builtins
from typing import Final

import msgspec

from shared.auth.control import AccessErrorCode, Reason
from shared.auth.tokens import ViewerGrant, check_viewer_id
from shared.errors import ConfigError, StreamNotFoundError
from shared.models import ViewerPermissions

__all__ = [
    "Approval",
    "Denial",
    "PeerIdentity",
    "PendingRequest",
    "PendingRequests",
]

_DENIED: Final = "the operator denied the request"


class PeerIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """Who is at the other end, as far as the transport can tell."""

    #: ``host:port`` the connection comes from.
    address: str
    #: ``sha256:HEX`` of the client's TLS certificate, when it presented one.
    certificate_fingerprint: str | None = None


class PendingRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A viewer without a token asking to watch, as the operator sees it."""

    request_id: str
    stream: str
    #: The viewer id it asked for, if any.
    viewer: str | None
    #: The name it gave, if any (for the operator's eyes only: anyone can claim any name).
    name: str | None
    peer: PeerIdentity
    requested_at: float
    expires_at: float


class Approval(msgspec.Struct, frozen=True, kw_only=True):
    """The operator let a pending viewer in with ``grant``."""

    request_id: str
    grant: ViewerGrant


class Denial(msgspec.Struct, frozen=True, kw_only=True):
    """The request was turned down (by the operator, or because too many are waiting)."""

    request_id: str
    code: AccessErrorCode = AccessErrorCode.DENIED
    reason: Reason = Reason.DENIED
    text: str = _DENIED


class PendingRequests:
    """Viewers waiting for an operator's decision, across a stream's shards (the supervisor's).

    Pure: the time is passed in.  Requests lapse at their ``expires_at`` (the connection closes
    itself then too); :meth:`next_deadline` says when the next one does.
    """

    def __init__(self, *, capacity: int = 64) -> None:
        if capacity < 1:
            raise ConfigError(f"pending request capacity {capacity} must be at least 1")
        self.capacity = capacity
        self._requests: dict[str, PendingRequest] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, request: PendingRequest, now: float) -> Denial | None:
        """Queue ``request``; a :class:`Denial` (too many waiting) to pass to its connection."""
        self.expire(now)
        known = self._requests.get(request.request_id)
        if known is not None:
            if known != request:
                raise ConfigError(f"request id {request.request_id!r} is already in use")
            return None  # the same request told twice
        if len(self._requests) >= self.capacity:
            return Denial(
                request_id=request.request_id,
                code=AccessErrorCode.TOO_MANY,
                reason=Reason.TOO_MANY,
                text=f"{self.capacity} viewers are already waiting for approval; try later",
            )
        self._requests[request.request_id] = request
        return None

    def list(self, now: float) -> list[PendingRequest]:
        """The requests still waiting, oldest first."""
        self.expire(now)
        return sorted(self._requests.values(), key=lambda r: (r.requested_at, r.request_id))

    def approve(
        self,
        request_id: str,
        now: float,
        *,
        permissions: ViewerPermissions | None = None,
        viewer: str | None = None,
    ) -> Approval:
        """Let the request's viewer in, as ``viewer`` (default: the id it asked for, else a new
        one) with ``permissions`` (default: view only)."""
        request = self._take(request_id, now)
        viewer_id = check_viewer_id(viewer or request.viewer or f"viewer-{request_id}")
        grant = ViewerGrant(
            stream=request.stream,
            viewer=viewer_id,
            permissions=permissions or ViewerPermissions(),
            token_id=None,
            expires_at=None,
        )
        return Approval(request_id=request_id, grant=grant)

    def deny(self, request_id: str, now: float, *, text: str = "") -> Denial:
        self._take(request_id, now)
        return Denial(request_id=request_id, text=text or _DENIED)

    def withdraw(self, request_id: str) -> PendingRequest | None:
        """Forget a request whose connection closed or lapsed."""
        return self._requests.pop(request_id, None)

    def expire(self, now: float) -> builtins.list[PendingRequest]:
        """Drop and return the requests whose time is up."""
        lapsed = [r for r in self._requests.values() if r.expires_at <= now]
        for request in lapsed:
            del self._requests[request.request_id]
        return lapsed

    def next_deadline(self) -> float | None:
        return min((r.expires_at for r in self._requests.values()), default=None)

    def _take(self, request_id: str, now: float) -> PendingRequest:
        self.expire(now)
        request = self._requests.pop(request_id, None)
        if request is None:
            raise StreamNotFoundError(
                f"no pending request {request_id!r} (answered, withdrawn or expired already)"
            )
        return request
