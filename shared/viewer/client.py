"""The viewer: RTP over QUIC in, decoded pictures and sound out, feedback back to the sender.

Runs without Ray: this is the client a person (or a test) uses to watch a stream.  It is the
receiving half of the design's NetworkStreamer: ``receive_stream`` is :meth:`Viewer.connect`
followed by :meth:`Viewer.media` (or :meth:`Viewer.frames` for video alone),
``get_stream_stats`` is :meth:`Viewer.stream_stats`, ``close_stream`` is :meth:`Viewer.close`;
the sending half is ``actors/stages/sender.py``.

The protocol work is the sans-I/O :class:`shared.rtp.receiver.ReceiverSession`: per track
(video H.264 on flows 0/1, audio Opus on flows 2/3) a jitter buffer that waits for
retransmissions within a latency budget, reception statistics, and the RTCP feedback (NACK,
PLI, transport-wide feedback, RR).  This shell is thin, as aioquic's asyncio layer is: it
hands the session every packet already queued, arms ONE timer for the session's
:meth:`~shared.rtp.receiver.ReceiverSession.next_deadline` (its ``get_timer()``) while it
waits for the next packet, ticks the session when that time comes, and sends what the tick
returns.  A gap therefore brings a NACK in the same pass that saw it, with no polling interval.
Decoding (H.264 and Opus with PyAV) never runs on this loop: whole frames go to one decode
thread (:mod:`shared.viewer.decoding`) and the pictures come back, in order, to :meth:`media`.
The latest SR of each track maps RTP timestamps to the sender's capture clock (RFC 3550
§6.4.1), which lines audio up with video (:attr:`ViewerReport.av_offset_ms`).

The session runs on ``time.monotonic()`` (packet arrivals, ticks, so jitter, DLSR and the
NACK/PLI timers): an NTP step cannot disturb them.  The wall clock is read only where it is
compared with wall-clock data, the capture times (latency, the A/V offset).

Before any media the viewer says who it is on the control stream (:mod:`shared.viewer.access`,
the protocol in :mod:`shared.auth.control`): right after each QUIC handshake it sends
``hello`` with the stream id and its token, and one task reads what the server says back
(``welcome``, ``pending``, ``refused``, notices, replies to :meth:`Viewer.request_quality` and
:meth:`Viewer.request_recording`).  Media is never made to wait for that task: an older server
says nothing and the viewer watches as before.  A refused viewer's :meth:`media` ends with the
connection, and :attr:`Viewer.refusal_reason` says why in the server's words.

Each test-source picture carries its capture timestamp (``shared.capture.stamp``), so the viewer reads
capture-to-decode latency from the picture alone.  When the connection drops (the server
silent past the SRs it owes, :mod:`shared.viewer.liveness`, or QUIC's idle timeout) the viewer
reconnects with exponential backoff, pinning the same certificate, to the endpoint that served
it and then the URL's alternates; a stream the server ends on purpose ends :meth:`media`, once
the frames already received are decoded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, TypeVar

import msgspec

from shared.auth.control import (
    Notice,
    Pending,
    QualityReply,
    RecordReply,
    Refused,
    ServerMessage,
    Welcome,
)
from shared.errors import NetworkError
from shared.media.codec import H264Decoder
from shared.models import StreamStats
from shared.roq.transport import RoqClient
from shared.roq.url import StreamUrl
from shared.rtp.h264 import H264PayloadFormat
from shared.rtp.jitter_buffer import BufferedFrame
from shared.rtp.opus import OpusDecoder, OpusPayloadFormat
from shared.rtp.rate_window import RateWindow
from shared.rtp.receiver import ReceiverSession, ReceiverTrack
from shared.rtp.sender import AUDIO_TRACK, VIDEO_TRACK
from shared.viewer.access import AccessState, ViewerAccess
from shared.viewer.decoding import (
    DECODE_BACKLOG_S,
    Decoded,
    DecodedAudio,
    DecodedFrame,
    DecodeJob,
    DecoderFactory,
    DecodeWorker,
    read_frame_stamp,
)
from shared.viewer.latency import LatencyStats
from shared.viewer.liveness import SilenceTimer, reconnect_attempts

logger = logging.getLogger(__name__)

__all__ = ["DecodedAudio", "DecodedFrame", "Viewer", "ViewerReport", "read_frame_stamp"]

#: QUIC idle timeout of a viewer connection: how soon a dead path is noticed.
VIEWER_IDLE_TIMEOUT_S = 5.0

R = TypeVar("R", QualityReply, RecordReply)

#: How long :meth:`Viewer.request_quality` and :meth:`Viewer.request_recording` wait for the
#: server's reply by default.
REQUEST_TIMEOUT_S = 10.0

#: What the receive task hands back: a packet with its arrival time, or None once closed.
Received = tuple[int, bytes, float] | None


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
    silences: int = 0
    """Connections given up because the server went silent past the bound
    (:mod:`shared.viewer.liveness`), each followed by a reconnect."""
    audio_frames_decoded: int = 0
    audio_frames_dropped: int = 0
    audio_decode_errors: int = 0
    av_offset_ms: float | None = None
    """Median video minus median audio capture-to-decode delay (SR clock), both tracks only."""
    decode_queue_dropped: int = 0
    """Video frames dropped, decoded or not, because the decoder or the consumer of
    :meth:`Viewer.media` fell more than ``decode_backlog_s`` behind (resumed at a keyframe)."""
    audio_decode_queue_dropped: int = 0
    """Audio frames dropped for the same reason."""
    access: str = AccessState.UNANSWERED.value
    """What the server said of this viewer on the control stream (``unanswered``, ``pending``,
    ``admitted`` or ``refused``; see :class:`shared.viewer.access.AccessState`)."""
    notices: int = 0
    """Notices the server sent this viewer."""
    width: int = 0
    height: int = 0
    """The size of the last picture decoded (0 before the first): the sender's rung."""
    resolution_changes: int = 0
    """Times the decoded size changed (a switch of rung, at an IDR with new SPS/PPS)."""


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
        video_decoder: DecoderFactory = H264Decoder,
        audio_decoder: DecoderFactory = OpusDecoder,
        decode_backlog_s: float = DECODE_BACKLOG_S,
        access: ViewerAccess | None = None,
        on_notice: Callable[[Notice], None] | None = None,
        on_message: Callable[[ServerMessage], None] | None = None,
    ) -> None:
        """``access``: the control-stream state (None: this viewer speaks no control protocol,
        as over a test's in-memory transport); :meth:`connect` makes it and starts it."""
        self.url = url
        self._client = client
        self.access = access
        self._on_notice = on_notice
        self._on_message = on_message
        self._control_task: asyncio.Task[None] | None = None
        #: Requests sent on the control stream, by id, waiting for their reply.
        self._replies: dict[int, asyncio.Future[ServerMessage]] = {}
        self._connect_options = connect_options
        self._reconnect_enabled = reconnect
        #: Which of ``url.endpoints`` serves now (0: the URL's own; others after a move).
        self._endpoint = 0
        self._reconnect_timeout_s = reconnect_timeout_s
        self._session = ReceiverSession(
            [(VIDEO_TRACK, H264PayloadFormat()), (AUDIO_TRACK, OpusPayloadFormat())],
            latency_budget_s=latency_budget_s,
            cname=url.viewer,
        )
        self._video = self._session.tracks[VIDEO_TRACK.flow_id]
        self._audio = self._session.tracks[AUDIO_TRACK.flow_id]
        self._delays: dict[str, collections.deque[float]] = {
            kind: collections.deque(maxlen=300) for kind in ("video", "audio")
        }
        self._decoding = DecodeWorker(
            video_decoder=video_decoder, audio_decoder=audio_decoder, max_backlog_s=decode_backlog_s
        )
        #: Decoded items (with the job that made them) not yet handed to media()'s consumer.
        self._decoded: collections.deque[tuple[DecodedFrame | DecodedAudio, Decoded]] = (
            collections.deque()
        )
        self._decode_failure: Exception | None = None
        self._decode_backlog_s = decode_backlog_s
        #: Decoded (video, audio) items dropped because the consumer fell behind.
        self._undelivered_dropped = [0, 0]
        #: Set by anything media() waits for: a packet, a decoded frame.  One timer beside it.
        self._wake = asyncio.Event()
        self._receiving: asyncio.Task[Received] | None = None
        self._connection_closed = False
        #: Whether the server has gone silent past what it owes (its SRs): the one timer
        #: armed at its deadline gives the connection up (:mod:`shared.viewer.liveness`).
        self._silence = SilenceTimer()
        self._silence_timer: asyncio.TimerHandle | None = None
        self._latency = LatencyStats()
        self._report = ViewerReport(url=str(url), mode=client.mode)
        self._started = started
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
        video_decoder: DecoderFactory = H264Decoder,
        token: str | None = None,
        name: str | None = None,
        on_notice: Callable[[Notice], None] | None = None,
        on_message: Callable[[ServerMessage], None] | None = None,
    ) -> Viewer:
        """Connect to a stream URL; the URL's ``fp`` pins the certificate, else ``ca_file``
        (or the system's CAs) must vouch for it.  ``datagrams=False`` asks for stream mode;
        ``video_decoder`` makes the H.264 decoder (e.g. ``lambda: H264Decoder(hardware=True)``).

        The hello on the control stream names the URL's stream and viewer, and carries
        ``token`` (a viewer token; without one the server may let the viewer ask an operator's
        approval, shown ``name``).  ``on_notice`` gets each notice the server sends, and
        ``on_message`` every message it sends (welcome, pending, refused, notices, replies),
        both on the event loop after :attr:`access` has taken it in."""
        parsed = url if isinstance(url, StreamUrl) else StreamUrl.parse(url)
        # Checked before any connection: a name or token the server would refuse fails here.
        access = ViewerAccess(
            stream=parsed.session_id, token=token, viewer=parsed.viewer, name=name
        )
        options: dict[str, Any] = {
            "fingerprint": parsed.fingerprint,
            "ca_file": ca_file,
            "datagrams": datagrams,
            "timeout": timeout,
            "idle_timeout": idle_timeout,
        }
        started = time.monotonic()
        client, endpoint = await _connect_first(parsed, options)
        viewer = cls(
            parsed,
            client,
            started=started,
            connect_options=options,
            latency_budget_s=latency_budget_s,
            reconnect=reconnect,
            video_decoder=video_decoder,
            access=access,
            on_notice=on_notice,
            on_message=on_message,
        )
        viewer._endpoint = endpoint
        viewer._start_control()
        return viewer

    async def frames(self) -> AsyncIterator[DecodedFrame]:
        """Decoded pictures until the stream ends (audio is received but not returned)."""
        async for item in self.media():
            if isinstance(item, DecodedFrame):
                yield item

    async def media(self) -> AsyncIterator[DecodedFrame | DecodedAudio]:
        """Decoded pictures and audio frames, in order, as they become ready, until the stream
        ends.  One pass: every queued packet to the session, a tick if its deadline has come,
        then one decoded item to the consumer, or a wait for a packet, a decoded item or the
        session's next deadline, whichever is first."""
        if self._closing:
            return
        self._decoding.start(asyncio.get_running_loop(), self._on_decoded)
        while not self._closing:
            self._wake.clear()  # before looking: whatever happens from here on sets it again
            self._receive_queued()
            deadline = self._session.next_deadline()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self._tick(now)
                deadline = self._session.next_deadline()
            if self._decode_failure is not None:
                raise self._decode_failure
            if self._decoded:
                yield self._take_decoded()
                continue
            if self._connection_closed and not self._decoding.outstanding:
                # What was received is decoded and handed out before a reconnect's backoff.
                if await self._reconnect():
                    continue
                break
            # Past deadlines (more NACKs due than one tick sends) still let the loop run.
            delay = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
                # lands as the wait completes, and the loop would never stop.
                async with asyncio.timeout(delay):
                    await self._wake.wait()
        # The stream is over and every frame of it handed out, or the viewer is leaving.
        await self._decoding.stop()

    # -- packets in, feedback out, frames to the decoder -----------------------------------------

    def _receive_queued(self) -> None:
        """Hand the session the packet the receive task got, then every one queued behind it,
        and keep one receive pending.  All of them before any tick: a gap that a queued packet
        fills is never NACKed, and a stalled loop never gives up on a retransmission that is
        in fact waiting in the queue."""
        task = self._receiving
        if task is not None and task.done():
            self._receiving = None
            received = task.result()
            if received is None:
                self._connection_closed = True
                return
            self._on_packet(*received)
        while (item := self._client.receive_nowait()) is not None:
            self._on_packet(*item)
        if self._receiving is None and not self._connection_closed:
            self._receiving = asyncio.ensure_future(self._client.receive_timed())
            self._receiving.add_done_callback(lambda _: self._wake.set())

    def _on_packet(self, flow_id: int, data: bytes, arrival: float) -> None:
        if not self._silence.armed:  # the connection's first media: now SRs are owed
            self._silence.heard(arrival, media=True)
            self._arm_silence()
        self.received_window.add(arrival, len(data))
        self._submit(self._session.on_packet(flow_id, data, arrival))

    def _tick(self, now: float) -> None:
        frames, feedback = self._session.tick(now, self._client.rtt_ms / 1000)
        for flow_id, packet in feedback:
            self._client.send(flow_id, packet)
        self._submit(frames)

    def _submit(self, frames: list[tuple[ReceiverTrack, BufferedFrame]]) -> None:
        if not frames:
            return
        now = time.monotonic()
        if self._decoded and now - self._decoded[0][1].queued_at > self._decode_backlog_s:
            # The consumer is far behind: what waits for it, decoded or not, is stale.  As
            # when the decoder falls behind, drop it all and resume video at a keyframe.
            video = sum(isinstance(item, DecodedFrame) for item, _ in self._decoded)
            self._undelivered_dropped[0] += video
            self._undelivered_dropped[1] += len(self._decoded) - video
            self._decoded.clear()
            self._decoding.drop_waiting(restart_video=video > 0)
        for track, frame in frames:
            capture_us = track.capture_us(frame.rtp_timestamp)
            self._decoding.submit(DecodeJob(frame, track is self._audio, capture_us, now))
        if self._decoding.skipping_to_keyframe:
            # The decoder dropped frames to catch up: a PLI beats the next periodic keyframe.
            self._session.request_keyframe(VIDEO_TRACK.flow_id, now)

    def _arm_silence(self) -> None:
        deadline = self._silence.deadline(self._client.probe_timeout_s)
        if deadline is None or self._closing:
            return
        loop = asyncio.get_running_loop()
        # call_at runs after the I/O the loop already has ready, so what arrived while this
        # viewer's own loop was busy is stamped before the server is judged.
        self._silence_timer = loop.call_at(deadline, self._on_silence_timer)

    def _on_silence_timer(self) -> None:
        self._silence_timer = None
        client = self._client
        silence = self._silence
        silence.heard(client.last_received_at)
        pto_s = client.probe_timeout_s
        if not silence.expired(time.monotonic(), pto_s):
            self._arm_silence()
            return
        bound = silence.bound(pto_s)
        logger.info("%s: nothing from the server for %.2f s: reconnecting", self.url, bound)
        self._report.silences += 1
        client.abandon(f"server silent for {bound:.2f} s")
        self._wake.set()

    def _cancel_silence(self) -> None:
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None

    # -- decoded items back ----------------------------------------------------------------------

    def _on_decoded(self, result: Decoded | Exception) -> None:
        """On the loop, in decode order: one job's items, or the exception its decoder raised."""
        if isinstance(result, Exception):
            self._decode_failure = self._decode_failure or result
        else:
            self._decoded.extend((item, result) for item in result.items)
        self._wake.set()

    def _take_decoded(self) -> DecodedFrame | DecodedAudio:
        """The next item for the consumer, counted as it is handed over (the times in it were
        taken on the decode thread, when it was decoded)."""
        item, decoded = self._decoded.popleft()
        if isinstance(item, DecodedAudio):
            self._report.audio_frames_decoded += 1
            self._delay("audio", item.capture_us, decoded.decoded_us)
            return item
        self._report.frames_decoded += 1
        size = (item.frame.width, item.frame.height)
        report = self._report
        if size != (report.width, report.height):
            report.resolution_changes += report.width != 0
            report.width, report.height = size
        if self._report.first_frame_s is None:
            self._report.first_frame_s = decoded.decoded_at - self._started
        self._delay("video", item.capture_us, decoded.decoded_us)
        if item.latency_ms is not None:
            self._latency.add(item.latency_ms)
            self._report.stamps_read += 1
        return item

    def _delay(self, kind: str, capture_us: int | None, decoded_us: int) -> None:
        """Capture (sender clock, via SR) to decode (this clock), for the A/V offset."""
        if capture_us is not None:
            self._delays[kind].append((decoded_us - capture_us) / 1000.0)

    # -- the control stream ----------------------------------------------------------------------

    def _start_control(self) -> None:
        """Say hello on this connection's control stream and read the server's answers in a
        task of their own, so media never waits on them."""
        access = self.access
        if access is None:
            return
        if self._control_task is not None:
            self._control_task.cancel()
        client = self._client
        client.send_control(access.hello())
        self._control_task = asyncio.ensure_future(self._read_control(client))

    async def _read_control(self, client: RoqClient) -> None:
        while (item := await client.receive_control()) is not None:
            self._on_control(*item)
        # The connection is gone: no reply can come on it any more.
        self._fail_requests("the connection closed before the server answered")

    def _drain_control(self) -> None:
        """Take in what the server sent that the control task has not read yet (a refusal that
        arrived with the close is read here before anyone asks why the connection ended)."""
        if self.access is None:
            return
        while (item := self._client.receive_control_nowait()) is not None:
            self._on_control(*item)

    def _on_control(self, data: bytes, end_stream: bool) -> None:
        assert self.access is not None
        for message in self.access.receive(data, end_stream=end_stream):
            if isinstance(message, QualityReply | RecordReply) and message.id is not None:
                future = self._replies.pop(message.id, None)
                if future is not None and not future.done():
                    future.set_result(message)
            try:
                if isinstance(message, Notice) and self._on_notice is not None:
                    self._on_notice(message)
                if self._on_message is not None:
                    self._on_message(message)
            except Exception:
                # The caller's callback broke, not the stream: say so loudly, keep reading.
                logger.exception("a control message callback raised")

    def _fail_requests(self, why: str) -> None:
        replies, self._replies = self._replies, {}
        for future in replies.values():
            if not future.done():
                future.set_exception(NetworkError(why))

    async def _request(
        self, request_id: int, data: bytes, reply_type: type[R], what: str, timeout: float
    ) -> R:
        if self.access is None or self._client.closed:
            raise NetworkError(f"cannot send the {what}: the connection is closed")
        future: asyncio.Future[ServerMessage] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = future
        self._client.send_control(data)
        try:
            async with asyncio.timeout(timeout):
                reply = await future
        except TimeoutError:
            raise NetworkError(
                f"the server did not answer the {what} within {timeout:g} s"
            ) from None
        finally:
            self._replies.pop(request_id, None)
        if not isinstance(reply, reply_type):
            raise NetworkError(f"the server answered the {what} with a {type(reply).__name__}")
        return reply

    async def request_quality(
        self,
        *,
        rung: int | None = None,
        preset: str | None = None,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> QualityReply:
        """Ask the server for one rung (by index, or by the preset it was made from; neither:
        back to the rung the server picks by bandwidth) and return its answer: ``ok``, or why
        not (``reason``, ``text``).  :class:`NetworkError` when no answer comes in ``timeout``
        seconds (an older server) or the connection closes first."""
        if self.access is None:
            raise NetworkError("this viewer has no control stream")
        request_id, data = self.access.quality_request(rung=rung, preset=preset)
        return await self._request(request_id, data, QualityReply, "quality request", timeout)

    async def request_recording(
        self, action: Literal["start", "stop"], *, timeout: float = REQUEST_TIMEOUT_S
    ) -> RecordReply:
        """Ask the server to start or stop recording the stream (needs ``can_record``)."""
        if self.access is None:
            raise NetworkError("this viewer has no control stream")
        request_id, data = self.access.record_request(action)
        return await self._request(request_id, data, RecordReply, "recording request", timeout)

    @property
    def access_state(self) -> AccessState:
        """What the server has said of this viewer (``unanswered`` without a control stream)."""
        if self.access is None:
            return AccessState.UNANSWERED
        self._drain_control()
        return self.access.state

    @property
    def welcome(self) -> Welcome | None:
        """The server's welcome on this connection: the viewer id, permissions and rungs."""
        return self.access.welcome if self.access is not None else None

    @property
    def pending(self) -> Pending | None:
        """The approval request this viewer waits on (its id is what the operator sees)."""
        return self.access.pending if self.access is not None else None

    @property
    def refusal(self) -> Refused | None:
        """The server's ``refused`` message, if it sent one."""
        self._drain_control()
        return self.access.refusal if self.access is not None else None

    @property
    def notices(self) -> list[Notice]:
        """The newest notices the server sent (up to ``shared.viewer.access.MAX_NOTICES``)."""
        return list(self.access.notices) if self.access is not None else []

    @property
    def refusal_reason(self) -> str | None:
        """Why the server refused or cut this viewer, exactly as it said it (``"<reason>:
        <text>"``), or None when it did not."""
        self._drain_control()
        if self.access is None:
            return None
        return self.access.refusal_reason(self._client.termination)

    # -- connection ----------------------------------------------------------------------------

    async def _reconnect(self) -> bool:
        """After the connection ended: reconnect with backoff if it dropped; False to stop."""
        self._cancel_silence()
        termination = self._client.termination
        dropped = (
            self._client.abandoned is not None
            or termination is None
            or termination[1] == "Idle timeout"
        )
        if self._closing or not self._reconnect_enabled or not dropped:
            return False
        deadline = time.monotonic() + self._reconnect_timeout_s
        # The endpoint that served last first, then the URL's alternates in turn (shards of
        # the stream on other nodes): quick attempts first, then a backoff that grows once
        # every endpoint has failed (``shared.viewer.liveness.reconnect_attempts``).
        endpoints = self.url.endpoints
        attempts = reconnect_attempts(
            len(endpoints),
            rtt_s=self._client.rtt_ms / 1000,
            timeout_s=self._connect_options.get("timeout", 10.0),
        )
        for delay, timeout, offset in attempts:
            if time.monotonic() + delay >= deadline or self._closing:
                break
            await asyncio.sleep(delay)
            index = (self._endpoint + offset) % len(endpoints)
            host, port = endpoints[index]
            options = self._connect_options | {"timeout": timeout}
            try:
                client = await RoqClient.connect(host, port, **options)
            except NetworkError:
                continue
            self._endpoint = index
            try:
                await self._client.close()
            except Exception as exc:  # the old path is dead; the new one is what matters
                logger.debug("closing the old connection: %s", exc)
            self._client = client
            self._connection_closed = False
            self._silence.reset()
            self._session.new_connection()
            self._report.reconnects += 1
            if self.access is not None:
                self.access.new_connection()
                self._start_control()
            return True
        return False

    @property
    def frames_decoded(self) -> int:
        """Pictures decoded and handed out by :meth:`media` so far: O(1), for a caller that
        checks it on every frame."""
        return self._report.frames_decoded

    def report(self) -> ViewerReport:
        """Everything this viewer counted, with latency percentiles over up to 100,000
        samples: O(samples), so a caller refreshes it at a display rate, not per frame."""
        report = self._report
        report.mode = self._client.mode
        decoding = self._decoding
        report.decode_errors = decoding.video_decode_errors
        report.audio_decode_errors = decoding.audio_decode_errors
        report.decode_queue_dropped = decoding.video_dropped + self._undelivered_dropped[0]
        report.audio_decode_queue_dropped = decoding.audio_dropped + self._undelivered_dropped[1]
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
        if self.access is not None:
            self._drain_control()
            report.access = self.access.state.value
            report.notices = self.access.notices_received
        report.audio_frames_dropped = audio.buffer.frames_dropped
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

    @property
    def termination(self) -> tuple[int, str] | None:
        """How the server ended the connection: (error code, reason phrase), None while
        open.  A server refusing a viewer closes with an ``AccessErrorCode`` and
        ``"<reason>: <text>"`` (:attr:`refusal_reason` prefers the ``refused`` message)."""
        return self._client.termination

    async def close(self) -> None:
        """Leave the stream: close the connection and end the decode thread (the frame it is
        decoding finishes first)."""
        self._closing = True
        self._cancel_silence()
        if self._receiving is not None:
            self._receiving.cancel()
            self._receiving = None
        if self._control_task is not None:
            self._control_task.cancel()
            self._control_task = None
        self._fail_requests("the viewer closed")
        try:
            await self._client.close()
        finally:
            await self._decoding.stop()


async def _connect_first(url: StreamUrl, options: dict[str, Any]) -> tuple[RoqClient, int]:
    """Connect to the URL's endpoint, or else to its alternates in turn; which one answered.
    The first endpoint's error is raised when none does."""
    first: NetworkError | None = None
    for index, (host, port) in enumerate(url.endpoints):
        try:
            return await RoqClient.connect(host, port, **options), index
        except NetworkError as exc:
            first = first or exc
    assert first is not None
    raise first
