"""The broadcast tier on the session's real Ray cluster: sender shards chosen by the balancer,
viewers tracked by the registry, limits refused with their reason.

The balancer's and registry's rules are tested with literal times and loads in
``test_balancer.py`` and ``test_registry.py``; here the shell: tickets land on the shard the
balancer chose (its own port, not a kernel hash), a shard starts when the others are full and
retires when idle, a real viewer's connection is matched to its ticket through its RTCP CNAME,
and a refused viewer is told why.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import ray

from actors import StreamManager
from actors.handles import SenderHandle
from actors.placement import NAMESPACE
from shared.errors import ResourceError
from shared.models import (
    ConnectionQuality,
    Resolution,
    StreamConfig,
    StreamQuality,
    StreamState,
    ViewerLimits,
    ViewerTicket,
)
from shared.roq.url import StreamUrl
from shared.viewer.client import Viewer
from tests.conftest import stream_actors, wait_for_no_leaks
from tests.test_pipeline import REPO, eventually, run_cli

pytestmark = pytest.mark.ray

QVGA = StreamQuality(resolution=Resolution(320, 240), framerate=30, bitrate=300_000)
#: Fifty viewers and their load generator share this 2-core machine with the encoder and the
#: shard: a light stream leaves the CPU headroom that makes "nobody else lost a frame" a
#: property of the code, not of the machine's mood.
QVGA15 = StreamQuality(resolution=Resolution(320, 240), framerate=15, bitrate=150_000)


def port(ticket: ViewerTicket) -> int:
    return StreamUrl.parse(ticket.url).port


def shards(sid: str) -> list[str]:
    return sorted(name for name in stream_actors(sid) if "-shard-" in name)


async def status_of(manager: StreamManager, sid: str, viewer_id: str) -> Any:
    return next(v for v in await manager.get_viewer_status(sid) if v.viewer_id == viewer_id)


def test_the_balancer_places_starts_refuses_and_retires_shards(ray_cluster: str) -> None:
    limits = ViewerLimits(
        max_viewers=4, max_viewers_per_shard=2, max_shards=2, idle_shard_retire_s=1.0
    )

    async def main() -> str:
        async with StreamManager.start() as manager:
            config = StreamConfig(quality=QVGA, viewers=limits)
            sid = (await manager.start_camera_stream(config)).session_id
            first = [await manager.add_viewer(sid, f"p{i}") for i in range(2)]
            assert port(first[0]) == port(first[1])  # one shard takes both
            assert len(shards(sid)) == 1
            # The first shard is full: the balancer starts a second, on its own port.
            second = [await manager.add_viewer(sid, f"q{i}") for i in range(2)]
            assert port(second[0]) == port(second[1]) != port(first[0])
            assert len(shards(sid)) == 2
            # The stream is full: refused, with the reason.
            with pytest.raises(ResourceError, match="is full"):
                await manager.add_viewer(sid, "late")

            # A real viewer with a ticket: its CNAME ties its connection to the ticket.
            viewer = await Viewer.connect(second[0].url)
            watching = asyncio.create_task(viewer.watch(seconds=60))
            try:
                await eventually(
                    lambda: status_of(manager, sid, second[0].viewer_id),
                    lambda s: (
                        s.connection_quality is not ConnectionQuality.DISCONNECTED
                        and s.bytes_sent > 0
                    ),
                    "the viewer's connection matched to its ticket",
                )
                unused = await status_of(manager, sid, second[1].viewer_id)
                assert unused.connection_quality is ConnectionQuality.DISCONNECTED

                # Seats free up on the first shard; the next viewer goes there, not to the
                # full second shard.
                for ticket in first:
                    await manager.remove_viewer(sid, ticket.viewer_id)
                again = await manager.add_viewer(sid, "again")
                assert port(again) == port(first[0])

                # Kill -9 the second shard: its viewer loses its connection, the stream goes on.
                shard = (await status_of(manager, sid, second[0].viewer_id)).shard
                resources = await manager.resources()
                [victim] = [p for p in resources.processes if p.label == f"{sid}/sender-{shard}"]
                os.kill(victim.pid, signal.SIGKILL)
                await eventually(lambda: shards(sid), lambda s: len(s) == 1, "one shard left")
                # The survivor took over the dead shard's address: the viewer, reconnecting to
                # the URL it knows, lands there and the registry says so.
                back = await eventually(
                    lambda: status_of(manager, sid, second[0].viewer_id),
                    lambda s: s.state == "connected" and s.shard not in ("", shard),
                    "the viewer reconnected to the surviving shard",
                )
                assert back.shard == (await status_of(manager, sid, again.viewer_id)).shard
                assert (await manager.get_stream(sid)).state is StreamState.ACTIVE
                seen = viewer.frames_decoded
                await eventually(
                    lambda: viewer.frames_decoded, lambda n: n > seen + 10, "frames again"
                )
            finally:
                watching.cancel()
                await viewer.close()

            # Everyone leaves: the remaining shard is the first, and it stays (min one shard).
            for ticket in [*second, again]:
                await manager.remove_viewer(sid, ticket.viewer_id)
            assert (await manager.get_stream(sid)).viewers == []
            assert len(shards(sid)) == 1
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_an_idle_extra_shard_retires_and_a_refused_rate_says_when_to_retry(
    ray_cluster: str,
) -> None:
    limits = ViewerLimits(
        max_viewers_per_shard=1,
        max_shards=2,
        idle_shard_retire_s=1.0,
        connect_rate_per_s=0.01,
        connect_burst=2,
    )

    async def main() -> str:
        async with StreamManager.start() as manager:
            config = StreamConfig(quality=QVGA, viewers=limits)
            sid = (await manager.start_camera_stream(config)).session_id
            a = await manager.add_viewer(sid, "a")
            b = await manager.add_viewer(sid, "b")
            assert port(a) != port(b) and len(shards(sid)) == 2
            with pytest.raises(ResourceError, match="try again in"):
                await manager.add_viewer(sid, "c")  # the burst of 2 is spent
            await manager.remove_viewer(sid, b.viewer_id)
            # Idle for a second, the extra shard stops; the first stays.
            await eventually(lambda: shards(sid), lambda s: len(s) == 1, "the idle shard gone")
            await manager.remove_viewer(sid, a.viewer_id)
            assert (await manager.get_stream(sid)).state is StreamState.ACTIVE
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_ports_a_shard_took_over_move_on_when_it_retires(ray_cluster: str) -> None:
    """Shard A dies; C, the least loaded, takes over its port.  When C retires idle, A's port
    (an address A's viewers still use) moves to B instead of closing with C."""
    limits = ViewerLimits(max_viewers_per_shard=1, max_shards=3, idle_shard_retire_s=1.0)

    async def main() -> str:
        async with StreamManager.start() as manager:
            sid = (
                await manager.start_camera_stream(StreamConfig(quality=QVGA, viewers=limits))
            ).session_id
            a, b, c = [await manager.add_viewer(sid, name) for name in "abc"]
            assert len({port(a), port(b), port(c)}) == 3
            by_port = {port(t): name for t, name in ((a, "A"), (b, "B"), (c, "C"))}
            handles = {
                by_port[StreamUrl.parse((await h.stats()).url).port]: h
                for h in (SenderHandle(ray.get_actor(n, namespace=NAMESPACE)) for n in shards(sid))
            }
            # B serves a real viewer, so C (no traffic) is the least loaded survivor.
            viewer = await Viewer.connect(b.url)
            watching = asyncio.create_task(viewer.watch(seconds=60))
            try:
                await eventually(lambda: viewer.frames_decoded, lambda n: n > 5, "b's frames")
                await eventually(
                    lambda: status_of(manager, sid, b.viewer_id),
                    lambda s: s.state == "connected" and s.bytes_sent > 0,
                    "b's traffic seen by the supervisor",
                )
                os.kill((await handles["A"].stats()).pid, signal.SIGKILL)
                await eventually(
                    handles["C"].stats, lambda s: port(a) in s.ports, "C serving A's port"
                )
                # C goes idle and retires; A's port moves to B first.
                await manager.remove_viewer(sid, c.viewer_id)
                await eventually(lambda: shards(sid), lambda s: len(s) == 1, "C retired")
                assert port(a) in (await handles["B"].stats()).ports
                # A's viewer, coming back to the address it knows, is served (once b has left
                # B's one seat).
                watching.cancel()
                await viewer.close()
                # The shard frees b's seat when b's connection ends, which is three PTOs after
                # b's CONNECTION_CLOSE (the draining period, RFC 9000 section 10.2.2), not at once.
                await eventually(handles["B"].stats, lambda s: not s.peers, "b's seat freed")
                again = await Viewer.connect(a.url)
                try:
                    await again.watch(seconds=30, frames=10)
                    assert again.frames_decoded >= 10
                    assert (await handles["B"].stats()).connections_refused == 0
                finally:
                    await again.close()
            finally:
                watching.cancel()
                await viewer.close()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_a_viewer_over_a_shards_limit_is_closed_with_the_reason_view_prints(
    ray_cluster: str,
) -> None:
    async def main() -> str:
        async with StreamManager.start() as manager:
            config = StreamConfig(quality=QVGA, viewers=ViewerLimits(max_viewers_per_shard=1))
            sid = (await manager.start_camera_stream(config)).session_id
            url = await manager.open_shards(sid, 1)  # for viewers without a ticket, as serve
            first = await Viewer.connect(url, reconnect=False)
            try:
                report = await first.watch(frames=5, seconds=60)
                assert report.frames_decoded == 5
                # The shard is full: the next viewer is closed at once, with the reason.
                refused = await asyncio.to_thread(run_cli, "view", url, "--seconds", "20", "--json")
                assert refused.returncode == 1, refused.stderr
                assert f"refused: this sender of stream {sid} is full (1 viewers)" in (
                    refused.stderr
                )
                assert "Traceback" not in refused.stderr
                assert first.termination is None  # the first viewer was not disturbed
            finally:
                await first.close()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_fifty_viewers_all_receive_and_a_viewer_that_stops_reading_is_isolated(
    ray_cluster: str,
) -> None:
    """50 light viewers (``kizuna-stream loadtest``'s) on one shard, and one real viewer process
    frozen with SIGSTOP: it reads nothing and acknowledges nothing.  The shard drops it at the
    idle timeout; meanwhile nobody else loses a frame to it.  (Its effect on the others'
    latency p99 is measured, not asserted, by ``perf.bench_fanout``'s stalled arm.)"""
    from shared.viewer.load import LoadTest

    async def main() -> str:
        async with StreamManager.start() as manager:
            sid = (await manager.start_camera_stream(StreamConfig(quality=QVGA15))).session_id
            url = await manager.open_shards(sid, 1)
            frozen = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "actors.cli", "view", f"{url}&viewer=frozen",
                "--seconds", "120",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                cwd=REPO,
            )  # fmt: skip
            # Connects spread over 5 s, with generous handshake and idle timeouts: a failed first
            # connection is not retried, and a core shared with other work can leave a
            # handshake silent for seconds.  (The frozen viewer keeps the default 5 s.)
            test = LoadTest(
                url, 50, seconds=120.0, ramp_s=5.0, connect_timeout_s=30.0, idle_timeout_s=15.0
            )
            stop = asyncio.Event()
            run = asyncio.create_task(test.run(stop))
            try:
                shard_stats = await _shard_stats(manager, sid)
                try:
                    connected = await eventually(
                        shard_stats,
                        lambda s: (
                            len(s.peers) == 51 and any(p.viewer_id == "frozen" for p in s.peers)
                        ),
                        "51 viewers connected, the real one's CNAME heard",
                        timeout=60,
                    )
                    await eventually(
                        lambda: min(v.core.frames for v in test.viewers),
                        lambda n: n >= 15,
                        "every light viewer's first second of video",
                        timeout=60,
                    )
                except AssertionError as exc:
                    raise AssertionError(
                        f"{exc}; load test: {test.summary(time.monotonic())}"
                    ) from exc
                [real] = [p for p in connected.peers if p.viewer_id == "frozen"]
                # What the ramp-up cost (a handshake on a busy core can expire a newcomer's
                # first frames) is not the frozen viewer's doing: count from here.
                expired_at_freeze = {
                    p.peer_id: p.frames_expired for p in (await shard_stats()).peers
                }
                os.kill(frozen.pid, signal.SIGSTOP)
                before = [v.core.frames for v in test.viewers]
                # Frozen, it acknowledges nothing: the shard gives up on it at the QUIC idle
                # timeout (its queue, meanwhile, bounded by age)...
                gone = await eventually(
                    shard_stats,
                    lambda s: (
                        len(s.peers) == 50 and all(p.peer_id != real.peer_id for p in s.peers)
                    ),
                    "the shard to drop the frozen viewer",
                    timeout=60,
                )
                # ...while every other viewer kept receiving, and none of theirs expired.
                assert (
                    min(v.core.frames - b for v, b in zip(test.viewers, before, strict=True)) >= 30
                )
                expired = {
                    p.viewer_id: p.frames_expired - expired_at_freeze[p.peer_id] for p in gone.peers
                }
                assert len(expired) == 50
                assert not any(expired.values()), expired
            finally:
                stop.set()
                await run
                if frozen.returncode is None:
                    frozen.kill()
                await frozen.wait()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))


async def _shard_stats(manager: StreamManager, sid: str) -> Callable[[], Awaitable[Any]]:
    """A reader of the stream's only shard's stats."""
    [name] = shards(sid)
    handle = SenderHandle(ray.get_actor(name, namespace=NAMESPACE))

    async def read() -> Any:
        return await handle.stats()

    return read
