"""The viewer: connect over QUIC, reassemble H.264 from RTP, decode with PyAV, measure latency.

Runs without Ray: this is the client a person (or a test) uses to watch a stream.  Each decoded
picture carries the capture timestamp drawn by the test source (see ``shared.stamp``), so the
viewer reads capture-to-decode latency from the picture alone; pictures from other sources just
have no stamp.

When the assembler loses a frame it waits for the next keyframe and asks for one with an RTCP
PLI (RFC 4585 §6.3.1), at most once per :data:`PLI_INTERVAL_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import numpy as np

from shared.codec import H264Decoder
from shared.errors import ProtocolError
from shared.frame_assembler import FrameAssembler
from shared.h264_rtp import to_annexb
from shared.latency import LatencyStats
from shared.roq import VIDEO_FLOW_ID, VIDEO_RTCP_FLOW_ID
from shared.roq_transport import RoqClient
from shared.rtp import RtcpPli, RtpPacket
from shared.stamp import Stamp, read_stamp
from shared.stream_url import StreamUrl

__all__ = ["DecodedFrame", "Viewer", "ViewerReport"]

PLI_INTERVAL_S = 0.2
#: SSRC this viewer uses as the sender of its feedback packets.
VIEWER_SSRC = 0x5EED


class ViewerReport(msgspec.Struct, kw_only=True):
    url: str
    frames_decoded: int = 0
    frames_dropped: int = 0
    decode_errors: int = 0
    keyframe_requests: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    stamps_read: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    first_frame_s: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class DecodedFrame:
    frame: Any  # av.VideoFrame
    stamp: Stamp | None
    latency_ms: float | None


def read_frame_stamp(frame: Any) -> Stamp | None:
    """Read the test source's timestamp from a decoded yuv420p frame without copying it all."""
    plane = frame.planes[0]
    # A view of the decoder's plane (no copy); read_stamp only touches the strip rows.
    luma = np.frombuffer(plane, dtype=np.uint8).reshape(-1, plane.line_size)
    return read_stamp(luma[: frame.height, : frame.width])


class Viewer:
    def __init__(self, url: StreamUrl, client: RoqClient, *, started: float) -> None:
        self.url = url
        self._client = client
        self._assembler = FrameAssembler()
        self._decoder = H264Decoder()
        self._latency = LatencyStats()
        self._report = ViewerReport(url=str(url))
        self._last_pli = -1e9
        self._started = started
        self._media_ssrc = 0

    @classmethod
    async def connect(cls, url: str | StreamUrl, *, timeout: float = 10.0) -> Viewer:
        parsed = url if isinstance(url, StreamUrl) else StreamUrl.parse(url)
        started = time.monotonic()
        client = await RoqClient.connect(
            parsed.host, parsed.port, fingerprint=parsed.fingerprint, timeout=timeout
        )
        return cls(parsed, client, started=started)

    async def frames(self) -> AsyncIterator[DecodedFrame]:
        """Decoded pictures until the sender closes the connection."""
        while True:
            received = await self._client.receive()
            if received is None:
                return
            flow_id, data = received
            if flow_id != VIDEO_FLOW_ID:
                continue
            self._report.packets_received += 1
            self._report.bytes_received += len(data)
            try:
                packet = RtpPacket.parse(data)
            except ProtocolError:
                continue
            self._media_ssrc = packet.ssrc
            for assembled in self._assembler.push(packet):
                for frame in self._decoder.decode(to_annexb(assembled.nal_units)):
                    yield self._measure(frame)
            self._report.frames_dropped = self._assembler.frames_dropped
            if self._assembler.keyframe_needed:
                self._request_keyframe(time.monotonic())

    def _measure(self, frame: Any) -> DecodedFrame:
        now_us = time.time_ns() // 1000
        self._report.frames_decoded += 1
        if self._report.first_frame_s is None:
            self._report.first_frame_s = time.monotonic() - self._started
        stamp = read_frame_stamp(frame)
        latency_ms = None
        if stamp is not None:
            latency_ms = (now_us - stamp.capture_us) / 1000.0
            self._latency.add(latency_ms)
            self._report.stamps_read += 1
        return DecodedFrame(frame=frame, stamp=stamp, latency_ms=latency_ms)

    def _request_keyframe(self, now: float) -> None:
        if now - self._last_pli < PLI_INTERVAL_S:
            return
        self._last_pli = now
        self._report.keyframe_requests += 1
        pli = RtcpPli(sender_ssrc=VIEWER_SSRC, media_ssrc=self._media_ssrc)
        self._client.send(VIDEO_RTCP_FLOW_ID, pli.serialize())

    async def watch(
        self, *, seconds: float | None = None, frames: int | None = None
    ) -> ViewerReport:
        """Decode until ``seconds`` pass, ``frames`` were decoded, or the stream ends."""

        async def consume() -> None:
            async for _ in self.frames():
                if frames is not None and self._report.frames_decoded >= frames:
                    return

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(consume(), seconds)
        return self.report()

    def report(self) -> ViewerReport:
        self._report.decode_errors = self._decoder.decode_errors
        self._report.latency_p50_ms = self._latency.percentile(50)
        self._report.latency_p99_ms = self._latency.percentile(99)
        return msgspec.structs.replace(self._report)

    async def close(self) -> None:
        await self._client.close()
