"""Per-viewer rungs in a real sender shard, on the session's Ray cluster.

A stream encoded as a two-rung ladder (1024x576 at 1 Mbps, and the LOW preset's 854x480 at
0.5 Mbps) and a real viewer (``shared.viewer.client``, decoding): capped with
``set_rung_cap`` it decodes only the low rung's pictures; with the cap lifted it climbs to the
top rung at an IDR of that rung, on the same SSRC with no sequence gap (no packet counted
lost), and its decoder reports the new size.  The rung choice itself is tested with a fake
clock in ``test_rung_choice.py``, the fan-out's wiring in ``test_abr_wiring.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
import ray

from actors import StreamManager
from actors.handles import SenderHandle
from actors.placement import NAMESPACE
from shared.control.rung_choice import cap_for
from shared.media.scaler import plan_ladder
from shared.models import (
    ConnectionQuality,
    QualityPreset,
    Resolution,
    StreamConfig,
    StreamQuality,
)
from shared.viewer.client import Viewer
from shared.viewer.decoding import DecodedFrame
from tests.conftest import stream_actors, wait_for_no_leaks
from tests.test_broadcast import status_of
from tests.test_pipeline import eventually

pytestmark = pytest.mark.ray

TOP = StreamQuality(resolution=Resolution(1024, 576), framerate=15, bitrate=1_000_000)
LOW = (854, 480)


def shard_of(sid: str) -> SenderHandle:
    [name] = [name for name in stream_actors(sid) if "-shard-" in name]
    return SenderHandle(ray.get_actor(name, namespace=NAMESPACE))


async def peer(shard: SenderHandle) -> Any:
    stats = await shard.stats()
    return stats.peers[0] if stats.peers else None


def test_a_capped_viewer_gets_the_low_rung_and_climbs_at_an_idr_when_lifted(
    ray_cluster: str,
) -> None:
    async def main() -> str:
        async with StreamManager.start() as manager:
            config = StreamConfig(quality=TOP, rungs=(QualityPreset.LOW,))
            sid = (await manager.start_camera_stream(config)).session_id
            ticket = await manager.add_viewer(sid, "p")
            shard = shard_of(sid)
            assert (await shard.stats()).rung_rates == [1_000_000, 500_000]
            viewer = await Viewer.connect(ticket.url)
            sizes: list[tuple[int, int]] = []

            async def consume() -> None:
                async for item in viewer.media():
                    if isinstance(item, DecodedFrame):
                        sizes.append((item.frame.width, item.frame.height))

            watching = asyncio.create_task(consume())
            try:
                # The shard knows the viewer by its ticket once its first RTCP names it.
                # The cap a viewer whose permissions say max_quality=LOW gets on this ladder.
                cap = cap_for(QualityPreset.LOW, plan_ladder(TOP, config.rungs).rungs)
                assert cap == 1
                await eventually(
                    lambda: shard.set_rung_cap(ticket.viewer_id, cap),
                    lambda n: n == 1,
                    "the cap applied to the viewer's connection",
                )
                await eventually(
                    lambda: peer(shard),
                    lambda p: p is not None and p.rung == p.rung_wanted == 1 and p.rung_cap == 1,
                    "the viewer on the low rung",
                )
                # The stream's status says so: the viewer's quality is the low rung's.
                await eventually(
                    lambda: status_of(manager, sid, ticket.viewer_id),
                    lambda v: (
                        v.current_quality.resolution == Resolution(*LOW)
                        and v.connection_quality is not ConnectionQuality.DISCONNECTED
                    ),
                    "the viewer's status showing the low rung",
                )
                capped_from = len(sizes)
                await eventually(
                    lambda: len(sizes), lambda n: n >= capped_from + 45, "3 s of capped frames"
                )
                assert set(sizes[capped_from:]) == {LOW}
                ssrc = viewer._video.stats.ssrc if viewer._video.stats else None

                lifted_from = len(sizes)
                assert await shard.set_rung_cap(ticket.viewer_id, 0) == 1
                report = await eventually(
                    viewer.report, lambda r: (r.width, r.height) == (1024, 576), "the top rung"
                )
                after = sizes[lifted_from:]
                top = after.index((1024, 576))
                # One clean switch: low pictures, then top ones, never back.
                assert set(after[:top]) <= {LOW}
                await eventually(lambda: len(sizes), lambda n: n >= lifted_from + top + 15, "more")
                assert set(sizes[lifted_from + top :]) == {(1024, 576)}
                status = await peer(shard)
                assert status.rung == 0 and status.rung_switches >= 1
                # The same SSRC, and its sequence numbers continuous across the switch.
                assert viewer._video.stats is not None
                assert viewer._video.stats.ssrc == ssrc
                await eventually(
                    lambda: status_of(manager, sid, ticket.viewer_id),
                    lambda v: v.current_quality == TOP,
                    "the viewer's status showing the stream's own quality",
                )
                final = viewer.report()
                assert final.packets_lost == 0 and final.decode_errors == 0
                assert report.resolution_changes >= 1
            finally:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
                await viewer.close()
            await manager.remove_viewer(sid, ticket.viewer_id)
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))
