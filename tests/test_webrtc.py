"""WebRTC viewers: encode-once into aiortc, the WHEP endpoint, and the WebRTC shard on Ray.

Without Ray: a real H.264 encoder writes a packet ring as the encoder actor does; the
:class:`~shared.webrtc.feed.RingFeed` reads it and aiortc peers (aiortc on both ends, over
loopback ICE) receive and decode it.  "No encoder per viewer" is checked on aiortc's own
H.264 codec object (``pack`` called, ``encode`` never) and on the bytes: the NAL units the
receiver depacketizes are the ring's.  The WHEP endpoint's answers (201 and every refusal) are
checked over real HTTP on loopback.  With Ray: the supervisor's WebRTC shard on a real token
stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import av
import numpy as np
import pytest
import ray
from aiohttp import web
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc import rtp as aiortc_rtp
from aiortc.codecs import h264 as aiortc_h264
from aiortc.codecs import opus as aiortc_opus

from actors import StreamManager
from actors.handles import WebRTCHandle
from actors.placement import NAMESPACE
from shared.auth.control import RungInfo
from shared.auth.server import AccessSettings
from shared.auth.tokens import TokenIssuer, TokenKey
from shared.capture.testpattern import TestPattern
from shared.errors import ConfigError, ProtocolError, ResourceError
from shared.media.codec import EncoderConfig, H264Encoder
from shared.media.opus import OpusEncoder
from shared.models import (
    AccessMode,
    ConnectionQuality,
    QualityPreset,
    Resolution,
    StreamAccess,
    StreamConfig,
    StreamQuality,
    ViewerLimits,
    ViewerPermissions,
)
from shared.pool.packet_ring import PacketRing
from shared.pool.shm import segment_name
from shared.rtp.h264 import split_annexb
from shared.webrtc import control
from shared.webrtc.feed import RingFeed
from shared.webrtc.feedback import WEBRTC_SELECTOR, BrowserRungChoice
from shared.webrtc.whep import WhepEndpoint
from tests.browser import Page, chromium, chromium_path
from tests.conftest import _someone_elses, shm_snapshot, stream_actors, wait_for_no_leaks
from tests.netns import CappedLink, missing_tools
from tests.test_audio import TONE_HZ, peak_hz

WIDTH, HEIGHT, FPS = 320, 180, 30
SECRET = b"test-secret-of-thirty-two-bytes!"


async def until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Producer:
    """Encodes the test pattern into a ring at FPS, as the encoder actor does."""

    ring: PacketRing
    width: int = WIDTH
    height: int = HEIGHT
    units: list[bytes] = field(default_factory=list)

    async def run(self) -> None:
        encoder = H264Encoder(
            EncoderConfig(
                width=self.width,
                height=self.height,
                framerate=FPS,
                bitrate=300_000,
                keyframe_interval=30,
            )
        )
        pattern = TestPattern(self.width, self.height, FPS)
        started = time.monotonic()
        index = 0
        while True:
            capture_us = time.time_ns() // 1000
            for unit in encoder.encode(
                pattern.render(index, capture_us), pts=index * 3000, capture_us=capture_us
            ):
                self.units.append(unit.data)
                self.ring.append(
                    unit.data,
                    pts=unit.pts,
                    capture_us=capture_us,
                    monotonic_us=time.monotonic_ns() // 1000,
                    keyframe=unit.keyframe,
                )
            index += 1
            await asyncio.sleep(max(0.0, started + index / FPS - time.monotonic()))


async def produce_tone(ring: PacketRing, sent: list[bytes]) -> None:
    """A 440 Hz tone encoded to Opus into the audio ring in real time, as capture does."""
    encoder = OpusEncoder(sample_rate=48_000, channels=2, bitrate=64_000)
    block = 960  # 20 ms
    started = time.monotonic()
    index = 0
    while True:
        t = (np.arange(block) + index * block) / 48_000
        mono = (8000 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.int16)
        for packet in encoder.encode(np.stack([mono, mono], axis=1), time.time_ns() // 1000):
            sent.append(packet.data)
            ring.append(
                packet.data,
                pts=packet.pts,
                capture_us=packet.capture_us,
                monotonic_us=time.monotonic_ns() // 1000,
                keyframe=True,
            )
        index += 1
        await asyncio.sleep(max(0.0, started + index * 0.02 - time.monotonic()))


@contextlib.asynccontextmanager
async def producing(
    width: int = WIDTH, height: int = HEIGHT
) -> AsyncIterator[tuple[Producer, PacketRing]]:
    ring = PacketRing.create(segment_name(uuid.uuid4().hex[:10], "video"), capacity_bytes=4 << 20)
    producer = Producer(ring, width, height)
    task = asyncio.create_task(producer.run())
    try:
        yield producer, ring
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        ring.unlink()  # the writer removes what it made
        ring.close()


class Receiver:
    """An aiortc peer that receives video (and audio) recvonly and decodes it."""

    def __init__(self, *, audio: bool = False) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        if audio:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.frames: list[av.VideoFrame] = []
        self.audio: list[av.AudioFrame] = []
        self._tasks: list[asyncio.Task[None]] = []

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._tasks.append(asyncio.create_task(self._collect(track)))

    async def _collect(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(Exception):
            while True:
                frame = await track.recv()
                if isinstance(frame, av.VideoFrame):
                    self.frames.append(frame)
                else:
                    assert isinstance(frame, av.AudioFrame)
                    self.audio.append(frame)

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture(autouse=True)
def no_segment_left() -> Any:
    """Every test here leaves no shared-memory segment behind (the Ray tests check their
    stream's too, with ``wait_for_no_leaks``).  Segments a live process outside this session
    made meanwhile (another engineer's tests on a shared machine) are not this test's."""
    before = shm_snapshot().segments
    yield

    def left() -> list[str]:
        return sorted(s for s in set(shm_snapshot().segments) - before if not _someone_elses(s))

    # A segment another program is making or unlinking right now can look like a leak for a
    # moment (no header yet, or its maker just exited); a leak of this test's stays.
    deadline = time.monotonic() + 5.0
    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left(), f"segments left behind: {left()}"


@pytest.fixture
def codec_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts aiortc's H.264 codec calls: ``pack`` (pass-through) and ``encode``."""
    calls = {"pack": 0, "encode": 0, "libx264": 0}
    pack, encode = aiortc_h264.H264Encoder.pack, aiortc_h264.H264Encoder.encode
    encode_frame = aiortc_h264.H264Encoder._encode_frame

    def counted_pack(self: Any, packet: Any) -> Any:
        calls["pack"] += 1
        return pack(self, packet)

    def counted_encode(self: Any, *args: Any) -> Any:
        calls["encode"] += 1
        return encode(self, *args)

    def counted_encode_frame(self: Any, *args: Any) -> Any:
        calls["libx264"] += 1  # where aiortc opens libx264
        return encode_frame(self, *args)

    monkeypatch.setattr(aiortc_h264.H264Encoder, "pack", counted_pack)
    monkeypatch.setattr(aiortc_h264.H264Encoder, "encode", counted_encode)
    monkeypatch.setattr(aiortc_h264.H264Encoder, "_encode_frame", counted_encode_frame)
    return calls


@pytest.fixture
def received_units(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The access units aiortc's receivers reassembled, before decoding."""
    units: list[bytes] = []
    decode = aiortc_h264.H264Decoder.decode

    def spy(self: Any, encoded_frame: Any) -> Any:
        units.append(bytes(encoded_frame.data))
        return decode(self, encoded_frame)

    monkeypatch.setattr(aiortc_h264.H264Decoder, "decode", spy)
    return units


@pytest.fixture
def opus_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """aiortc's Opus codec: ``pack``/``encode`` calls, and the payloads its decoders got."""
    calls: dict[str, Any] = {"pack": 0, "encode": 0, "received": []}
    pack, encode = aiortc_opus.OpusEncoder.pack, aiortc_opus.OpusEncoder.encode
    decode = aiortc_opus.OpusDecoder.decode

    def counted_pack(self: Any, packet: Any) -> Any:
        calls["pack"] += 1
        return pack(self, packet)

    def counted_encode(self: Any, *args: Any) -> Any:
        calls["encode"] += 1
        return encode(self, *args)

    def spy(self: Any, encoded_frame: Any) -> Any:
        calls["received"].append(bytes(encoded_frame.data))
        return decode(self, encoded_frame)

    monkeypatch.setattr(aiortc_opus.OpusEncoder, "pack", counted_pack)
    monkeypatch.setattr(aiortc_opus.OpusEncoder, "encode", counted_encode)
    monkeypatch.setattr(aiortc_opus.OpusDecoder, "decode", spy)
    return calls


def open_access() -> AccessSettings:
    return AccessSettings(access=StreamAccess(mode=AccessMode.OPEN))


def token_access() -> AccessSettings:
    return AccessSettings(access=StreamAccess(mode=AccessMode.TOKEN), secret=SECRET)


@contextlib.asynccontextmanager
async def serving(endpoint: WhepEndpoint) -> AsyncIterator[str]:
    runner = web.AppRunner(endpoint.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    [address] = runner.addresses
    port = address[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await endpoint.close()
        await runner.cleanup()


async def post_offer(
    base: str,
    stream: str,
    offer: str,
    token: str | None = None,
    content_type: str = "application/sdp",
) -> tuple[int, str, str | None]:
    headers = {"Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/whep/{stream}", data=offer, headers=headers) as response,
    ):
        return response.status, await response.text(), response.headers.get("Location")


def nal_units(units: list[bytes]) -> list[bytes]:
    return [nal for unit in units for nal in split_annexb(unit)]


# -- without Ray ---------------------------------------------------------------------------


def test_encoded_packets_reach_aiortc_peers_unencoded_and_decode_at_the_rungs_size(
    codec_calls: dict[str, int], received_units: list[bytes]
) -> None:
    async def main() -> None:
        async with producing() as (producer, ring):
            requests: list[float] = []
            feed = RingFeed(
                PacketRing.attach(ring.name), "video", request_keyframe=lambda: requests.append(1)
            )
            feed.start()
            endpoint = WhepEndpoint("s1", open_access(), video=[feed])
            receivers = [Receiver() for _ in range(2)]
            try:
                async with serving(endpoint) as base:
                    for receiver in receivers:
                        status, answer, location = await post_offer(
                            base, "s1", await receiver.offer()
                        )
                        assert status == 201, answer
                        assert location is not None and location.startswith("/whep/s1/")
                        assert "H264" in answer and "packetization-mode=1" in answer
                        assert "VP8" not in answer  # H.264 only: the ring's codec
                        await receiver.answer(answer)
                    await until(
                        lambda: all(len(r.frames) >= 30 for r in receivers),
                        "30 decoded frames each",
                    )
                    stats = endpoint.peer_stats()
                    assert len(stats) == 2 and all(s.frames_sent >= 30 for s in stats)
                    # One reader for both peers: the ring is read once, not once per peer.
                    assert feed.packets_read <= len(producer.units)
                    assert feed.tracks == 2
            finally:
                for receiver in receivers:
                    await receiver.close()
                await feed.close()
            for receiver in receivers:
                assert {(f.width, f.height) for f in receiver.frames} == {(WIDTH, HEIGHT)}
            # Encode once: aiortc packed the ring's access units and never encoded one.
            assert codec_calls["pack"] >= 60
            assert codec_calls["encode"] == 0 and codec_calls["libx264"] == 0
            # The NAL units the receivers reassembled are the encoder's, byte for byte.
            sent = set(nal_units(producer.units))
            got = nal_units(received_units)
            assert len(got) >= 60 and all(nal in sent for nal in got)
            assert requests  # newcomers asked the encoder for a keyframe

    asyncio.run(main())


def test_opus_from_the_audio_ring_reaches_the_peer_unencoded_beside_the_video(
    opus_calls: dict[str, Any],
) -> None:
    async def main() -> None:
        async with producing() as (_producer, video_ring):
            audio_ring = PacketRing.create(
                segment_name(uuid.uuid4().hex[:10], "audio"), capacity_bytes=1 << 20
            )
            sent: list[bytes] = []
            tone = asyncio.create_task(produce_tone(audio_ring, sent))
            video = RingFeed(PacketRing.attach(video_ring.name), "video")
            audio = RingFeed(PacketRing.attach(audio_ring.name), "audio")
            video.start()
            audio.start()
            endpoint = WhepEndpoint("s1", open_access(), video=[video], audio=audio)
            receiver = Receiver(audio=True)
            try:
                async with serving(endpoint) as base:
                    status, answer, _ = await post_offer(base, "s1", await receiver.offer())
                    assert status == 201 and "opus" in answer
                    await receiver.answer(answer)
                    await until(
                        lambda: len(receiver.audio) >= 100 and len(receiver.frames) >= 10,
                        "2 s of audio and 10 video frames",
                    )
            finally:
                tone.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tone
                await receiver.close()
                await video.close()
                await audio.close()
                audio_ring.unlink()
                audio_ring.close()
            pcm = np.concatenate([f.to_ndarray().reshape(-1, 2) for f in receiver.audio[25:]])
            assert peak_hz(pcm, 48_000) == pytest.approx(TONE_HZ, abs=2)
            # Passed through: aiortc packed the ring's Opus packets and encoded none.
            assert opus_calls["pack"] >= 100 and opus_calls["encode"] == 0
            received = opus_calls["received"]
            assert len(received) >= 100 and set(received) <= set(sent)

    asyncio.run(main())


class PushedTrack:
    """Stands in for a peer's track: what a feed pushes to it."""

    def __init__(self) -> None:
        self.pushed: list[bytes] = []

    def on(self, event: str, callback: Callable[[], None]) -> None:
        pass

    def push(self, data: bytes, pts: int, *, keyframe: bool, rung: int) -> None:
        self.pushed.append(data)

    def stop(self) -> None:
        pass


def test_a_feed_reads_the_ring_its_restarted_encoder_made_anew() -> None:
    """An encoder restart re-creates its rings under the same names (``actors.recovery``):
    a feed re-attached reads the new ring, and the peer's track, still subscribed, gets it."""

    async def main() -> None:
        name = segment_name(uuid.uuid4().hex[:10], "video")
        old = PacketRing.create(name, capacity_bytes=1 << 20)
        feed = RingFeed(PacketRing.attach(name), "video")
        track = PushedTrack()
        feed.attach(cast(Any, track))
        feed.start()
        new: PacketRing | None = None
        try:
            old.append(b"before", pts=0, capture_us=0, monotonic_us=0, keyframe=True)
            await until(lambda: track.pushed == [b"before"], "the old ring's packet")
            old.unlink()  # the encoder died: its restart creates the ring anew
            old.close()
            new = PacketRing.create(name, capacity_bytes=1 << 20)
            new.append(b"idr", pts=3000, capture_us=0, monotonic_us=0, keyframe=True)
            feed.reattach()  # from the new ring's latest keyframe on
            new.append(b"after", pts=6000, capture_us=0, monotonic_us=0, keyframe=False)
            await until(lambda: track.pushed[1:] == [b"idr", b"after"], "the new ring's packets")
        finally:
            await feed.close()
            if new is not None:
                new.unlink()
                new.close()

    asyncio.run(main())


def test_whep_answers_201_with_a_good_token_and_refuses_every_bad_one_with_its_status() -> None:
    async def main() -> None:
        async with producing() as (_producer, ring):
            feed = RingFeed(PacketRing.attach(ring.name), "video")
            feed.start()
            endpoint = WhepEndpoint("s1", token_access(), video=[feed], max_peers=1)
            issuer = TokenIssuer(TokenKey.hs256(SECRET))
            now = time.time()
            good, grant = issuer.issue(stream="s1", now=now, viewer="alice")
            blind, _ = issuer.issue(
                stream="s1", now=now, permissions=ViewerPermissions(can_view=False)
            )
            expired, _ = issuer.issue(stream="s1", now=now - 7200, ttl_s=60)
            other, _ = issuer.issue(stream="elsewhere", now=now)
            forged, _ = TokenIssuer(TokenKey.hs256(b"x" * 32)).issue(stream="s1", now=now)
            receiver, late = Receiver(), Receiver()
            try:
                async with serving(endpoint) as base:
                    offer = await receiver.offer()
                    refused = {
                        "none": await post_offer(base, "s1", offer),
                        "garbage": await post_offer(base, "s1", offer, "not a token"),
                        "forged": await post_offer(base, "s1", offer, forged),
                        "expired": await post_offer(base, "s1", offer, expired),
                        "other": await post_offer(base, "s1", offer, other),
                        "blind": await post_offer(base, "s1", offer, blind),
                        "unknown": await post_offer(base, "nope", offer, good),
                        "json": await post_offer(base, "s1", offer, good, "application/json"),
                    }
                    statuses = {name: status for name, (status, _, _) in refused.items()}
                    assert statuses == {
                        "none": 401,
                        "garbage": 401,
                        "forged": 401,
                        "expired": 401,
                        "other": 401,
                        "blind": 403,
                        "unknown": 404,
                        "json": 415,
                    }
                    assert "no token" in refused["none"][1]
                    assert "expired" in refused["expired"][1]
                    assert not any(location for _, _, location in refused.values())
                    assert endpoint.peers == {} and feed.tracks == 0  # refused: no peer, no media
                    assert endpoint.refusals["forged"] == 1 and endpoint.refusals["missing"] == 1

                    status, answer, location = await post_offer(base, "s1", offer, good)
                    assert status == 201 and location is not None
                    await receiver.answer(answer)
                    await until(lambda: len(receiver.frames) >= 5, "frames for the good token")
                    [peer] = endpoint.peer_stats()
                    assert peer.viewer_id == "alice" and peer.frames_sent >= 5
                    # One peer allowed: the next is told the stream is full.
                    full = await post_offer(base, "s1", await late.offer(), good)
                    assert full[0] == 503 and "full" in full[1]

                    async with aiohttp.ClientSession() as session:
                        async with session.delete(base + location) as response:
                            assert response.status == 200
                        assert endpoint.peers == {}
                        async with session.delete(base + location) as response:
                            assert response.status == 404
                    assert endpoint.departed_frames >= 5

                    # Revoked: the live peer is cut and the token is refused from then on.
                    again = Receiver()
                    try:
                        status, _, _ = await post_offer(base, "s1", await again.offer(), good)
                        assert status == 201 and len(endpoint.peers) == 1
                        assert await endpoint.revoke(token_id=grant.token_id) == 1
                        assert endpoint.peers == {}
                        status, text, _ = await post_offer(base, "s1", offer, good)
                        assert status == 401 and "revoked" in text
                    finally:
                        await again.close()
            finally:
                await receiver.close()
                await late.close()
                await feed.close()

    asyncio.run(main())


def test_a_tokens_max_quality_picks_the_best_rung_it_allows() -> None:
    top = RungInfo(
        index=0, width=WIDTH, height=HEIGHT, framerate=30, bitrate=300_000, preset="medium"
    )
    low = RungInfo(index=1, width=192, height=108, framerate=30, bitrate=100_000, preset="low")
    access = AccessSettings(
        access=StreamAccess(mode=AccessMode.TOKEN), secret=SECRET, rungs=(top, low)
    )
    issuer = TokenIssuer(TokenKey.hs256(SECRET))

    async def main() -> None:
        async with producing() as (_, ring0), producing(192, 108) as (_, ring1):
            feeds = [RingFeed(PacketRing.attach(r.name), "video") for r in (ring0, ring1)]
            for feed in feeds:
                feed.start()
            endpoint = WhepEndpoint("s1", access, video=feeds)
            # Only rung 0 served: a "low" token has nothing it may watch.
            top_only = WhepEndpoint("s1", access, video=feeds[:1])
            receivers = {"ultra": Receiver(), "low": Receiver()}
            refused = Receiver()
            try:
                async with serving(endpoint) as base, serving(top_only) as top_base:
                    for cap, receiver in receivers.items():
                        token, _ = issuer.issue(
                            stream="s1",
                            now=time.time(),
                            permissions=ViewerPermissions(max_quality=QualityPreset(cap)),
                        )
                        status, answer, _ = await post_offer(
                            base, "s1", await receiver.offer(), token
                        )
                        assert status == 201, answer
                        await receiver.answer(answer)
                    status, text, _ = await post_offer(top_base, "s1", await refused.offer(), token)
                    assert status == 403 and "max_quality" in text
                    await until(
                        lambda: all(len(r.frames) >= 5 for r in receivers.values()),
                        "frames at both caps",
                    )
                    assert sorted(p.rung for p in endpoint.peer_stats()) == [0, 1]
            finally:
                for receiver in [*receivers.values(), refused]:
                    await receiver.close()
                for feed in feeds:
                    await feed.close()
            assert {(f.width, f.height) for f in receivers["ultra"].frames} == {(WIDTH, HEIGHT)}
            assert {(f.width, f.height) for f in receivers["low"].frames} == {(192, 108)}

    asyncio.run(main())


# -- browser feedback into the rung choice (shared.webrtc.feedback) ------------------------

RATES = [1_500_000, 600_000, 250_000]


def test_a_browsers_remb_and_loss_pick_its_rung_and_the_switch_waits_for_the_new_rungs_idr() -> (
    None
):
    choice = BrowserRungChoice(RATES, now=0.0, cap=0)
    assert choice.rung == 0  # the best rung its token allows: nothing here can probe up
    # Before the first REMB nothing is timed, and a receiver report alone moves nothing.
    assert choice.next_deadline() is None and choice.on_timer(100.0) is None
    assert choice.on_receiver_report(0, 0.02, now=1.0) is None
    assert choice.on_remb(2_000_000, now=1.5) is None
    assert choice.next_deadline() == 1.5 + WEBRTC_SELECTOR.feedback_timeout_s
    # The browser's estimate falls under the top rung: down to the best rung that holds.
    switch = choice.on_remb(700_000, now=2.0)
    assert switch is not None and (switch.from_rung, switch.to_rung) == (0, 1)
    assert (choice.rung, choice.wanted) == (0, 1)
    assert choice.keyframe_request(2.0) == 1  # ask rung 1's encoder for an IDR at once,
    assert choice.keyframe_request(2.2) is None  # not again before keyframe_retry_s,
    assert choice.keyframe_request(2.0 + WEBRTC_SELECTOR.keyframe_retry_s) == 1  # then again
    # Until that IDR the viewer keeps its rung: rung 1's other frames are not for it.
    assert choice.takes(0, False, 2.6) and choice.takes(0, True, 2.7)
    assert not choice.takes(1, False, 2.8) and not choice.takes(2, True, 2.8)
    assert choice.takes(1, True, 2.9)  # the IDR: the switch is made here
    assert (choice.rung, choice.wanted) == (1, 1)
    assert not choice.takes(0, True, 3.0) and choice.takes(1, False, 3.0)
    # Loss in a receiver report (8-bit fraction) with the same estimate: it stays.
    assert choice.on_receiver_report(64, 0.03, now=3.5) is None
    assert choice.loss == 0.25 and choice.rtt_s == 0.03 and choice.rung == 1
    # Silence (no REMB, no report) for the feedback timeout: one rung down.
    silent = 3.5 + WEBRTC_SELECTOR.feedback_timeout_s
    assert choice.next_deadline() == silent
    switch = choice.on_timer(silent)
    assert switch is not None and switch.to_rung == 2
    # A quality request pins a rung (the data channel's, with can_control_quality).
    choice = BrowserRungChoice(RATES, now=0.0, cap=1)
    switch = choice.set_pin(2, now=1.0)
    assert switch is not None and switch.to_rung == 2 and choice.keyframe_request(1.0) == 2
    with pytest.raises(ConfigError):
        choice.on_receiver_report(256, None, now=2.0)


def test_a_remb_under_the_top_rung_moves_an_aiortc_peer_to_the_lower_rung_at_its_idr() -> None:
    """The shell: aiortc's RTCP for the video sender reaches the peer's choice, and the peer's
    track, fed by both rungs' rings, switches at the lower rung's keyframe."""
    top = RungInfo(index=0, width=WIDTH, height=HEIGHT, framerate=30, bitrate=300_000, preset="")
    low = RungInfo(index=1, width=192, height=108, framerate=30, bitrate=100_000, preset="")
    access = AccessSettings(access=StreamAccess(), rungs=(top, low))

    async def main() -> None:
        async with producing() as (_, ring0), producing(192, 108) as (_, ring1):
            feeds = [RingFeed(PacketRing.attach(r.name), "video") for r in (ring0, ring1)]
            for feed in feeds:
                feed.start()
            endpoint = WhepEndpoint("s1", access, video=feeds)
            receiver = Receiver()
            try:
                async with serving(endpoint) as base:
                    status, answer, _ = await post_offer(base, "s1", await receiver.offer())
                    assert status == 201, answer
                    await receiver.answer(answer)
                    await until(lambda: len(receiver.frames) >= 5, "frames of the top rung")
                    [peer] = endpoint.peers.values()
                    sender = peer.video_sender
                    assert sender is not None and peer.rung == 0
                    remb = aiortc_rtp.RtcpPsfbPacket(
                        fmt=aiortc_rtp.RTCP_PSFB_APP,
                        ssrc=1,
                        media_ssrc=0,
                        fci=aiortc_rtp.pack_remb_fci(20_000, [sender._ssrc]),
                    )
                    await sender._handle_rtcp_packet(remb)
                    [stats] = endpoint.peer_stats()
                    assert stats.remb_bps == 20_000 and stats.rtcp.get("remb", 0) >= 1
                    # At once, or (a fall just after an IDR is doubted) idr_grace_s later.
                    await until(lambda: endpoint.peer_stats()[0].rung_wanted == 1, "a switch down")
                    await until(
                        lambda: (
                            (receiver.frames[-1].width, receiver.frames[-1].height) == (192, 108)
                        ),
                        "frames of the lower rung",
                    )
                    switched = len(receiver.frames) - 1
                    await until(lambda: len(receiver.frames) >= switched + 10, "more frames")
                    assert peer.rung == 1
            finally:
                await receiver.close()
                for feed in feeds:
                    await feed.close()
            sizes = [(f.width, f.height) for f in receiver.frames]
            first_low = sizes.index((192, 108))
            # One switch, at the IDR: the top rung's frames before it, the lower rung's after.
            assert set(sizes[:first_low]) == {(WIDTH, HEIGHT)}
            assert set(sizes[first_low:]) == {(192, 108)}

    asyncio.run(main())


def test_a_quality_request_on_the_data_channel_moves_a_peer_only_with_can_control_quality() -> None:
    top = RungInfo(index=0, width=WIDTH, height=HEIGHT, framerate=30, bitrate=300_000, preset="")
    low = RungInfo(index=1, width=192, height=108, framerate=30, bitrate=100_000, preset="")
    access = AccessSettings(
        access=StreamAccess(mode=AccessMode.TOKEN), secret=SECRET, rungs=(top, low)
    )
    issuer = TokenIssuer(TokenKey.hs256(SECRET))

    async def main() -> None:
        async with producing() as (_, ring0), producing(192, 108) as (_, ring1):
            feeds = [RingFeed(PacketRing.attach(r.name), "video") for r in (ring0, ring1)]
            for feed in feeds:
                feed.start()
            endpoint = WhepEndpoint("s1", access, video=feeds)
            receivers = {"may": Receiver(), "may not": Receiver()}
            replies: dict[str, list[dict[str, Any]]] = {name: [] for name in receivers}
            channels = {}
            for name, receiver in receivers.items():
                channel = receiver.pc.createDataChannel(control.CHANNEL_LABEL)
                channel.on("message", lambda m, n=name: replies[n].append(json.loads(m)))
                channels[name] = channel
            try:
                async with serving(endpoint) as base:
                    for name, receiver in receivers.items():
                        permissions = ViewerPermissions(can_control_quality=name == "may")
                        token, _ = issuer.issue(
                            stream="s1", now=time.time(), permissions=permissions
                        )
                        status, answer, _ = await post_offer(
                            base, "s1", await receiver.offer(), token
                        )
                        assert status == 201, answer
                        await receiver.answer(answer)
                    await until(
                        lambda: (
                            all(len(r.frames) >= 5 for r in receivers.values())
                            and all(c.readyState == "open" for c in channels.values())
                        ),
                        "frames and open channels",
                    )
                    # Stats come on the channel, about once a second.
                    await until(
                        lambda: all(any(m["type"] == "stats" for m in r) for r in replies.values()),
                        "stats on each channel",
                    )
                    for channel in channels.values():
                        channel.send(json.dumps({"type": "quality", "rung": 1}))
                    await until(
                        lambda: all(
                            any(m["type"] == "quality" for m in r) for r in replies.values()
                        ),
                        "the replies",
                    )
                    [granted] = [m for m in replies["may"] if m["type"] == "quality"]
                    [refused] = [m for m in replies["may not"] if m["type"] == "quality"]
                    assert granted == {"type": "quality", "ok": True, "rung": 1, "reason": ""}
                    assert not refused["ok"] and "does not allow" in refused["reason"]
                    may = receivers["may"]
                    await until(
                        lambda: (may.frames[-1].width, may.frames[-1].height) == (192, 108),
                        "the lower rung's pictures",
                    )
                    # A notice reaches every open channel.
                    assert endpoint.notify("hello", {"n": 1}) == 2
                    await until(
                        lambda: all(
                            {"type": "notice", "text": "hello", "data": {"n": 1}} in r
                            for r in replies.values()
                        ),
                        "the notices",
                    )
                    pins = sorted((str(s.pinned), s.rung) for s in endpoint.peer_stats())
                    assert pins == [("1", 1), ("None", 0)]
            finally:
                for receiver in receivers.values():
                    await receiver.close()
                for feed in feeds:
                    await feed.close()
            # The refused viewer stayed on the top rung throughout.
            assert {(f.width, f.height) for f in receivers["may not"].frames} == {(WIDTH, HEIGHT)}

    asyncio.run(main())


def test_the_control_channels_messages_parse_and_quality_needs_can_control_quality() -> None:
    assert control.parse_client('{"type": "quality", "rung": 2}') == control.QualityRequest(rung=2)
    report = control.parse_client(b'{"type": "report", "latency_ms": 31.5, "width": 320}')
    assert report == control.ViewerReport(latency_ms=31.5, width=320)
    for bad, why in [
        ("not json", "JSON"),
        ('{"type": "shutdown"}', "not a control message"),
        ('{"type": "quality", "rung": "top"}', "not a control message"),
        ("[" * 5000, "over"),
    ]:
        with pytest.raises(ProtocolError, match=why):
            control.parse_client(bad)
    allowed = ViewerPermissions(can_control_quality=True)
    ask = control.QualityRequest
    assert control.decide_quality(ask(rung=1), allowed, rungs=3, cap=0).ok
    assert control.decide_quality(ask(rung=None), allowed, rungs=3, cap=0).ok
    refusals = [
        (ask(rung=1), ViewerPermissions(), "does not allow"),
        (ask(rung=3), allowed, "rungs 0 to 2"),
        (ask(rung=0), allowed, "allows rung 1 at best"),
    ]
    for request, permissions, why in refusals:
        reply = control.decide_quality(request, permissions, rungs=3, cap=1 if "best" in why else 0)
        assert not reply.ok and why in reply.reason
    notice = json.loads(control.encode(control.Notice(text="hi", data={"n": 1})))
    assert notice == {"type": "notice", "text": "hi", "data": {"n": 1}}


def test_whep_refuses_an_offer_without_h264_packetization_mode_1() -> None:
    async def main() -> None:
        async with producing() as (_producer, ring):
            feed = RingFeed(PacketRing.attach(ring.name), "video")
            feed.start()
            endpoint = WhepEndpoint("s1", open_access(), video=[feed])
            receiver = Receiver()
            try:
                async with serving(endpoint) as base:
                    offer = await receiver.offer()
                    # Only VP8 offered: nothing the ring's H.264 can be sent as.
                    vp8_only = "\r\n".join(
                        line
                        for line in offer.split("\r\n")
                        if "H264" not in line and not line.startswith("a=fmtp")
                    )
                    status, text, _ = await post_offer(base, "s1", vp8_only)
                    assert status == 400 and "H.264" in text
                    status, text, _ = await post_offer(base, "s1", "v=0\r\nnonsense")
                    assert status == 400
                    assert endpoint.peers == {}
            finally:
                await receiver.close()
                await feed.close()

    asyncio.run(main())


#: Stamped frames the latency bound is measured over (about 3 s at 30 frames a second).
LATENCY_FRAMES = 90
#: Where the browser tests also copy their screenshots, when set (a CI job's artifacts folder;
#: they are always in the test's tmp_path).
ARTIFACTS = os.environ.get("KIZUNA_TEST_ARTIFACTS")


async def until_async(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def shard_latency(shard: WebRTCHandle) -> bool:
    peers = (await shard.stats()).peers
    return bool(peers) and all(p.latency_ms is not None and p.latency_ms > 0 for p in peers)


# -- on Ray: the supervisor's WebRTC shard -------------------------------------------------

QVGA = StreamQuality(resolution=Resolution(320, 240), framerate=30, bitrate=300_000)


async def refused_offer() -> str:
    """A browser-like offer from a peer that is closed at once (its answer is not used)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        return str(pc.localDescription.sdp)
    finally:
        await pc.close()


def encoders(sid: str) -> list[str]:
    return [name for name in stream_actors(sid) if name.startswith(f"kz-{sid}-encoder")]


@pytest.mark.ray
def test_whep_on_a_real_token_stream_plays_refuses_and_shares_one_encoder(
    ray_cluster: str,
) -> None:
    async def main() -> str:
        async with StreamManager.start(token_secret=SECRET) as manager:
            config = StreamConfig(
                quality=QVGA,
                access=StreamAccess(mode=AccessMode.TOKEN),
                viewers=ViewerLimits(max_viewers=3, max_viewers_per_shard=5),
            )
            sid = (await manager.start_camera_stream(config)).session_id
            url = await manager.open_whep(sid)
            assert url.endswith(f"/whep/{sid}") and await manager.open_whep(sid) == url
            base = url.removesuffix(f"/whep/{sid}")
            shard = WebRTCHandle(ray.get_actor(f"kz-{sid}-webrtc", namespace=NAMESPACE))
            before = encoders(sid)
            assert len(before) == 1
            tickets = [await manager.add_viewer(sid, f"browser-{n}") for n in range(3)]
            forged, _ = TokenIssuer(TokenKey.hs256(b"x" * 32)).issue(stream=sid, now=time.time())
            receivers = [Receiver() for _ in range(3)]
            try:
                offer = await receivers[0].offer()
                assert (await post_offer(base, sid, offer))[0] == 401  # no token
                assert (await post_offer(base, sid, offer, forged))[0] == 401
                status, text, _ = await post_offer(base, "no-such-stream", offer, tickets[0].token)
                assert status == 404, text
                refused = await shard.stats()
                assert refused.refusals == {"missing": 1, "forged": 1, "unknown_stream": 1}
                assert refused.peers == []
                locations = []
                for receiver, ticket in zip(receivers, tickets, strict=True):
                    status, answer, location = await post_offer(
                        base, sid, await receiver.offer(), ticket.token
                    )
                    assert status == 201, answer
                    assert location is not None
                    locations.append(location)
                    await receiver.answer(answer)
                await until(
                    lambda: all(len(r.frames) >= 10 for r in receivers),
                    "10 decoded frames at each of three WHEP clients",
                    timeout=30,
                )
                for receiver in receivers:
                    assert {(f.width, f.height) for f in receiver.frames} == {(320, 240)}
                stats = await shard.stats()
                assert sorted(p.viewer_id or "" for p in stats.peers) == sorted(
                    t.viewer_id for t in tickets
                )
                # Three browsers, still the one encoder; and no frame encoded for them here.
                assert encoders(sid) == before
                # They are the stream's viewers: their tickets' seats moved to the WebRTC shard.
                statuses = {v.viewer_id: v for v in await manager.get_viewer_status(sid)}
                assert set(statuses) == {t.viewer_id for t in tickets}
                for viewer in statuses.values():
                    assert (viewer.shard, viewer.state) == ("webrtc", "connected")
                    assert viewer.bytes_sent > 0 and viewer.url == url
                    assert viewer.current_quality.resolution == Resolution(320, 240)
                    assert viewer.connection_quality != ConnectionQuality.DISCONNECTED
                # The stream's limit (3) counts them: a fourth viewer is refused, with why.
                extra = await manager.issue_token(sid)
                status, text, _ = await post_offer(base, sid, await refused_offer(), extra)
                assert status == 503 and "full (3 viewers)" in text, text
                with pytest.raises(ResourceError, match="full"):
                    await manager.add_viewer(sid, "quic-viewer")
                async with (
                    aiohttp.ClientSession() as session,
                    session.delete(base + locations[0]) as response,
                ):
                    assert response.status == 200
                session_id = locations[0].rsplit("/", 1)[1]
                after = await shard.stats()
                assert session_id not in {p.session for p in after.peers}
                # Gone from the stream's viewers, and its seat is free again.
                statuses = {v.viewer_id: v for v in await manager.get_viewer_status(sid)}
                assert set(statuses) == {tickets[1].viewer_id, tickets[2].viewer_id}
                status, answer, location = await post_offer(base, sid, await refused_offer(), extra)
                assert status == 201, answer
                assert location is not None
                async with (
                    aiohttp.ClientSession() as session,
                    session.delete(base + location) as response,
                ):
                    assert response.status == 200
                assert after.frames_sent >= 30 and after.bytes_sent > 0
                # The operator's revocation and removal reach the WebRTC shard too.
                assert await manager.revoke_viewer(sid, viewer_id=tickets[1].viewer_id) == 1
                await manager.remove_viewer(sid, tickets[2].viewer_id)
                assert (await shard.stats()).peers == []
                assert await manager.get_viewer_status(sid) == []
            finally:
                for receiver in receivers:
                    await receiver.close()
            await manager.stop_stream(sid)
            return sid

    wait_for_no_leaks(asyncio.run(main()))


#: Null until the player page has loaded (the first page shown is about:blank).
PLAYER_STATE = """window.whep === undefined ? null : JSON.stringify({
  time: document.getElementById("video").currentTime,
  width: document.getElementById("video").videoWidth,
  height: document.getElementById("video").videoHeight,
  status: window.whep.status,
  rung: window.whep.stats === null ? null : window.whep.stats.rung,
  wanted: window.whep.stats === null ? null : window.whep.stats.rung_wanted,
  latencies: window.whep.latencies.length,
  notices: window.whep.notices.map((n) => n.text),
  quality: window.whep.quality,
  overlay: document.getElementById("overlay").textContent,
})"""


async def player_state(page: Page) -> dict[str, Any] | None:
    """The player's state, or None while the page is still loading."""
    text = await page.evaluate(PLAYER_STATE)
    state: dict[str, Any] | None = None if text is None else json.loads(text)
    return state


async def wait_for_state(
    page: Page, done: Callable[[dict[str, Any]], bool], what: str, timeout: float = 30.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = await player_state(page)
        if state is not None and done(state):
            return state
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last: {state}"
        await asyncio.sleep(0.1)


@pytest.mark.ray
def test_chromium_plays_the_player_page_and_a_bad_token_gets_401_and_no_media(
    ray_cluster: str, tmp_path: Path
) -> None:
    chromium_path()  # skip (or, under CI=true, fail) before starting a stream

    async def main() -> str:
        async with StreamManager.start(token_secret=SECRET) as manager:
            config = StreamConfig(quality=QVGA, access=StreamAccess(mode=AccessMode.TOKEN))
            sid = (await manager.start_camera_stream(config)).session_id
            url = await manager.open_whep(sid)
            shard = WebRTCHandle(ray.get_actor(f"kz-{sid}-webrtc", namespace=NAMESPACE))
            ticket = await manager.add_viewer(sid, "chromium")
            assert ticket.token is not None
            forged, _ = TokenIssuer(TokenKey.hs256(b"x" * 32)).issue(stream=sid, now=time.time())
            async with chromium(f"{url}/player?token={forged}", tmp_path / "bad") as page:
                refused = await wait_for_state(page, lambda s: s["status"] is not None, "a reply")
                assert refused["status"] == 401
                assert "signature" in await page.evaluate("window.whep.error")
                assert refused["width"] == 0  # no media
            stats = await shard.stats()
            assert stats.peers == [] and stats.refusals == {"forged": 1}
            async with chromium(f"{url}/player?token={ticket.token}", tmp_path / "good") as page:
                first = await wait_for_state(
                    page, lambda s: s["time"] > 0.5, "the video to start playing"
                )
                assert first["status"] == 201
                later = await wait_for_state(
                    page, lambda s: s["time"] >= first["time"] + 1.0, "playback to advance"
                )
                assert (later["width"], later["height"]) == (320, 240)
                # The latency, read off the decoded picture's stamp through a canvas: a
                # bound on a measured media latency over a few seconds of frames.
                state = await wait_for_state(
                    page,
                    lambda s: s["latencies"] >= LATENCY_FRAMES and s["rung"] is not None,
                    f"{LATENCY_FRAMES} stamps read and the channel's stats",
                )
                latencies = await page.evaluate("window.whep.latencies")
                p50, p95 = np.percentile(latencies, [50, 95])
                print(f"Chromium latency on loopback: p50 {p50:.0f} ms, p95 {p95:.0f} ms")
                assert 0 < p95 < 200, f"p95 {p95:.0f} ms over {len(latencies)} frames"
                assert state["rung"] == 0 and "rung 0" in state["overlay"]
                assert "latency" in state["overlay"]
                await page.screenshot(tmp_path / "player.png")
                [peer] = (await shard.stats()).peers
                assert peer.viewer_id == ticket.viewer_id and peer.state == "connected"
                assert peer.channel == "open"
                # The data channel: a notice of broadcast_to_viewers reaches the page; a
                # quality request without can_control_quality is refused, with why.
                assert await manager.broadcast_to_viewers(sid, "maintenance at noon") == 1
                await wait_for_state(
                    page, lambda s: s["notices"] == ["maintenance at noon"], "the notice"
                )
                await page.evaluate("window.requestRung(0)")
                state = await wait_for_state(page, lambda s: s["quality"] is not None, "a reply")
                assert state["quality"]["ok"] is False
                assert "does not allow" in state["quality"]["reason"]
                # The page reports its latency back: the viewer's stats, on the server.
                await until_async(
                    lambda: shard_latency(shard), "the page's latency report on the server"
                )
                [viewer] = await manager.get_viewer_status(sid)
                assert (viewer.viewer_id, viewer.shard, viewer.state) == (
                    ticket.viewer_id,
                    "webrtc",
                    "connected",
                )
            assert (tmp_path / "player.png").stat().st_size > 1000
            if ARTIFACTS:  # kept where a CI run collects it (tmp_path goes with the session)
                Path(ARTIFACTS).mkdir(parents=True, exist_ok=True)
                shutil.copy(tmp_path / "player.png", Path(ARTIFACTS) / "webrtc-player.png")
            await manager.stop_stream(sid)
            return sid

    wait_for_no_leaks(asyncio.run(main()))


@pytest.mark.ray
def test_three_chromium_browsers_at_once_share_the_one_encoder(
    ray_cluster: str, tmp_path: Path
) -> None:
    chromium_path()

    async def main() -> str:
        async with StreamManager.start(token_secret=SECRET) as manager:
            config = StreamConfig(quality=QVGA, access=StreamAccess(mode=AccessMode.TOKEN))
            sid = (await manager.start_camera_stream(config)).session_id
            url = await manager.open_whep(sid)
            shard = WebRTCHandle(ray.get_actor(f"kz-{sid}-webrtc", namespace=NAMESPACE))
            before = encoders(sid)
            assert len(before) == 1
            control_ok = ViewerPermissions(can_control_quality=True)
            tokens = [
                await manager.issue_token(sid, control_ok if n == 0 else None) for n in range(3)
            ]
            async with contextlib.AsyncExitStack() as stack:
                pages = [
                    await stack.enter_async_context(
                        chromium(f"{url}/player?token={token}", tmp_path / f"b{n}")
                    )
                    for n, token in enumerate(tokens)
                ]
                for page in pages:
                    await plays_at(page, (320, 240))
                # Three browsers playing at once, and still the one encoder.
                assert encoders(sid) == before
                stats = await shard.stats()
                assert len(stats.peers) == 3 and {p.state for p in stats.peers} == {"connected"}
                statuses = await manager.get_viewer_status(sid)
                assert len(statuses) == 3 and {v.state for v in statuses} == {"connected"}
                # The token with can_control_quality may choose (rung 0 is this stream's one).
                await pages[0].evaluate("window.requestRung(0)")
                state = await wait_for_state(pages[0], lambda s: s["quality"] is not None, "reply")
                assert state["quality"] == {"type": "quality", "ok": True, "rung": 0, "reason": ""}
            await manager.stop_stream(sid)
            return sid

    wait_for_no_leaks(asyncio.run(main()))


#: A ladder whose top rung a 1 Mbps path cannot carry (as ``tests/test_abr_netns.py``'s).
LADDER_TOP = StreamQuality(resolution=Resolution(1024, 576), framerate=15, bitrate=1_500_000)
CAP_BPS = 1_000_000
#: How long the browser's estimate may take to fall and the switch to be made, on this loaded
#: machine (libwebrtc's REMB falls within a few seconds of a standing queue).
MOVE_S = 30.0


@pytest.fixture
def link() -> Iterator[CappedLink]:
    why = missing_tools()
    if why is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)
    made = CappedLink()
    try:
        yield made
    finally:
        made.close()


@pytest.mark.ray
def test_chromium_behind_a_1_mbps_cap_settles_on_a_lower_rung(
    ray_cluster: str, link: CappedLink, tmp_path: Path
) -> None:
    chromium_path()

    async def main() -> str:
        async with StreamManager.start() as manager:
            config = StreamConfig(quality=LADDER_TOP, rungs=(QualityPreset.LOW,))
            sid = (await manager.start_camera_stream(config)).session_id
            # On the link's host side: the browser in the namespace reaches it over the pair.
            url = await manager.open_whep(sid, host=link.host)
            shard = WebRTCHandle(ray.get_actor(f"kz-{sid}-webrtc", namespace=NAMESPACE))
            assert (await shard.stats()).rungs == 2
            async with chromium(f"{url}/player?autoplay=1", tmp_path / "capped", link.command()):
                await until_async(lambda: peer_is(shard, rung=0, playing=True), "the top rung")
                link.cap(CAP_BPS)
                await until_async(
                    lambda: peer_is(shard, rung=1, playing=True),
                    "the capped browser settled on the lower rung",
                    timeout=MOVE_S,
                )
                [peer] = (await shard.stats()).peers
                print(f"Chromium's RTCP to aiortc: {peer.rtcp}; REMB {peer.remb_bps} bit/s")
                # What moved it: Chromium's REMB (aiortc negotiates no transport-cc).
                assert peer.rtcp.get("remb", 0) > 0 and peer.remb_bps is not None
                assert peer.remb_bps < CAP_BPS
                assert peer.rtcp.get("transport-cc", 0) == 0
            await manager.stop_stream(sid)
            return sid

    wait_for_no_leaks(asyncio.run(main()))


async def plays_at(page: Page, size: tuple[int, int]) -> None:
    """The page's video plays (its time advances by a second) at ``size``."""
    first: float = (await wait_for_state(page, lambda s: s["time"] > 0.5, "playing"))["time"]
    later = await wait_for_state(page, lambda s: s["time"] >= first + 1.0, "playback to advance")
    assert (later["width"], later["height"]) == size


async def peer_is(shard: WebRTCHandle, *, rung: int, playing: bool) -> bool:
    peers = (await shard.stats()).peers
    return (
        len(peers) == 1
        and peers[0].rung == peers[0].rung_wanted == rung
        and (not playing or peers[0].frames_sent > 0)
    )
