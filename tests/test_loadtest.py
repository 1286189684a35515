"""The load test: the light viewer (``shared.viewer.light``), the run that starts many of them
(``shared.viewer.load``) and ``kizuna-stream loadtest``.

The late-frame rule and the light session's counting run on literal times, sans-I/O, on RTP
packets made by the real sender core.  The rest runs on loopback without Ray: a real
SenderActor fed through a real PacketRing (its doorbell wakes the sender), a QUIC server that
refuses every viewer with a reason, and a port nobody listens on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import random
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator

import msgspec
import numpy as np
import pytest

from actors.cli.common import EXIT_ERROR, EXIT_USAGE
from actors.cli.main import main
from actors.handles import EncoderHandle
from actors.stages.sender import SenderActor
from shared.capture.testpattern import TestPattern
from shared.errors import ConfigError, ProtocolError
from shared.media.codec import EncoderConfig, H264Encoder
from shared.pool.packet_ring import PacketRing
from shared.pool.shm import segment_name
from shared.roq.framing import RoqErrorCode
from shared.roq.tls import generate_self_signed
from shared.roq.transport import RoqConnection, RoqServer
from shared.roq.url import StreamUrl
from shared.rtp.rtcp import (
    RtcpReceiverReport,
    RtcpSourceDescription,
    RtcpTransportFeedback,
    parse_rtcp_compound,
)
from shared.rtp.sender import VIDEO_TRACK, BroadcastSender, PeerSender
from shared.viewer.light import (
    DELAY_WARMUP_FRAMES,
    LATE_AFTER_S,
    LateFrameClock,
    LightSession,
    LightViewer,
)
from shared.viewer.load import LoadReport, LoadTest
from tests.impairment import ImpairmentRelay
from tests.test_network_sender_actor import FakeEncoderHandle
from tests.test_roq_loopback import until

WIDTH, HEIGHT, FPS = 320, 180, 30
SPS, PPS = b"\x67\x42\x00\x1f\xab", b"\x68\xce\x38\x80"


# -- the late-frame rule, on literal times ----------------------------------------------------


def test_a_frame_is_late_only_past_100_ms_after_its_rtp_time_on_the_first_frames_clock() -> None:
    clock = LateFrameClock(90_000)
    assert LATE_AFTER_S == 0.1
    assert not clock.is_late(1_000, 10.0)  # the first frame aligns the clock: never late
    # Frame 1 is due at 10.0 + 3000 / 90000 s; 99 ms after that is in time, 101 ms is late.
    assert not clock.is_late(4_000, 10.0 + 3_000 / 90_000 + 0.099)
    assert clock.is_late(7_000, 10.0 + 6_000 / 90_000 + 0.101)
    # Lateness is per frame, against the first frame's alignment: an early frame is fine,
    # and a late one does not move the clock for the next.
    assert not clock.is_late(10_000, 10.0)
    assert not clock.is_late(13_000, 10.0 + 12_000 / 90_000 + 0.05)


def test_the_late_rule_survives_an_rtp_timestamp_wrap_and_realigns_on_request() -> None:
    clock = LateFrameClock(90_000)
    assert not clock.is_late(2**32 - 1_500, 5.0)
    assert not clock.is_late(1_500, 5.0 + 3_000 / 90_000 + 0.05)  # wrapped: 3000 ticks on
    assert clock.is_late(4_500, 5.0 + 6_000 / 90_000 + 0.15)
    clock.align()  # a new connection: the next frame aligns again, wherever its timestamp is
    assert not clock.is_late(123, 100.0)
    assert not clock.is_late(3_123, 100.0 + 1 / 30)
    assert clock.is_late(6_123, 100.0 + 2 / 30 + 0.2)


# -- the light session, sans-I/O -------------------------------------------------------------


class ScriptedStream:
    """RTP packets of synthetic H.264 frames from the real sender core (its own SSRC and
    sequence space, as a new connection gets): a keyframe every ``gop`` frames, P frames of
    three packets, so a frame's last packet and its first are different packets."""

    def __init__(self, seed: int, gop: int = 30) -> None:
        self.gop = gop
        self._rng = random.Random(seed)
        self._packetizer = BroadcastSender([VIDEO_TRACK], initial_bps=1_000_000)
        self._peer = PeerSender([VIDEO_TRACK], now=0.0, initial_bps=1_000_000, rng=self._rng)

    def frame(self, index: int) -> list[bytes]:
        keyframe = index % self.gop == 0
        units = [SPS, PPS, b"\x65" + self._rng.randbytes(4_000)] if keyframe else []
        units = units or [b"\x41" + self._rng.randbytes(3_000)]
        access_unit = b"".join(b"\x00\x00\x00\x01" + unit for unit in units)
        payloads = self._packetizer.payloads(0, access_unit)
        return self._peer.send_frame(
            0, payloads, pts=index * 3_000, capture_us=0, keyframe=keyframe, now=index / FPS
        )


def deliver(core: LightSession, arrivals: list[tuple[float, bytes]]) -> float:
    """Packets to the session in arrival order, ticking it whenever its deadline comes first
    (as its shell does); returns the last arrival."""
    arrivals = sorted(arrivals, key=lambda item: item[0])
    now = arrivals[0][0]
    for when, packet in arrivals:
        while (deadline := core.next_deadline()) is not None and deadline <= when:
            core.tick(max(deadline, now))
        now = when
        core.on_packet(VIDEO_TRACK.flow_id, packet, now)
        if (deadline := core.next_deadline()) is not None and deadline <= now:
            core.tick(now)
    return now


def settle(core: LightSession, now: float, seconds: float) -> None:
    """Nothing more arrives: tick at each deadline for ``seconds``."""
    end = now + seconds
    while (deadline := core.next_deadline()) is not None and deadline <= end:
        now = max(deadline, now)
        core.tick(now)


def test_frames_are_counted_and_only_the_frame_whose_own_last_packet_came_late_is_late() -> None:
    stream, core = ScriptedStream(seed=1), LightSession()
    start = 50.0
    arrivals: list[tuple[float, bytes]] = []
    for index in range(30):
        packets = stream.frame(index)
        assert len(packets) >= 3
        for number, packet in enumerate(packets):
            when = start + index / FPS
            if index == 10 and number == len(packets) - 1:
                when += 0.15  # frame 10's last packet is 150 ms late
            arrivals.append((when, packet))
    last = deliver(core, arrivals)
    settle(core, last, 1.0)
    assert core.frames == 30
    # Frames 11-14 waited behind frame 10 in the jitter buffer, but their own packets came in
    # time: by the definition only frame 10 is late.
    assert core.late == 1
    assert core.packets_lost == 0
    assert core.nacks_sent >= 1  # the gap was asked for at once
    assert core.packets_recovered == 1  # and the late packet filled it
    assert core.feedback_sent >= 1 and core.reports_sent >= 1
    # 29 frames after the first, over the 29 frame intervals since the first frame.
    assert core.fps(start + 29 / FPS) == pytest.approx(30.0)
    assert core.bytes_received == sum(len(packet) for _, packet in arrivals)


def test_frame_delay_is_measured_from_the_fastest_frame_after_a_warm_up() -> None:
    """The first frame came 20 ms late (so the late clock's alignment is off by 20 ms); frame
    50's last packet 150 ms late.  Delays count from the fastest frame, not the first, and the
    connection's first second is left out."""
    stream, core = ScriptedStream(seed=3), LightSession()
    start, count = 20.0, DELAY_WARMUP_FRAMES + 40
    arrivals: list[tuple[float, bytes]] = []
    for index in range(count):
        packets = stream.frame(index)
        for number, packet in enumerate(packets):
            when = start + index / FPS + (0.02 if index == 0 else 0.0)
            if index == DELAY_WARMUP_FRAMES + 20 and number == len(packets) - 1:
                when += 0.15
            arrivals.append((when, packet))
    settle(core, deliver(core, arrivals), 1.0)
    assert core.frames == count
    delays = core.frame_delays()
    assert len(delays) == count - DELAY_WARMUP_FRAMES
    assert sorted(delays)[-2] == pytest.approx(0.0, abs=1e-6)
    assert max(delays) == pytest.approx(150.0)
    # 40 samples, one of them 150: numpy's interpolated p99 lies between 0 and 150.
    assert core.delay_p99_ms() == round(float(np.percentile(delays, 99)), 2) == 91.5
    # A new connection starts its own samples.
    core.new_connection()
    assert core.delay_p99_ms() is None and len(core.frame_delays()) == 0


def test_a_packet_lost_for_good_is_loss_and_a_keyframe_request_not_a_late_frame() -> None:
    stream, core = ScriptedStream(seed=2, gop=30), LightSession()
    arrivals = []
    for index in range(60):
        packets = stream.frame(index)
        if index == 20:
            packets = packets[:1] + packets[2:]  # its second packet never arrives
        arrivals += [(100.0 + index / FPS, packet) for packet in packets]
    settle(core, deliver(core, arrivals), 2.0)
    assert core.packets_lost == 1
    assert core.nacks_sent >= 1 and core.plis_sent >= 1
    # Frame 20 is given up on and frames 21-29 depend on it: the next keyframe (30) resumes.
    assert core.frames == 50 and core.frames_dropped >= 10
    assert core.late == 0


def test_a_new_connection_keeps_the_counts_and_aligns_the_late_clock_again() -> None:
    core = LightSession()
    first = ScriptedStream(seed=3)
    arrivals = []
    for index in range(10):
        packets = first.frame(index)
        if index == 5:
            packets = packets[1:]  # lost for good (no keyframe follows: nothing after it counts)
        arrivals += [(10.0 + index / FPS, packet) for packet in packets]
    settle(core, deliver(core, arrivals), 1.0)
    assert (core.frames, core.packets_lost) == (5, 1)
    core.new_connection()
    # The new connection's stream starts 60 s later at unrelated RTP timestamps: on the old
    # alignment every frame would be late.
    second = ScriptedStream(seed=4)
    arrivals = [(70.0 + i / FPS, p) for i in range(30) for p in second.frame(i)]
    settle(core, deliver(core, arrivals), 1.0)
    assert core.frames == 35 and core.late == 0
    assert core.packets_lost == 1  # the first connection's loss is kept


# -- on loopback ------------------------------------------------------------------------------


async def feed(ring: PacketRing, encoder: H264Encoder) -> None:
    """A live 30 fps stream into the ring until cancelled (its doorbell wakes the sender)."""
    pattern = TestPattern(WIDTH, HEIGHT, FPS)
    started = time.monotonic()
    index = 0
    while True:
        capture_us, monotonic_us = time.time_ns() // 1000, time.monotonic_ns() // 1000
        for unit in encoder.encode(
            pattern.render(index, capture_us), pts=index * 3000, capture_us=capture_us
        ):
            ring.append(
                unit.data,
                pts=unit.pts,
                capture_us=capture_us,
                monotonic_us=monotonic_us,
                keyframe=unit.keyframe,
            )
        index += 1
        await asyncio.sleep(max(0.0, started + index / FPS - time.monotonic()))


@contextlib.asynccontextmanager
async def streaming() -> AsyncIterator[tuple[str, SenderActor]]:
    """A real SenderActor serving a live encoded stream on loopback; yields its URL."""
    session = uuid.uuid4().hex[:10]
    video = PacketRing.create(segment_name(session, "video"), capacity_bytes=4 << 20)
    encoder = H264Encoder(
        EncoderConfig(
            width=WIDTH, height=HEIGHT, framerate=FPS, bitrate=300_000, keyframe_interval=60
        )
    )
    sender = SenderActor(session, "shard-0", video.name, EncoderHandle(FakeEncoderHandle(encoder)))
    url = await sender.open("127.0.0.1", 0)
    feeder = asyncio.create_task(feed(video, encoder))
    try:
        yield url, sender
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder
        await sender.stop()
        video.close()
        video.unlink()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_twenty_light_viewers_all_receive_and_each_sends_a_viewers_feedback() -> None:
    viewers = 20

    async def main() -> tuple[LoadReport, dict[str, set[str]], list[LightViewer]]:
        async with streaming() as (url, sender):
            # What each connection's RTCP carried, seen where the sender receives it (the
            # actor's QUIC server calls its packet callback through this attribute).
            feedback: dict[str, set[str]] = collections.defaultdict(set)
            server = sender._server
            receive = server.on_packet
            assert receive is not None

            # A viewer is known by its CNAME (in every compound RR, RFC 3550 §6.1), so a viewer
            # that reconnected on a loaded machine still counts once.
            cnames: dict[str, str] = {}

            def spy(connection: RoqConnection, flow_id: int, data: bytes) -> None:
                with contextlib.suppress(ProtocolError):
                    packets = parse_rtcp_compound(data)
                    for packet in packets:
                        if isinstance(packet, RtcpSourceDescription):
                            cnames[connection.peer_id] = packet.cname_of() or ""
                    for packet in packets:
                        feedback[connection.peer_id].add(type(packet).__name__)
                receive(connection, flow_id, data)

            def by_viewer() -> dict[str, set[str]]:
                seen: dict[str, set[str]] = collections.defaultdict(set)
                for peer, kinds in feedback.items():
                    if peer in cnames:
                        seen[cnames[peer]] |= kinds
                return seen

            server.on_packet = spy
            test = LoadTest(url, viewers, seconds=120.0)  # ends on the condition below
            stop = asyncio.Event()
            run = asyncio.create_task(test.run(stop))

            def done() -> bool:
                # Every viewer saw a second of video, and the sender heard from every one of
                # them both kinds of periodic feedback.
                kinds = {RtcpTransportFeedback.__name__, RtcpReceiverReport.__name__}
                return all(v.core.frames >= FPS for v in test.viewers) and (
                    sum(kinds <= seen for seen in by_viewer().values()) == viewers
                )

            await until(done, "a second of video at every viewer, feedback from each", timeout=150)
            stop.set()
            return await run, by_viewer(), test.viewers

    report, feedback, test_viewers = asyncio.run(main())
    summary = report.summary
    assert report.interrupted  # stopped by the condition, not by the clock
    assert (summary.viewers, summary.connected, summary.watching) == (viewers, viewers, viewers)
    assert summary.failed == summary.closed == 0 and summary.reasons == {}
    assert len(feedback) == viewers  # twenty CNAMEs: twenty distinct viewers
    for viewer in report.viewers:
        assert viewer.state == "watching" and viewer.reason is None
        assert viewer.frames >= FPS and viewer.fps > 0 and viewer.bytes > 0
        assert viewer.feedback_sent > 0 and viewer.reports_sent > 0
        assert viewer.first_frame_s is not None
    frames = sum(v.frames for v in report.viewers)
    late = sum(v.late for v in report.viewers)
    assert summary.frames == frames and summary.late == late
    assert summary.late_frame_ratio == round(late / frames, 6)
    pooled = np.concatenate([v.core.frame_delays() for v in test_viewers])
    assert summary.delay_p99_ms == round(float(np.percentile(pooled, 99)), 2)
    assert summary.fps_min == min(v.fps for v in report.viewers)
    assert summary.bytes == sum(v.bytes for v in report.viewers)
    assert summary.mbps > 0 and summary.cpu_cores > 0 and summary.rss_mb > 0


def test_a_dropped_connection_is_reconnected_and_the_counts_go_on() -> None:
    async def main() -> tuple[LoadReport, list[int]]:
        async with streaming() as (url, _):
            stream = StreamUrl.parse(url)
            relay = ImpairmentRelay((stream.host, stream.port))
            port = await relay.start()
            # QUIC's idle timeout (5 s) left as it is: the viewers' silence timer notices.
            test = LoadTest(msgspec.structs.replace(stream, port=port), 2, seconds=120.0)
            stop = asyncio.Event()
            run = asyncio.create_task(test.run(stop))
            try:
                await until(lambda: all(v.core.frames > 0 for v in test.viewers), "video")
                relay.cut = True  # the path goes silent: no close, nothing
                await until(
                    lambda: all(v.state == "reconnecting" for v in test.viewers), "the drop"
                )
                before = [v.core.frames for v in test.viewers]
                relay.cut = False
                await until(
                    lambda: all(
                        v.reconnects == 1 and v.state == "watching" and v.core.frames > seen
                        for v, seen in zip(test.viewers, before, strict=True)
                    ),
                    "video again on new connections",
                    timeout=30,
                )
            finally:
                stop.set()
                report = await run
                relay.close()
            return report, before

    report, before = asyncio.run(main())
    for viewer, seen in zip(report.viewers, before, strict=True):
        assert (viewer.state, viewer.reconnects, viewer.reason) == ("watching", 1, None)
        assert viewer.silences == 1  # given up on silence, not on QUIC's idle timeout
        assert viewer.frames > seen
    assert report.summary.reconnects == 2 and report.summary.watching == 2


def test_a_server_that_refuses_with_a_reason_is_reported_per_viewer() -> None:
    async def main() -> LoadReport:
        identity = generate_self_signed("127.0.0.1")

        def refuse(connection: RoqConnection) -> None:
            connection.close(RoqErrorCode.ROQ_NO_ERROR, "viewer limit reached")

        server = RoqServer(identity, on_connect=refuse)
        await server.start("127.0.0.1", 0)
        url = StreamUrl(
            host="127.0.0.1", port=server.port, session_id="s", fingerprint=identity.fingerprint
        )
        try:
            # The run ends as soon as every viewer has ended, long before its time.
            return await LoadTest(url, 3, seconds=60.0).run()
        finally:
            await server.close()

    report = asyncio.run(main())
    assert not report.interrupted
    assert [(v.state, v.reason) for v in report.viewers] == [("closed", "viewer limit reached")] * 3
    summary = report.summary
    assert (summary.connected, summary.closed, summary.failed) == (3, 3, 0)
    assert summary.reasons == {"viewer limit reached": 3}


def test_a_port_nobody_listens_on_fails_every_viewer_with_a_reason() -> None:
    port = free_port()
    url = StreamUrl(host="127.0.0.1", port=port, session_id="s", fingerprint="sha256:00")

    report = asyncio.run(LoadTest(url, 3, seconds=60.0, connect_timeout_s=0.5).run())
    for viewer in report.viewers:
        assert viewer.state == "failed"
        assert viewer.reason is not None and f"127.0.0.1:{port}" in viewer.reason
        assert viewer.frames == 0 and viewer.fps == 0.0
    summary = report.summary
    assert (summary.connected, summary.failed) == (0, 3)
    assert summary.fps_min is None and summary.fps_median is None
    assert sum(summary.reasons.values()) == 3


def test_a_ramp_spreads_the_viewers_starts_evenly_over_its_seconds() -> None:
    url = StreamUrl(host="127.0.0.1", port=free_port(), session_id="s", fingerprint="sha256:00")
    test = LoadTest(url, 4, seconds=30.0, ramp_s=1.2, connect_timeout_s=0.2)
    asyncio.run(test.run())
    starts = [viewer.started_at for viewer in test.viewers]
    assert all(start is not None for start in starts)
    first = starts[0]
    assert first is not None
    # Viewer i starts no sooner than i * 1.2 / 4 s after the first (a bound asyncio's timers
    # guarantee; how much later depends on the machine and is not asserted).
    for index, start in enumerate(starts):
        assert start is not None and start - first >= index * 0.3 - 1e-6


def test_bad_arguments_are_refused_before_anything_starts() -> None:
    with pytest.raises(ConfigError):
        LoadTest("roq://127.0.0.1:1/s", 0, seconds=1.0)
    with pytest.raises(ConfigError):
        LoadTest("roq://127.0.0.1:1/s", 1, seconds=0.0)
    with pytest.raises(ConfigError):
        LoadTest("roq://127.0.0.1:1/s", 1, seconds=2.0, ramp_s=2.0)
    with pytest.raises(ConfigError):
        LoadTest("http://127.0.0.1:1/s", 1, seconds=1.0)


STREAM = "roq://127.0.0.1:4433/s"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([STREAM, "--viewers", "0", "--seconds", "5"], "--viewers must be at least 1"),
        ([STREAM, "--viewers", "2", "--seconds", "0"], "--seconds must be positive"),
        ([STREAM, "--viewers", "2", "--seconds", "5", "--ramp", "5"], "--ramp must be"),
        ([STREAM, "--viewers", "2", "--seconds", "5", "--idle-timeout", "0"], "--idle-timeout"),
        (["http://example.com/x", "--viewers", "2", "--seconds", "5"], "must start with roq://"),
        (["roq://example.com/x", "--viewers", "2", "--seconds", "5"], "needs a host and a port"),
    ],
)
def test_the_command_refuses_bad_input_with_a_usage_error(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["loadtest", *arguments]) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_the_command_reports_in_one_json_line_and_fails_when_nobody_connects(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"roq://127.0.0.1:{free_port()}/s?fp=sha256:00"
    code = main(
        ["loadtest", url, "--viewers", "2", "--seconds", "30", "--connect-timeout", "0.5", "--json"]
    )
    out = capsys.readouterr().out
    assert code == EXIT_ERROR
    [line] = out.splitlines()
    result = json.loads(line)
    assert result["summary"]["failed"] == 2
    assert [v["state"] for v in result["viewers"]] == ["failed", "failed"]


def test_the_command_prints_a_table_and_a_summary_for_a_person(
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    url = f"roq://127.0.0.1:{port}/s?fp=sha256:00"
    code = main(["loadtest", url, "--viewers", "2", "--seconds", "30", "--connect-timeout", "0.5"])
    out = capsys.readouterr().out
    assert code == EXIT_ERROR
    assert "0/2 viewers connected" in out and "2 failed" in out
    assert out.count(f"cannot connect to 127.0.0.1:{port}") == 3  # two rows and the summary
    assert "load generator:" in out


def test_the_command_prints_one_json_line_with_the_summary_and_every_viewer() -> None:
    async def main() -> tuple[int, bytes, bytes]:
        async with streaming() as (url, _):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "actors.cli",
                "loadtest",
                url,
                "--viewers",
                "3",
                "--seconds",
                "3",
                "--json",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(process.communicate(), 120)  # a hang guard only
            assert process.returncode is not None
            return process.returncode, out, err

    code, out, err = asyncio.run(main())
    assert code == 0, err.decode()
    [line] = out.decode().splitlines()
    result = json.loads(line)
    assert set(result) == {"url", "interrupted", "summary", "viewers"}
    summary = result["summary"]
    for key in (
        "viewers",
        "connected",
        "failed",
        "closed",
        "reasons",
        "reconnects",
        "fps_min",
        "fps_median",
        "late_frame_ratio",
        "lost",
        "loss",
        "bytes",
        "mbps",
        "cpu_cores",
        "rss_mb",
    ):
        assert key in summary, key
    assert summary["viewers"] == 3
    assert [v["index"] for v in result["viewers"]] == [0, 1, 2]
    for viewer in result["viewers"]:
        assert {"state", "fps", "frames", "late", "lost", "bytes", "reconnects", "reason"} <= set(
            viewer
        )
