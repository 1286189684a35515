"""The light viewer: RTP over QUIC in, frames counted but never decoded, a real viewer's feedback out.

``kizuna-stream loadtest`` runs hundreds of these on one event loop (:mod:`shared.viewer.load`),
so each does only what the sender must see from a real viewer and what its report needs.  Like
the real viewer (:mod:`shared.viewer.client`) it receives through
:class:`shared.roq.transport.RoqClient` and runs a :class:`shared.rtp.receiver.ReceiverSession`
(jitter buffer, NACK and PLI at once, transport-wide feedback every 50 ms, receiver reports
every 500 ms), so the sender's bandwidth estimate, retransmissions and keyframe requests see
what a real viewer makes them see; but the frames the jitter buffer releases are only counted
and timed, never decoded, and nothing of PyAV is imported.

Two parts, as in the rest of ``shared``: :class:`LightSession` is sans-I/O (packets in with
their arrival time, feedback out, :meth:`LightSession.next_deadline` for its shell's one timer;
it reads no clock), and :class:`LightViewer` is the thin asyncio shell around it: one task
waits for packets (hands the session every packet already queued, then ticks it if its deadline
has come), and one ``call_at`` timer, re-armed only when the deadline moves, ticks it when
nothing arrives.  The timer's callback first takes what is queued, so a gap a queued packet
fills is never NACKed.  Time is ``time.monotonic()``, the clock RoqClient stamps arrivals with.

Definitions (the load test's report uses exactly these):

- **frame**: a complete video frame, every packet of one access unit present, as the jitter
  buffer releases it (a retransmission may complete it); a frame given up on is not one.
- **fps**: frames after the first, divided by the seconds from the first frame to the end of
  the viewer's run (0 before a second frame).
- **late**: a frame is late when its last packet (the latest arrival among its packets) comes
  more than 100 ms (:data:`LATE_AFTER_S`) after the time its RTP timestamp gives, on a clock
  aligned at the first frame: the first frame's last packet arrives at ``a0`` carrying
  timestamp ``t0``, so a frame with timestamp ``t`` is due at ``a0 + (t - t0) / 90000`` s (the
  video clock, RFC 6184 §5.1).  A new connection starts a new alignment.  The late ratio is
  late frames over frames.
- **delay**: how much later than the viewer's fastest frame a frame's last packet came,
  relative to its RTP time: with the late rule's clock, ``arrival - due`` for each frame less
  the smallest such value (so the fastest frame has delay 0 and a frame that queued 30 ms
  longer somewhere has 30).  This is latency less the path's fixed part, which is what a
  stalled neighbour or a busy sender adds; it does not depend on the first frame being on
  time.  The report gives its 99th percentile over the viewer's frames on its current
  connection (the newest :data:`DELAY_SAMPLES`), the load test's over every viewer's.  A
  connection's first :data:`DELAY_WARMUP_FRAMES` frames are left out: they come while QUIC's
  congestion window opens behind the first keyframe, which ``first_frame_s`` already reports.
- **lost**: RTP packets never received, after NACK repair: expected minus received per RFC 3550
  Appendix A.3 (a retransmission that arrived counts as received), video and audio.
- **bytes**: what arrived in RoQ payloads, RTP and RTCP (QUIC and UDP overhead not counted).

Each connection starts as the real viewer's does: a ``hello`` with the stream id and the token
on the control stream (:mod:`shared.viewer.access`).  No task reads the answers: they are taken
in, without waiting, whenever packets are, when the connection ends and when a report is made,
so a light viewer costs no more than before; media is never made to wait for them.

A connection that drops (the server silent past the SRs it owes, :mod:`shared.viewer.liveness`,
or QUIC's idle timeout; nothing said) is reconnected with backoff, as the real viewer does, to
the endpoint that served it and then the URL's alternates; one the server closes with a reason (a refusal, the stream stopping) ends the
viewer, and the reason is kept for its report: a refusal's in the server's words
(``"<reason>: <text>"``).  A failed first connection is reported, not
retried: it is what the operator runs the test to find.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec
import numpy as np

from shared.errors import NetworkError
from shared.roq.transport import RoqClient
from shared.roq.url import StreamUrl
from shared.rtp.h264 import H264PayloadFormat
from shared.rtp.opus import OpusPayloadFormat
from shared.rtp.receiver import ReceiverSession
from shared.rtp.rtcp import RTCP_PSFB, RTCP_RR, RTCP_RTPFB
from shared.rtp.sender import AUDIO_TRACK, VIDEO_TRACK
from shared.viewer.access import ViewerAccess
from shared.viewer.latency import LatencyStats
from shared.viewer.liveness import SilenceTimer, reconnect_attempts

__all__ = [
    "LATE_AFTER_S",
    "LateFrameClock",
    "LightSession",
    "LightViewer",
    "LightViewerReport",
]

logger = logging.getLogger(__name__)

#: A frame whose last packet arrives later than this after its RTP time is late.
LATE_AFTER_S = 0.1
#: Frame delays kept per viewer for the percentile (about two minutes at 30 fps).
DELAY_SAMPLES = 4096
#: Frames at the start of each connection not sampled for the delay (one second at 30 fps).
DELAY_WARMUP_FRAMES = 30
#: QUIC idle timeout of a light viewer's connection, as the real viewer's: how soon a dead
#: path is noticed (and reconnected).
IDLE_TIMEOUT_S = 5.0
#: Video RTP timestamps whose latest arrival is remembered while their frame is incomplete.
#: Frames complete in order within the jitter buffer's budget, so a few seconds of video is
#: plenty; the bound keeps duplicates of released frames from growing it.
MAX_TRACKED_FRAMES = 256

# RTCP feedback message types (RFC 4585 §6.1 FMT values).
_FMT_NACK, _FMT_PLI, _FMT_TRANSPORT_CC = 1, 1, 15

# Viewer states in the report.
CONNECTING, WATCHING, RECONNECTING = "connecting", "watching", "reconnecting"
FAILED, CLOSED, LEFT, ERROR = "failed", "closed", "left", "error"


class LateFrameClock:
    """Whether a frame is late: the rule in the module doc, on times passed in.

    The first frame after :meth:`align` (or creation) sets the alignment; every later one is
    due at that arrival plus its RTP time since, and is late past ``late_after_s`` after that.
    Timestamps are unwrapped frame to frame (frames come in order; a difference is taken
    modulo 2**32 as a signed 32-bit number, RFC 3550 §5.1), so a wrap changes nothing.
    """

    __slots__ = ("_anchor", "_clock_rate", "_elapsed", "_previous", "late_after_s")

    def __init__(
        self, clock_rate: int = VIDEO_TRACK.clock_rate, late_after_s: float = LATE_AFTER_S
    ):
        self._clock_rate = clock_rate
        self.late_after_s = late_after_s
        self._anchor: float | None = None
        self._previous = 0
        self._elapsed = 0  # RTP ticks from the aligning frame to the previous one

    def align(self) -> None:
        """Start a new alignment at the next frame (a new connection, a new sender)."""
        self._anchor = None

    def is_late(self, rtp_timestamp: int, last_arrival: float) -> bool:
        """Whether the frame with ``rtp_timestamp`` whose last packet arrived at
        ``last_arrival`` (seconds, the clock the alignment was made on) is late."""
        return self.delay(rtp_timestamp, last_arrival) > self.late_after_s

    def delay(self, rtp_timestamp: int, last_arrival: float) -> float:
        """Seconds past its due time that the frame's last packet arrived (0 for the frame
        that makes the alignment); call once per frame, in order."""
        if self._anchor is None:
            self._anchor, self._previous, self._elapsed = last_arrival, rtp_timestamp, 0
            return 0.0
        self._elapsed += (rtp_timestamp - self._previous + 2**31) % 2**32 - 2**31
        self._previous = rtp_timestamp
        return last_arrival - (self._anchor + self._elapsed / self._clock_rate)


class LightSession:
    """One light viewer's protocol state across its connections, sans-I/O.

    :meth:`on_packet` takes a ``(flow id, packet)`` with its arrival time; :meth:`tick`, due at
    :meth:`next_deadline`, returns the RTCP to send.  Both count the frames the session's jitter
    buffer releases (and which of them are late) and nothing more is done with them.
    """

    def __init__(self, *, latency_budget_s: float = 0.2) -> None:
        self.session = ReceiverSession(
            [(VIDEO_TRACK, H264PayloadFormat()), (AUDIO_TRACK, OpusPayloadFormat())],
            latency_budget_s=latency_budget_s,
        )
        self._video = self.session.tracks[VIDEO_TRACK.flow_id]
        self._audio = self.session.tracks[AUDIO_TRACK.flow_id]
        self.late_clock = LateFrameClock(VIDEO_TRACK.clock_rate)
        #: Each frame's ``arrival - due`` on the late clock (ms), the newest DELAY_SAMPLES of
        #: this connection; :meth:`frame_delays` makes them delays.
        self._transit = LatencyStats(DELAY_SAMPLES)
        self._connection_frames = 0
        #: Latest arrival of a packet of each video frame not yet released, by RTP timestamp.
        self._arrivals: dict[int, float] = {}
        self.frames = 0
        self.late = 0
        self.audio_frames = 0
        self.first_frame_at: float | None = None
        self.last_frame_at: float | None = None
        #: Packets lost on connections before this one (each connection has its own sources).
        self._lost_before = 0
        # Feedback sent, by kind.
        self.nacks_sent = 0
        self.plis_sent = 0
        self.feedback_sent = 0
        self.reports_sent = 0

    def on_packet(self, flow_id: int, data: bytes, now: float) -> None:
        if flow_id == VIDEO_TRACK.flow_id and len(data) >= 12:
            # The RTP timestamp (RFC 3550 §5.1, octets 4-7) without a second parse.
            arrivals = self._arrivals
            arrivals[int.from_bytes(data[4:8], "big")] = now
            if len(arrivals) > MAX_TRACKED_FRAMES:
                del arrivals[next(iter(arrivals))]
        released = self.session.on_packet(flow_id, data, now)
        if released:
            self._count(released, now)

    def tick(self, now: float, rtt_s: float = 0.0) -> list[tuple[int, bytes]]:
        """The RTCP ``(flow id, packet)`` due at ``now``; frames given up on are counted."""
        released, feedback = self.session.tick(now, rtt_s)
        if released:
            self._count(released, now)
        for _, packet in feedback:
            self._note_sent(packet)
        return feedback

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has work (None: no timer); re-read after every call in."""
        return self.session.next_deadline()

    def new_connection(self) -> None:
        """A new QUIC connection: a new transport-wide sequence space, new sources (the sender
        gives each connection its own SSRCs) and a new alignment for the late-frame clock."""
        self._lost_before += self._lost_now()
        for track in (self._video, self._audio):
            track.stats = None  # the next packet starts the new source's statistics
        self.session.new_connection()
        self.late_clock.align()
        self._transit = LatencyStats(DELAY_SAMPLES)
        self._connection_frames = 0
        self._arrivals.clear()

    def frame_delays(self) -> np.ndarray[tuple[int], np.dtype[np.float64]]:
        """Each frame's delay in ms (the module doc's definition), this connection's."""
        transit = self._transit.values()
        return transit - transit.min() if len(transit) else transit.copy()

    def delay_p99_ms(self) -> float | None:
        delays = self.frame_delays()
        return round(float(np.percentile(delays, 99)), 2) if len(delays) else None

    def _count(self, released: list[Any], now: float) -> None:
        video = self._video
        for track, frame in released:
            if track is not video:
                self.audio_frames += 1
                continue
            arrival = self._arrivals.pop(frame.rtp_timestamp, now)
            self.frames += 1
            if self.first_frame_at is None:
                self.first_frame_at = arrival
            self.last_frame_at = arrival
            delay = self.late_clock.delay(frame.rtp_timestamp, arrival)
            self._connection_frames += 1
            if self._connection_frames > DELAY_WARMUP_FRAMES:
                self._transit.add(delay * 1000)
            if delay > self.late_clock.late_after_s:
                self.late += 1

    def _note_sent(self, packet: bytes) -> None:
        # The first packet of a compound says what it is (RFC 3550 §6.4.2, RFC 4585 §6.1).
        kind, fmt = packet[1], packet[0] & 0x1F
        if kind == RTCP_RTPFB:
            if fmt == _FMT_TRANSPORT_CC:
                self.feedback_sent += 1
            elif fmt == _FMT_NACK:
                self.nacks_sent += 1
        elif kind == RTCP_PSFB and fmt == _FMT_PLI:
            self.plis_sent += 1
        elif kind == RTCP_RR:
            self.reports_sent += 1

    def _lost_now(self) -> int:
        return sum(t.stats.packets_lost for t in (self._video, self._audio) if t.stats)

    @property
    def packets_lost(self) -> int:
        """RTP packets never received (RFC 3550 A.3), over every connection so far."""
        return max(self._lost_before + self._lost_now(), 0)

    @property
    def rtp_packets(self) -> int:
        """RTP packets received, each counted once (duplicates left out)."""
        return sum(
            t.buffer.packets_received - t.buffer.packets_duplicate
            for t in (self._video, self._audio)
        )

    @property
    def bytes_received(self) -> int:
        return self.session.bytes_received

    @property
    def frames_dropped(self) -> int:
        """Video frames the jitter buffer gave up on (a loss not repaired in time)."""
        return self._video.buffer.frames_dropped

    @property
    def packets_recovered(self) -> int:
        return self._video.buffer.packets_recovered + self._audio.buffer.packets_recovered

    def fps(self, end: float) -> float:
        """Frames after the first per second, from the first frame to ``end``."""
        first = self.first_frame_at
        if first is None or self.frames < 2 or end <= first:
            return 0.0
        return (self.frames - 1) / (end - first)


class LightViewerReport(msgspec.Struct, kw_only=True):
    """One light viewer's run, by the definitions in :mod:`shared.viewer.light`."""

    index: int
    state: str
    """``watching`` (to the end), ``failed`` (never connected), ``closed`` (by the server, see
    ``reason``), ``reconnecting`` (dropped, not back by the end), ``connecting`` (the run ended
    during its handshake), ``left`` (stopped before it ever connected) or ``error`` (a bug, in
    ``reason``)."""
    reason: str | None = None
    """Why it failed to connect, or the reason phrase the server closed the connection with."""
    fps: float = 0.0
    frames: int = 0
    late: int = 0
    lost: int = 0
    bytes: int = 0
    reconnects: int = 0
    silences: int = 0
    """Connections given up because the server went silent (see ``reconnects``)."""
    rtp_packets: int = 0
    audio_frames: int = 0
    frames_dropped: int = 0
    packets_recovered: int = 0
    nacks_sent: int = 0
    """NACK packets sent (each may ask for several sequence numbers)."""
    plis_sent: int = 0
    feedback_sent: int = 0
    """Transport-wide feedback packets sent."""
    reports_sent: int = 0
    """Receiver reports sent."""
    first_frame_s: float | None = None
    """From the start of its first connection attempt to its first frame."""
    rtt_ms: float = 0.0
    delay_p99_ms: float | None = None
    """The 99th percentile of its frames' delay (see the module doc; None before a frame)."""
    access: str = "unanswered"
    """What the server said of it on the control stream: ``unanswered`` (nothing, e.g. an
    older server), ``pending`` (waiting for approval), ``admitted`` or ``refused``."""
    notices: int = 0
    """Notices the server sent it."""


class LightViewer:
    """One light viewer of ``url``: :meth:`run` until cancelled, then :meth:`close`."""

    def __init__(
        self,
        index: int,
        url: StreamUrl,
        *,
        connect_timeout_s: float = 10.0,
        latency_budget_s: float = 0.2,
        datagrams: bool = True,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        connect_gate: asyncio.Semaphore | None = None,
        token: str | None = None,
    ) -> None:
        """``idle_timeout_s``: how long a silent connection lasts before it counts as dropped
        (and is reconnected); ``connect_gate`` bounds the handshakes in flight; ``token``: the
        viewer token its hello carries."""
        self.index = index
        self.url = url
        self.core = LightSession(latency_budget_s=latency_budget_s)
        self.access = ViewerAccess(stream=url.session_id, token=token, viewer=url.viewer)
        self._options: dict[str, Any] = {
            "fingerprint": url.fingerprint,
            "datagrams": datagrams,
            "timeout": connect_timeout_s,
            "idle_timeout": idle_timeout_s,
        }
        self._gate = connect_gate
        self._client: RoqClient | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._silence = SilenceTimer()
        self._silence_timer: asyncio.TimerHandle | None = None
        self.silences = 0
        #: Which of ``url.endpoints`` serves now (0: the URL's own; others after a move).
        self._endpoint = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.state = CONNECTING
        self.reason: str | None = None
        self.reconnects = 0
        self.started_at: float | None = None
        self._rtt_ms = 0.0

    async def run(self) -> None:
        """Connect, watch, reconnect after a drop; returns when the viewer has ended (failed,
        or closed by the server).  Cancel it to stop; then :meth:`close`."""
        self._loop = asyncio.get_running_loop()
        try:
            self._client = await self._connect(first=True)
        except NetworkError as exc:
            self.state, self.reason = FAILED, str(exc)
            return
        while True:
            self.state = WATCHING
            await self._watch(self._client)
            self._take_control()  # a refusal comes just before the close
            termination = self._client.termination
            self._disarm()
            reason = self.access.refusal_reason(termination)
            dropped = self._client.abandoned is not None or (
                termination is None or termination[1] == "Idle timeout"
            )
            if reason is None and not dropped:
                assert termination is not None
                reason = termination[1] or f"QUIC error {termination[0]:#x}"
            if reason is not None:
                # On purpose, with a reason: a refusal, the stream stopping.  Not retried.
                self.state, self.reason = CLOSED, reason
                return
            self.state = RECONNECTING
            client = await self._reconnect()
            with contextlib.suppress(Exception):  # the old path is dead already
                await self._client.close()
            self._client = client
            self.core.new_connection()
            self._silence.reset()
            self.reconnects += 1

    async def _connect(
        self, *, first: bool = False, endpoint: int = 0, timeout: float | None = None
    ) -> RoqClient:
        gate = self._gate or contextlib.nullcontext()
        async with gate:
            if first:
                self.started_at = time.monotonic()
            host, port = self.url.endpoints[endpoint]
            options = self._options if timeout is None else self._options | {"timeout": timeout}
            client = await RoqClient.connect(host, port, **options)
        self._endpoint = endpoint
        self.access.new_connection()
        client.send_control(self.access.hello())
        return client

    async def _reconnect(self) -> RoqClient:
        """A new connection after a drop, retried until cancelled: the endpoint that served
        last first, then the URL's alternates in turn; quick attempts, then a backoff
        (``shared.viewer.liveness.reconnect_attempts``)."""
        endpoints, first = len(self.url.endpoints), self._endpoint
        rtt_s = self._client.rtt_ms / 1000 if self._client is not None else 0.0
        attempts = reconnect_attempts(endpoints, rtt_s=rtt_s, timeout_s=self._options["timeout"])
        for delay, timeout, offset in attempts:
            await asyncio.sleep(delay)
            try:
                client = await self._connect(endpoint=(first + offset) % endpoints, timeout=timeout)
            except NetworkError as exc:
                self.reason = str(exc)
                continue
            self.reason = None
            return client
        raise AssertionError("reconnect_attempts never ends")

    async def _watch(self, client: RoqClient) -> None:
        """Packets to the session until the connection closes; feedback as it falls due."""
        core = self.core
        while True:
            item = await client.receive_timed()
            if item is None:
                return
            if not self._silence.armed:  # the connection's first media: now SRs are owed
                self._silence.heard(item[2], media=True)
                self._arm_silence(client)
            core.on_packet(*item)
            while (item := client.receive_nowait()) is not None:
                core.on_packet(*item)
            self._take_control()
            self._arm(time.monotonic())

    def _take_control(self) -> None:
        """What the server said on the control stream since the last look (no waiting)."""
        client = self._client
        if client is None:
            return
        while (item := client.receive_control_nowait()) is not None:
            data, end_stream = item
            self.access.receive(data, end_stream=end_stream)

    def _arm(self, now: float) -> None:
        """Tick now if the session's deadline has come; else keep one timer at it."""
        client, core = self._client, self.core
        assert client is not None and self._loop is not None
        deadline = core.next_deadline()
        # More NACKs due than one tick sends leave the deadline at "now": a few more passes.
        for _ in range(4):
            if deadline is None or deadline > now:
                break
            self._tick(client, max(now, deadline))
            deadline = core.next_deadline()
        if deadline is None:
            self._disarm()
            return
        if self._timer is not None:
            if self._timer_at == deadline:
                return  # the usual case: a packet that did not move the deadline
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        client = self._client
        if client is None:
            return
        # Everything already received first: a gap that a queued packet fills is no loss.
        core = self.core
        while (item := client.receive_nowait()) is not None:
            core.on_packet(*item)
        # asyncio may run a timer a clock tick early; the deadline has come all the same.
        self._arm(max(time.monotonic(), self._timer_at))

    def _arm_silence(self, client: RoqClient) -> None:
        deadline = self._silence.deadline(client.probe_timeout_s)
        if deadline is not None and self._loop is not None:
            # call_at runs after the I/O the loop already has ready: a busy loop's backlog is
            # stamped before the server is judged.
            self._silence_timer = self._loop.call_at(deadline, self._on_silence_timer, client)

    def _on_silence_timer(self, client: RoqClient) -> None:
        self._silence_timer = None
        if client is not self._client:
            return
        silence = self._silence
        silence.heard(client.last_received_at)
        pto_s = client.probe_timeout_s
        if not silence.expired(time.monotonic(), pto_s):
            self._arm_silence(client)
            return
        self.silences += 1
        client.abandon(f"server silent for {silence.bound(pto_s):.2f} s")

    def _tick(self, client: RoqClient, now: float) -> None:
        rtt_ms = client.rtt_ms
        self._rtt_ms = rtt_ms
        for flow_id, packet in self.core.tick(now, rtt_ms / 1000):
            client.send(flow_id, packet)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None

    async def close(self) -> None:
        """Leave: stop the timer, close the connection (after :meth:`run` was cancelled)."""
        self._disarm()
        client, self._client = self._client, None
        if client is None:
            if self.state == CONNECTING:
                self.state = LEFT
            return
        try:
            await client.close()
        except Exception as exc:  # leaving anyway: the report is what matters now
            logger.debug("light viewer %d: closing: %s", self.index, exc)

    def report(self, end: float) -> LightViewerReport:
        """The viewer's figures, fps over its run up to ``end`` (monotonic seconds)."""
        core = self.core
        self._take_control()
        first_frame_s = None
        if core.first_frame_at is not None and self.started_at is not None:
            first_frame_s = round(core.first_frame_at - self.started_at, 3)
        return LightViewerReport(
            index=self.index,
            state=self.state,
            reason=self.reason,
            fps=round(core.fps(end), 2),
            frames=core.frames,
            late=core.late,
            lost=core.packets_lost,
            bytes=core.bytes_received,
            reconnects=self.reconnects,
            silences=self.silences,
            rtp_packets=core.rtp_packets,
            audio_frames=core.audio_frames,
            frames_dropped=core.frames_dropped,
            packets_recovered=core.packets_recovered,
            nacks_sent=core.nacks_sent,
            plis_sent=core.plis_sent,
            feedback_sent=core.feedback_sent,
            reports_sent=core.reports_sent,
            first_frame_s=first_frame_s,
            rtt_ms=round(self._rtt_ms, 2),
            delay_p99_ms=self.core.delay_p99_ms(),
            access=self.access.state.value,
            notices=self.access.notices_received,
        )
