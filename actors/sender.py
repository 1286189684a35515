"""SenderActor: one viewer's RTP-over-QUIC server, fed from the shared packet ring.

Each viewer gets its own actor (and so its own process and event loop): a viewer on a slow
network, or one whose QUIC connection is being torn down, never delays the others, and viewers
fan out in parallel across cores.  The actor reads access units from the packet ring the
encoder fills, packetizes them for RTP (RFC 6184) and sends them in QUIC DATAGRAM frames
(draft-ietf-avtcore-rtp-over-quic-14 §5.3).  A viewer's PLI becomes a keyframe request to the
encoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from typing import Any

import msgspec

from shared.errors import ProtocolError
from shared.packetring import PacketRing, PacketRingReader, RingPacket
from shared.roq import VIDEO_FLOW_ID, VIDEO_RTCP_FLOW_ID, encode_datagram
from shared.roq_transport import PeerStats, RoqServer
from shared.rtp import RtcpPli, parse_rtcp_compound
from shared.rtp_sender import H264RtpSender
from shared.stream_url import StreamUrl
from shared.tls import TlsIdentity, generate_self_signed

logger = logging.getLogger(__name__)


#: A batch spanning more capture time than this is a backlog (the actor stalled): live viewers
#: are better served from its newest keyframe than by a burst of stale frames.
STALE_BATCH_US = 250_000


def skip_to_fresh_keyframe(packets: list[RingPacket]) -> list[RingPacket]:
    if len(packets) < 2 or packets[-1].capture_us - packets[0].capture_us <= STALE_BATCH_US:
        return packets
    for index in range(len(packets) - 1, 0, -1):
        if packets[index].keyframe:
            return packets[index:]
    return packets


class SenderStats(msgspec.Struct, kw_only=True):
    pid: int
    viewer_id: str
    url: str
    peers: list[PeerStats]
    frames_sent: int
    frames_missed: int
    packets_sent: int
    bytes_sent: int
    keyframe_requests: int
    error: str | None = None


class SenderActor:
    def __init__(self, session_id: str, viewer_id: str, ring_name: str, encoder: Any) -> None:
        self._session_id = session_id
        self._viewer_id = viewer_id
        self._ring_name = ring_name
        self._encoder = encoder
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._frames_sent = 0
        self._frames_missed = 0
        self._keyframe_requests = 0
        self._url = ""
        self._error: str | None = None
        self._rtp = H264RtpSender(
            ssrc=random.getrandbits(32),
            initial_sequence=random.getrandbits(16),
            timestamp_offset=random.getrandbits(32),
        )

    async def open(self, host: str, port: int, identity: TlsIdentity | None = None) -> str:
        """Listen for the viewer; returns the URL it connects to."""
        identity = identity or generate_self_signed(host)
        self._server = RoqServer(identity, on_rtcp=self._on_rtcp)
        self._server.on_connect = self._on_connect
        await self._server.start(host, port)
        self._ring = PacketRing.attach(self._ring_name)
        self._reader = PacketRingReader(self._ring, start="latest_keyframe")
        # Nobody is connected yet: what is in the ring now is history, not something to send.
        self._reader.read_available()
        self._task = asyncio.create_task(self._run(), name="send")
        self._url = str(
            StreamUrl(
                host=host,
                port=self._server.port,
                session_id=self._session_id,
                fingerprint=identity.fingerprint,
            )
        )
        return self._url

    def packets_ready(self, sequence: int) -> None:
        self._wakeup.set()

    async def _run(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                self._send_available()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("sender %s failed", self._viewer_id)
            self._error = f"{type(exc).__name__}: {exc}"

    def _send_available(self) -> None:
        batch = self._reader.read_available()
        if batch.missed:
            # We fell behind the ring and resumed at a keyframe; the viewer sees a sequence
            # gap only if it was mid-GOP, and its PLI will follow.
            self._frames_missed += batch.missed
        packets = skip_to_fresh_keyframe(batch.packets)
        self._frames_missed += len(batch.packets) - len(packets)
        for packet in packets:
            rtp_packets = self._rtp.packetize(packet.data, pts=packet.pts)
            datagrams = [encode_datagram(VIDEO_FLOW_ID, rtp) for rtp in rtp_packets]
            self._server.send_frame(datagrams, keyframe=packet.keyframe)
            self._frames_sent += 1

    def _on_connect(self, peer: PeerStats) -> None:
        # Start the newcomer on a fresh IDR instead of making it wait for the next periodic one.
        self._request_keyframe()

    def _on_rtcp(self, peer: PeerStats, flow_id: int, data: bytes) -> None:
        if flow_id != VIDEO_RTCP_FLOW_ID:
            peer.datagrams_malformed += 1
            return
        try:
            packets = parse_rtcp_compound(data)
        except ProtocolError:
            peer.datagrams_malformed += 1
            return
        if any(isinstance(packet, RtcpPli) for packet in packets):
            self._request_keyframe()

    def _request_keyframe(self) -> None:
        self._keyframe_requests += 1
        self._encoder.request_keyframe.remote()

    async def stats(self) -> SenderStats:
        peers = self._server.peers
        return SenderStats(
            pid=os.getpid(),
            viewer_id=self._viewer_id,
            url=self._url,
            peers=peers,
            frames_sent=self._frames_sent,
            frames_missed=self._frames_missed,
            packets_sent=self._rtp.packets_sent,
            bytes_sent=sum(p.bytes_sent for p in peers),
            keyframe_requests=self._keyframe_requests,
            error=self._error,
        )

    async def stop(self) -> SenderStats:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        stats = await self.stats()
        await self._server.close()
        # Give aioquic a moment to put the CONNECTION_CLOSE on the wire.
        await asyncio.sleep(0.05)
        self._ring.close()
        return stats
