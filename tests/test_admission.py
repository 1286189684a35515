"""Admission of a viewer connection (``shared.auth.admission``) and the operator's pending list
(``shared.auth.pending``), with a fake clock: literal times, no sockets."""

from __future__ import annotations

import base64
import itertools
import json
import logging
import struct
from collections.abc import Callable

import jwt
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.auth.admission import (
    Action,
    AdmissionPolicy,
    AdmissionState,
    AdmitViewer,
    CloseConnection,
    RecordCommand,
    RequestApproval,
    SelectRung,
    SendControl,
    ViewerAdmission,
    WithdrawApproval,
    allowed_rungs,
    rung_within,
)
from shared.auth.control import (
    LENGTH_PREFIX,
    MAX_MESSAGE_SIZE,
    AccessErrorCode,
    Hello,
    Notice,
    Pending,
    QualityReply,
    QualityRequest,
    RecordReply,
    RecordRequest,
    Refused,
    RungInfo,
    ServerMessage,
    Welcome,
    encode_message,
    notice,
    server_message_parser,
)
from shared.auth.pending import Denial, PeerIdentity, PendingRequests
from shared.auth.tokens import TokenIssuer, TokenKey, TokenVerifier
from shared.errors import ConfigError, StreamNotFoundError
from shared.models import QualityPreset, ViewerPermissions
from shared.roq.framing import RoqErrorCode

SECRET = b"admission-tests-secret-0123456789abcdef"
KEY = TokenKey.hs256(SECRET)
T0 = 1_700_000_000.0
PEER = PeerIdentity(address="192.0.2.7:50123", certificate_fingerprint="sha256:ab12")
RUNGS = (
    RungInfo(index=0, width=1920, height=1080, framerate=30, bitrate=3_000_000, preset="high"),
    RungInfo(index=1, width=1280, height=720, framerate=30, bitrate=1_500_000, preset="medium"),
    RungInfo(index=2, width=854, height=480, framerate=15, bitrate=500_000, preset="low"),
)
STREAMS = {"cam": RUNGS, "screen": RUNGS[:1]}
#: Request and viewer ids, unique across the session as the real random ones are.
IDS = itertools.count(1)


def token(
    *,
    stream: str = "cam",
    viewer: str | None = "alice",
    ttl_s: float = 600,
    now: float = T0,
    key: TokenKey = KEY,
    **permissions: object,
) -> str:
    issued, _ = TokenIssuer(key).issue(
        stream=stream,
        viewer=viewer,
        ttl_s=ttl_s,
        now=now,
        permissions=ViewerPermissions(**permissions),  # type: ignore[arg-type]
    )
    return issued


def hello(tok: str | None = None, **fields: object) -> bytes:
    base: dict[str, object] = {"version": 1, "stream": "cam", "token": tok}
    base.update(fields)
    return encode_message(Hello(**base))  # type: ignore[arg-type]


def connection(
    verifier: TokenVerifier | None = None,
    *,
    now: float = T0,
    policy: AdmissionPolicy | None = None,
) -> ViewerAdmission:
    return ViewerAdmission(
        verifier=verifier or TokenVerifier(KEY),
        streams=STREAMS,
        peer=PEER,
        now=now,
        policy=policy,
        new_id=lambda: f"id{next(IDS)}",
    )


def sent(actions: list[Action]) -> list[ServerMessage]:
    """What reached the wire, decoded as a viewer decodes it."""
    data = b"".join(a.data for a in actions if isinstance(a, SendControl))
    return server_message_parser().feed(data)


def refused(actions: list[Action]) -> tuple[int, str]:
    """The refusal in ``actions``: its code and reason, checked on the wire and in the close."""
    messages = sent(actions)
    assert isinstance(messages[-1], Refused), messages
    close = actions[-1]
    assert isinstance(close, CloseConnection)
    assert close.code == messages[-1].code
    assert close.reason.startswith(f"{messages[-1].reason}: ")
    assert not any(isinstance(a, AdmitViewer) for a in actions)
    return close.code, messages[-1].reason


def reason_text(actions: list[Action]) -> tuple[str | None, str]:
    """The reason and text of the first message sent (a refusal or a refused request)."""
    message = sent(actions)[0]
    assert isinstance(message, Refused | QualityReply | RecordReply)
    return message.reason, message.text or ""


def admitted(conn: ViewerAdmission, actions: list[Action]) -> tuple[Welcome, AdmitViewer]:
    welcome, admit = actions[-2:]
    assert isinstance(welcome, SendControl) and isinstance(admit, AdmitViewer)
    assert isinstance(welcome.message, Welcome)
    assert conn.state is AdmissionState.ADMITTED and conn.media_allowed
    return welcome.message, admit


# --- admitted --------------------------------------------------------------------------------


def test_a_valid_token_is_welcomed_and_only_then_may_media_flow() -> None:
    conn = connection()
    assert not conn.media_allowed and conn.next_deadline() == T0 + 5
    tok = token(can_record=True)
    first, second = hello(tok)[:10], hello(tok)[10:]
    assert conn.receive(first, T0 + 0.1) == []
    assert not conn.media_allowed  # half a hello lets nothing through
    actions = conn.receive(second, T0 + 0.2)
    welcome, admit = admitted(conn, actions)
    assert isinstance(actions[0], SendControl)  # welcome is written before media starts
    assert welcome.viewer == "alice" and welcome.stream == "cam"
    assert welcome.permissions.can_record and not welcome.permissions.can_control_quality
    assert [r.index for r in welcome.rungs] == [0, 1, 2]
    assert welcome.expires_at == T0 + 600
    assert admit.grant.viewer == "alice" and admit.rungs == (0, 1, 2)
    assert conn.next_deadline() is None  # nothing more to time


def test_a_token_without_a_viewer_takes_the_hello_viewer_or_a_new_id() -> None:
    conn = connection()
    welcome, admit = admitted(conn, conn.receive(hello(token(viewer=None), viewer="bob"), T0))
    assert welcome.viewer == admit.grant.viewer == "bob"
    conn = connection()
    welcome, _ = admitted(conn, conn.receive(hello(token(viewer=None)), T0))
    assert welcome.viewer.startswith("id")  # made up by the connection
    # The token's viewer wins over what the hello claims.
    conn = connection()
    welcome, _ = admitted(conn, conn.receive(hello(token(viewer="alice"), viewer="mallory"), T0))
    assert welcome.viewer == "alice"


# --- refusals: one per token reason ----------------------------------------------------------


def _expired() -> str:
    return token(ttl_s=10, now=T0 - 60)


def _forged() -> str:
    return token(key=TokenKey.hs256(b"not-the-server-secret-0123456789ab"))


def _wrong_stream() -> str:
    return token(stream="screen")


def _malformed() -> str:
    return jwt.encode({"stream": "cam", "jti": "x"}, SECRET, algorithm="HS256")  # no exp


@pytest.mark.parametrize(
    ("make", "code", "reason"),
    [
        (_expired, AccessErrorCode.EXPIRED, "expired"),
        (_forged, AccessErrorCode.UNAUTHORIZED, "forged"),
        (_wrong_stream, AccessErrorCode.FORBIDDEN, "wrong_stream"),
        (_malformed, AccessErrorCode.UNAUTHORIZED, "malformed"),
        (lambda: "", AccessErrorCode.UNAUTHORIZED, "missing"),
    ],
    ids=["expired", "forged", "wrong_stream", "malformed", "missing-empty"],
)
def test_token_refusals(make: Callable[[], str], code: AccessErrorCode, reason: str) -> None:
    conn = connection()
    tok = make()
    actions = conn.receive(hello(tok), T0)
    assert refused(actions) == (code, reason)
    assert conn.state is AdmissionState.CLOSED and not conn.media_allowed
    assert conn.next_deadline() is None
    for action in actions:
        if isinstance(action, CloseConnection):
            assert tok == "" or tok not in action.reason


def test_revoked_token_is_refused_at_hello() -> None:
    verifier = TokenVerifier(KEY)
    verifier.revocations.revoke_viewer("alice")
    assert refused(connection(verifier).receive(hello(token()), T0)) == (
        AccessErrorCode.REVOKED,
        "revoked",
    )


def test_a_revoked_viewer_id_named_in_the_hello_is_refused() -> None:
    verifier = TokenVerifier(KEY)
    verifier.revocations.revoke_viewer("bob")
    actions = connection(verifier).receive(hello(token(viewer=None), viewer="bob"), T0)
    assert refused(actions) == (AccessErrorCode.REVOKED, "revoked")


def test_missing_token_when_approvals_are_off() -> None:
    conn = connection(policy=AdmissionPolicy(allow_approval_requests=False))
    assert refused(conn.receive(hello(None), T0)) == (AccessErrorCode.UNAUTHORIZED, "missing")


def test_unknown_stream_and_unknown_version() -> None:
    assert refused(connection().receive(hello(token(), stream="nope"), T0)) == (
        AccessErrorCode.UNKNOWN_STREAM,
        "unknown_stream",
    )
    assert refused(connection().receive(hello(token(), version=2), T0)) == (
        AccessErrorCode.PROTOCOL_ERROR,
        "version",
    )


@pytest.mark.parametrize(
    "data",
    [
        encode_message(QualityRequest(rung=0)),  # not a hello first
        b"\x00\x00\x00\x03abc",  # not JSON
        b"\xff\xff\xff\xff",  # oversize
    ],
    ids=["quality-first", "not-json", "oversize"],
)
def test_protocol_errors_close_the_connection(data: bytes) -> None:
    conn = connection()
    actions = conn.receive(data, T0)
    assert refused(actions) == (AccessErrorCode.PROTOCOL_ERROR, "protocol")
    assert not conn.media_allowed
    assert conn.receive(hello(token()), T0) == []  # closed: nothing more happens


@pytest.mark.parametrize("fields", [{"name": "\x1b[2Jhi"}, {"viewer": "a\nb"}])
def test_control_characters_in_viewer_or_name_are_refused(fields: dict[str, str]) -> None:
    conn = connection()
    assert refused(conn.receive(hello(None, **fields), T0)) == (
        AccessErrorCode.PROTOCOL_ERROR,
        "protocol",
    )


def test_a_second_hello_cuts_an_admitted_viewer() -> None:
    conn = connection()
    admitted(conn, conn.receive(hello(token()), T0))
    actions = conn.receive(hello(token(viewer="mallory")), T0 + 1)
    assert refused(actions) == (AccessErrorCode.PROTOCOL_ERROR, "protocol")
    assert not conn.media_allowed


# --- the hello timeout -----------------------------------------------------------------------


def test_a_client_that_never_says_hello_is_closed_at_the_deadline() -> None:
    conn = connection(now=100.0)
    assert conn.next_deadline() == 105.0
    assert conn.handle_timer(104.999) == []
    assert conn.receive(hello(token(now=100.0))[:5], 104.0) == []  # bytes do not extend it
    assert conn.next_deadline() == 105.0
    assert refused(conn.handle_timer(105.0)) == (AccessErrorCode.HELLO_TIMEOUT, "hello_timeout")
    assert conn.next_deadline() is None and conn.handle_timer(200.0) == []


def test_a_hello_after_the_deadline_is_too_late_even_before_the_timer_ran() -> None:
    conn = connection(now=100.0)
    actions = conn.receive(hello(token(now=100.0)), 105.5)
    assert refused(actions) == (AccessErrorCode.HELLO_TIMEOUT, "hello_timeout")


def test_the_hello_timeout_is_configurable() -> None:
    conn = connection(now=0.0, policy=AdmissionPolicy(hello_timeout_s=1.5))
    assert conn.next_deadline() == 1.5


# --- unknown viewers: pending, approved, denied, expired --------------------------------------


def ask(registry: PendingRequests, now: float = T0) -> tuple[ViewerAdmission, str]:
    conn = connection(now=now)
    actions = conn.receive(hello(None, viewer="carol", name="Carol's laptop"), now)
    request_action, pending = actions
    assert isinstance(request_action, RequestApproval)
    request = request_action.request
    assert request.peer == PEER and request.name == "Carol's laptop"
    assert request.viewer == "carol" and request.stream == "cam"
    assert sent([pending]) == [Pending(request=request.request_id, expires_in=60.0)]
    assert conn.state is AdmissionState.PENDING_APPROVAL and not conn.media_allowed
    assert conn.next_deadline() == now + 60
    assert registry.add(request, now) is None
    return conn, request.request_id


def test_pending_request_approved() -> None:
    registry = PendingRequests()
    conn, request_id = ask(registry)
    assert [r.request_id for r in registry.list(T0 + 1)] == [request_id]
    approval = registry.approve(
        request_id,
        T0 + 10,
        permissions=ViewerPermissions(can_control_quality=True, max_quality=QualityPreset.MEDIUM),
    )
    assert len(registry) == 0
    welcome, admit = admitted(conn, conn.approve(approval, T0 + 10))
    assert welcome.viewer == "carol" and welcome.permissions.can_control_quality
    assert admit.rungs == (1, 2) and admit.grant.token_id is None
    with pytest.raises(StreamNotFoundError, match="answered, withdrawn or expired"):
        registry.approve(request_id, T0 + 11)  # once only


def test_pending_request_denied() -> None:
    registry = PendingRequests()
    conn, request_id = ask(registry)
    denial = registry.deny(request_id, T0 + 5, text="not tonight")
    actions = conn.deny(denial, T0 + 5)
    assert refused(actions) == (AccessErrorCode.DENIED, "denied")
    assert "not tonight" in reason_text(actions)[1]
    assert len(registry) == 0 and not conn.media_allowed


def test_pending_request_expires_on_both_sides() -> None:
    registry = PendingRequests()
    conn, request_id = ask(registry, now=1000.0)
    assert registry.next_deadline() == 1060.0
    assert conn.handle_timer(1059.9) == [] and registry.expire(1059.9) == []
    actions = conn.handle_timer(1060.0)
    assert actions[0] == WithdrawApproval(request_id=request_id)
    assert refused(actions) == (AccessErrorCode.APPROVAL_EXPIRED, "approval_expired")
    assert [r.request_id for r in registry.expire(1060.0)] == [request_id]
    assert registry.list(1060.0) == [] and registry.next_deadline() is None
    with pytest.raises(StreamNotFoundError):
        registry.approve(request_id, 1060.0)


def test_an_approval_after_expiry_or_for_another_request_is_ignored() -> None:
    registry = PendingRequests()
    conn, request_id = ask(registry)
    other_registry = PendingRequests()
    _, other_id = ask(other_registry)
    stray = other_registry.approve(other_id, T0)
    stray = type(stray)(request_id="someone-else", grant=stray.grant)
    assert conn.approve(stray, T0 + 1) == []
    assert conn.state is AdmissionState.PENDING_APPROVAL
    late = registry.approve(request_id, T0 + 59)
    actions = conn.approve(late, T0 + 61)  # the connection lapsed first
    assert refused(actions) == (AccessErrorCode.APPROVAL_EXPIRED, "approval_expired")


def test_too_many_pending_requests() -> None:
    registry = PendingRequests(capacity=1)
    ask(registry)
    conn = connection()
    request_action = conn.receive(hello(None), T0)[0]
    assert isinstance(request_action, RequestApproval)
    denial = registry.add(request_action.request, T0)
    assert isinstance(denial, Denial)
    assert refused(conn.deny(denial, T0)) == (AccessErrorCode.TOO_MANY, "too_many")


def test_requests_while_pending_are_answered_not_admitted() -> None:
    conn, _ = ask(PendingRequests())
    replies = sent(
        conn.receive(
            encode_message(QualityRequest(id=3, rung=2))
            + encode_message(RecordRequest(action="start")),
            T0 + 1,
        )
    )
    text = "wait for the welcome: the request has not been approved yet"
    assert replies == [
        QualityReply(ok=False, id=3, reason="not_admitted", text=text),
        RecordReply(ok=False, action="start", reason="not_admitted", text=text),
    ]
    assert conn.state is AdmissionState.PENDING_APPROVAL


def test_a_pending_viewer_that_leaves_is_withdrawn() -> None:
    conn, request_id = ask(PendingRequests())
    assert conn.connection_lost() == [WithdrawApproval(request_id=request_id)]
    conn, request_id = ask(PendingRequests())
    actions = conn.receive(b"", T0 + 1, end_stream=True)
    assert actions == [
        WithdrawApproval(request_id=request_id),
        CloseConnection(code=RoqErrorCode.ROQ_NO_ERROR, reason="the viewer left"),
    ]


# --- revocation cuts a live viewer -----------------------------------------------------------


def test_revoking_the_token_cuts_the_viewer_at_once() -> None:
    verifier = TokenVerifier(KEY)
    conn = connection(verifier)
    _, admit = admitted(conn, conn.receive(hello(token()), T0))
    assert conn.recheck(T0 + 30) == []  # nothing revoked: nothing happens
    verifier.revocations.revoke_token("unrelated")
    verifier.revocations.revoke_viewer("bob")
    assert conn.recheck(T0 + 30) == [] and conn.media_allowed
    assert admit.grant.token_id is not None
    verifier.revocations.revoke_token(admit.grant.token_id)
    # The cut is in the answer to the very call that told of the revocation: no timer, no wait.
    actions = conn.recheck(T0 + 30)
    assert refused(actions) == (AccessErrorCode.REVOKED, "revoked")
    assert not conn.media_allowed and conn.state is AdmissionState.CLOSED


def test_revoking_the_viewer_cuts_it_whichever_token_it_used() -> None:
    verifier = TokenVerifier(KEY)
    conn = connection(verifier)
    admitted(conn, conn.receive(hello(token(viewer=None), viewer="dave"), T0))
    verifier.revocations.revoke_viewer("dave")
    assert refused(conn.recheck(T0 + 1)) == (AccessErrorCode.REVOKED, "revoked")


def test_revoking_an_approved_viewer_and_a_pending_one() -> None:
    registry = PendingRequests()
    conn, request_id = ask(registry)
    verifier = conn._verifier
    admitted(conn, conn.approve(registry.approve(request_id, T0), T0))
    verifier.revocations.revoke_viewer("carol")
    assert refused(conn.recheck(T0 + 1)) == (AccessErrorCode.REVOKED, "revoked")
    conn, request_id = ask(registry)
    conn._verifier.revocations.revoke_viewer("carol")
    actions = conn.recheck(T0 + 1)
    assert actions[0] == WithdrawApproval(request_id=request_id)
    assert refused(actions) == (AccessErrorCode.REVOKED, "revoked")


# --- permissions enforced ---------------------------------------------------------------------


def test_can_view_false_is_forbidden() -> None:
    actions = connection().receive(hello(token(can_view=False)), T0)
    assert refused(actions) == (AccessErrorCode.FORBIDDEN, "not_permitted")


def test_max_quality_caps_the_rungs_offered_and_chosen() -> None:
    conn = connection()
    tok = token(max_quality=QualityPreset.MEDIUM, can_control_quality=True)
    welcome, admit = admitted(conn, conn.receive(hello(tok), T0))
    assert [r.index for r in welcome.rungs] == [1, 2] and admit.rungs == (1, 2)
    assert conn.allowed_rungs == (1, 2)
    actions = conn.receive(encode_message(QualityRequest(id=1, rung=0)), T0 + 1)
    assert not any(isinstance(a, SelectRung) for a in actions)
    (reply,) = sent(actions)
    assert isinstance(reply, QualityReply) and not reply.ok
    assert reply.reason == "above_max_quality" and "max_quality medium" in (reply.text or "")
    actions = conn.receive(encode_message(QualityRequest(id=2, preset="high")), T0 + 2)
    assert reason_text(actions)[0] == "above_max_quality"
    actions = conn.receive(encode_message(QualityRequest(id=3, rung=1)), T0 + 3)
    assert actions[0] == SelectRung(rung=1)
    assert sent(actions) == [QualityReply(ok=True, id=3, rung=1)] and conn.rung == 1


def test_no_rung_within_max_quality_is_forbidden() -> None:
    conn = connection()
    actions = conn.receive(
        hello(token(stream="screen", max_quality=QualityPreset.LOW), stream="screen"), T0
    )
    assert refused(actions) == (AccessErrorCode.FORBIDDEN, "quality_cap")


def test_quality_requests_need_can_control_quality() -> None:
    conn = connection()
    admitted(conn, conn.receive(hello(token()), T0))
    actions = conn.receive(encode_message(QualityRequest(id=9, rung=2)), T0 + 1)
    assert not any(isinstance(a, SelectRung) for a in actions)
    (reply,) = sent(actions)
    assert isinstance(reply, QualityReply)
    assert (reply.ok, reply.id, reply.reason) == (False, 9, "not_permitted")
    assert "can_control_quality" in (reply.text or "")
    assert conn.rung is None and conn.media_allowed  # refused, not cut


def test_quality_by_preset_back_to_adaptive_and_bad_requests() -> None:
    conn = connection()
    admitted(conn, conn.receive(hello(token(can_control_quality=True)), T0))
    assert conn.receive(encode_message(QualityRequest(preset="low")), T0)[0] == SelectRung(rung=2)
    assert conn.receive(encode_message(QualityRequest()), T0)[0] == SelectRung(rung=None)
    for request, reason in [
        (QualityRequest(rung=7), "unknown_rung"),
        (QualityRequest(preset="ultra"), "unknown_rung"),
        (QualityRequest(rung=1, preset="medium"), "bad_request"),
    ]:
        actions = conn.receive(encode_message(request), T0)
        assert [type(a) for a in actions] == [SendControl]
        assert reason_text(actions)[0] == reason


def test_recording_requests_need_can_record() -> None:
    conn = connection()
    admitted(conn, conn.receive(hello(token()), T0))
    actions = conn.receive(encode_message(RecordRequest(action="start", id=4)), T0)
    assert not any(isinstance(a, RecordCommand) for a in actions)
    assert sent(actions) == [
        RecordReply(
            ok=False,
            action="start",
            id=4,
            reason="not_permitted",
            text="this viewer may not record on the server (can_record is false)",
        )
    ]
    conn = connection()
    admitted(conn, conn.receive(hello(token(can_record=True)), T0))
    actions = conn.receive(encode_message(RecordRequest(action="start", id=5)), T0)
    assert actions == [RecordCommand(action="start", request_id=5)]
    assert isinstance(actions[0], RecordCommand)
    reply = conn.recording_done(actions[0], ok=False, text="disk full")
    assert sent(reply) == [
        RecordReply(ok=False, action="start", id=5, reason="failed", text="disk full")
    ]


def test_rung_within_a_cap() -> None:
    wide_low = RungInfo(index=1, width=1138, height=480, framerate=15, bitrate=1, preset="low")
    assert rung_within(wide_low, QualityPreset.LOW)  # a 21:9 source's "low" rung is still low
    custom_720 = RungInfo(index=0, width=1280, height=720, framerate=30, bitrate=1, preset="custom")
    assert rung_within(custom_720, QualityPreset.MEDIUM)
    assert not rung_within(custom_720, QualityPreset.LOW)
    custom_720p60 = RungInfo(
        index=0, width=1280, height=720, framerate=60, bitrate=1, preset="custom"
    )
    assert not rung_within(custom_720p60, QualityPreset.HIGH)  # HIGH is 30 fps
    assert rung_within(custom_720p60, QualityPreset.ULTRA)
    assert not rung_within(custom_720, QualityPreset.CUSTOM)  # no cap is not a cap
    assert [r.index for r in allowed_rungs(RUNGS[::-1], QualityPreset.HIGH)] == [0, 1, 2]


# --- notices ----------------------------------------------------------------------------------


def test_notices_go_to_admitted_viewers_only() -> None:
    message = notice("going live", {"in_s": 300})
    waiting = connection()
    assert waiting.notice(message) == []
    pending, _ = ask(PendingRequests())
    assert pending.notice(message) == []
    conn = connection()
    admitted(conn, conn.receive(hello(token()), T0))
    assert sent(conn.notice(message)) == [Notice(text="going live", data={"in_s": 300})]


# --- tokens never in logs ---------------------------------------------------------------------


def test_no_token_in_any_log_record_or_close_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    verifier = TokenVerifier(KEY)
    good = token()
    verifier.revocations.revoke_token("nothing")
    tokens = [good, _expired(), _forged(), _wrong_stream(), _malformed(), good[:-3] + "abc"]
    reasons = []
    for tok in tokens:
        conn = connection(verifier)
        for action in conn.receive(hello(tok), T0):
            if isinstance(action, CloseConnection):
                reasons.append(action.reason)
            if isinstance(action, AdmitViewer):
                verifier.revocations.revoke_viewer("alice")
                reasons += [a.reason for a in conn.recheck(T0) if isinstance(a, CloseConnection)]
    assert len(reasons) == len(tokens)
    assert len(caplog.records) >= len(tokens)  # each refusal was logged
    for tok in tokens:
        for part in (tok, *tok.split(".")[1:]):
            assert part not in caplog.text
            assert all(part not in reason for reason in reasons)


# --- property: random bytes and random tokens -------------------------------------------------

LIMIT = LENGTH_PREFIX + MAX_MESSAGE_SIZE


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


#: Strings that look like JWTs: three base64url parts of random or claim-shaped JSON.
JWT_SHAPED = st.builds(
    lambda header, payload, signature: f"{_b64(header)}.{_b64(payload)}.{_b64(signature)}",
    st.sampled_from([b'{"alg":"HS256","typ":"JWT"}', b'{"alg":"none"}', b'{"alg":"EdDSA"}'])
    | st.binary(max_size=40),
    st.sampled_from(
        [json.dumps({"stream": "cam", "exp": 2**40, "jti": "j", "sub": "alice"}).encode()]
    )
    | st.binary(max_size=80),
    st.binary(max_size=64),
)
TOKENS = st.text(max_size=300) | JWT_SHAPED | st.just(_forged()) | st.just(_expired())


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(
        st.binary(max_size=200)
        | st.binary(max_size=200).map(lambda b: struct.pack(">I", len(b)) + b),
        max_size=10,
    ),
    times=st.lists(st.floats(min_value=0, max_value=10), min_size=10, max_size=10),
)
def test_random_bytes_never_admit_and_never_raise(chunks: list[bytes], times: list[float]) -> None:
    conn = connection(now=0.0)
    now = 0.0
    for chunk, step in zip(chunks, times, strict=False):
        now += step
        actions = conn.receive(chunk, now)
        assert not any(isinstance(a, AdmitViewer) for a in actions)
        assert not conn.media_allowed
        assert conn.buffered < LIMIT


@settings(max_examples=300, deadline=None)
@given(tok=TOKENS, viewer=st.none() | st.text(min_size=1, max_size=64).filter(str.isprintable))
def test_random_tokens_are_refused_with_a_token_reason(tok: str, viewer: str | None) -> None:
    conn = connection()
    message = {"type": "hello", "version": 1, "stream": "cam", "token": tok, "viewer": viewer}
    payload = json.dumps(message).encode()
    actions = conn.receive(struct.pack(">I", len(payload)) + payload, T0)
    assert not any(isinstance(a, AdmitViewer) for a in actions)
    assert not conn.media_allowed
    close = actions[-1]
    assert isinstance(close, CloseConnection)
    assert close.code in {AccessErrorCode.UNAUTHORIZED, AccessErrorCode.EXPIRED}
    assert close.reason.split(":")[0] in {"missing", "malformed", "forged", "expired"}
    if len(tok) >= 8:
        assert tok not in close.reason


def test_the_pending_list_is_oldest_first_and_ids_are_not_reused() -> None:
    registry = PendingRequests()
    _, first_id = ask(registry, now=T0)
    _, second_id = ask(registry, now=T0 + 1)
    assert [r.request_id for r in registry.list(T0 + 2)] == [first_id, second_id]
    request = registry.list(T0 + 2)[0]
    assert registry.add(request, T0 + 2) is None  # told twice: still one
    assert len(registry) == 2
    with pytest.raises(ConfigError, match="already in use"):
        registry.add(type(request)(**{**msgspec.structs.asdict(request), "name": "x"}), T0 + 2)
    assert registry.withdraw(first_id) == request and len(registry) == 1
    nameless = ViewerAdmission(
        verifier=TokenVerifier(KEY), streams=STREAMS, peer=PEER, now=T0, new_id=lambda: "r9"
    )
    (request_action, _) = nameless.receive(hello(None), T0)
    assert isinstance(request_action, RequestApproval)
    registry.add(request_action.request, T0)
    assert registry.approve("r9", T0).grant.viewer == "viewer-r9"
