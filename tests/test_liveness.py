"""The viewer's silence timer (``shared.viewer.liveness``) on a fake clock, fed by the real
sender core's SRs: it fires once the server stops, never while its SRs come, paused or not."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Sequence

import msgspec
import pytest

from shared.errors import ConfigError
from shared.rtp.sender import SR_INTERVAL_S, VIDEO_TRACK, BroadcastSender
from shared.viewer.client import Viewer, ViewerReport
from shared.viewer.liveness import (
    QUICK_ATTEMPTS,
    SILENCE_BOUND_S,
    SilenceTimer,
    reconnect_attempts,
)
from tests.impairment import ImpairmentRelay
from tests.test_roq_loopback import Broadcast, collect, until

FPS = 30
ONE_WAY_S = 0.02


class Wire:
    """A viewer connection's sending end: what the sender core sends, with its time."""

    def __init__(self) -> None:
        self.backlog = 0
        self.transport_rtt_s = 2 * ONE_WAY_S
        self.now = 0.0
        self.sent: list[float] = []

    def send_media(
        self, flow_id: int, packets: Sequence[bytes], *, keyframe: bool, urgent: bool = False
    ) -> None:
        self.sent += [self.now] * len(packets)

    def send_rtcp(self, flow_id: int, packet: bytes) -> None:
        self.sent.append(self.now)


def shard(*, frames_until: float, dies_at: float, lag_s: float = 0.0) -> list[float]:
    """The shard's loop on a fake clock: frames at 30 fps until ``frames_until`` (then a pause:
    capture waits, the loop runs on its SR timer alone, as ``actors.stages.sender`` does), its
    timer wake-ups ``lag_s`` late, nothing from ``dies_at`` on (SIGKILL).  When each packet
    it sent (media and SRs) was sent."""
    sender = BroadcastSender([VIDEO_TRACK], initial_bps=1_000_000, rng=random.Random(3))
    wire = Wire()
    sender.add(wire, 0.0)
    now, frame = 0.0, 0
    while now < dies_at:
        wire.now = now
        if now >= frame / FPS and now < frames_until:
            sender.send(
                0,
                b"\x00\x00\x00\x01\x65" + bytes(50),
                pts=frame * 3000,
                capture_us=int(now * 1e6),
                keyframe=True,
                now=now,
                wall_now=now + 1e9,
            )
            frame += 1
        sender.poll(now, now + 1e9)
        next_frame = frame / FPS if frame / FPS < frames_until else float("inf")
        now = min(sender.next_poll() + lag_s, next_frame)
    return wire.sent


def silence_at(arrivals: list[float], *, until: float, step: float = 0.01) -> float | None:
    """Run the viewer's timer over ``arrivals`` on a clock ticking by ``step``: when it first
    says the server is gone (None: never before ``until``)."""
    timer = SilenceTimer()
    pending = sorted(arrivals)
    now = 0.0
    while now < until:
        while pending and pending[0] <= now:
            timer.heard(pending.pop(0), media=True)
        if timer.expired(now):
            return now
        now = round(now + step, 9)
    return None


def test_the_bound_is_three_report_intervals() -> None:
    assert SILENCE_BOUND_S == pytest.approx(3 * SR_INTERVAL_S) == pytest.approx(1.5)


def test_it_fires_once_the_bound_has_passed_since_the_last_thing_heard() -> None:
    timer = SilenceTimer()
    timer.heard(10.0, media=True)
    timer.heard(10.4)  # an ACK, a control message: a sign of life like any other
    assert timer.deadline() == pytest.approx(11.9)
    assert not timer.expired(11.89)
    assert timer.expired(11.9)
    # Something older than what was heard moves nothing (arrivals stamped out of order).
    timer.heard(10.2)
    assert timer.deadline() == pytest.approx(11.9)


def test_nothing_is_owed_before_the_first_media_so_it_never_fires() -> None:
    timer = SilenceTimer()
    timer.heard(1.0)  # the server's welcome on the control stream, no media yet
    assert not timer.armed and timer.deadline() is None
    assert not timer.expired(1000.0)
    timer.heard(2.0, media=True)
    assert timer.armed and timer.expired(3.5)
    timer.reset()  # a new connection: disarmed until its own first media
    assert not timer.armed and not timer.expired(1000.0)


def test_a_long_probe_timeout_stretches_the_bound_to_three_of_them() -> None:
    timer = SilenceTimer()
    timer.heard(0.0, media=True)
    assert timer.bound(pto_s=0.1) == SILENCE_BOUND_S
    assert timer.bound(pto_s=0.8) == pytest.approx(2.4)
    assert not timer.expired(2.39, pto_s=0.8) and timer.expired(2.41, pto_s=0.8)


def test_a_bound_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be positive"):
        SilenceTimer(0.0)


def test_never_while_the_shard_streams_and_fires_within_the_bound_of_its_death() -> None:
    sent = shard(frames_until=20.0, dies_at=12.0)
    arrivals = [at + ONE_WAY_S for at in sent]
    fired = silence_at(arrivals, until=20.0)
    assert fired is not None
    assert max(arrivals) + SILENCE_BOUND_S <= fired < max(arrivals) + SILENCE_BOUND_S + 0.011
    assert fired < 12.0 + SILENCE_BOUND_S + 0.011


def test_a_paused_stream_sends_srs_alone_and_its_viewers_are_never_dropped() -> None:
    # Frames for 2 s, then paused: no frame for 28 s, only the SRs.  Two SRs in a row lost on
    # the way every third second still keep the viewer; so does one lost with a busy shard
    # loop that wakes 200 ms late every time.
    for lag_s, lost_in_a_row in ((0.0, 2), (0.2, 1)):
        sent = shard(frames_until=2.0, dies_at=30.0, lag_s=lag_s)
        paused = [at for at in sent if at > 2.0]
        gaps = [b - a for a, b in itertools.pairwise(paused)]
        assert paused and max(gaps) <= SR_INTERVAL_S + lag_s + 1e-9  # the SR timer alone
        lost = {
            at
            for second in range(3, 30, 3)
            for at in [a for a in paused if a > second][:lost_in_a_row]
        }
        assert len(lost) == 9 * lost_in_a_row
        arrivals = [at + ONE_WAY_S for at in sent if at not in lost]
        assert silence_at(arrivals, until=30.0) is None
        # One more lost in a row is silence past the bound: the timer is no looser than that.
        more = set([at for at in paused if at > 9.0][: lost_in_a_row + 1])
        arrivals = [at + ONE_WAY_S for at in sent if at not in lost | more]
        assert silence_at(arrivals, until=30.0) is not None
    # The same pause on a shard that dies at 20 s: noticed once its SRs stop.
    sent = shard(frames_until=2.0, dies_at=20.0, lag_s=0.1)
    fired = silence_at([at + ONE_WAY_S for at in sent], until=30.0)
    assert fired is not None and 20.0 < fired <= 20.0 + SILENCE_BOUND_S + 0.011


def test_reconnects_try_quickly_first_with_a_fresh_handshake_then_back_off() -> None:
    attempts = list(itertools.islice(reconnect_attempts(2, rtt_s=0.001, timeout_s=10.0), 12))
    quick, slow = attempts[:QUICK_ATTEMPTS], attempts[QUICK_ATTEMPTS:]
    # Short and close together: a new Initial at least every 0.6 s while the server is
    # replaced, where one attempt's own resends would back off (0.2, 0.4, 0.8, 1.6 s).
    assert all(delay + timeout <= 0.6 for delay, timeout, _ in quick)
    # Then the connect timeout, the pause doubling once both endpoints have failed.
    assert [(d, t) for d, t, _ in slow] == [
        (0.25, 10.0),
        (0.25, 10.0),
        (0.5, 10.0),
        (0.5, 10.0),
        (1.0, 10.0),
        (1.0, 10.0),
    ]
    # Every endpoint in turn, from the one that served last (offset 0).
    assert [offset % 2 for _, _, offset in attempts] == [0, 1] * 6


def test_a_long_path_gets_quick_attempts_long_enough_for_its_handshake() -> None:
    _, timeout, _ = next(reconnect_attempts(1, rtt_s=0.3, timeout_s=10.0))
    assert timeout == pytest.approx(0.9)  # three of its round trips
    assert next(reconnect_attempts(1, rtt_s=9.0, timeout_s=5.0))[1] == 5.0  # never past it
    with pytest.raises(ConfigError, match="needs an endpoint"):
        next(reconnect_attempts(0))


# -- the viewer shell on loopback --------------------------------------------------------------


def test_a_viewer_whose_server_goes_silent_gives_it_up_and_reconnects() -> None:
    """The path goes silent both ways, as a SIGKILLed shard's does (no CONNECTION_CLOSE): the
    viewer's silence timer gives the connection up, long before QUIC's 5 s idle timeout, and
    reconnects by itself once the server answers again."""

    async def main() -> ViewerReport:
        broadcast = Broadcast()
        url = await broadcast.start()
        relay = ImpairmentRelay((url.host, url.port))
        port = await relay.start()
        viewer = await Viewer.connect(msgspec.structs.replace(url, port=port))
        seen: list[int] = []
        decoding = asyncio.create_task(collect(viewer, seen))
        sending = asyncio.create_task(broadcast.send(range(100_000)))
        try:
            await until(lambda: len(seen) > 10, "frames")
            relay.cut = True  # a dead server: nothing arrives, nothing is said
            # Given up by the timer (QUIC's idle timeout would count no silence).
            await until(lambda: viewer.report().silences == 1, "the silence noticed", timeout=20)
            relay.cut = False
            before = len(seen)
            await until(
                lambda: viewer.report().reconnects == 1 and len(seen) > before + 10,
                "frames again on a new connection",
                timeout=30,
            )
            return viewer.report()
        finally:
            sending.cancel()
            decoding.cancel()
            await viewer.close()
            await broadcast.server.close()
            relay.close()

    report = asyncio.run(main())
    assert (report.silences, report.reconnects) == (1, 1)
