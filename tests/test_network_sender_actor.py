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
from dataclasses import dataclass

from actors.handles import EncoderHandle
from actors.stages.sender import SenderActor, SenderStats
from shared.capture.testpattern import TestPattern
from shared.media.codec import EncoderConfig, H264Encoder
from shared.pool.packet_ring import PacketRing
from shared.pool.shm import segment_name
from shared.roq.tls import generate_self_signed
from shared.viewer.client import Viewer
from tests.test_roq_loopback import collect, until

WIDTH, HEIGHT, FPS = 320, 180, 30


@dataclass
class Outcome:
    seen: list[list[int]]
    """Frame numbers each viewer decoded."""
    stats: list[SenderStats]
    finals: list[SenderStats]
    requests: int
    """Keyframe requests the encoder got."""
    received: int
    sent: int
    estimate_before: int
    estimate_after: int
    capped_estimate: int
    still_running: int
    shard_sent: int
    kept_bytes: int


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

    async def main() -> Outcome:
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
        seen: list[list[int]] = [[] for _ in viewers]
        tasks = [
            asyncio.create_task(collect(viewer, into))
            for viewer, into in zip(viewers, seen, strict=True)
        ]

        async def all_connected() -> bool:
            return sum([len((await shard.stats()).peers) for shard in shards]) == len(viewers)

        # Each viewer is known to a shard before the first frame, so each is sent all 60.
        await until(all_connected, "the shards to see every viewer")
        pattern = TestPattern(WIDTH, HEIGHT, FPS)
        started = time.monotonic()
        for index in range(60):
            capture_us, monotonic_us = time.time_ns() // 1000, time.monotonic_ns() // 1000
            for unit in encoder.encode(
                pattern.render(index, capture_us), pts=index * 3000, capture_us=capture_us
            ):
                video.append(  # its doorbell wakes both shards
                    unit.data,
                    pts=unit.pts,
                    capture_us=capture_us,
                    monotonic_us=monotonic_us,
                    keyframe=unit.keyframe,
                )
            await asyncio.sleep(max(0.0, started + (index + 1) / FPS - time.monotonic()))
        # Loopback rarely loses a frame for good; the counts below judge if it did.
        await until(
            lambda: all(into and into[-1] == 59 for into in seen),
            "frame 59 at every viewer",
            required=False,
        )
        stats = [await shard.stats() for shard in shards]
        # What the viewers received was sent first: read it before the senders' counters.
        received = sum(viewer.report().bytes_received for viewer in viewers)
        sent = sum([(await shard.get_stream_stats()).bytes_sent for shard in shards])

        # One viewer's connection on a shard that has one (the kernel may give one shard all).
        shard, stat = next((sh, st) for sh, st in zip(shards, stats, strict=True) if st.peers)
        target = stat.peers[0].peer_id
        before = await shard.get_stream_stats(target)
        await shard.adjust_bitrate(100_000, target)
        after = await shard.get_stream_stats(target)
        [capped] = [p for p in (await shard.stats()).peers if p.peer_id == target]

        async def target_gone() -> bool:
            return all(peer.peer_id != target for peer in (await shard.stats()).peers)

        shard_sent = (await shard.stats()).bytes_sent
        assert await shard.close_stream(target)
        assert not await shard.close_stream("nobody")
        await until(lambda: sum(task.done() for task in tasks) == 1, "the closed stream to end")
        await until(target_gone, "the shard to let the closed connection go")
        still_running = sum(not task.done() for task in tasks)
        kept_bytes = (await shard.stats()).bytes_sent
        finals = [await shard.stop() for shard in shards]
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        for viewer in viewers:
            await viewer.close()
        video.close()
        video.unlink()
        return Outcome(
            seen=seen,
            stats=stats,
            finals=finals,
            requests=handle.requests,
            received=received,
            sent=sent,
            estimate_before=before.current_bitrate,
            estimate_after=after.current_bitrate,
            capped_estimate=capped.estimate_bps,
            still_running=still_running,
            shard_sent=shard_sent,
            kept_bytes=kept_bytes,
        )

    outcome = asyncio.run(main())
    assert sum(len(s.peers) for s in outcome.stats) == 4  # each viewer on one of the shards
    assert all(len(frames) >= 30 for frames in outcome.seen), outcome.seen
    assert all(s.tracks == ["video"] for s in outcome.stats)
    # Sending works: every byte the viewers counted went through the senders' counters.
    assert outcome.sent >= outcome.received > 60 * 500
    # adjust_bitrate caps that connection's estimate, which get_stream_stats reports.
    assert outcome.estimate_before > 100_000
    assert outcome.estimate_after == outcome.capped_estimate == 100_000
    # close_stream ended exactly that viewer's stream; the others went on until stop().
    assert outcome.still_running == 3
    # A departed connection's bytes stay in the shard's total.
    assert outcome.kept_bytes >= outcome.shard_sent
    # Newcomers asked for keyframes; each request the shards forwarded reached the encoder.
    assert outcome.requests >= 1
    assert sum(final.keyframe_requests for final in outcome.finals) == outcome.requests


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
