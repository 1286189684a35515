"""Memory that must stay bounded for the life of a connection, whoever reads the stats.

The send rate a :class:`PeerSender` keeps (for its retransmission budget) and the receive rate
a :class:`Viewer` keeps (for ``stream_stats``) are :class:`RateWindow` s, trimmed on every
insert: long connections where nobody asks for stats and no NACK arrives stay small.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from typing import cast

import pytest

from shared.errors import ConfigError
from shared.roq.transport import RoqClient
from shared.roq.url import StreamUrl
from shared.rtp.rate_window import RateWindow
from shared.rtp.sender import VIDEO_TRACK, PeerSender
from shared.viewer.client import Viewer
from shared.viewer.latency import LatencyStats


def test_rate_window_is_bounded_by_its_buckets_at_any_packet_rate() -> None:
    window = RateWindow(1.0, buckets=100)
    for index in range(100_000):  # 10 s at 10,000 packets a second, 1000 bytes each
        window.add(index / 10_000, 1000)
        assert len(window) <= 101
    # The last second held 10,000 packets: 80 Mbit/s, exact to within one 10 ms bucket.
    assert window.rate_bps(9.9999) == pytest.approx(80_000_000, rel=0.011)
    assert window.bytes(100.0) == 0 and len(window) == 0  # all of it aged out


def test_rate_window_counts_only_the_last_window() -> None:
    window = RateWindow(1.0)
    window.add(10.0, 500)
    window.add(10.5, 300)
    assert window.bytes(10.9) == 800
    assert window.bytes(11.2) == 300  # the first sample is over a second old
    assert window.rate_bps(11.2) == 2400
    with pytest.raises(ConfigError):
        RateWindow(0.0)


def test_a_long_connection_without_nacks_keeps_a_bounded_send_record() -> None:
    peer = PeerSender([VIDEO_TRACK], now=0.0, initial_bps=1_000_000, rng=random.Random(2))
    for index in range(20_000):  # 11 minutes at 30 fps; no NACK, no stats call
        payloads = [b"\x41" + bytes(999)] * 2
        peer.send_frame(0, payloads, pts=index * 3000, capture_us=0, keyframe=True, now=index / 30)
        assert len(peer.sent_window) <= 101
    # The last second held 30 frames of two packets: 1000 bytes, a 12-byte RTP header and the
    # 8-byte transport-wide sequence extension each.
    assert peer.sent_window.rate_bps(19_999.5 / 30) == 30 * 2 * 1020 * 8


class QueuedClient:
    """Stands in for the viewer's QUIC client: hands out queued ``(flow, packet, arrival)``,
    then reports the stream closed by the server."""

    mode = "datagram"
    malformed = 0
    rtt_ms = 0.0
    termination = (0, "stream stopped")
    probe_timeout_s = 0.0
    abandoned: str | None = None

    @property
    def last_received_at(self) -> float:
        return time.monotonic()  # in memory: never silent

    def abandon(self, reason: str) -> None:
        self.abandoned = reason

    def __init__(self, items: collections.deque[tuple[int, bytes, float]]) -> None:
        self._items = items

    @property
    def queued(self) -> int:
        return len(self._items)

    def receive_nowait(self) -> tuple[int, bytes, float] | None:
        return self._items.popleft() if self._items else None

    async def receive_timed(self) -> tuple[int, bytes, float] | None:
        return self.receive_nowait()

    def send(self, flow_id: int, packet: bytes) -> None:
        pass

    async def close(self) -> None:
        pass


def test_a_viewer_that_is_never_asked_for_stats_keeps_a_bounded_receive_record() -> None:
    # 100 s of packets, 200 a second, on a flow the viewer does not use: counted and dropped,
    # and each one goes into the receive rate, which nobody reads until the end.
    items = collections.deque((99, bytes(100), index / 200) for index in range(20_000))
    client = QueuedClient(items)
    url = StreamUrl(host="127.0.0.1", port=1, session_id="t")
    viewer = Viewer(url, cast(RoqClient, client), started=0.0, connect_options={}, reconnect=False)

    async def consume() -> None:
        async for _ in viewer.media():
            pass

    asyncio.run(consume())
    assert not items and viewer.report().unknown_flows == 20_000
    # Trimmed as packets came, though stream_stats() was never called: one second's buckets.
    assert 0 < len(viewer.received_window) <= 101


def test_latency_stats_keep_the_newest_samples_in_a_fixed_ring() -> None:
    stats = LatencyStats(max_samples=100)
    assert stats.percentile(50) is None
    for value in range(1000):  # only 900..999 are kept
        stats.add(float(value))
    assert len(stats) == 100
    assert stats.percentile(0) == 900.0 and stats.percentile(100) == 999.0
    assert stats.percentile(50) == pytest.approx(949.5)
