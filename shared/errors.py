"""One error hierarchy for the whole system, mirroring the design's streaming error types.

Every error raised on purpose derives from :class:`KizunaError`.  Where a built-in exception
already names the category, the error subclasses it too (as PyAV does), so callers can catch
either ``kizuna.PermissionError`` or the built-in ``PermissionError``.

The classes keep the plain ``Exception(message)`` constructor so they pickle across Ray actor
boundaries unchanged: Ray re-raises a remote error as a subclass of the original class, so
``except CaptureError`` works around ``await actor.method.remote()``.
"""

from __future__ import annotations

import builtins
import enum

__all__ = [
    "AuthError",
    "AuthReason",
    "CaptureError",
    "ConfigError",
    "EncodingError",
    "KizunaError",
    "NetworkError",
    "PermissionError",
    "ProtocolError",
    "RecordingError",
    "ResourceError",
    "StreamNotFoundError",
    "StreamStateError",
]


class KizunaError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(KizunaError, ValueError):
    """A configuration or argument that cannot work: unknown source, odd resolution, bad rate."""


class CaptureError(KizunaError):
    """Camera, screen or audio capture failed (device missing, busy, or stopped delivering)."""


class EncodingError(KizunaError):
    """Video encoding or hardware acceleration failed."""


class NetworkError(KizunaError, ConnectionError):
    """Stream transmission or connectivity failed (port in use, peer gone, handshake failed)."""


class ProtocolError(NetworkError, ValueError):
    """Bytes from the network that do not parse: truncated RTP, bad varint, unknown flow."""


class PermissionError(KizunaError, builtins.PermissionError):
    """Camera or screen access was denied, or a viewer lacks the permission it asked to use."""


class AuthReason(enum.StrEnum):
    """Why a viewer's credential was refused (``AuthError.reason``), as the control stream and
    ``kizuna-stream view`` spell it."""

    #: No token was presented.
    MISSING = "missing"
    #: Not a JWT this server issues: bad encoding, missing or mistyped claims, too long.
    MALFORMED = "malformed"
    #: The signature does not verify, or the token names an algorithm this server does not use
    #: (``none``, or HS256 against an EdDSA key: algorithm confusion).
    FORGED = "forged"
    #: Past its ``exp``.
    EXPIRED = "expired"
    #: Issued for another stream.
    WRONG_STREAM = "wrong_stream"
    #: Its token id or its viewer was revoked.
    REVOKED = "revoked"


class AuthError(PermissionError):
    """A viewer's token (or lack of one) does not let it in; ``reason`` says why.

    The message never contains the token: it is a bearer credential, and messages end up in
    logs and on the viewer's screen.
    """

    def __init__(self, message: str, reason: AuthReason) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[AuthError], tuple[str, AuthReason]]:
        # Exception pickles as cls(*args), which would lose ``reason``; Ray pickles errors.
        return (type(self), (str(self), self.reason))


class ResourceError(KizunaError):
    """Not enough CPU, memory, shared memory or bandwidth to do what was asked."""


class RecordingError(KizunaError):
    """A recording could not be written (disk full, muxer failure)."""


class StreamNotFoundError(KizunaError, LookupError):
    """No active stream (or viewer, or recording) has the given id."""


class StreamStateError(KizunaError, RuntimeError):
    """The stream's state does not allow what was asked (a viewer added to a stream that is
    stopping, or failed), or a state change the stream's state table does not have."""


class CrashLoopError(KizunaError, RuntimeError):
    """A stage actor kept crashing as soon as it was restarted (``actors.recovery``)."""
