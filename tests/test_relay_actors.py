"""The relay stage on the session's Ray cluster: a live stream's rings carried by a
RelayOriginActor to a NodeRelayActor, and a sender shard reading the relayed copy serving a
real viewer that decodes.  Both relay ends sit on this one node (what differs between nodes —
the rings' names — is exercised; a multi-node cluster is the scale-out tests' part)."""

from __future__ import annotations

import asyncio

import ray

from actors import StreamManager
from actors.handles import EncoderHandle, NodeRelayHandle, RelayOriginHandle, SenderHandle
from actors.placement import NAMESPACE, spawn
from actors.stages.relay import NodeRelayActor, RelayOriginActor
from actors.stages.sender import SenderActor
from shared.models import Resolution, StreamConfig, StreamQuality
from shared.pool.shm import list_segments, segment_name
from shared.roq.tls import generate_self_signed
from shared.viewer.client import Viewer
from tests.conftest import wait_for_no_leaks

QVGA = StreamQuality(resolution=Resolution(320, 240), framerate=30, bitrate=300_000)


def test_a_shard_reading_a_relayed_ring_serves_a_viewer_that_decodes(ray_cluster: str) -> None:
    async def main() -> str:
        async with StreamManager.start() as manager:
            sid = (await manager.start_camera_stream(StreamConfig(quality=QVGA))).session_id
            node = ray.get_runtime_context().get_node_id()
            encoder = EncoderHandle(ray.get_actor(f"kz-{sid}-encoder", namespace=NAMESPACE))
            origin = spawn(
                RelayOriginActor, RelayOriginHandle, name=f"kz-{sid}-relay", node_id=node
            )(sid, {"video": segment_name(sid, "video")})
            relay: NodeRelayHandle | None = None
            shard: SenderHandle | None = None
            try:
                address = await origin.open()
                relay = spawn(
                    NodeRelayActor, NodeRelayHandle, name=f"kz-{sid}-relay-n2", node_id=node
                )(sid, address, ["video"], "n2")
                rings = await relay.open()
                assert rings == {"video": segment_name(sid, "n2-video")}
                assert rings["video"] in list_segments(f"kz_{sid}_")
                shard = spawn(SenderActor, SenderHandle, name=f"kz-{sid}-n2-shard", node_id=node)(
                    sid, "n2-shard", rings["video"], encoder, ring_prefix="n2-"
                )
                url = await shard.open("127.0.0.1", 0, generate_self_signed("127.0.0.1"))
                viewer = await Viewer.connect(url)
                try:
                    await viewer.watch(seconds=30, frames=20)
                    assert viewer.frames_decoded >= 20
                    report = viewer.report()
                    assert (report.width, report.height) == (320, 240)
                    assert report.decode_errors == 0
                finally:
                    await viewer.close()
                received = await relay.stats()
                served = await origin.stats()
                assert received.downlink.packets_appended >= 20
                assert served.nodes["n2"].packets_forwarded >= received.downlink.packets_appended
                assert received.delay_p50_ms is not None
            finally:
                for handle in (shard, relay, origin):
                    if handle is not None:
                        await handle.stop()
                        handle.kill()
            await manager.stop_stream(sid)
        return sid

    wait_for_no_leaks(asyncio.run(main()))
