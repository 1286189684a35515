"""Several streams on one UDP port (``actors.port_listeners``), on the session's Ray cluster.

Two healthy streams of different sizes, one open and one behind tokens, share one port: each
real viewer decodes its own stream's pictures, a viewer naming a stream the port does not carry
is refused with UNKNOWN_STREAM, the port's process killed with SIGKILL comes back with both
streams (their viewers reconnect by themselves), a restarted supervisor takes the port back
with its streams, pausing or removing one leaves the other's
viewer playing, and the port closes with its last stream, leaving no actor, segment or
doorbell.  ``serve --config`` with two streams on one address is ``test_config_serve.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

import msgspec
import pytest
import ray

from actors import StreamManager
from shared.auth.control import AccessErrorCode
from shared.models import (
    AccessMode,
    Resolution,
    StreamAccess,
    StreamConfig,
    StreamQuality,
    StreamState,
)
from shared.roq.framing import RoqErrorCode
from shared.roq.url import StreamUrl
from shared.viewer.client import Viewer
from tests.conftest import wait_for_no_leaks
from tests.test_pipeline import eventually, frame_where, size
from tests.test_recovery import alive
from tests.test_serve_view import free_udp_port

pytestmark = pytest.mark.ray

SECRET = b"shared-port-test-secret-32-bytes!!"
WIDE = StreamQuality(resolution=Resolution(320, 180), framerate=15, bitrate=200_000)
SMALL = StreamQuality(resolution=Resolution(256, 144), framerate=15, bitrate=150_000)


def port_actors(port: int) -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"kz-port-{port}-")
    ]


async def port_pid(manager: StreamManager, sid: str, port: int) -> int | None:
    """The pid of the process serving ``sid`` on the shared ``port``, as the supervisor sees it."""
    for process in (await manager.resources()).processes:
        if process.label == f"{sid}/sender-port-{port}":
            return process.pid
    return None


def _pid(actor: object) -> int:
    return os.getpid()


async def active(manager: StreamManager) -> list[str] | None:
    try:
        return [s.session_id for s in await manager.get_active_streams()]
    except Exception:  # the supervisor is still restarting
        return None


async def decodes_more(viewer: Viewer, frames: int, what: str) -> None:
    start = viewer.frames_decoded
    await eventually(lambda: viewer.frames_decoded, lambda n: n >= start + frames, what)


def test_two_streams_on_one_port_each_viewer_gets_its_own(ray_cluster: str) -> None:
    async def main() -> tuple[str, str, int]:
        port = free_udp_port()
        async with StreamManager.start(token_secret=SECRET) as manager:
            open_access = StreamAccess(mode=AccessMode.OPEN)
            wide = (
                await manager.start_camera_stream(StreamConfig(quality=WIDE, access=open_access))
            ).session_id
            small = (
                await manager.start_camera_stream(
                    StreamConfig(quality=SMALL, access=StreamAccess(mode=AccessMode.TOKEN))
                )
            ).session_id
            wide_url = StreamUrl.parse(await manager.open_shared_port(wide, port))
            small_url = StreamUrl.parse(await manager.open_shared_port(small, port))
            # One address and one certificate; the path says which stream.
            assert (wide_url.port, small_url.port) == (port, port)
            assert wide_url.fingerprint == small_url.fingerprint
            assert (wide_url.session_id, small_url.session_id) == (wide, small)
            assert len(port_actors(port)) == 1
            # ``status`` names the process that serves each stream there: the port's.
            shards = [a for a in (await manager.overview()).actors if a.role == "shard"]
            assert sorted(a.stream or "" for a in shards) == sorted([wide, small])
            assert {a.name for a in shards} == set(port_actors(port))

            token = await manager.issue_token(small)
            wide_viewer = await Viewer.connect(wide_url)
            small_viewer = await Viewer.connect(small_url, token=token)
            watching: list[asyncio.Task[object]] = []
            try:
                # Each viewer decodes its own stream's pictures.
                decoded = await asyncio.gather(
                    frame_where(wide_viewer, lambda f: True, "a frame of the wide stream"),
                    frame_where(small_viewer, lambda f: True, "a frame of the small stream"),
                )
                assert [size(d) for d in decoded] == [(320, 180), (256, 144)]
                assert small_viewer.welcome is not None and small_viewer.welcome.stream == small
                watching = [
                    asyncio.create_task(v.watch(seconds=300)) for v in (wide_viewer, small_viewer)
                ]

                # A stream the port does not carry: refused with its code and reason, no media.
                stray = await Viewer.connect(
                    msgspec.structs.replace(wide_url, session_id="nosuchstream"), reconnect=False
                )
                report = await stray.watch(seconds=30)
                await stray.close()
                assert stray.termination is not None
                assert stray.termination[0] == AccessErrorCode.UNKNOWN_STREAM
                assert stray.refusal is not None and stray.refusal.reason == "unknown_stream"
                assert "nosuchstream" in stray.refusal.text
                assert report.packets_received == 0

                # The port's process killed: a new one serves both streams at the same address,
                # and each viewer reconnects by itself and decodes its own stream again.
                pid = await port_pid(manager, wide, port)
                assert alive(pid) and pid == await port_pid(manager, small, port)
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                for sid in (wide, small):
                    await eventually(
                        lambda sid=sid: port_pid(manager, sid, port),  # type: ignore[misc]
                        lambda p: p is not None and p != pid and alive(p),
                        f"stream {sid} back on port {port}",
                    )
                await decodes_more(wide_viewer, 30, "the wide viewer decoding again")
                await decodes_more(small_viewer, 30, "the small viewer decoding again")
                assert wide_viewer.report().reconnects >= 1
                assert small_viewer.report().reconnects >= 1
                assert len(port_actors(port)) == 1
                # Still each its own stream after the reconnect.
                assert (wide_viewer.report().width, small_viewer.report().width) == (320, 256)

                # The supervisor killed: its successor takes both streams back with their part
                # of the port (the port's last stream leaving below then ends its process).
                port_process = await port_pid(manager, small, port)
                supervisor = manager._supervisor.actor
                os.kill(await supervisor.__ray_call__.remote(_pid), signal.SIGKILL)
                await eventually(
                    lambda: active(manager),
                    lambda ids: ids is not None and set(ids) == {wide, small},
                    "both streams taken back",
                )
                for sid in (wide, small):
                    assert await port_pid(manager, sid, port) == port_process

                # One paused: the other's viewer plays on; the paused one's stays connected.
                await manager.pause_stream(wide)
                await decodes_more(small_viewer, 30, "the small viewer while wide is paused")
                assert wide_viewer.termination is None
                await manager.resume_stream(wide)
                await decodes_more(wide_viewer, 15, "the wide viewer after resume")

                # One removed: its viewer is told, the other's plays on, the port stays open.
                await manager.stop_stream(wide)
                await eventually(
                    lambda: wide_viewer.termination, lambda t: t is not None, "wide's viewer closed"
                )
                assert wide_viewer.termination is not None
                assert wide_viewer.termination[0] == RoqErrorCode.ROQ_NO_ERROR
                await decodes_more(small_viewer, 30, "the small viewer after wide stopped")
                assert (await manager.get_stream(small)).state is StreamState.ACTIVE
                assert len(port_actors(port)) == 1
            finally:
                for task in watching:
                    task.cancel()
                await wide_viewer.close()
                await small_viewer.close()
            await manager.stop_stream(small)
            # The last stream gone: so is the port's process, and the port is free again.
            await eventually(lambda: port_actors(port), lambda names: not names, "port closed")
        return wide, small, port

    wide, small, port = asyncio.run(main())
    wait_for_no_leaks(wide)
    wait_for_no_leaks(small)
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as probe:
        probe.bind(("127.0.0.1", port))
