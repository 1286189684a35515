"""One monotonic clock on the network path: a wall-clock step disturbs no RTT and no estimate.

The sender and viewer cores (:class:`PeerSender`, :class:`ReceiverSession`) are wired together
in memory on a virtual monotonic clock, with a fixed one-way delay.  The sender's wall clock
(what its SRs carry, and what the frames' capture times are on) runs far from the monotonic
one and, in one run, is stepped as NTP would step it.  Everything timed (RTT from RR echoes,
the bandwidth estimate, DLSR at the viewer) must come out the same in both runs.
"""

from __future__ import annotations

import heapq
import itertools
import random

import pytest

from shared.rtp.h264 import H264PayloadFormat
from shared.rtp.receiver import ReceiverSession
from shared.rtp.sender import VIDEO_TRACK, PeerSender

ONE_WAY_S = 0.015
WALL_S = 1_700_000_000.0
FPS = 30
SECONDS = 6.0


def run(wall_steps: dict[float, float]) -> list[tuple[float, float, int]]:
    """``wall_steps`` maps a monotonic time to a jump of the sender's wall clock there.
    Returns ``(time, rtt ms, estimate)`` after each RTCP packet the sender handled."""
    peer = PeerSender([VIDEO_TRACK], now=0.0, initial_bps=1_000_000, rng=random.Random(5))
    receiver = ReceiverSession([(VIDEO_TRACK, H264PayloadFormat())])
    events: list[tuple[float, int, str, bytes]] = []
    order = itertools.count()

    def at(when: float, kind: str, data: bytes = b"") -> None:
        heapq.heappush(events, (when, next(order), kind, data))

    def wall(now: float) -> float:
        return WALL_S + now + sum(step for when, step in wall_steps.items() if when <= now)

    for index in range(int(SECONDS * FPS)):
        at(index / FPS, "frame")
    for index in range(int(SECONDS * 100)):
        at(index / 100, "tick")
    seen: list[tuple[float, float, int]] = []
    frame = 0
    while events:
        now, _, kind, data = heapq.heappop(events)
        if kind == "frame":
            payloads = [bytes([0x65]) + bytes(1000)] * 3  # one IDR slice in three NAL units
            capture_us = int(wall(now) * 1e6)
            for packet in peer.send_frame(
                0, payloads, pts=frame * 3000, capture_us=capture_us, keyframe=True, now=now
            ):
                at(now + ONE_WAY_S, "down", packet)
            frame += 1
        elif kind == "down":
            receiver.on_packet(VIDEO_TRACK.flow_id, data, now)
        elif kind == "sr":
            receiver.on_packet(VIDEO_TRACK.rtcp_flow_id, data, now)
        elif kind == "up":
            peer.on_rtcp(data, now)
            seen.append((now, peer.feedback.rtt_ms, peer.estimator.estimate_bps))
        else:
            for _, packet in peer.poll(now, wall(now)):
                at(now + ONE_WAY_S, "sr", packet)
            for _, packet in receiver.tick(now)[1]:
                at(now + ONE_WAY_S, "up", packet)
    return seen


def test_a_wall_clock_step_disturbs_neither_rtt_nor_the_estimate() -> None:
    steady = run({})
    # NTP steps the sender's clock back an hour, then forward two, mid-stream.
    stepped = run({2.0: -3600.0, 4.0: 7200.25})
    assert stepped == steady
    rtts = [rtt for _, rtt, _ in stepped if rtt]
    # RTT comes from the RR echoes (no transport RTT is given here): one per half second.
    assert len(rtts) >= 2 * (SECONDS - 1)
    assert all(rtt == pytest.approx(2 * ONE_WAY_S * 1000, abs=0.1) for rtt in rtts)
    after_steps = [rtt for when, rtt, _ in stepped if when > 4.5]
    assert after_steps and all(rtt == pytest.approx(30.0, abs=0.1) for rtt in after_steps)
    # The estimate moved during the run, so agreeing on it is not agreeing on a constant.
    assert len({estimate for _, _, estimate in stepped}) > 5
