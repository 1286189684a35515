"""Viewer tokens (``shared.auth.tokens``) and the secret file (``shared.auth.secret_file``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import pickle
from pathlib import Path

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from shared.auth.secret_file import (
    SECRET_ENV,
    default_secret_path,
    ensure_secret_file,
    load_secret,
    read_secret_file,
)
from shared.auth.tokens import (
    MAX_TOKEN_LENGTH,
    Revocations,
    TokenIssuer,
    TokenKey,
    TokenVerifier,
    ViewerGrant,
)
from shared.errors import AuthError, AuthReason, ConfigError, KizunaError
from shared.models import QualityPreset, ViewerPermissions

SECRET = b"s3cret-for-tests-only-0123456789abcdef"
NOW = 1_700_000_000.0
KEY = TokenKey.hs256(SECRET)
ED_KEY = TokenKey.generate_ed25519()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, object], claims: dict[str, object], sign: bytes | None) -> str:
    """A compact JWS built by hand (what an attacker does), HMAC-SHA256 with ``sign`` if given."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b""
    if sign is not None:
        signature = hmac.new(sign, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def claims(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "stream": "cam",
        "sub": "alice",
        "can_view": True,
        "can_record": False,
        "can_control_quality": False,
        "max_quality": "ultra",
        "iat": int(NOW),
        "exp": int(NOW) + 60,
        "jti": "token-1",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def refusal(verifier: TokenVerifier, token: str | None, *, stream: str = "cam") -> AuthError:
    with pytest.raises(AuthError) as caught:
        verifier.verify(token, stream=stream, now=NOW)
    error = caught.value
    if token:
        # The message never carries the token nor its signature or payload.
        for part in (token, *[p for p in token.split(".") if len(p) >= 8]):
            assert part not in str(error) and part not in repr(error)
    return error


@pytest.mark.parametrize("key", [KEY, ED_KEY], ids=["HS256", "EdDSA"])
def test_an_issued_token_verifies_to_its_grant(key: TokenKey) -> None:
    permissions = ViewerPermissions(
        can_record=True, can_control_quality=True, max_quality=QualityPreset.MEDIUM
    )
    token, issued = TokenIssuer(key).issue(
        stream="cam", viewer="alice", permissions=permissions, ttl_s=60, now=NOW
    )
    grant = TokenVerifier(key).verify(token, stream="cam", now=NOW + 1)
    assert grant == issued
    assert grant == ViewerGrant(
        stream="cam",
        viewer="alice",
        permissions=permissions,
        token_id=issued.token_id,
        expires_at=NOW + 60,
    )
    assert jwt.get_unverified_header(token)["alg"] == key.algorithm
    # Each token has its own id.
    other, _ = TokenIssuer(key).issue(stream="cam", now=NOW)
    assert TokenVerifier(key).verify(other, stream="cam", now=NOW).token_id != grant.token_id


def test_a_token_without_a_viewer_grants_no_viewer_id() -> None:
    token, _ = TokenIssuer(KEY).issue(stream="cam", now=NOW)
    grant = TokenVerifier(KEY).verify(token, stream="cam", now=NOW)
    assert grant.viewer is None
    assert grant.permissions == ViewerPermissions()


# --- one test per refusal reason ---------------------------------------------------------------


@pytest.mark.parametrize("token", [None, ""])
def test_missing(token: str | None) -> None:
    assert refusal(TokenVerifier(KEY), token).reason is AuthReason.MISSING


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b.c",
        "eyJhbGciOiJIUzI1NiJ9",  # a header alone
        "e30.e30.",  # header {} : no algorithm, refused before any signature check
        "x" * (MAX_TOKEN_LENGTH + 1),
        "ünïcode.tøken.here",
        "eyJ hbGc.eyJ.sig",
    ],
)
def test_malformed_encoding(token: str) -> None:
    assert refusal(TokenVerifier(KEY), token).reason is AuthReason.MALFORMED


@pytest.mark.parametrize(
    "bad",
    [
        claims(stream=None),
        claims(exp=None),
        claims(jti=None),
        claims(exp="tomorrow"),
        claims(max_quality="custom"),
        claims(max_quality="best"),
        claims(can_record="yes"),
        claims(stream=""),
        claims(sub="x" * 65),
        claims(iat=int(NOW) + 3600),  # issued after it expires
    ],
    ids=[
        "no-stream",
        "no-exp",
        "no-jti",
        "exp-text",
        "cap-custom",
        "cap-unknown",
        "bool-text",
        "empty-stream",
        "long-sub",
        "iat-after-exp",
    ],
)
def test_malformed_claims_signed_with_the_right_key(bad: dict[str, object]) -> None:
    token = jwt.encode(bad, SECRET, algorithm="HS256")
    error = refusal(TokenVerifier(KEY), token)
    assert error.reason is AuthReason.MALFORMED
    # A bad enum value is never quoted back (it could be anything the issuer wrote).
    assert "best" not in str(error)


def test_forged_with_another_secret() -> None:
    token, _ = TokenIssuer(TokenKey.hs256(b"another-secret-0123456789abcdefgh")).issue(
        stream="cam", now=NOW
    )
    assert refusal(TokenVerifier(KEY), token).reason is AuthReason.FORGED


def test_forged_by_editing_the_claims_of_a_real_token() -> None:
    token, _ = TokenIssuer(KEY).issue(stream="cam", now=NOW)
    header, _, signature = token.split(".")
    upgraded = b64(json.dumps(claims(can_record=True)).encode())
    assert refusal(TokenVerifier(KEY), f"{header}.{upgraded}.{signature}").reason is (
        AuthReason.FORGED
    )


def test_forged_ed25519_token_from_another_key_pair() -> None:
    token, _ = TokenIssuer(TokenKey.generate_ed25519()).issue(stream="cam", now=NOW)
    assert refusal(TokenVerifier(ED_KEY), token).reason is AuthReason.FORGED


def test_expired_at_exp_exactly_and_valid_a_second_before() -> None:
    token, grant = TokenIssuer(KEY).issue(stream="cam", ttl_s=60, now=NOW)
    verifier = TokenVerifier(KEY)
    assert grant.expires_at == NOW + 60
    verifier.verify(token, stream="cam", now=NOW + 59)
    with pytest.raises(AuthError) as caught:
        verifier.verify(token, stream="cam", now=NOW + 60)  # RFC 7519: "on or after"
    assert caught.value.reason is AuthReason.EXPIRED
    assert token not in str(caught.value)


def test_leeway_allows_clock_skew_and_no_more() -> None:
    token, _ = TokenIssuer(KEY).issue(stream="cam", ttl_s=60, now=NOW)
    verifier = TokenVerifier(KEY, leeway_s=10)
    verifier.verify(token, stream="cam", now=NOW + 69)
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(token, stream="cam", now=NOW + 70)


def test_wrong_stream() -> None:
    token, _ = TokenIssuer(KEY).issue(stream="cam", now=NOW)
    error = refusal(TokenVerifier(KEY), token, stream="screen")
    assert error.reason is AuthReason.WRONG_STREAM
    assert "'cam'" in str(error) and "'screen'" in str(error)


def test_revoked_by_token_id_then_restored() -> None:
    token, grant = TokenIssuer(KEY).issue(stream="cam", viewer="alice", now=NOW)
    verifier = TokenVerifier(KEY)
    assert grant.token_id is not None
    verifier.revocations.revoke_token(grant.token_id, expires_at=grant.expires_at)
    assert refusal(verifier, token).reason is AuthReason.REVOKED
    verifier.revocations.restore_token(grant.token_id)
    assert verifier.verify(token, stream="cam", now=NOW) == grant


def test_revoked_by_viewer_id_covers_every_token_of_that_viewer() -> None:
    issuer = TokenIssuer(KEY)
    first, _ = issuer.issue(stream="cam", viewer="alice", now=NOW)
    second, _ = issuer.issue(stream="cam", viewer="alice", now=NOW)
    bob, _ = issuer.issue(stream="cam", viewer="bob", now=NOW)
    revocations = Revocations()
    revocations.revoke_viewer("alice")
    verifier = TokenVerifier(KEY, revocations=revocations)
    assert refusal(verifier, first).reason is AuthReason.REVOKED
    assert refusal(verifier, second).reason is AuthReason.REVOKED
    assert verifier.verify(bob, stream="cam", now=NOW).viewer == "bob"


def test_revocations_prune_expired_token_ids_and_travel_as_a_struct() -> None:
    revocations = Revocations()
    revocations.revoke_token("old", expires_at=NOW - 1)
    revocations.revoke_token("live", expires_at=NOW + 60)
    revocations.revoke_token("unknown-expiry")
    revocations.revoke_viewer("alice")
    revocations.prune(NOW)
    assert set(revocations.tokens) == {"live", "unknown-expiry"}
    shipped = msgspec.json.decode(msgspec.json.encode(revocations), type=Revocations)
    merged = Revocations()
    merged.update(shipped)
    assert merged.revoked(token_id="live") and merged.revoked(viewers=("alice",))
    assert not merged.revoked(token_id="old", viewers=("bob", None))


# --- algorithms are pinned -------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused_as_forged(alg: str) -> None:
    token = hand_made({"alg": alg, "typ": "JWT"}, claims(), sign=None)
    for verifier in (TokenVerifier(KEY), TokenVerifier(ED_KEY)):
        assert refusal(verifier, token).reason is AuthReason.FORGED


def test_pyjwt_alg_none_token_is_refused_as_forged() -> None:
    token = jwt.encode(claims(), None, algorithm="none")  # type: ignore[arg-type]
    assert refusal(TokenVerifier(KEY), token).reason is AuthReason.FORGED


def test_alg_confusion_hs256_signed_with_the_eddsa_public_key_is_forged() -> None:
    # The classic attack: the verifier's public key is public, so an attacker HMACs with it
    # and hopes the server verifies HS256 with "its key".
    public_pem = ED_KEY.public_pem()
    assert public_pem is not None
    token = hand_made({"alg": "HS256", "typ": "JWT"}, claims(), sign=public_pem)
    raw = ED_KEY._verifying
    assert isinstance(raw, ed25519.Ed25519PublicKey)
    raw_bytes = raw.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    token_raw = hand_made({"alg": "HS256", "typ": "JWT"}, claims(), sign=raw_bytes)
    verifier = TokenVerifier(TokenKey.ed25519(raw))
    assert refusal(verifier, token).reason is AuthReason.FORGED
    assert refusal(verifier, token_raw).reason is AuthReason.FORGED


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_an_eddsa_token_is_refused_by_an_hs256_server_and_hs384_by_either() -> None:
    eddsa, _ = TokenIssuer(ED_KEY).issue(stream="cam", now=NOW)
    assert refusal(TokenVerifier(KEY), eddsa).reason is AuthReason.FORGED
    hs384 = jwt.encode(claims(), SECRET, algorithm="HS384")  # right secret, other algorithm
    assert refusal(TokenVerifier(KEY), hs384).reason is AuthReason.FORGED


# --- errors and logs -------------------------------------------------------------------------


def test_auth_error_is_a_permission_error_and_pickles_with_its_reason() -> None:
    error = AuthError("the token expired 3 s ago", AuthReason.EXPIRED)
    assert isinstance(error, KizunaError) and isinstance(error, PermissionError)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is AuthError
    assert copy.reason is AuthReason.EXPIRED and str(copy) == str(error)


def test_no_token_in_any_log_record(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    issuer = TokenIssuer(KEY)
    good, grant = issuer.issue(stream="cam", viewer="alice", now=NOW)
    forged, _ = TokenIssuer(TokenKey.hs256(b"x" * 32)).issue(stream="cam", now=NOW)
    verifier = TokenVerifier(KEY)
    assert grant.token_id is not None
    verifier.revocations.revoke_token(grant.token_id)
    tokens = [good, forged, good + "x", jwt.encode(claims(exp=1), SECRET, algorithm="HS256")]
    for token in tokens:
        with pytest.raises(AuthError) as caught:
            verifier.verify(token, stream="cam", now=NOW)
        logging.getLogger("test").warning("refused: %s", caught.value)
    assert caplog.records  # the log did capture what was said
    for token in tokens:
        assert token.split(".")[2][:16] not in caplog.text
    assert SECRET.decode() not in caplog.text


def test_key_repr_hides_the_secret() -> None:
    assert SECRET.decode() not in repr(KEY)
    assert "HS256" in repr(KEY)


# --- keys and issuing ------------------------------------------------------------------------


def test_short_hs256_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 32"):
        TokenKey.hs256(b"short")


def test_issue_refuses_impossible_tokens() -> None:
    issuer = TokenIssuer(KEY)
    with pytest.raises(ConfigError, match="lifetime"):
        issuer.issue(stream="cam", ttl_s=0, now=NOW)
    with pytest.raises(ConfigError, match="max_quality"):
        issuer.issue(
            stream="cam",
            permissions=ViewerPermissions(max_quality=QualityPreset.CUSTOM),
            now=NOW,
        )
    with pytest.raises(ConfigError, match="stream id"):
        issuer.issue(stream="two words", now=NOW)


def test_ed25519_keys_from_pem_and_a_public_key_only_verifies() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    signer = TokenKey.from_pem(private_pem)
    public_pem = signer.public_pem()
    assert public_pem is not None
    verifier_key = TokenKey.from_pem(public_pem)
    assert not verifier_key.can_sign
    with pytest.raises(ConfigError, match="not sign"):
        TokenIssuer(verifier_key)
    token, grant = TokenIssuer(signer).issue(stream="cam", now=NOW)
    assert TokenVerifier(verifier_key).verify(token, stream="cam", now=NOW) == grant


def test_a_non_ed25519_key_is_refused() -> None:
    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError, match="only Ed25519"):
        TokenKey.from_pem(rsa_pem)


# --- the secret file -------------------------------------------------------------------------


def test_default_path_follows_xdg_state_home_then_home(tmp_path: Path) -> None:
    assert default_secret_path({"XDG_STATE_HOME": str(tmp_path), "HOME": "/nowhere"}) == (
        tmp_path / "kizuna-stream" / "token-secret"
    )
    # A relative XDG_STATE_HOME is invalid per the spec: ignored.
    assert default_secret_path({"XDG_STATE_HOME": "rel", "HOME": str(tmp_path)}) == (
        tmp_path / ".local" / "state" / "kizuna-stream" / "token-secret"
    )


def test_the_server_creates_a_private_secret_file_once(tmp_path: Path) -> None:
    path = tmp_path / "state" / "kizuna-stream" / "token-secret"
    old_umask = os.umask(0)  # even a permissive umask must not open the file up
    try:
        assert ensure_secret_file(path) == path
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    secret = read_secret_file(path)
    assert len(secret) >= 32
    ensure_secret_file(path)  # a second start keeps the secret its tokens were signed with
    assert read_secret_file(path) == secret
    assert TokenKey.hs256(secret).algorithm == "HS256"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_secret_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"y" * 40)
    path.chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600") as caught:
        read_secret_file(path)
    assert "y" * 40 not in str(caught.value)
    with pytest.raises(ConfigError, match="chmod 600"):
        ensure_secret_file(path)  # a server does not start on an open secret either


def test_a_short_missing_or_linked_secret_file_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"tiny\n")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 32"):
        read_secret_file(short)
    with pytest.raises(ConfigError, match="does not exist"):
        read_secret_file(tmp_path / "absent")
    good = tmp_path / "good"
    good.write_bytes(b"g" * 40)
    good.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(good)
    with pytest.raises(ConfigError, match="cannot open"):
        read_secret_file(link)


def test_load_secret_order_file_then_env_then_default(tmp_path: Path) -> None:
    state = tmp_path / "state"
    environ = {"XDG_STATE_HOME": str(state), "HOME": str(tmp_path)}
    with pytest.raises(ConfigError, match=SECRET_ENV) as caught:
        load_secret(environ=environ)
    assert "kizuna-stream serve" in str(caught.value)
    created = load_secret(create=True, environ=environ)  # what serve does
    assert load_secret(environ=environ) == created  # what token on the same machine reads
    environ[SECRET_ENV] = "e" * 40
    assert load_secret(environ=environ) == b"e" * 40
    given = tmp_path / "given"
    given.write_bytes(b"f" * 40 + b"\n")
    given.chmod(0o600)
    assert load_secret(given, environ=environ) == b"f" * 40


def test_a_short_env_secret_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match="at least 32") as caught:
        load_secret(environ={SECRET_ENV: "hunter2-hunter2"})
    assert "hunter2" not in str(caught.value)
