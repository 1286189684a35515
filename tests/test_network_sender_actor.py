"""SenderActor without Ray: the actor class on this event loop, fed through real packet rings.

The actor is a plain class (Ray only hosts it), so its shell logic is tested here directly:
several actors sharing one UDP port (SO_REUSEPORT shards), the audio track attached when the
stream has an audio ring, keyframe requests forwarded to the encoder, and the NetworkStreamer
calls (get_stream_stats, adjust_bitrate, close_stream).
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

from actors.handles import EncoderHandle
from actors.stages.sender import SenderActor, SenderStats
from shared.capture.testpattern import TestPattern
from shared.media.codec import EncoderConfig, H264Encoder
from shared.pool.packet_ring import PacketRing
from shared.pool.shm import segment_name
from shared.roq.tls import generate_self_signed
from shared.viewer.client import DecodedFrame, Viewer

WIDTH, HEIGHT, FPS = 320, 180, 30


class FakeEncoderHandle:
    """Stands in for the encoder actor's handle: ``handle.request_keyframe.remote()``."""

    def __init__(self, encoder: H264Encoder) -> None:
        self.requests = 0
        outer = self

        class _Method:
            def remote(self, rung: int | None = 0) -> None:
                outer.requests += 1
                encoder.request_keyframe()

        self.request_keyframe = _Method()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_shards_share_a_port_and_serve_every_viewer() -> None:
    session = uuid.uuid4().hex[:10]

    async def main() -> tuple[list[int], list[int], list[SenderStats], int]:
        video = PacketRing.create(segment_name(session, "video"), capacity_bytes=4 << 20)
        encoder = H264Encoder(
            EncoderConfig(
                width=WIDTH, height=HEIGHT, framerate=FPS, bitrate=300_000, keyframe_interval=60
            )
        )
        handle = FakeEncoderHandle(encoder)
        identity = generate_self_signed("127.0.0.1")
        port = free_port()
        shards = [
            SenderActor(session, f"shard-{i}", video.name, EncoderHandle(handle)) for i in range(2)
        ]
        urls = [await shard.open("127.0.0.1", port, identity) for shard in shards]
        assert urls[0] == urls[1]  # one address, one certificate, one URL
        viewers = [await Viewer.connect(urls[0], reconnect=False) for _ in range(4)]
        counts = [0] * len(viewers)

        async def consume(index: int) -> None:
            async for item in viewers[index].media():
                counts[index] += isinstance(item, DecodedFrame)

        tasks = [asyncio.create_task(consume(i)) for i in range(len(viewers))]
        pattern = TestPattern(WIDTH, HEIGHT, FPS)
        started = time.monotonic()
        for index in range(60):
            capture_us = time.time_ns() // 1000
            for unit in encoder.encode(
                pattern.render(index, capture_us), pts=index * 3000, capture_us=capture_us
            ):
                sequence = video.append(
                    unit.data, pts=unit.pts, capture_us=capture_us, keyframe=unit.keyframe
                )
                for shard in shards:
                    shard.packets_ready(sequence)
            await asyncio.sleep(max(0.0, started + (index + 1) / FPS - time.monotonic()))
        await asyncio.sleep(0.3)
        stats = [await shard.stats() for shard in shards]
        per_shard = [len(s.peers) for s in stats]
        stream_stats = await shards[0].get_stream_stats()
        if stats[0].peers:
            await shards[0].adjust_bitrate(100_000, stats[0].peers[0].peer_id)
            assert await shards[0].close_stream(stats[0].peers[0].peer_id)
        assert not await shards[0].close_stream("nobody")
        for shard in shards:
            await shard.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        for viewer in viewers:
            await viewer.close()
        video.close()
        video.unlink()
        assert stream_stats.bytes_sent >= 0
        return counts, per_shard, stats, handle.requests

    counts, per_shard, stats, requests = asyncio.run(main())
    assert sum(per_shard) == 4  # every viewer landed on one of the two shards
    assert all(count >= 30 for count in counts), counts
    assert requests >= 1  # newcomers asked for a keyframe
    assert all(s.tracks == ["video"] for s in stats)


def test_the_audio_ring_is_attached_when_it_exists() -> None:
    session = uuid.uuid4().hex[:10]

    async def main() -> list[str]:
        video = PacketRing.create(segment_name(session, "video"), capacity_bytes=1 << 20)
        audio = PacketRing.create(segment_name(session, "audio"), capacity_bytes=1 << 20)
        encoder = H264Encoder(
            EncoderConfig(
                width=WIDTH, height=HEIGHT, framerate=FPS, bitrate=300_000, keyframe_interval=60
            )
        )
        actor = SenderActor(session, "v", video.name, EncoderHandle(FakeEncoderHandle(encoder)))
        await actor.open("127.0.0.1", 0)
        tracks = (await actor.stats()).tracks
        await actor.stop()
        for ring in (video, audio):
            ring.close()
            ring.unlink()
        return tracks

    assert asyncio.run(main()) == ["video", "audio"]
