"""RTP over QUIC on real loopback sockets, without Ray: server, sender core and viewer."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import pytest

from shared.codec import EncoderConfig, H264Encoder
from shared.errors import NetworkError
from shared.roq import VIDEO_FLOW_ID, VIDEO_RTCP_FLOW_ID, encode_datagram
from shared.roq_transport import PeerStats, RoqServer
from shared.rtp import RtcpPli, parse_rtcp_compound
from shared.rtp_sender import H264RtpSender
from shared.stream_url import StreamUrl
from shared.testpattern import TestPattern
from shared.tls import generate_self_signed
from shared.viewer import Viewer

WIDTH, HEIGHT, FPS = 320, 180, 30


class Broadcast:
    """Encoder + RTP sender + QUIC server in one loop, as the actors are across processes."""

    def __init__(self) -> None:
        self.identity = generate_self_signed("127.0.0.1")
        self.plis = 0
        self.server = RoqServer(self.identity, on_rtcp=self._on_rtcp)
        self.encoder = H264Encoder(
            EncoderConfig(
                width=WIDTH, height=HEIGHT, framerate=FPS, bitrate=300_000, keyframe_interval=300
            )
        )
        self.rtp = H264RtpSender(ssrc=0x1234, initial_sequence=65500, timestamp_offset=2**32 - 5000)
        self.pattern = TestPattern(WIDTH, HEIGHT, FPS)

    def _on_rtcp(self, peer: PeerStats, flow_id: int, data: bytes) -> None:
        assert flow_id == VIDEO_RTCP_FLOW_ID
        if any(isinstance(p, RtcpPli) for p in parse_rtcp_compound(data)):
            self.plis += 1
            self.encoder.request_keyframe()

    async def start(self) -> StreamUrl:
        await self.server.start("127.0.0.1", 0)
        return StreamUrl(
            host="127.0.0.1",
            port=self.server.port,
            session_id="t",
            fingerprint=self.identity.fingerprint,
        )

    async def send(
        self, frames: range, *, mangle: Callable[[int, list[bytes]], list[bytes]] | None = None
    ) -> None:
        for index in frames:
            capture_us = time.time_ns() // 1000
            for unit in self.encoder.encode(
                self.pattern.render(index, capture_us), pts=index * 3000, capture_us=capture_us
            ):
                datagrams = [
                    encode_datagram(VIDEO_FLOW_ID, p)
                    for p in self.rtp.packetize(unit.data, pts=unit.pts)
                ]
                if mangle is not None:
                    datagrams = mangle(index, datagrams)
                self.server.send_frame(datagrams, keyframe=unit.keyframe)
            await asyncio.sleep(1 / FPS)


async def collect(viewer: Viewer, into: list[int]) -> None:
    async for frame in viewer.frames():
        assert frame.stamp is not None
        into.append(frame.stamp.frame_number)


def test_every_frame_arrives_decodes_and_carries_its_stamp() -> None:
    async def main() -> tuple[list[int], object]:
        broadcast = Broadcast()
        url = await broadcast.start()
        viewer = await Viewer.connect(url)
        seen: list[int] = []
        task = asyncio.create_task(collect(viewer, seen))
        await asyncio.sleep(0.05)
        await broadcast.send(range(60))
        await asyncio.sleep(0.3)
        await broadcast.server.close()
        await asyncio.wait_for(task, 5)  # the stream ends when the server closes
        await viewer.close()
        return seen, viewer.report()

    seen, report = asyncio.run(main())
    assert seen == list(range(60))
    assert report.decode_errors == 0 and report.frames_dropped == 0  # type: ignore[attr-defined]
    assert report.latency_p50_ms is not None and report.latency_p50_ms < 1000  # type: ignore[attr-defined]


def test_lost_packet_drops_until_a_requested_keyframe_and_nothing_corrupt_is_decoded() -> None:
    def lose_one(index: int, datagrams: list[bytes]) -> list[bytes]:
        return datagrams[:-1] if index == 10 else datagrams  # frame 10 loses its last packet

    async def main() -> tuple[list[int], object, int]:
        broadcast = Broadcast()
        url = await broadcast.start()
        viewer = await Viewer.connect(url)
        seen: list[int] = []
        task = asyncio.create_task(collect(viewer, seen))
        await asyncio.sleep(0.05)
        await broadcast.send(range(40), mangle=lose_one)
        await asyncio.sleep(0.3)
        await broadcast.server.close()
        await asyncio.wait_for(task, 5)
        await viewer.close()
        return seen, viewer.report(), broadcast.plis

    seen, report, plis = asyncio.run(main())
    assert plis >= 1
    assert seen[:10] == list(range(10))
    assert 10 not in seen
    resumed = [n for n in seen if n > 10]
    assert resumed and resumed == sorted(resumed) and resumed[-1] == 39
    assert report.decode_errors == 0 and report.frames_dropped >= 1  # type: ignore[attr-defined]


def test_one_viewer_leaving_does_not_disturb_another() -> None:
    async def main() -> tuple[list[int], int]:
        broadcast = Broadcast()
        url = await broadcast.start()
        stays, leaves = await Viewer.connect(url), await Viewer.connect(url)
        seen: list[int] = []
        task = asyncio.create_task(collect(stays, seen))
        await asyncio.sleep(0.05)
        await broadcast.send(range(15))
        await leaves.close()
        await broadcast.send(range(15, 30))
        peers = len(broadcast.server.peers)
        await asyncio.sleep(0.2)
        await broadcast.server.close()
        await asyncio.wait_for(task, 5)
        await stays.close()
        return seen, peers

    seen, peers = asyncio.run(main())
    assert seen == list(range(30))
    assert peers == 1


def test_certificate_mismatch_is_refused() -> None:
    async def main() -> None:
        broadcast = Broadcast()
        url = await broadcast.start()
        forged = StreamUrl(
            host=url.host, port=url.port, session_id="t", fingerprint="sha256:" + "0" * 64
        )
        try:
            with pytest.raises(NetworkError, match="expected sha256:000"):
                await Viewer.connect(forged)
        finally:
            await broadcast.server.close()

    asyncio.run(main())


def test_port_in_use_and_nobody_listening_are_network_errors() -> None:
    async def main() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            with pytest.raises(NetworkError, match="already in use"):
                await RoqServer(generate_self_signed()).start("127.0.0.1", port)
        with pytest.raises(NetworkError, match="cannot connect"):
            await Viewer.connect(
                StreamUrl(host="127.0.0.1", port=port, session_id="t"), timeout=1.0
            )

    asyncio.run(main())
