"""The viewer: RTP over QUIC in, decoded pictures and sound out, feedback back to the sender.

Runs without Ray: this is the client a person (or a test) uses to watch a stream.  It is the
receiving half of the design's NetworkStreamer: ``receive_stream`` is :meth:`Viewer.connect`
followed by :meth:`Viewer.media` (or :meth:`Viewer.frames` for video alone),
``get_stream_stats`` is :meth:`Viewer.stream_stats`, ``close_stream`` is :meth:`Viewer.close`;
the sending half is ``actors/stages/sender.py``.

The protocol work is the sans-I/O :class:`shared.rtp.receiver.ReceiverSession`: per track
(video H.264 on flows 0/1, audio Opus on flows 2/3) a jitter buffer that waits for
retransmissions within a latency budget, reception statistics, and the RTCP feedback (NACK,
PLI, transport-wide feedback, RR).  This shell moves packets in and feedback out, ticks the
session every :data:`TICK_S`, and decodes: H.264 and Opus with PyAV.  The latest SR of each
track maps RTP timestamps to the sender's capture clock (RFC 3550 §6.4.1), which lines audio
up with video (:attr:`ViewerReport.av_offset_ms`).

The session runs on ``time.monotonic()`` (packet arrivals, ticks, so jitter, DLSR and the
NACK/PLI timers): an NTP step cannot disturb them.  The wall clock is read only where it is
compared with wall-clock data, the capture times (latency, the A/V offset).

Each test-source picture carries its capture timestamp (``shared.capture.stamp``), so the viewer reads
capture-to-decode latency from the picture alone.  When the connection drops (QUIC idle
timeout) the viewer reconnects with exponential backoff, pinning the same certificate; a stream
the server ends on purpose ends :meth:`media`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import numpy as np

from shared.capture.stamp import Stamp, read_stamp
from shared.errors import NetworkError
from shared.media.codec import H264Decoder
from shared.models import StreamStats
from shared.roq.transport import RoqClient
from shared.roq.url import StreamUrl
from shared.rtp.h264 import H264PayloadFormat, to_annexb
from shared.rtp.jitter_buffer import BufferedFrame
from shared.rtp.opus import OpusDecoder, OpusPayloadFormat
from shared.rtp.rate_window import RateWindow
from shared.rtp.receiver import ReceiverSession, ReceiverTrack
from shared.rtp.sender import AUDIO_TRACK, VIDEO_TRACK
from shared.viewer.latency import LatencyStats

logger = logging.getLogger(__name__)

__all__ = ["DecodedAudio", "DecodedFrame", "Viewer", "ViewerReport", "read_frame_stamp"]

TICK_S = 0.02
#: A tick waits for queued packets to be handled, but not longer than this.
MAX_TICK_DELAY_S = 0.1
RECONNECT_FIRST_DELAY_S, RECONNECT_MAX_DELAY_S = 0.25, 4.0
#: QUIC idle timeout of a viewer connection: how soon a dead path is noticed.
VIEWER_IDLE_TIMEOUT_S = 5.0


class ViewerReport(msgspec.Struct, kw_only=True):
    url: str
    mode: str = ""
    frames_decoded: int = 0
    frames_dropped: int = 0
    decode_errors: int = 0
    keyframe_requests: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    packets_lost: int = 0
    packets_malformed: int = 0
    unknown_flows: int = 0
    nacks_sent: int = 0
    packets_recovered: int = 0
    frames_recovered: int = 0
    stamps_read: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    jitter_ms: float = 0.0
    rtt_ms: float = 0.0
    first_frame_s: float | None = None
    reconnects: int = 0
    audio_frames_decoded: int = 0
    audio_frames_dropped: int = 0
    audio_decode_errors: int = 0
    av_offset_ms: float | None = None
    """Median video minus median audio capture-to-decode delay (SR clock), both tracks only."""


@dataclasses.dataclass(frozen=True, slots=True)
class DecodedFrame:
    frame: Any  # av.VideoFrame
    stamp: Stamp | None
    latency_ms: float | None
    rtp_timestamp: int = 0
    capture_us: int | None = None
    """Capture time on the sender's clock (from its SR), None before the first SR."""
    keyframe: bool = False
    access_unit: bytes = b""
    """The H.264 access unit (Annex B) the picture was decoded from, for remuxing."""


@dataclasses.dataclass(frozen=True, slots=True)
class DecodedAudio:
    frame: Any  # av.AudioFrame
    rtp_timestamp: int
    capture_us: int | None
    latency_ms: float | None


def read_frame_stamp(frame: Any) -> Stamp | None:
    """Read the test source's timestamp from a decoded yuv420p frame without copying it all."""
    plane = frame.planes[0]
    # A view of the decoder's plane (no copy); read_stamp only touches the strip rows.
    luma = np.frombuffer(plane, dtype=np.uint8).reshape(-1, plane.line_size)
    return read_stamp(luma[: frame.height, : frame.width])


class Viewer:
    def __init__(
        self,
        url: StreamUrl,
        client: RoqClient,
        *,
        started: float,
        connect_options: dict[str, Any],
        latency_budget_s: float = 0.2,
        reconnect: bool = True,
        reconnect_timeout_s: float = 30.0,
    ) -> None:
        self.url = url
        self._client = client
        self._connect_options = connect_options
        self._reconnect_enabled = reconnect
        self._reconnect_timeout_s = reconnect_timeout_s
        self._session = ReceiverSession(
            [(VIDEO_TRACK, H264PayloadFormat()), (AUDIO_TRACK, OpusPayloadFormat())],
            latency_budget_s=latency_budget_s,
        )
        self._video = self._session.tracks[VIDEO_TRACK.flow_id]
        self._audio = self._session.tracks[AUDIO_TRACK.flow_id]
        self._delays: dict[str, collections.deque[float]] = {
            kind: collections.deque(maxlen=300) for kind in ("video", "audio")
        }
        self._decoder = H264Decoder()
        self._audio_decoder: OpusDecoder | None = None
        self._latency = LatencyStats()
        self._report = ViewerReport(url=str(url), mode=client.mode)
        self._started = started
        self._next_tick = 0.0
        #: Bytes received over the last second, bounded on every packet (``stream_stats``).
        self.received_window = RateWindow(1.0)
        self._closing = False

    @classmethod
    async def connect(
        cls,
        url: str | StreamUrl,
        *,
        timeout: float = 10.0,
        ca_file: str | None = None,
        datagrams: bool = True,
        reconnect: bool = True,
        latency_budget_s: float = 0.2,
        idle_timeout: float = VIEWER_IDLE_TIMEOUT_S,
    ) -> Viewer:
        """Connect to a stream URL; the URL's ``fp`` pins the certificate, else ``ca_file``
        (or the system's CAs) must vouch for it.  ``datagrams=False`` asks for stream mode."""
        parsed = url if isinstance(url, StreamUrl) else StreamUrl.parse(url)
        options: dict[str, Any] = {
            "fingerprint": parsed.fingerprint,
            "ca_file": ca_file,
            "datagrams": datagrams,
            "timeout": timeout,
            "idle_timeout": idle_timeout,
        }
        started = time.monotonic()
        client = await RoqClient.connect(parsed.host, parsed.port, **options)
        return cls(
            parsed,
            client,
            started=started,
            connect_options=options,
            latency_budget_s=latency_budget_s,
            reconnect=reconnect,
        )

    async def frames(self) -> AsyncIterator[DecodedFrame]:
        """Decoded pictures until the stream ends (audio is received but not returned)."""
        async for item in self.media():
            if isinstance(item, DecodedFrame):
                yield item

    async def media(self) -> AsyncIterator[DecodedFrame | DecodedAudio]:
        """Decoded pictures and audio frames, as they become ready, until the stream ends."""
        while True:
            # Packets already queued are handled before the tick, so a stalled loop never
            # gives up on a retransmission that is in fact waiting in the queue.
            item = self._client.receive_nowait()
            wait = self._next_tick - time.monotonic()
            if item is None and wait > 0:
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel
                    # that lands as the receive completes, and the loop would never stop.
                    async with asyncio.timeout(wait):
                        item = await self._client.receive_timed()
                except TimeoutError:
                    item = None
                else:
                    if item is None and not await self._reconnect():
                        return
            outputs: list[DecodedFrame | DecodedAudio] = []
            if item is not None:
                outputs += self._on_packet(*item)
            now = time.monotonic()
            backlog = self._client.queued
            if now >= self._next_tick and (not backlog or now - self._next_tick > MAX_TICK_DELAY_S):
                self._next_tick = now + TICK_S
                outputs += self._tick(now)
            for output in outputs:
                yield output

    # -- packets in, frames out -----------------------------------------------------------

    def _on_packet(
        self, flow_id: int, data: bytes, arrival: float
    ) -> list[DecodedFrame | DecodedAudio]:
        self.received_window.add(arrival, len(data))
        return self._decode(self._session.on_packet(flow_id, data, arrival))

    def _tick(self, now: float) -> list[DecodedFrame | DecodedAudio]:
        frames, feedback = self._session.tick(now, self._client.rtt_ms / 1000)
        for flow_id, packet in feedback:
            self._client.send(flow_id, packet)
        return self._decode(frames)

    def _decode(
        self, frames: list[tuple[ReceiverTrack, BufferedFrame]]
    ) -> list[DecodedFrame | DecodedAudio]:
        out: list[DecodedFrame | DecodedAudio] = []
        for track, frame in frames:
            capture_us = track.capture_us(frame.rtp_timestamp)
            if track is self._audio:
                if self._audio_decoder is None:
                    self._audio_decoder = OpusDecoder()
                for audio in self._audio_decoder.decode(frame.units[0]):
                    delay = self._delay("audio", capture_us)
                    out.append(DecodedAudio(audio, frame.rtp_timestamp, capture_us, delay))
                continue
            access_unit = to_annexb(frame.units)
            for picture in self._decoder.decode(access_unit):
                out.append(self._measure(picture, frame, capture_us, access_unit))
        return out

    def _delay(self, kind: str, capture_us: int | None) -> float | None:
        """Capture (sender clock, via SR) to decode (this clock), for the A/V offset."""
        if capture_us is None:
            return None
        delay = (time.time_ns() // 1000 - capture_us) / 1000.0
        self._delays[kind].append(delay)
        return delay

    def _measure(
        self, picture: Any, frame: BufferedFrame, capture_us: int | None, access_unit: bytes
    ) -> DecodedFrame:
        now_us = time.time_ns() // 1000
        self._report.frames_decoded += 1
        if self._report.first_frame_s is None:
            self._report.first_frame_s = time.monotonic() - self._started
        self._delay("video", capture_us)
        stamp = read_frame_stamp(picture)
        latency_ms = None
        if stamp is not None:
            latency_ms = (now_us - stamp.capture_us) / 1000.0
            self._latency.add(latency_ms)
            self._report.stamps_read += 1
        return DecodedFrame(
            frame=picture,
            stamp=stamp,
            latency_ms=latency_ms,
            rtp_timestamp=frame.rtp_timestamp,
            capture_us=capture_us,
            keyframe=frame.keyframe,
            access_unit=access_unit,
        )

    # -- connection ----------------------------------------------------------------------------

    async def _reconnect(self) -> bool:
        """After the connection ended: reconnect with backoff if it dropped; False to stop."""
        termination = self._client.termination
        dropped = termination is None or termination[1] == "Idle timeout"
        if self._closing or not self._reconnect_enabled or not dropped:
            return False
        deadline = time.monotonic() + self._reconnect_timeout_s
        delay = RECONNECT_FIRST_DELAY_S
        while time.monotonic() + delay < deadline and not self._closing:
            await asyncio.sleep(delay)
            try:
                client = await RoqClient.connect(
                    self.url.host, self.url.port, **self._connect_options
                )
            except NetworkError:
                delay = min(delay * 2, RECONNECT_MAX_DELAY_S)
                continue
            try:
                await self._client.close()
            except Exception as exc:  # the old path is dead; the new one is what matters
                logger.debug("closing the old connection: %s", exc)
            self._client = client
            self._session.new_connection()
            self._report.reconnects += 1
            return True
        return False

    @property
    def frames_decoded(self) -> int:
        """Pictures decoded so far: O(1), for a caller that checks it on every frame."""
        return self._report.frames_decoded

    def report(self) -> ViewerReport:
        """Everything this viewer counted, with latency percentiles over up to 100,000
        samples: O(samples), so a caller refreshes it at a display rate, not per frame."""
        report = self._report
        report.mode = self._client.mode
        report.decode_errors = self._decoder.decode_errors
        report.latency_p50_ms = self._latency.percentile(50)
        report.latency_p99_ms = self._latency.percentile(99)
        video, audio = self._video, self._audio
        session = self._session
        report.packets_received, report.bytes_received = (
            session.packets_received,
            session.bytes_received,
        )
        report.packets_malformed = session.packets_malformed + self._client.malformed
        report.unknown_flows = session.unknown_flows
        report.keyframe_requests = session.keyframe_requests
        report.frames_dropped = video.buffer.frames_dropped
        report.nacks_sent = video.buffer.nacks_sent + audio.buffer.nacks_sent
        report.packets_recovered = video.buffer.packets_recovered + audio.buffer.packets_recovered
        report.frames_recovered = video.buffer.frames_recovered
        report.packets_lost = sum(t.stats.packets_lost for t in (video, audio) if t.stats)
        report.jitter_ms = video.stats.jitter_s * 1000 if video.stats else 0.0
        report.rtt_ms = self._client.rtt_ms
        report.audio_frames_dropped = audio.buffer.frames_dropped
        if self._audio_decoder is not None:
            report.audio_frames_decoded = self._audio_decoder.frames_decoded
            report.audio_decode_errors = self._audio_decoder.decode_errors
        video_delays, audio_delays = self._delays["video"], self._delays["audio"]
        if video_delays and audio_delays:
            report.av_offset_ms = statistics.median(video_delays) - statistics.median(audio_delays)
        return msgspec.structs.replace(report)

    def stream_stats(self) -> StreamStats:
        """The design's StreamStats as this viewer sees its stream (``get_stream_stats``)."""
        report = self.report()
        now = time.monotonic()
        received = report.packets_received + report.packets_lost
        elapsed = max(now - self._started, 1e-3)
        return StreamStats(
            bytes_received=report.bytes_received,
            frames_decoded=report.frames_decoded,
            frames_dropped=report.frames_dropped,
            current_bitrate=self.received_window.rate_bps(now),
            average_bitrate=int(report.bytes_received * 8 / elapsed),
            latency_ms=int(report.latency_p50_ms or 0),
            jitter_ms=int(report.jitter_ms),
            packet_loss_rate=report.packets_lost / received if received else 0.0,
            last_updated=time.time(),
        )

    async def watch(
        self, *, seconds: float | None = None, frames: int | None = None
    ) -> ViewerReport:
        """Decode until ``seconds`` pass, ``frames`` were decoded, or the stream ends."""

        async def consume() -> None:
            async for _ in self.media():
                if frames is not None and self._report.frames_decoded >= frames:
                    return

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(consume(), seconds)
        return self.report()

    async def close(self) -> None:
        self._closing = True
        await self._client.close()
