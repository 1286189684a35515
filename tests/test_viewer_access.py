"""The viewer's side of access control, against a real QUIC server that enforces it.

The server here is a small shell written for these tests: the loopback broadcast of
``tests.test_roq_loopback`` (encoder, ``BroadcastSender``, ``RoqServer``) with one
``shared.auth.admission.ViewerAdmission`` per connection, fed the control stream and carried
out action by action, so a connection joins the sender (gets media) only on ``AdmitViewer``.
Against it run the real :class:`~shared.viewer.client.Viewer`, the real
:class:`~shared.viewer.light.LightViewer` and ``kizuna-stream view`` in a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors.cli.access import ViewerToken
from actors.cli.main import build_parser
from shared.auth.admission import (
    Action,
    AdmissionPolicy,
    AdmitViewer,
    CloseConnection,
    RequestApproval,
    SendControl,
    ViewerAdmission,
)
from shared.auth.control import (
    AccessErrorCode,
    Notice,
    Pending,
    QualityReply,
    Refused,
    RungInfo,
    ServerMessage,
    Welcome,
    encode_message,
    notice,
)
from shared.auth.pending import Approval, Denial, PeerIdentity, PendingRequest
from shared.auth.tokens import TokenIssuer, TokenKey, TokenVerifier, ViewerGrant
from shared.errors import ConfigError, NetworkError
from shared.models import QualityPreset, ViewerPermissions
from shared.roq.transport import RoqConnection
from shared.roq.url import StreamUrl
from shared.viewer.access import AccessState, ViewerAccess
from shared.viewer.client import Viewer
from shared.viewer.light import CLOSED, LightViewer
from tests.test_roq_loopback import FPS, HEIGHT, WIDTH, Broadcast, collect, until

REPO = Path(__file__).resolve().parents[1]
SECRET = bytes(range(32))
STREAM = "cam"
RUNG = RungInfo(index=0, width=WIDTH, height=HEIGHT, framerate=FPS, bitrate=300_000, preset="low")
#: Hang guard for a run that should end on its own: far beyond what any needs.
GUARD_S = 30.0


class GuardedBroadcast(Broadcast):
    """The loopback broadcast behind a ViewerAdmission per connection (module doc)."""

    def __init__(self, *, approvals: bool = False) -> None:
        super().__init__()
        self.issuer = TokenIssuer(TokenKey.hs256(SECRET))
        self.verifier = TokenVerifier(TokenKey.hs256(SECRET))
        self.policy = AdmissionPolicy(allow_approval_requests=approvals)
        self.admissions: dict[RoqConnection, ViewerAdmission] = {}
        self._timers: dict[RoqConnection, asyncio.TimerHandle] = {}
        #: Every control message the server sent, with its connection, in order.
        self.sent: list[tuple[RoqConnection, ServerMessage]] = []
        self.requests: list[PendingRequest] = []
        self.admitted: list[RoqConnection] = []
        self.server.on_connect = self._on_handshake
        self.server.on_disconnect = self._on_gone
        self.server.on_control = self._on_control

    async def start(self, port: int = 0) -> StreamUrl:
        url = await super().start(port)
        return msgspec.structs.replace(url, session_id=STREAM)

    def token(self, *, stream: str = STREAM, now: float | None = None, **options: Any) -> str:
        token, _ = self.issuer.issue(
            stream=stream, now=time.time() if now is None else now, **options
        )
        return token

    # -- the shell

    def _on_handshake(self, connection: RoqConnection) -> None:
        self.admissions[connection] = ViewerAdmission(
            verifier=self.verifier,
            streams={STREAM: (RUNG,)},
            peer=PeerIdentity(address=connection.stats.address),
            now=time.time(),
            policy=self.policy,
        )
        self._arm(connection)

    def _on_control(self, connection: RoqConnection, data: bytes, end_stream: bool) -> None:
        admission = self.admissions.get(connection)
        if admission is not None:
            self.carry_out(connection, admission.receive(data, time.time(), end_stream=end_stream))

    def _on_gone(self, connection: RoqConnection) -> None:
        timer = self._timers.pop(connection, None)
        if timer is not None:
            timer.cancel()
        admission = self.admissions.pop(connection, None)
        if admission is not None:
            admission.connection_lost()
        self._on_disconnect(connection)

    def carry_out(self, connection: RoqConnection, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, SendControl):
                self.sent.append((connection, action.message))
                connection.send_control(action.data)
            elif isinstance(action, AdmitViewer):
                self.admitted.append(connection)
                self._on_connect(connection)  # Broadcast's: the connection joins the sender
                if self.sender.take_keyframe_request():
                    # A viewer let in mid-stream starts on a fresh IDR, as the sender asks.
                    self.encoder.request_keyframe()
            elif isinstance(action, CloseConnection):
                self._on_disconnect(connection)
                connection.close(action.code, action.reason)
            elif isinstance(action, RequestApproval):
                self.requests.append(action.request)
        self._arm(connection)

    def _arm(self, connection: RoqConnection) -> None:
        """One timer per connection, at its admission's next deadline (hello, approval)."""
        timer = self._timers.pop(connection, None)
        if timer is not None:
            timer.cancel()
        admission = self.admissions.get(connection)
        deadline = admission.next_deadline() if admission is not None else None
        if admission is None or deadline is None:
            return

        def due() -> None:
            self.carry_out(connection, admission.handle_timer(time.time()))

        loop = asyncio.get_running_loop()
        self._timers[connection] = loop.call_later(max(deadline - time.time(), 0.0), due)

    # -- what the operator does

    def broadcast_notice(self, text: str, data: dict[str, Any]) -> None:
        for connection, admission in list(self.admissions.items()):
            self.carry_out(connection, admission.notice(notice(text, data)))

    def answer(self, request: PendingRequest, decision: Approval | Denial) -> None:
        for connection, admission in list(self.admissions.items()):
            if admission.pending_request == request:
                now = time.time()
                actions = (
                    admission.approve(decision, now)
                    if isinstance(decision, Approval)
                    else admission.deny(decision, now)
                )
                self.carry_out(connection, actions)

    def refusals(self) -> list[Refused]:
        return [m for _, m in self.sent if isinstance(m, Refused)]

    async def stream_until(self, done: Callable[[], bool], *, first: int = 0) -> int:
        """Send frames until ``done()``; returns the next frame number."""
        index = first
        deadline = time.monotonic() + GUARD_S
        while not done():
            assert time.monotonic() < deadline, "the stream never got there"
            await self.send(range(index, index + 5))
            index += 5
        return index


def said(refusal: Refused) -> str:
    """A refusal as the server put it: what the client must report, exactly."""
    return f"{refusal.reason}: {refusal.text}"


async def watch_to_the_end(viewer: Viewer) -> list[int]:
    """Consume the viewer's media until its stream ends (hang-guarded)."""
    seen: list[int] = []
    await asyncio.wait_for(collect(viewer, seen), GUARD_S)
    return seen


# -- the sans-I/O core -------------------------------------------------------------------------


def test_the_hello_carries_stream_token_viewer_and_name_and_no_repr_shows_the_token() -> None:
    access = ViewerAccess(stream=STREAM, token="eyJ.secret.token", viewer="v1", name="Ana")
    hello = access.hello()
    assert int.from_bytes(hello[:4], "big") == len(hello) - 4
    assert json.loads(hello[4:]) == {
        "type": "hello",
        "version": 1,
        "stream": STREAM,
        "token": "eyJ.secret.token",
        "viewer": "v1",
        "name": "Ana",
    }
    assert "secret" not in repr(access) and "<redacted>" in repr(access)
    assert json.loads(ViewerAccess(stream=STREAM).hello()[4:]) == {
        "type": "hello",
        "version": 1,
        "stream": STREAM,
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stream": ""}, "names no stream"),
        ({"stream": "a b"}, "stream id"),
        ({"stream": STREAM, "name": "x" * 65}, "name"),
        ({"stream": STREAM, "name": "bell\a"}, "name"),
        ({"stream": STREAM, "token": "t" * 4097}, "4097 characters"),
    ],
)
def test_a_hello_the_server_would_refuse_is_refused_before_connecting(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        ViewerAccess(**options)
    assert "tttt" not in str(caught.value)


def test_the_server_messages_are_taken_in_however_the_bytes_arrive() -> None:
    access = ViewerAccess(stream=STREAM, token="t")
    pending = Pending(request="r1", expires_in=60.0)
    welcome = Welcome(
        version=1,
        viewer="v",
        stream=STREAM,
        permissions=_permissions(),
        rungs=(RUNG,),
    )
    news = Notice(text="hi", data={"n": 1})
    data = b"".join(encode_message(m) for m in (pending, welcome, news))
    got: list[ServerMessage] = []
    for index in range(len(data)):  # one byte at a time
        got += access.receive(data[index : index + 1])
        if got == [pending]:
            assert access.state is AccessState.PENDING and access.pending == pending
    assert got == [pending, welcome, news]
    assert access.state is AccessState.ADMITTED and access.welcome == welcome
    assert access.pending is None
    assert list(access.notices) == [news] and access.notices_received == 1
    # A new connection: a new control stream, nothing said on it yet; the notices stay.
    access.new_connection()
    assert state_of(access) is AccessState.UNANSWERED and access.welcome is None
    assert list(access.notices) == [news]


def state_of(access: ViewerAccess) -> AccessState:
    """Read afresh (mypy keeps an attribute narrowed across the method call that changes it)."""
    return access.state


def test_a_refusal_is_reported_in_the_servers_words_from_the_message_or_the_close() -> None:
    access = ViewerAccess(stream=STREAM)
    code = int(AccessErrorCode.EXPIRED)
    # Only the close arrived: its reason phrase, for an access error code only.
    assert access.refusal_reason((code, "expired: the token expired 3 s ago")) == (
        "expired: the token expired 3 s ago"
    )
    assert access.refusal_reason((0, "stream stopped")) is None
    assert access.refusal_reason(None) is None
    # The message, when it came, wins (its text is not cut to the close frame's length).
    refused = Refused(code=code, reason="expired", text="x" * 300)
    access.receive(encode_message(refused))
    assert access.state is AccessState.REFUSED
    assert access.refusal_reason((code, "expired: " + "x" * 191)) == "expired: " + "x" * 300


def test_a_broken_control_stream_from_the_server_is_ignored_not_fatal() -> None:
    access = ViewerAccess(stream=STREAM)
    assert access.receive(b"\x00\x00\x00\x02{]") == []
    assert access.control_error is not None and "JSON" in access.control_error
    # Whatever follows is ignored; the state stays what it was.
    assert access.receive(encode_message(Notice(text="late"))) == []
    assert access.state is AccessState.UNANSWERED and access.notices_received == 0


def test_the_command_lines_token_hides_from_reprs() -> None:
    token = "eyJhbGciOi.secret-part.sig"
    args = build_parser().parse_args(["view", "roq://127.0.0.1:1/cam", "--token", token])
    assert isinstance(args.token, ViewerToken) and args.token == token
    assert token not in repr(args) and "secret-part" not in repr(args)


def _permissions(**options: Any) -> Any:
    from shared.auth.control import PermissionsInfo

    defaults = {
        "can_view": True,
        "can_record": False,
        "can_control_quality": False,
        "max_quality": "ultra",
    }
    return PermissionsInfo(**{**defaults, **options})


# -- the viewer against the server -------------------------------------------------------------


def test_a_valid_token_is_welcomed_and_its_frames_decode_and_quality_requests_answered() -> None:
    async def main() -> None:
        broadcast = GuardedBroadcast()
        url = await broadcast.start()
        token = broadcast.token(
            viewer="ana",
            permissions=ViewerPermissions(can_control_quality=True, max_quality=QualityPreset.LOW),
        )
        viewer = await Viewer.connect(url, token=token, reconnect=False)
        seen: list[int] = []
        task = asyncio.create_task(collect(viewer, seen))
        try:
            await until(lambda: viewer.welcome is not None, "the welcome")
            welcome = viewer.welcome
            assert welcome is not None
            assert (welcome.viewer, welcome.stream, welcome.rungs) == ("ana", STREAM, (RUNG,))
            assert welcome.permissions == _permissions(can_control_quality=True, max_quality="low")
            assert viewer.access_state is AccessState.ADMITTED
            await until(lambda: len(broadcast.sender.peers) == 1, "the sender to add the viewer")
            await broadcast.send(range(30))
            await until(lambda: bool(seen) and seen[-1] == 29, "frame 29 at the viewer")
            assert seen == list(range(30))
            # Quality requests go out and their replies come back, matched by id.
            chosen = await viewer.request_quality(rung=0)
            assert chosen == QualityReply(ok=True, id=chosen.id, rung=0)
            unknown = await viewer.request_quality(rung=3)
            assert (unknown.ok, unknown.reason) == (False, "unknown_rung")
            assert unknown.id != chosen.id
            refused = await viewer.request_recording("start")
            assert (refused.ok, refused.reason, refused.action) == (False, "not_permitted", "start")
            report = viewer.report()
            assert report.access == "admitted" and report.frames_decoded == 30
        finally:
            task.cancel()
            await viewer.close()
            await broadcast.server.close()

    asyncio.run(main())


def test_a_light_viewer_with_a_valid_token_is_admitted_and_counts_frames() -> None:
    async def main() -> None:
        broadcast = GuardedBroadcast()
        url = await broadcast.start()
        light = LightViewer(0, url, token=broadcast.token())
        running = asyncio.create_task(light.run())
        try:
            await until(lambda: len(broadcast.sender.peers) == 1, "the sender to add the viewer")
            await broadcast.stream_until(lambda: light.core.frames >= 20)
            report = light.report(time.monotonic())
            assert report.access == "admitted" and report.state == "watching"
            assert report.frames >= 20
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            await light.close()
            await broadcast.server.close()

    asyncio.run(main())


def test_no_token_without_approvals_is_refused_with_the_reason_and_not_one_media_packet() -> None:
    """While an admitted viewer receives a live stream, a viewer without a token (and so a
    light one) is refused: each reports the server's reason, and received no media."""

    async def main() -> None:
        broadcast = GuardedBroadcast(approvals=False)
        url = await broadcast.start()
        admitted = await Viewer.connect(url, token=broadcast.token(), reconnect=False)
        seen: list[int] = []
        watching = asyncio.create_task(collect(admitted, seen))
        await until(lambda: len(broadcast.sender.peers) == 1, "the sender to add the viewer")
        sending = asyncio.create_task(broadcast.stream_until(lambda: False))
        try:
            await until(lambda: len(seen) >= 5, "frames at the admitted viewer")
            stranger = await Viewer.connect(url, reconnect=False)
            assert await watch_to_the_end(stranger) == []
            light = LightViewer(1, url)
            await asyncio.wait_for(light.run(), GUARD_S)
            frames_meanwhile = len(seen)
            await stranger.close()
            await light.close()
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
        watching.cancel()
        await admitted.close()
        await broadcast.server.close()

        first, second = broadcast.refusals()
        assert first.reason == second.reason == "missing"
        # The viewer: the server's words, its close code, no media.
        assert stranger.refusal == first
        assert stranger.refusal_reason == said(first)
        assert stranger.termination is not None
        assert stranger.termination[0] == AccessErrorCode.UNAUTHORIZED
        report = stranger.report()
        assert report.access == "refused"
        assert report.packets_received == report.bytes_received == 0
        # The light viewer: closed, the server's words, no media.
        light_report = light.report(time.monotonic())
        assert (light_report.state, light_report.reason) == (CLOSED, said(second))
        assert light_report.access == "refused"
        assert light_report.rtp_packets == light_report.bytes == 0
        assert frames_meanwhile > 5  # media flowed the whole time, to the admitted viewer

    asyncio.run(main())


def _bad_token(broadcast: GuardedBroadcast, kind: str) -> str:
    if kind == "expired":
        return broadcast.token(now=time.time() - 7200, ttl_s=60)
    if kind == "forged":
        other = TokenIssuer(TokenKey.hs256(bytes(32)))
        token, _ = other.issue(stream=STREAM, now=time.time())
        return token
    if kind == "wrong_stream":
        return broadcast.token(stream="other")
    assert kind == "malformed"
    return "not.a-jwt"


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("expired", AccessErrorCode.EXPIRED),
        ("forged", AccessErrorCode.UNAUTHORIZED),
        ("wrong_stream", AccessErrorCode.FORBIDDEN),
        ("malformed", AccessErrorCode.UNAUTHORIZED),
    ],
)
def test_a_bad_token_is_refused_and_both_viewers_report_the_servers_reason(
    kind: str, code: AccessErrorCode
) -> None:
    async def main() -> None:
        broadcast = GuardedBroadcast()
        url = await broadcast.start()
        token = _bad_token(broadcast, kind)
        viewer = await Viewer.connect(url, token=token, reconnect=False)
        assert await watch_to_the_end(viewer) == []
        light = LightViewer(0, url, token=token)
        await asyncio.wait_for(light.run(), GUARD_S)
        await viewer.close()
        await light.close()
        await broadcast.server.close()

        first, second = broadcast.refusals()
        assert first.reason == second.reason == kind
        assert viewer.refusal_reason == said(first)
        assert viewer.termination is not None and viewer.termination[0] == code
        assert viewer.report().packets_received == 0
        light_report = light.report(time.monotonic())
        assert (light_report.state, light_report.reason) == (CLOSED, said(second))
        assert light_report.rtp_packets == 0
        assert token not in (viewer.refusal_reason or "") + (light_report.reason or "")

    asyncio.run(main())


def test_a_notice_reaches_on_notice_and_the_light_viewers_count() -> None:
    async def main() -> None:
        broadcast = GuardedBroadcast()
        url = await broadcast.start()
        heard: list[Notice] = []
        messages: list[ServerMessage] = []
        viewer = await Viewer.connect(
            url,
            token=broadcast.token(),
            reconnect=False,
            on_notice=heard.append,
            on_message=messages.append,
        )
        light = LightViewer(0, url, token=broadcast.token())
        running = asyncio.create_task(light.run())
        try:
            await until(lambda: len(broadcast.admitted) == 2, "both viewers admitted")
            broadcast.broadcast_notice("back in 5 minutes", {"minutes": 5, "by": "ops"})
            await until(lambda: bool(heard), "the notice at the viewer")
            await until(
                lambda: light.report(time.monotonic()).notices == 1, "the light viewer's count"
            )
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            await viewer.close()
            await light.close()
            await broadcast.server.close()
        expected = Notice(text="back in 5 minutes", data={"minutes": 5, "by": "ops"})
        assert heard == [expected] and viewer.notices == [expected]
        assert [type(m) for m in messages] == [Welcome, Notice]
        assert viewer.report().notices == 1

    asyncio.run(main())


@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_a_viewer_without_a_token_waits_for_approval_with_no_media_then_is_let_in_or_told_no(
    decision: str,
) -> None:
    async def main() -> None:
        broadcast = GuardedBroadcast(approvals=True)
        url = await broadcast.start()
        viewer = await Viewer.connect(url, name="Ana at the door", reconnect=False)
        seen: list[int] = []
        task = asyncio.create_task(collect(viewer, seen))
        try:
            await until(lambda: viewer.pending is not None, "the pending status")
            [request] = broadcast.requests
            pending = viewer.pending
            assert pending is not None and pending.request == request.request_id
            assert request.name == "Ana at the door" and request.stream == STREAM
            assert viewer.access_state is AccessState.PENDING
            # A stream runs meanwhile (to an admitted viewer): none of it reaches this one.
            other = await Viewer.connect(url, token=broadcast.token(), reconnect=False)
            await until(lambda: len(broadcast.sender.peers) == 1, "the admitted viewer added")
            await broadcast.send(range(15))
            assert viewer.report().packets_received == 0
            await other.close()
            if decision == "approve":
                grant = ViewerGrant(
                    stream=STREAM, viewer="ana", permissions=ViewerPermissions(), token_id=None
                )
                broadcast.answer(request, Approval(request_id=request.request_id, grant=grant))
                await until(lambda: viewer.welcome is not None, "the welcome")
                assert viewer.welcome is not None and viewer.welcome.viewer == "ana"
                assert viewer.pending is None
                await until(lambda: len(broadcast.sender.peers) == 1, "the sender to add it")
                await broadcast.stream_until(lambda: len(seen) >= 10, first=15)
                assert viewer.report().frames_decoded >= 10
            else:
                broadcast.answer(request, Denial(request_id=request.request_id))
                await asyncio.wait_for(task, GUARD_S)
                [refusal] = broadcast.refusals()
                assert viewer.refusal_reason == said(refusal)
                assert viewer.refusal_reason == "denied: the operator denied the request"
                assert viewer.report().packets_received == 0 and seen == []
        finally:
            task.cancel()
            await viewer.close()
            await broadcast.server.close()

    asyncio.run(main())


def test_a_viewer_that_reconnects_after_a_drop_says_hello_again_and_is_welcomed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def main() -> None:
        broadcast = GuardedBroadcast()
        url = await broadcast.start()
        viewer = await Viewer.connect(url, token=broadcast.token(viewer="ana"), idle_timeout=1.0)
        seen: list[int] = []
        task = asyncio.create_task(collect(viewer, seen))
        try:
            await until(lambda: viewer.welcome is not None, "the first welcome")
            first = viewer.welcome
            # The path goes dark: the viewer hears nothing, its QUIC idle timeout ends the
            # connection, and it reconnects.
            monkeypatch.setattr(viewer._client._protocol, "datagram_received", lambda *_: None)
            await until(lambda: viewer.report().reconnects == 1, "the reconnect")
            await until(lambda: len(broadcast.admitted) == 2, "the second admission")
            await until(lambda: viewer.welcome is not None, "the second welcome")
            assert viewer.welcome == first  # the same viewer, let in again on its token
            assert viewer.access_state is AccessState.ADMITTED
            await broadcast.stream_until(lambda: len(seen) >= 5)
        finally:
            task.cancel()
            await viewer.close()
            await broadcast.server.close()
        welcomes = [m for _, m in broadcast.sent if isinstance(m, Welcome)]
        assert len(welcomes) == 2 and welcomes[0] == welcomes[1]

    asyncio.run(main())


def test_a_server_that_never_answers_the_hello_still_streams_to_the_viewer() -> None:
    """A server older than the control stream ignores it: media flows all the same, and a
    quality request fails cleanly after its timeout instead of hanging."""

    async def main() -> None:
        broadcast = Broadcast()  # no control handler at all
        url = await broadcast.start()
        viewer = await Viewer.connect(url, token="a-token", reconnect=False)
        seen: list[int] = []
        task = asyncio.create_task(collect(viewer, seen))
        try:
            await until(lambda: len(broadcast.sender.peers) == 1, "the server to see the viewer")
            await broadcast.send(range(20))
            await until(lambda: bool(seen) and seen[-1] == 19, "frame 19 at the viewer")
            assert viewer.access_state is AccessState.UNANSWERED
            with pytest.raises(NetworkError, match="did not answer the quality request"):
                await viewer.request_quality(rung=0, timeout=0.2)
        finally:
            task.cancel()
            await viewer.close()
            await broadcast.server.close()
        assert seen == list(range(20)) and viewer.report().access == "unanswered"

    asyncio.run(main())


# -- kizuna-stream view ------------------------------------------------------------------------


async def run_view(
    broadcast: GuardedBroadcast,
    arguments: list[str],
    *,
    env: dict[str, str] | None = None,
    while_running: Callable[[], Any] | None = None,
) -> tuple[int, str, str]:
    """``kizuna-stream view`` in a subprocess against ``broadcast``; ``while_running`` is
    awaited beside it (it drives the server)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "actors.cli",
        "view",
        *arguments,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    driver = asyncio.create_task(while_running()) if while_running is not None else None
    try:
        out, err = await asyncio.wait_for(process.communicate(), 120)  # a hang guard only
    finally:
        if driver is not None:
            driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await driver
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("via", ["--token", "KIZUNA_TOKEN"])
def test_view_prints_the_refusal_reason_exits_1_and_never_the_token(via: str) -> None:
    async def main() -> tuple[int, str, str, str, list[Refused]]:
        broadcast = GuardedBroadcast()
        url = await broadcast.start()
        token = _bad_token(broadcast, "forged")
        if via == "--token":
            result = await run_view(broadcast, [str(url), "--token", token, "--seconds", "60"])
        else:
            result = await run_view(broadcast, [str(url), "--seconds", "60"], env={via: token})
        await broadcast.server.close()
        return *result, token, broadcast.refusals()

    code, out, err, token, refusals = asyncio.run(main())
    [refusal] = refusals
    assert refusal.reason == "forged"
    assert code == 1, err
    assert f"kizuna-stream: error: the server refused this viewer: {said(refusal)}" in err
    assert "Traceback" not in err
    assert token not in out + err
    assert token.split(".")[2] not in out + err  # not even its signature


def test_view_json_reports_the_refusal_as_its_error_object_without_the_token() -> None:
    async def main() -> tuple[int, str, str, str, list[Refused]]:
        broadcast = GuardedBroadcast()
        url = await broadcast.start()
        token = _bad_token(broadcast, "expired")
        result = await run_view(broadcast, [str(url), "--token", token, "--json"])
        await broadcast.server.close()
        return *result, token, broadcast.refusals()

    code, out, err, token, refusals = asyncio.run(main())
    [refusal] = refusals
    assert code == 1, err
    [line] = out.splitlines()
    error = json.loads(line)["error"]
    assert error == {
        "kind": "NetworkError",
        "message": f"the server refused this viewer: {said(refusal)}",
    }
    assert refusal.reason == "expired"
    assert token not in out + err


def test_view_prints_its_admission_and_each_notice_then_its_summary() -> None:
    async def main() -> tuple[int, str, str, str]:
        broadcast = GuardedBroadcast()
        url = await broadcast.start()
        token = broadcast.token(viewer="ana")

        async def drive() -> None:
            await until(lambda: len(broadcast.sender.peers) == 1, "view admitted", timeout=60)
            broadcast.broadcast_notice("going live", {"talk": 2, "room": "B"})
            await broadcast.stream_until(lambda: False)

        result = await run_view(
            broadcast, [str(url), "--token", token, "--frames", "10"], while_running=drive
        )
        await broadcast.server.close()
        return *result, token

    code, out, err, token = asyncio.run(main())
    assert code == 0, err
    lines = out.splitlines()
    assert f"admitted to stream {STREAM} as viewer ana (max quality ultra)" in lines
    assert 'notice: going live {"talk":2,"room":"B"}' in lines
    assert lines[-1].startswith("10 frames decoded")
    assert token not in out + err


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "text"])
def test_view_shows_the_pending_request_then_the_denial_as_its_error(json_output: bool) -> None:
    async def main() -> tuple[int, str, str, list[PendingRequest], list[Refused]]:
        broadcast = GuardedBroadcast(approvals=True)
        url = await broadcast.start()

        async def drive() -> None:
            await until(lambda: bool(broadcast.requests), "the approval request", timeout=60)
            [request] = broadcast.requests
            broadcast.answer(request, Denial(request_id=request.request_id, text="not today"))

        arguments = [str(url), "--name", "Ana", *(["--json"] if json_output else [])]
        result = await run_view(broadcast, arguments, while_running=drive)
        await broadcast.server.close()
        return *result, broadcast.requests, broadcast.refusals()

    code, out, err, requests, refusals = asyncio.run(main())
    [request], [refusal] = requests, refusals
    assert request.name == "Ana"
    assert said(refusal) == "denied: not today"
    assert code == 1, err
    if json_output:
        first, last = (json.loads(line) for line in out.splitlines())
        assert first == {"type": "pending", "request": request.request_id, "expires_in": 60.0}
        assert last["error"]["message"] == "the server refused this viewer: denied: not today"
    else:
        waiting = f"waiting for the operator's approval (request {request.request_id}, "
        assert out.splitlines()[0] == waiting + "expires in 60 s)"
        assert "kizuna-stream: error: the server refused this viewer: denied: not today" in err


# -- kizuna-stream record and loadtest ---------------------------------------------------------


async def run_command(arguments: list[str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "actors.cli",
        *arguments,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)  # a hang guard only
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def test_record_presents_its_token_and_a_refusal_ends_it_with_the_reason(tmp_path: Path) -> None:
    async def main() -> tuple[int, str, str, str, list[Refused]]:
        broadcast = GuardedBroadcast()
        url = await broadcast.start()
        token = _bad_token(broadcast, "wrong_stream")
        out = tmp_path / "talk.mp4"
        result = await run_command(["record", str(url), "--out", str(out), "--token", token])
        await broadcast.server.close()
        return *result, token, broadcast.refusals()

    code, out, err, token, refusals = asyncio.run(main())
    [refusal] = refusals
    assert refusal.reason == "wrong_stream"
    assert code == 1, err
    assert f"the server refused this viewer: {said(refusal)}" in err
    assert token not in out + err


def test_loadtest_presents_its_token_and_reports_each_refusal_by_reason() -> None:
    async def main() -> tuple[int, str, str, str, list[Refused]]:
        broadcast = GuardedBroadcast()
        url = await broadcast.start()
        token = _bad_token(broadcast, "forged")
        arguments = ["loadtest", str(url), "--viewers", "2", "--seconds", "60", "--json"]
        result = await run_command([*arguments, "--token", token])
        await broadcast.server.close()
        return *result, token, broadcast.refusals()

    _code, out, err, token, refusals = asyncio.run(main())
    first, second = refusals
    assert first.reason == second.reason == "forged"
    [line] = out.splitlines()
    report = json.loads(line)
    assert report["summary"]["closed"] == 2
    assert report["summary"]["reasons"] == {said(first): 2}
    assert [v["access"] for v in report["viewers"]] == ["refused", "refused"]
    assert token not in out + err
