"""Viewer access control on the session's real Ray cluster: token streams admit a viewer only
with a valid token or an operator's approval, and the server enforces it.

The viewers here are plain RoQ clients that speak the control protocol by hand
(``shared.auth.control``), as a third-party client would from the README: they count the
media packets that reach them, so "refused" means zero media, not a viewer that chose not to
decode.  The admission rules themselves are tested with literal times in
``test_admission.py``; here the shard's shell, the supervisor and the manager.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from actors import StreamManager
from actors.placement import SUPERVISOR_PREFIX
from shared.auth.control import (
    PROTOCOL_VERSION,
    AccessErrorCode,
    Hello,
    Notice,
    Pending,
    QualityReply,
    QualityRequest,
    RecordReply,
    RecordRequest,
    Refused,
    ServerMessage,
    Welcome,
    encode_message,
    server_message_parser,
)
from shared.auth.tokens import TokenIssuer, TokenKey
from shared.errors import StreamNotFoundError
from shared.models import (
    AccessMode,
    QualityPreset,
    Resolution,
    StreamAccess,
    StreamConfig,
    StreamQuality,
    ViewerPermissions,
)
from shared.roq.transport import RoqClient
from shared.roq.url import StreamUrl
from shared.viewer.client import Viewer
from tests.conftest import wait_for_no_leaks
from tests.test_pipeline import REPO, eventually
from tests.test_recording import probe

pytestmark = pytest.mark.ray

SECRET = b"test-secret-of-thirty-two-bytes!"
QVGA = StreamQuality(resolution=Resolution(320, 240), framerate=30, bitrate=300_000)


def token_config(*, allow_requests: bool = False, hello_timeout_s: float = 5.0) -> StreamConfig:
    return StreamConfig(
        quality=QVGA,
        access=StreamAccess(
            mode=AccessMode.TOKEN, allow_requests=allow_requests, hello_timeout_s=hello_timeout_s
        ),
    )


class RawViewer:
    """A RoQ client that says hello by hand and counts what arrives."""

    def __init__(self, client: RoqClient) -> None:
        self.client = client
        self.media = 0
        self.messages: list[ServerMessage] = []
        self._parser = server_message_parser()
        self._tasks = [asyncio.create_task(self._media()), asyncio.create_task(self._control())]

    @classmethod
    async def connect(cls, url: str, hello: Hello | None) -> RawViewer:
        parsed = StreamUrl.parse(url)
        client = await RoqClient.connect(parsed.host, parsed.port, fingerprint=parsed.fingerprint)
        viewer = cls(client)
        if hello is not None:
            client.send_control(encode_message(hello))
        return viewer

    async def _media(self) -> None:
        while await self.client.receive() is not None:
            self.media += 1

    async def _control(self) -> None:
        while (item := await self.client.receive_control()) is not None:
            self.messages.extend(self._parser.feed(item[0], end_stream=item[1]))

    def of(self, kind: type[Any]) -> list[Any]:
        return [m for m in self.messages if isinstance(m, kind)]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()


def hello(sid: str, token: str | None = None, **extra: Any) -> Hello:
    return Hello(version=PROTOCOL_VERSION, stream=sid, token=token, **extra)


def test_a_ticket_token_admits_and_every_bad_token_is_refused_with_zero_media(
    ray_cluster: str,
) -> None:
    async def main() -> str:
        async with StreamManager.start(token_secret=SECRET) as manager:
            sid = (await manager.start_camera_stream(token_config())).session_id
            ticket = await manager.add_viewer(sid, "alice")
            assert ticket.token is not None and ticket.token not in repr(ticket)
            assert ticket.token not in ticket.url
            good = await RawViewer.connect(ticket.url, hello(sid, ticket.token))
            issuer = TokenIssuer(TokenKey.hs256(SECRET))
            expired, _ = issuer.issue(stream=sid, now=time.time() - 7200, ttl_s=60)
            other_stream, _ = issuer.issue(stream="elsewhere", now=time.time())
            forged, _ = TokenIssuer(TokenKey.hs256(b"x" * 32)).issue(stream=sid, now=time.time())
            blind, _ = issuer.issue(
                stream=sid, now=time.time(), permissions=ViewerPermissions(can_view=False)
            )
            bad = {
                "expired": await RawViewer.connect(ticket.url, hello(sid, expired)),
                "wrong_stream": await RawViewer.connect(ticket.url, hello(sid, other_stream)),
                "forged": await RawViewer.connect(ticket.url, hello(sid, forged)),
                "malformed": await RawViewer.connect(ticket.url, hello(sid, "not.a.jwt")),
                "missing": await RawViewer.connect(ticket.url, hello(sid)),
                # A valid token whose can_view is false.
                "not_permitted": await RawViewer.connect(ticket.url, hello(sid, blind)),
            }
            try:
                await eventually(lambda: good.media, lambda n: n > 30, "media at the good viewer")
                [welcome] = good.of(Welcome)
                assert welcome.viewer == ticket.viewer_id and welcome.stream == sid
                for reason, viewer in bad.items():
                    await eventually(
                        lambda v=viewer: v.client.termination,  # type: ignore[misc]
                        lambda t: t is not None,
                        f"the {reason} token's connection closed",
                    )
                    [refused] = viewer.of(Refused)
                    assert refused.reason == reason, (reason, refused)
                    code, phrase = viewer.client.termination or (0, "")
                    assert code == refused.code and phrase.startswith(f"{reason}:")
                    assert viewer.media == 0, reason
                    assert not viewer.of(Welcome)
                # The shard counted each refusal by its reason.
                statuses = await manager.get_viewer_status(sid)
                assert [s.viewer_id for s in statuses] == [ticket.viewer_id]
            finally:
                for viewer in [good, *bad.values()]:
                    await viewer.close()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_a_viewer_that_never_says_hello_is_closed_with_zero_media(ray_cluster: str) -> None:
    async def main() -> str:
        async with StreamManager.start(token_secret=SECRET) as manager:
            sid = (await manager.start_camera_stream(token_config(hello_timeout_s=1.0))).session_id
            ticket = await manager.add_viewer(sid, "mute")
            mute = await RawViewer.connect(ticket.url, None)
            try:
                await eventually(
                    lambda: mute.client.termination, lambda t: t is not None, "the hello timeout"
                )
                code, phrase = mute.client.termination or (0, "")
                assert code == AccessErrorCode.HELLO_TIMEOUT and "hello" in phrase
                assert mute.media == 0
            finally:
                await mute.close()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_requests_wait_for_the_operator_who_approves_or_denies_them(ray_cluster: str) -> None:
    async def main() -> str:
        async with StreamManager.start(token_secret=SECRET) as manager:
            sid = (await manager.start_camera_stream(token_config(allow_requests=True))).session_id
            url = await manager.open_shards(sid, 1)
            bob = await RawViewer.connect(url, hello(sid, viewer="bob", name="Bob's laptop"))
            eve = await RawViewer.connect(url, hello(sid, viewer="eve"))
            try:
                waiting = await eventually(
                    lambda: manager.viewer_requests(sid), lambda r: len(r) == 2, "two requests"
                )
                by_viewer = {r.viewer: r for r in waiting}
                assert by_viewer["bob"].name == "Bob's laptop"
                assert by_viewer["bob"].peer.address.startswith("127.0.0.1:")
                await eventually(lambda: len(bob.of(Pending)), lambda n: n == 1, "bob told")
                assert bob.media == eve.media == 0  # nothing before a decision

                await manager.approve_viewer_request(sid, by_viewer["bob"].request_id)
                await manager.deny_viewer_request(sid, by_viewer["eve"].request_id, "not today")
                await eventually(lambda: bob.media, lambda n: n > 30, "media once approved")
                [welcome] = bob.of(Welcome)
                assert welcome.viewer == "bob" and not welcome.permissions.can_record
                await eventually(
                    lambda: eve.client.termination, lambda t: t is not None, "eve refused"
                )
                [refused] = eve.of(Refused)
                assert refused.reason == "denied" and refused.text == "not today"
                assert eve.media == 0
                assert await manager.viewer_requests(sid) == []
                with pytest.raises(StreamNotFoundError, match="waits with request"):
                    await manager.approve_viewer_request(sid, "no-such-request")

                # A viewer without can_control_quality asks for a rung: refused, with why.
                bob.client.send_control(encode_message(QualityRequest(id=1, rung=0)))
                await eventually(
                    lambda: [m for m in bob.messages if getattr(m, "id", None) == 1],
                    lambda replies: len(replies) == 1,
                    "the quality reply",
                )
                [reply] = [m for m in bob.of(QualityReply) if m.id == 1]
                assert not reply.ok and reply.reason == "not_permitted"
            finally:
                await bob.close()
                await eve.close()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_revoking_cuts_a_live_viewer_and_keeps_it_out_and_notices_reach_viewers(
    ray_cluster: str,
) -> None:
    async def main() -> str:
        async with StreamManager.start(token_secret=SECRET) as manager:
            sid = (await manager.start_camera_stream(token_config())).session_id
            carol = await manager.add_viewer(sid, "carol")
            dave = await manager.add_viewer(
                sid, "dave", ViewerPermissions(max_quality=QualityPreset.HIGH)
            )
            viewers = [await RawViewer.connect(t.url, hello(sid, t.token)) for t in (carol, dave)]
            try:
                for viewer in viewers:
                    await eventually(lambda v=viewer: v.media, lambda n: n > 10, "media")  # type: ignore[misc]
                assert await manager.broadcast_to_viewers(sid, "back in 5", {"eta_s": 300}) == 2
                for viewer in viewers:
                    await eventually(lambda v=viewer: v.of(Notice), bool, "the notice")  # type: ignore[misc]
                    [note] = viewer.of(Notice)
                    assert (note.text, note.data) == ("back in 5", {"eta_s": 300})

                assert await manager.revoke_viewer(sid, viewer_id=carol.viewer_id) == 1
                cut, kept = viewers
                await eventually(
                    lambda: cut.client.termination, lambda t: t is not None, "carol cut"
                )
                code, _ = cut.client.termination or (0, "")
                assert code == AccessErrorCode.REVOKED and cut.of(Refused)[0].reason == "revoked"
                seen = kept.media
                await eventually(lambda: kept.media, lambda n: n > seen + 10, "dave goes on")
                # Her token no longer opens the door.
                again = await RawViewer.connect(carol.url, hello(sid, carol.token))
                try:
                    await eventually(
                        lambda: again.client.termination, lambda t: t is not None, "kept out"
                    )
                    assert again.media == 0 and again.of(Refused)[0].reason == "revoked"
                finally:
                    await again.close()
            finally:
                for viewer in viewers:
                    await viewer.close()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def viewers_cli(address: str, *args: str) -> dict[str, Any]:
    """``kizuna-stream viewers ARGS --json`` in its own process, joined to the test cluster."""
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(SUPERVISOR_PREFIX)
    ]
    assert len(names) == 1, names
    command = [sys.executable, "-m", "actors.cli", "viewers", *args, "--json"]
    done = subprocess.run(
        [*command, "--address", address, "--server", names[0]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_the_viewers_command_lists_approves_notifies_and_revokes(ray_cluster: str) -> None:
    async def main() -> str:
        async with StreamManager.start(token_secret=SECRET) as manager:
            sid = (await manager.start_camera_stream(token_config(allow_requests=True))).session_id
            url = await manager.open_shards(sid, 1)
            frank = await RawViewer.connect(url, hello(sid, viewer="frank", name="Frank"))
            try:
                await eventually(lambda: len(frank.of(Pending)), lambda n: n == 1, "pending")
                listed = await asyncio.to_thread(viewers_cli, ray_cluster, "list")
                [request] = listed["pending"]
                assert (request["viewer"], request["name"], listed["stream"]) == (
                    "frank",
                    "Frank",
                    sid,
                )
                await asyncio.to_thread(viewers_cli, ray_cluster, "approve", request["request"])
                await eventually(lambda: frank.media, lambda n: n > 10, "media once approved")
                sent = await asyncio.to_thread(
                    viewers_cli, ray_cluster, "notify", "starting soon", "--data", '{"in_s": 60}'
                )
                assert sent["sent"] == 1
                await eventually(lambda: frank.of(Notice), bool, "the notice")
                assert frank.of(Notice)[0].data == {"in_s": 60}
                revoked = await asyncio.to_thread(
                    viewers_cli, ray_cluster, "revoke", "--viewer", "frank"
                )
                assert revoked["cut"] == 1
                await eventually(
                    lambda: frank.client.termination, lambda t: t is not None, "frank cut"
                )
                assert (frank.client.termination or (0, ""))[0] == AccessErrorCode.REVOKED
            finally:
                await frank.close()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_a_viewer_records_on_the_server_only_with_can_record(
    ray_cluster: str, tmp_path: Path
) -> None:
    async def main() -> str:
        async with StreamManager.start(token_secret=SECRET) as manager:
            config = StreamConfig(
                quality=QVGA,
                access=StreamAccess(mode=AccessMode.TOKEN, viewer_recordings_dir=str(tmp_path)),
            )
            sid = (await manager.start_camera_stream(config)).session_id
            grace = await manager.add_viewer(sid, "grace", ViewerPermissions(can_record=True))
            henry = await manager.add_viewer(sid, "henry")
            viewers = [await RawViewer.connect(t.url, hello(sid, t.token)) for t in (grace, henry)]
            allowed, refused = viewers

            async def ask(viewer: RawViewer, action: str, number: int) -> RecordReply:
                viewer.client.send_control(
                    encode_message(RecordRequest(action=action, id=number))  # type: ignore[arg-type]
                )
                await eventually(
                    lambda: [m for m in viewer.of(RecordReply) if m.id == number],
                    bool,
                    f"the reply to record {action}",
                )
                [reply] = [m for m in viewer.of(RecordReply) if m.id == number]
                assert isinstance(reply, RecordReply)
                return reply

            try:
                for viewer in viewers:
                    await eventually(lambda v=viewer: v.media, lambda n: n > 10, "media")  # type: ignore[misc]
                no = await ask(refused, "start", 1)
                assert not no.ok and no.reason == "not_permitted"
                assert list(tmp_path.iterdir()) == []
                yes = await ask(allowed, "start", 2)
                assert yes.ok, yes
                again = await ask(allowed, "start", 3)
                assert not again.ok and "already running" in (again.text or "")
                [recording] = await eventually(
                    lambda: list(tmp_path.glob(f"{sid}-{grace.viewer_id}-*.mp4")),
                    lambda files: len(files) == 1 and files[0].stat().st_size > 10_000,
                    "the recording's bytes",
                )
                stopped = await ask(allowed, "stop", 4)
                assert stopped.ok, stopped
                # Stopped cleanly: a whole file that FFmpeg reads.
                video = probe(recording)["streams"]["video"]
                assert video["codec_name"] == "h264" and int(video["nb_read_frames"]) > 10
            finally:
                for viewer in viewers:
                    await viewer.close()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


LADDER = StreamConfig(
    quality=StreamQuality(resolution=Resolution(1024, 576), framerate=15, bitrate=1_000_000),
    rungs=(QualityPreset.LOW,),
    access=StreamAccess(mode=AccessMode.TOKEN),
)


def test_max_quality_caps_the_rung_and_can_control_quality_picks_one(ray_cluster: str) -> None:
    """On a two-rung stream (1024x576, and LOW's 854x480) over an open loopback path: a viewer
    whose token caps it at LOW decodes only 854x480; one allowed to control quality picks the
    low rung, then hands the choice back."""

    async def main() -> str:
        async with StreamManager.start(token_secret=SECRET) as manager:
            sid = (await manager.start_camera_stream(LADDER)).session_id
            capped = await manager.add_viewer(
                sid, "capped", ViewerPermissions(max_quality=QualityPreset.LOW)
            )
            chooser = await manager.add_viewer(
                sid, "chooser", ViewerPermissions(can_control_quality=True)
            )
            low = await Viewer.connect(capped.url, token=capped.token)
            free = await Viewer.connect(chooser.url, token=chooser.token)
            tasks = [asyncio.create_task(v.watch(seconds=120)) for v in (low, free)]
            try:
                await eventually(lambda: low.report().frames_decoded, lambda n: n > 120, "8 s")
                welcome = low.welcome
                assert welcome is not None
                assert [(r.width, r.height) for r in welcome.rungs] == [(854, 480)]
                report = low.report()
                assert (report.width, report.height) == (854, 480)
                assert report.resolution_changes == 0  # never the top rung, not even briefly
                # The chooser asks for the low rung by index: granted, and its pictures shrink.
                reply = await free.request_quality(rung=1)
                assert reply.ok and reply.rung == 1, reply
                await eventually(
                    lambda: (free.report().width, free.report().height),
                    lambda size: size == (854, 480),
                    "the chooser on the low rung",
                )
                # The operator hands the chooser's rung back to its bandwidth, through the API.
                assert await manager.adjust_viewer_quality(sid, chooser.viewer_id, None) == 1
                await eventually(
                    lambda: free.report().width, lambda w: w == 1024, "the chooser climbing back"
                )
                # The capped viewer may not choose.
                refused = await low.request_quality(rung=0)
                assert not refused.ok and refused.reason == "not_permitted"
                assert (low.report().width, low.report().height) == (854, 480)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await low.close()
                await free.close()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_a_returning_viewer_starts_on_the_rung_it_left_on(ray_cluster: str) -> None:
    """A new viewer starts on the lowest rung and climbs; one that comes back (the same viewer
    id, from its token) starts where it left, at the top, with no climb to watch."""

    async def main() -> str:
        async with StreamManager.start(token_secret=SECRET) as manager:
            sid = (await manager.start_camera_stream(LADDER)).session_id
            ticket = await manager.add_viewer(sid, "ivy")
            first = await Viewer.connect(ticket.url, token=ticket.token)
            watching = asyncio.create_task(first.watch(seconds=120))
            try:
                await eventually(
                    lambda: (first.report().width, first.report().resolution_changes),
                    lambda seen: seen == (1024, 1),
                    "the first visit climbing from the low rung to the top",
                    timeout=60,
                )
            finally:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
                await first.close()
            again = await Viewer.connect(ticket.url, token=ticket.token)
            try:
                report = await again.watch(seconds=60, frames=30)
                assert report.frames_decoded >= 30
                assert (report.width, report.resolution_changes) == (1024, 0)
            finally:
                await again.close()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))
