"""Viewer tokens: JWTs (RFC 7519) that let a viewer watch one stream with given permissions.

Pure: no file, socket or clock (the time is an argument).  Where the signing secret lives is
:mod:`shared.auth.secret_file`.

A token is a compact JWS (RFC 7515 §7.1) signed with HS256 (a server secret, RFC 7518 §3.2) or
EdDSA over Ed25519 (a key pair, RFC 8037), as LiveKit and MediaMTX tokens are.  Its claims:

=====================  =====================================================================
``stream``             the stream id it opens (required)
``sub``                the viewer id (optional: without it the viewer names itself)
``can_view``           :class:`~shared.models.ViewerPermissions` fields, at the top level
``can_record``
``can_control_quality``
``max_quality``        a preset name: low, medium, high or ultra
``exp``, ``iat``       NumericDate seconds (RFC 7519 §4.1.4, §4.1.6); ``exp`` is required
``jti``                the token id (RFC 7519 §4.1.7), what a revocation names
=====================  =====================================================================

:meth:`TokenVerifier.verify` checks, in this order, and raises :class:`~shared.errors.AuthError`
with the first reason that applies: ``missing`` (no token), ``malformed`` (not a compact JWS of
sane size, or its header names no algorithm), ``forged`` (the header names another algorithm than the verifier's one, or the
signature fails), ``malformed`` (claims missing or mistyped), ``expired``, ``wrong_stream``,
``revoked``.  The signature is checked before any claim is believed, so nothing an attacker
writes in the payload can choose the answer.

Algorithms are pinned: a verifier accepts exactly the algorithm of its key, so ``alg: none``
(RFC 7518 §3.6) and algorithm confusion (an HS256 token "signed" with an EdDSA server's public
key) are refused as forged.  HMAC signatures are compared in constant time by PyJWT
(``hmac.compare_digest``).

``exp`` is checked against the ``now`` given to :meth:`~TokenVerifier.verify`, not the machine
clock, with an optional leeway for clock skew between issuer and server.  A token is checked
when it is presented: a connection admitted with it outlives its ``exp``; revocation
(:class:`Revocations`) is how a live viewer is cut.

No message raised here contains the token, nor any part of it an attacker could replay.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from typing import Any, Final, Literal

import jwt
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from shared.errors import AuthError, AuthReason, ConfigError
from shared.models import QualityPreset, ViewerPermissions

__all__ = [
    "DEFAULT_TTL_S",
    "MAX_TOKEN_LENGTH",
    "MIN_SECRET_BYTES",
    "Algorithm",
    "Revocations",
    "TokenIssuer",
    "TokenKey",
    "TokenVerifier",
    "ViewerGrant",
    "check_stream_id",
    "check_viewer_id",
]

Algorithm = Literal["HS256", "EdDSA"]

#: RFC 7518 §3.2: an HS256 key must be at least as long as the hash output (256 bits).
MIN_SECRET_BYTES: Final = 32
#: A token longer than this is refused before it is parsed (ours are about 350 characters).
MAX_TOKEN_LENGTH: Final = 4096
#: What ``kizuna-stream token`` issues when no ``--ttl`` is given (one hour).
DEFAULT_TTL_S: Final = 3600.0
#: Longest lifetime a token may be issued with (a year): a longer one is a mistake.
MAX_TTL_S: Final = 366 * 86400.0
MAX_STREAM_ID: Final = 128
MAX_VIEWER_ID: Final = 64
_TOKEN_ALPHABET: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
)
_CAPS: Final = (QualityPreset.LOW, QualityPreset.MEDIUM, QualityPreset.HIGH, QualityPreset.ULTRA)


def check_stream_id(stream: str) -> str:
    """``stream`` if it can name a stream (1 to 128 printable characters, no spaces)."""
    if not (0 < len(stream) <= MAX_STREAM_ID and stream.isprintable() and " " not in stream):
        raise ConfigError(
            f"stream id must be 1 to {MAX_STREAM_ID} printable characters without spaces"
        )
    return stream


def check_viewer_id(viewer: str) -> str:
    """``viewer`` if it can name a viewer (1 to 64 printable characters, as in stream URLs)."""
    if not (0 < len(viewer) <= MAX_VIEWER_ID and viewer.isprintable()):
        raise ConfigError(f"viewer id must be 1 to {MAX_VIEWER_ID} printable characters")
    return viewer


class TokenKey:
    """The key tokens are signed or verified with, and the one algorithm it is used with.

    ``TokenKey.hs256(secret)`` signs and verifies; an Ed25519 private key signs and verifies, its
    public key only verifies (a server that checks tokens someone else issues).
    """

    __slots__ = ("_signing", "_verifying", "algorithm")

    def __init__(
        self,
        algorithm: Algorithm,
        signing: bytes | Ed25519PrivateKey | None,
        verifying: bytes | Ed25519PublicKey,
    ) -> None:
        self.algorithm: Final[Algorithm] = algorithm
        self._signing = signing
        self._verifying = verifying

    def __repr__(self) -> str:
        # Never the key material.
        return f"TokenKey({self.algorithm}, can_sign={self.can_sign})"

    @classmethod
    def hs256(cls, secret: bytes) -> TokenKey:
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"the token secret is {len(secret)} bytes; HS256 needs at least "
                f"{MIN_SECRET_BYTES} (RFC 7518 §3.2)"
            )
        return cls("HS256", secret, secret)

    @classmethod
    def ed25519(cls, key: Ed25519PrivateKey | Ed25519PublicKey) -> TokenKey:
        if isinstance(key, Ed25519PrivateKey):
            return cls("EdDSA", key, key.public_key())
        return cls("EdDSA", None, key)

    @classmethod
    def generate_ed25519(cls) -> TokenKey:
        return cls.ed25519(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> TokenKey:
        """An Ed25519 private or public key in PEM (``openssl genpkey -algorithm ed25519``)."""
        key: Any
        try:
            key = (
                serialization.load_pem_private_key(pem, password=None)
                if b"PRIVATE KEY" in pem
                else serialization.load_pem_public_key(pem)
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read the token key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
            raise ConfigError(
                f"the token key is a {type(key).__name__}; only Ed25519 keys (EdDSA) are used"
            )
        return cls.ed25519(key)

    @property
    def can_sign(self) -> bool:
        return self._signing is not None

    def public_pem(self) -> bytes | None:
        """The Ed25519 public key in PEM, for servers that only verify (None for HS256)."""
        if isinstance(self._verifying, Ed25519PublicKey):
            return self._verifying.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return None


class ViewerGrant(msgspec.Struct, frozen=True, kw_only=True):
    """What a verified token (or an operator's approval) lets one viewer do on one stream."""

    stream: str
    #: The viewer id; None when the token names no viewer (the connection then picks one).
    viewer: str | None
    permissions: ViewerPermissions
    #: The token id (``jti``); None for a viewer let in by approval, not by token.
    token_id: str | None
    #: The token's ``exp`` (seconds since the epoch); None for an approved viewer.
    expires_at: float | None = None


class Revocations(msgspec.Struct, kw_only=True):
    """Revoked token ids and viewer ids.  A plain struct so a supervisor can ship it to shards.

    A revoked token id is kept until its token would have expired anyway (``prune``); a revoked
    viewer stays revoked until :meth:`restore_viewer`.
    """

    #: Token id -> when the token expires (None: not known, kept until restored).
    tokens: dict[str, float | None] = msgspec.field(default_factory=dict)
    viewers: set[str] = msgspec.field(default_factory=set)

    def revoke_token(self, token_id: str, expires_at: float | None = None) -> None:
        self.tokens[token_id] = expires_at

    def revoke_viewer(self, viewer: str) -> None:
        self.viewers.add(viewer)

    def restore_token(self, token_id: str) -> None:
        self.tokens.pop(token_id, None)

    def restore_viewer(self, viewer: str) -> None:
        self.viewers.discard(viewer)

    def update(self, other: Revocations) -> None:
        """Take every revocation of ``other`` too (a shard merging the supervisor's list)."""
        self.tokens.update(other.tokens)
        self.viewers |= other.viewers

    def prune(self, now: float) -> None:
        """Forget token ids whose tokens have expired: they are refused as expired anyway."""
        for token_id in [t for t, exp in self.tokens.items() if exp is not None and exp <= now]:
            del self.tokens[token_id]

    def revoked(self, *, token_id: str | None = None, viewers: Iterable[str | None] = ()) -> bool:
        if token_id is not None and token_id in self.tokens:
            return True
        return any(v is not None and v in self.viewers for v in viewers)


class _Claims(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """The claims as they must be typed; anything else in the payload is ignored."""

    stream: str
    exp: int | float
    jti: str
    iat: int | float | None = None
    sub: str | None = None
    can_view: bool = True
    can_record: bool = False
    can_control_quality: bool = False
    max_quality: QualityPreset = QualityPreset.ULTRA


class TokenIssuer:
    """Signs viewer tokens with one key."""

    def __init__(self, key: TokenKey) -> None:
        if not key.can_sign:
            raise ConfigError("an Ed25519 public key can verify tokens but not sign them")
        self.key = key

    def issue(
        self,
        *,
        stream: str,
        now: float,
        permissions: ViewerPermissions | None = None,
        viewer: str | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        token_id: str | None = None,
    ) -> tuple[str, ViewerGrant]:
        """A signed token, and the grant its verification will return."""
        permissions = permissions or ViewerPermissions()
        check_stream_id(stream)
        if viewer is not None:
            check_viewer_id(viewer)
        if not (math.isfinite(ttl_s) and 0 < ttl_s <= MAX_TTL_S):
            raise ConfigError(f"token lifetime {ttl_s} s must be between 0 and {MAX_TTL_S:g} s")
        if permissions.max_quality not in _CAPS:
            raise ConfigError("max_quality must be a named preset: low, medium, high or ultra")
        token_id = token_id or secrets.token_urlsafe(12)
        issued = int(now)
        expires = math.ceil(now + ttl_s)
        claims: dict[str, Any] = {
            "stream": stream,
            "can_view": permissions.can_view,
            "can_record": permissions.can_record,
            "can_control_quality": permissions.can_control_quality,
            "max_quality": permissions.max_quality.value,
            "iat": issued,
            "exp": expires,
            "jti": token_id,
        }
        if viewer is not None:
            claims["sub"] = viewer
        signing = self.key._signing
        assert signing is not None  # checked in __init__
        token = jwt.encode(claims, signing, algorithm=self.key.algorithm)
        grant = ViewerGrant(
            stream=stream,
            viewer=viewer,
            permissions=permissions,
            token_id=token_id,
            expires_at=float(expires),
        )
        return token, grant


class TokenVerifier:
    """Checks viewer tokens against one key and a revocation list (module doc: the order)."""

    def __init__(
        self,
        key: TokenKey,
        *,
        revocations: Revocations | None = None,
        leeway_s: float = 0.0,
    ) -> None:
        if not (math.isfinite(leeway_s) and 0 <= leeway_s <= 300):
            raise ConfigError(f"leeway {leeway_s} s must be between 0 and 300 s")
        self.key = key
        #: Shared with whoever revokes: the verifier reads it on every check.
        self.revocations = revocations if revocations is not None else Revocations()
        self.leeway_s = leeway_s

    def verify(self, token: str | None, *, stream: str, now: float) -> ViewerGrant:
        """The grant ``token`` carries for ``stream`` at ``now``, or :class:`AuthError`."""
        if not token:
            raise AuthError("no token was presented", AuthReason.MISSING)
        if len(token) > MAX_TOKEN_LENGTH or not _TOKEN_ALPHABET.issuperset(token):
            raise AuthError(
                f"not a JWT: a token is at most {MAX_TOKEN_LENGTH} base64url characters "
                "in three dot-separated parts",
                AuthReason.MALFORMED,
            )
        payload = self._verified_payload(token)
        try:
            claims = msgspec.convert(payload, _Claims)
        except msgspec.ValidationError as exc:
            raise AuthError(
                f"the token's claims are not a viewer token's: {_claim_problem(exc)}",
                AuthReason.MALFORMED,
            ) from None
        grant = self._grant(claims)
        assert grant.expires_at is not None
        if now >= grant.expires_at + self.leeway_s:  # RFC 7519 §4.1.4: "on or after"
            raise AuthError(
                f"the token expired {now - grant.expires_at:.0f} s ago", AuthReason.EXPIRED
            )
        if grant.stream != stream:
            raise AuthError(
                f"the token is for stream {grant.stream!r}, not {stream!r}",
                AuthReason.WRONG_STREAM,
            )
        self.check_revoked(grant)
        return grant

    def check_revoked(self, grant: ViewerGrant, *, viewer: str | None = None) -> None:
        """Raise ``AuthError(revoked)`` when the grant's token id, its viewer or ``viewer``
        (the id the connection ended up with) is revoked."""
        if self.revocations.revoked(token_id=grant.token_id, viewers=(grant.viewer, viewer)):
            raise AuthError("the token or its viewer was revoked", AuthReason.REVOKED)

    def _verified_payload(self, token: str) -> dict[str, Any]:
        algorithm = self.key.algorithm
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("not a JWT: the header does not decode", AuthReason.MALFORMED) from None
        if not isinstance(header.get("alg"), str):  # RFC 7515 §4.1.1: alg is required
            raise AuthError("not a JWT: the header names no algorithm", AuthReason.MALFORMED)
        if header["alg"] != algorithm:
            # Checked before PyJWT (which pins too) so the reason is plain: a token naming
            # another algorithm was not made by this server's key.
            raise AuthError(
                f"the token is not signed with {algorithm}, the only algorithm this server accepts",
                AuthReason.FORGED,
            )
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                self.key._verifying,
                algorithms=[algorithm],
                # exp and iat are checked against the caller's ``now``, not the machine clock.
                options={
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError):
            raise AuthError("the token's signature does not verify", AuthReason.FORGED) from None
        except jwt.InvalidTokenError:
            raise AuthError(
                "not a JWT: the payload does not decode", AuthReason.MALFORMED
            ) from None
        return payload

    @staticmethod
    def _grant(claims: _Claims) -> ViewerGrant:
        problems = []
        if not math.isfinite(claims.exp) or claims.exp <= 0:
            problems.append("exp is not a time")
        if claims.iat is not None and (not math.isfinite(claims.iat) or claims.iat > claims.exp):
            problems.append("iat is not a time before exp")
        if claims.max_quality not in _CAPS:
            problems.append("max_quality is not low, medium, high or ultra")
        if not claims.jti or len(claims.jti) > 128:
            problems.append("jti is not 1 to 128 characters")
        try:
            check_stream_id(claims.stream)
            if claims.sub is not None:
                check_viewer_id(claims.sub)
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise AuthError(
                f"the token's claims are not a viewer token's: {'; '.join(problems)}",
                AuthReason.MALFORMED,
            )
        return ViewerGrant(
            stream=claims.stream,
            viewer=claims.sub,
            permissions=ViewerPermissions(
                can_view=claims.can_view,
                can_record=claims.can_record,
                can_control_quality=claims.can_control_quality,
                max_quality=claims.max_quality,
            ),
            token_id=claims.jti,
            expires_at=float(claims.exp),
        )


def _claim_problem(exc: msgspec.ValidationError) -> str:
    """msgspec's complaint without any value from the token (it quotes bad enum values)."""
    text = str(exc)
    if text.startswith("Object missing required field"):
        return text.replace("Object", "a", 1)
    path = text.rpartition(" - at ")[2]
    return f"{path.strip('`')} has the wrong type or value" if path != text else "not an object"
