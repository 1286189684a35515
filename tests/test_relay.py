"""The inter-node relay: its codec and cores with literal times, then its shells on loopback
TCP between real packet rings (a remote node's rings under other names, as on a test cluster
whose nodes share this machine's /dev/shm)."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from shared.errors import ConfigError, NetworkError, ProtocolError
from shared.pool.packet_ring import PacketRing, PacketRingReader, RingPacket
from shared.pool.shm import list_segments, unlink_segment
from shared.relay.downlink import RelayDownlink
from shared.relay.link import RelayReceiver, RelayServer
from shared.relay.uplink import RelayUplink
from shared.relay.wire import (
    VERSION,
    Goodbye,
    MessageDecoder,
    Packets,
    RelayMessage,
    Subscribe,
    Tracks,
    TrackShape,
    encode_message,
)
from tests.conftest import doorbells

T = TypeVar("T")
_COUNTER = itertools.count()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A segment-name prefix of this test alone; no segment or doorbell may outlive it."""
    value = f"kzrelay{os.getpid()}_{next(_COUNTER)}_"
    yield value
    leftovers = list_segments(value)
    for name in leftovers:
        unlink_segment(name)
    assert leftovers == [], f"test leaked shared memory segments {leftovers}"
    assert doorbells(value) == []


def packet(sequence: int, *, keyframe: bool = False, size: int = 100) -> RingPacket:
    return RingPacket(
        sequence=sequence,
        pts=sequence * 3000,
        capture_us=sequence * 33_333,
        monotonic_us=sequence * 33_333,
        keyframe=keyframe,
        duration=3000,
        data=bytes([sequence % 256]) * size,
    )


# -- the codec ----------------------------------------------------------------------------


def test_every_message_survives_the_codec_fed_a_byte_at_a_time() -> None:
    messages: list[RelayMessage] = [
        Subscribe(version=VERSION, stream="s", tracks=["video", "audio"], node="n1"),
        Tracks(tracks=[TrackShape(name="video", capacity_bytes=1 << 20, index_slots=1024)]),
        Packets(track=0, packets=[packet(1, keyframe=True), packet(2)]),
        Goodbye(reason="stream s ended"),
    ]
    wire = b"".join(encode_message(m) for m in messages)
    decoder = MessageDecoder()
    out = [m for byte in wire for m in decoder.feed(bytes([byte]))]
    assert out == messages
    assert decoder.buffered == 0


def test_a_length_over_the_limit_or_bytes_that_are_no_message_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="over the 1000-byte limit"):
        MessageDecoder(max_message_bytes=1000).feed((5000).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="not a relay message"):
        MessageDecoder().feed((3).to_bytes(4, "big") + b"\xc1\xc1\xc1")


# -- the uplink: forward, or drop to the next keyframe ---------------------------------------


def test_a_new_subscriber_starts_at_a_keyframe() -> None:
    uplink = RelayUplink(1)
    assert not uplink.admit(0, packet(1), 0.0, 0)
    assert uplink.admit(0, packet(2, keyframe=True), 0.0, 0)
    assert uplink.admit(0, packet(3), 0.0, 0)
    assert uplink.stats.packets_dropped == 1


def test_a_backed_up_link_drops_every_track_to_its_next_keyframe() -> None:
    uplink = RelayUplink(2, max_delay_s=0.5)
    video, audio = 0, 1
    assert uplink.admit(video, packet(1, keyframe=True), 0.0, 0)
    uplink.sent(1, 100, 120, now=0.0)
    assert uplink.admit(audio, packet(1, keyframe=True), 0.0, 120)
    uplink.sent(1, 100, 120, now=0.0)
    # At 0.4 s all 240 bytes are still unsent: 0.4 s of queueing, under the bound.
    assert uplink.queueing_delay(0.4, 240) == pytest.approx(0.4)
    assert uplink.admit(video, packet(2), 0.4, 240)
    uplink.sent(1, 100, 120, now=0.4)
    # At 0.6 s the first message is still unsent: over the bound, both tracks drop.
    assert not uplink.admit(video, packet(3), 0.6, 360)
    assert uplink.stats.congestion_events == 1
    # The socket drained; video waits for its keyframe, audio (all keyframes) resumes at once.
    assert uplink.queueing_delay(0.7, 0) == 0.0
    assert not uplink.admit(video, packet(4), 0.7, 0)
    assert uplink.admit(audio, packet(2, keyframe=True), 0.7, 0)
    assert uplink.admit(video, packet(5, keyframe=True), 0.7, 0)
    assert uplink.stats.packets_dropped == 2
    assert uplink.stats.congestion_events == 1


def test_the_delay_counts_from_the_oldest_unsent_message() -> None:
    uplink = RelayUplink(1, max_delay_s=1.0)
    for t, backlog in ((0.0, 0), (0.2, 100), (0.4, 200)):  # nothing sent yet
        assert uplink.admit(0, packet(1, keyframe=True), t, backlog)
        uplink.sent(1, 100, 100, now=t)
    # 150 bytes unsent: the first message is gone, the second half sent; it waited since 0.2.
    assert uplink.queueing_delay(0.5, 150) == pytest.approx(0.3)
    assert uplink.queueing_delay(0.5, 100) == pytest.approx(0.1)


def test_the_backlog_bound_holds_memory_even_when_the_delay_is_small() -> None:
    uplink = RelayUplink(1, max_backlog_bytes=1000)
    assert uplink.admit(0, packet(1, keyframe=True), 0.0, 0)
    uplink.sent(1, 2000, 2000, now=0.0)
    assert not uplink.admit(0, packet(2), 0.0, 2000)
    assert uplink.stats.congestion_events == 1


def test_uplink_settings_are_checked() -> None:
    with pytest.raises(ConfigError):
        RelayUplink(0)
    with pytest.raises(ConfigError):
        RelayUplink(1, max_delay_s=0)


# -- the downlink: gaps and keyframes ---------------------------------------------------------


def test_after_a_gap_the_local_ring_gets_nothing_until_a_keyframe() -> None:
    downlink = RelayDownlink(1)
    accepted = [
        downlink.accept(0, p)
        for p in (
            packet(5),  # the first packet is not a keyframe: nothing to decode yet
            packet(6, keyframe=True),
            packet(7),
            packet(10),  # 8 and 9 were dropped at the origin
            packet(11),
            packet(12, keyframe=True),
            packet(13),
        )
    ]
    assert accepted == [False, True, True, False, False, True, True]
    stats = downlink.stats
    assert (stats.packets_lost, stats.gaps, stats.packets_skipped) == (2, 1, 3)
    assert stats.packets_appended == 4


def test_tracks_resync_independently() -> None:
    downlink = RelayDownlink(2)
    assert downlink.accept(0, packet(1, keyframe=True))
    assert downlink.accept(1, packet(1, keyframe=True))
    assert not downlink.accept(0, packet(3))  # video lost 2
    assert downlink.accept(1, packet(2, keyframe=True))


# -- the shells, over loopback TCP ------------------------------------------------------------


async def until(read: Callable[[], T], done: Callable[[T], bool], what: str) -> T:
    deadline = time.monotonic() + 10.0
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last: {value!r}")
        await asyncio.sleep(0.01)


def append(ring: PacketRing, p: RingPacket) -> None:
    ring.append(
        p.data,
        pts=p.pts,
        capture_us=p.capture_us,
        monotonic_us=p.monotonic_us,
        keyframe=p.keyframe,
        duration=p.duration,
    )


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(main())


def test_a_remote_ring_receives_the_origins_packets_from_its_newest_keyframe(prefix: str) -> None:
    async def main() -> None:
        with (
            PacketRing.create(prefix + "video", capacity_bytes=1 << 20, index_slots=256) as video,
            PacketRing.create(prefix + "audio", capacity_bytes=1 << 16, index_slots=64) as audio,
        ):
            append(video, packet(1, keyframe=True))
            append(video, packet(2))  # before the subscriber: history
            append(video, packet(3, keyframe=True))
            server = RelayServer("s1", {"video": video.name, "audio": audio.name}, host="127.0.0.1")
            await server.start()
            receiver = RelayReceiver(
                ("127.0.0.1", server.port),
                "s1",
                {"video": prefix + "video-n2", "audio": prefix + "audio-n2"},
                node="n2",
            )
            try:
                await receiver.start()
                local = PacketRing.attach(prefix + "video-n2")
                local_audio = PacketRing.attach(prefix + "audio-n2")
                try:
                    assert (local.capacity, local.index_slots) == (1 << 20, 256)
                    reader = PacketRingReader(local)
                    for p in (packet(4), packet(5, keyframe=True, size=5000), packet(6)):
                        append(video, p)
                    append(audio, packet(1, keyframe=True, size=50))
                    await until(local.last_sequence, lambda n: n == 4, "four video packets")
                    await until(local_audio.last_sequence, lambda n: n == 1, "the audio packet")
                    got = reader.read_available().packets
                    # From the newest keyframe at subscription (3), then everything after.
                    assert [(p.pts, p.keyframe, len(p.data)) for p in got] == [
                        (9000, True, 100),
                        (12000, False, 100),
                        (15000, True, 5000),
                        (18000, False, 100),
                    ]
                    assert got[2].data == packet(5, keyframe=True, size=5000).data
                    assert got[2].capture_us == packet(5).capture_us
                    stats = receiver.stats()
                    assert stats.downlink.packets_appended == 5
                    assert stats.rings == {
                        "video": prefix + "video-n2",
                        "audio": prefix + "audio-n2",
                    }
                    assert server.stats().nodes["n2"].packets_forwarded == 5
                finally:
                    local.close()
                    local_audio.close()
            finally:
                await receiver.close()
                await server.close()
            assert list_segments(prefix + "video-") == []

    run(main)


def test_the_end_of_the_stream_reaches_the_receiver_with_its_reason(prefix: str) -> None:
    async def main() -> str | None:
        video = PacketRing.create(prefix + "video", capacity_bytes=1 << 16)
        server = RelayServer("s1", {"video": video.name}, host="127.0.0.1")
        await server.start()
        receiver = RelayReceiver(("127.0.0.1", server.port), "s1", {"video": prefix + "copy"})
        try:
            await receiver.start()
            video.unlink()
            video.close()  # the encoder stopped: its doorbell hangs up
            async with asyncio.timeout(10):
                return await receiver.wait_closed()
        finally:
            await receiver.close()
            await server.close()

    assert run(main) == "stream s1 ended"


@pytest.mark.parametrize(
    ("stream", "tracks", "reason"),
    [
        ("other", ["video"], "this relay serves stream s1"),
        ("s1", ["video", "depth"], "unknown tracks ['depth']"),
    ],
)
def test_a_bad_subscription_is_refused_with_the_reason(
    prefix: str, stream: str, tracks: list[str], reason: str
) -> None:
    async def main() -> None:
        with PacketRing.create(prefix + "video", capacity_bytes=1 << 16) as video:
            server = RelayServer("s1", {"video": video.name}, host="127.0.0.1")
            await server.start()
            receiver = RelayReceiver(
                ("127.0.0.1", server.port), stream, {t: prefix + "copy_" + t for t in tracks}
            )
            try:
                with pytest.raises(NetworkError, match=reason.replace("[", r"\[")):
                    await receiver.start()
                assert server.stats().connections_refused == 1
            finally:
                await receiver.close()
                await server.close()

    run(main)


def test_an_unreachable_origin_is_a_network_error(prefix: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connection refused

        async def main() -> None:
            receiver = RelayReceiver(("127.0.0.1", port), "s1", {"video": prefix + "copy"})
            with pytest.raises(NetworkError, match="cannot reach the relay origin"):
                await receiver.start()

        run(main)


def test_a_node_that_stops_reading_loses_whole_groups_and_never_blocks_the_origin(
    prefix: str,
) -> None:
    """A receiver that subscribes and then never reads: the origin's appends all complete,
    its uplink counts a congestion event and drops, and its buffered bytes stay bounded."""

    async def main() -> None:
        with PacketRing.create(prefix + "video", capacity_bytes=1 << 24) as video:
            server = RelayServer(
                "s1", {"video": video.name}, host="127.0.0.1", max_backlog_bytes=1 << 20
            )
            await server.start()
            stalled = socket.create_connection(("127.0.0.1", server.port))
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                subscribe = Subscribe(version=VERSION, stream="s1", tracks=["video"], node="slow")
                stalled.sendall(encode_message(subscribe))
                await until(lambda: server.stats().nodes, lambda n: "slow" in n, "the subscriber")
                for sequence in range(1, 2001):  # 2000 x 50 kB: 100 MB against a 1 MiB bound
                    append(video, packet(sequence, keyframe=sequence % 30 == 1, size=50_000))
                    await asyncio.sleep(0)  # the server's loop runs between appends
                stats = await until(
                    lambda: server.stats().nodes["slow"],
                    lambda s: s.packets_forwarded + s.packets_dropped == 2000,
                    "every packet forwarded or dropped",
                )
                assert stats.congestion_events >= 1 and stats.packets_dropped > 1000
                # What it did forward fits the bound plus the kernel's socket buffers.
                assert stats.bytes_forwarded < 2000 * 50_000 // 4
            finally:
                stalled.close()
                await server.close()

    run(main)
