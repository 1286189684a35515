"""RTP over real loopback QUIC through the userspace impairment relay (tests/impairment.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from shared.roq.url import StreamUrl
from shared.viewer.client import Viewer
from tests.impairment import Impairment, ImpairmentRelay
from tests.test_roq_loopback import FPS, Broadcast, collect, received, until

LOSSY = Impairment(loss=0.05, delay_s=0.01, jitter_s=0.004, reorder=0.01, duplicate=0.01)


async def through_relay(broadcast: Broadcast, relay: ImpairmentRelay) -> StreamUrl:
    direct = await broadcast.start()
    relay.target = (direct.host, direct.port)
    port = await relay.start()
    return StreamUrl(host="127.0.0.1", port=port, session_id="t", fingerprint=direct.fingerprint)


async def end_of_stream(task: asyncio.Task[None]) -> None:
    """Wait for the viewer to see the stream end, or stop waiting: on a lossy path the server's
    one CONNECTION_CLOSE can be lost, and only the idle timeout would end the connection."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(task, 5)


def test_thirty_seconds_at_five_percent_loss_skip_at_most_one_percent() -> None:
    frames = 30 * FPS

    async def main() -> tuple[list[int], Viewer, ImpairmentRelay, Broadcast]:
        broadcast = Broadcast(keyframe_interval=10 * FPS)
        relay = ImpairmentRelay(("127.0.0.1", 0), down=LOSSY, up=LOSSY, seed=2024)
        url = await through_relay(broadcast, relay)
        viewer = await Viewer.connect(url, reconnect=False)
        seen: list[int] = []
        task = asyncio.create_task(collect(viewer, seen))
        await until(lambda: len(broadcast.sender.peers) == 1, "the server to see the viewer")
        await broadcast.send(range(frames))
        # The last frame can be lost for good (1% may be): then the assertions below judge.
        await until(received(seen, frames - 1), "the last frame", required=False)
        await broadcast.server.close()
        await end_of_stream(task)
        await viewer.close()
        relay.close()
        return seen, viewer, relay, broadcast

    seen, viewer, relay, broadcast = asyncio.run(main())
    report = viewer.report()
    assert relay.down.stats.dropped > 0.03 * relay.down.stats.forwarded  # the loss was real
    assert seen == sorted(set(seen))
    skipped = frames - len(seen)
    assert skipped <= 0.01 * frames, (skipped, report)
    assert report.decode_errors == 0
    assert report.packets_recovered > 0 and report.nacks_sent > 0
    [peer] = broadcast.sender.peers.values()
    assert peer.feedback.retransmissions > 0 and peer.feedback.rtt_ms > 0
    assert 0.0 <= peer.feedback.loss < 0.2


def test_stream_mode_through_a_lossy_relay() -> None:
    async def main() -> tuple[list[int], Viewer]:
        broadcast = Broadcast()
        relay = ImpairmentRelay(("127.0.0.1", 0), down=LOSSY, up=LOSSY, seed=7)
        url = await through_relay(broadcast, relay)
        viewer = await Viewer.connect(url, datagrams=False, reconnect=False)
        seen: list[int] = []
        task = asyncio.create_task(collect(viewer, seen))
        await until(lambda: len(broadcast.sender.peers) == 1, "the server to see the viewer")
        await broadcast.send(range(90))
        await until(received(seen, 89), "the last frame", required=False)
        await broadcast.server.close()
        await end_of_stream(task)
        await viewer.close()
        relay.close()
        return seen, viewer

    seen, viewer = asyncio.run(main())
    report = viewer.report()
    assert report.mode == "stream" and report.decode_errors == 0
    assert seen == sorted(set(seen)) and len(seen) >= 80


def test_the_viewer_reconnects_with_backoff_after_the_path_drops() -> None:
    async def main() -> tuple[list[int], Viewer]:
        broadcast = Broadcast(keyframe_interval=FPS)
        relay = ImpairmentRelay(("127.0.0.1", 0), seed=3)
        url = await through_relay(broadcast, relay)
        viewer = await Viewer.connect(url, idle_timeout=1.0, timeout=1.0)
        seen: list[int] = []
        task = asyncio.create_task(collect(viewer, seen))
        await until(lambda: len(broadcast.sender.peers) == 1, "the server to see the viewer")
        await broadcast.send(range(30))
        await until(received(seen, 29), "frame 29 before the path drops")
        relay.cut = True  # the path drops: no packets either way
        await broadcast.send(range(30, 90))
        relay.cut = False
        await broadcast.send(range(90, 180))
        deadline = time.monotonic() + 10
        while (not seen or seen[-1] < 150) and time.monotonic() < deadline:
            await broadcast.send(range(180, 181))
        await broadcast.server.close()
        await asyncio.wait_for(task, 15)
        await viewer.close()
        relay.close()
        return seen, viewer

    seen, viewer = asyncio.run(main())
    report = viewer.report()
    assert report.reconnects >= 1
    assert seen[:30] == list(range(30))
    assert any(n >= 90 for n in seen)  # pictures again after the reconnect
    assert report.decode_errors == 0
