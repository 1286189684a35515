"""Sender and viewer cores wired together in memory, on a virtual clock, with fixed loss.

No sockets and no real clock: the :class:`BroadcastSender` (per-viewer RTP, NACK history,
SR, bandwidth estimate) talks to a :class:`ReceiverSession` (jitter buffer, NACK/PLI, RR,
transport-wide feedback) through a simulated link with a fixed one-way delay and a loss
pattern drawn from a seeded generator, in both directions.  The encoder and decoder are real
(libx264 and FFmpeg), so "nothing corrupt reaches the decoder" is checked byte for byte: every
delivered frame must equal what the encoder produced for that timestamp.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from shared.capture.testpattern import TestPattern
from shared.media.codec import EncoderConfig, H264Decoder, H264Encoder
from shared.rtp.h264 import H264PayloadFormat, split_annexb
from shared.rtp.receiver import ReceiverSession
from shared.rtp.sender import VIDEO_TRACK, BroadcastSender
from shared.viewer.client import read_frame_stamp

FPS, WIDTH, HEIGHT = 30, 320, 180
#: The virtual wall clock (capture stamps, the SRs' NTP time) runs this far ahead of the
#: virtual monotonic one, as the real ones do.
WALL_OFFSET_S = 1_700_000_000.0
ONE_WAY_S = 0.02
TICK_S = 0.01

#: Decides, by the index of a datagram on the link, whether the link loses it.
LossPattern = Callable[[int], bool]


def random_loss(rate: float, seed: int) -> LossPattern:
    rng = random.Random(seed)
    draws: dict[int, bool] = {}
    return lambda index: draws.setdefault(index, rng.random() < rate)


def burst_loss(bursts: Sequence[tuple[int, int]]) -> LossPattern:
    return lambda index: any(start <= index < start + length for start, length in bursts)


@dataclass
class Link:
    """One direction of the simulated network."""

    lose: LossPattern
    sent: int = 0
    lost: int = 0

    def passes(self) -> bool:
        index, self.sent = self.sent, self.sent + 1
        if self.lose(index):
            self.lost += 1
            return False
        return True


@dataclass
class Simulation:
    down: Link
    up: Link
    now: float = 1000.0
    events: list[tuple[float, int, str, object]] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def at(self, when: float, kind: str, data: object) -> None:
        heapq.heappush(self.events, (when, next(self.counter), kind, data))


class MemoryConnection:
    """What the sender sees of the viewer: packets go onto the simulated downlink."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim

    @property
    def backlog(self) -> int:
        return 0

    @property
    def transport_rtt_s(self) -> float:
        return 2 * ONE_WAY_S

    def send_media(
        self, flow_id: int, packets: Sequence[bytes], *, keyframe: bool, urgent: bool = False
    ) -> None:
        for packet in packets:
            self.send_rtcp(flow_id, packet)

    def send_rtcp(self, flow_id: int, packet: bytes) -> None:
        if self.sim.down.passes():
            self.sim.at(self.sim.now + ONE_WAY_S, "down", (flow_id, packet))


@dataclass
class Outcome:
    delivered: list[int]
    """Frame numbers the viewer decoded, in order."""
    keyframes: list[int]
    plis: int
    nacks: int
    recovered: int
    decode_errors: int
    frames: int


def simulate(down: LossPattern, up: LossPattern, *, frames: int = 300) -> Outcome:
    sim = Simulation(Link(down), Link(up))
    encoder = H264Encoder(
        EncoderConfig(
            width=WIDTH, height=HEIGHT, framerate=FPS, bitrate=1_000_000, keyframe_interval=10_000
        )
    )
    pattern = TestPattern(WIDTH, HEIGHT, FPS)
    sender = BroadcastSender([VIDEO_TRACK], initial_bps=1_000_000, rng=random.Random(3))
    connection = MemoryConnection(sim)
    peer = sender.add(connection, sim.now)
    receiver = ReceiverSession([(VIDEO_TRACK, H264PayloadFormat())], latency_budget_s=0.25)
    decoder = H264Decoder()
    sent_units: dict[int, tuple[int, list[bytes]]] = {}  # RTP timestamp -> (frame, NAL units)
    outcome = Outcome([], [], 0, 0, 0, 0, frames)

    def deliver(found: list) -> None:  # type: ignore[type-arg]
        for _, frame in found:
            number, units = sent_units[frame.rtp_timestamp]
            assert frame.units == units, f"frame {number} differs from what was encoded"
            for picture in decoder.decode(b"".join(b"\x00\x00\x00\x01" + u for u in frame.units)):
                stamp = read_frame_stamp(picture)
                assert stamp is not None and stamp.frame_number == number
                outcome.delivered.append(number)
                if frame.keyframe:
                    outcome.keyframes.append(number)

    for index in range(frames):
        sim.at(sim.now + index / FPS, "frame", index)
    end = sim.now + frames / FPS + 1.0
    tick = sim.now
    while tick < end:
        sim.at(tick, "tick", None)
        tick += TICK_S
    while sim.events:
        sim.now, _, kind, data = heapq.heappop(sim.events)
        if kind == "frame":
            assert isinstance(data, int)
            if sender.take_keyframe_request():
                encoder.request_keyframe()
            capture_us = int((sim.now + WALL_OFFSET_S) * 1e6)
            for unit in encoder.encode(
                pattern.render(data, capture_us), pts=data * 3000, capture_us=capture_us
            ):
                sent_units[peer.streams[0].timestamp(unit.pts)] = (data, split_annexb(unit.data))
                sender.send(
                    0,
                    unit.data,
                    pts=unit.pts,
                    capture_us=capture_us,
                    keyframe=unit.keyframe,
                    now=sim.now,
                    wall_now=sim.now + WALL_OFFSET_S,
                )
        elif kind == "down":
            assert isinstance(data, tuple)
            flow: int = data[0]
            deliver(receiver.on_packet(flow, data[1], sim.now))
        elif kind == "up":
            sender.on_rtcp(connection, data, sim.now)  # type: ignore[arg-type]
        else:
            found, feedback = receiver.tick(sim.now, rtt_s=2 * ONE_WAY_S)
            deliver(found)
            for _, packet in feedback:
                if sim.up.passes():
                    sim.at(sim.now + ONE_WAY_S, "up", packet)
            sender.poll(sim.now, sim.now + WALL_OFFSET_S)
    video = receiver.tracks[VIDEO_TRACK.flow_id]
    outcome.plis = receiver.keyframe_requests
    outcome.nacks = video.buffer.nacks_sent
    outcome.recovered = video.buffer.packets_recovered
    outcome.decode_errors = decoder.decode_errors
    return outcome


def check_clean(outcome: Outcome) -> None:
    """Frames come in order; after any skipped frame the next one is a requested keyframe."""
    assert outcome.decode_errors == 0
    delivered = outcome.delivered
    assert delivered == sorted(set(delivered))
    assert delivered and delivered[0] == 0
    for previous, current in itertools.pairwise(delivered):
        if current != previous + 1:
            assert current in outcome.keyframes, f"resumed at {current} without a keyframe"
    if len(delivered) < outcome.frames:
        assert outcome.plis >= 1


def test_lossless_link_delivers_every_frame() -> None:
    outcome = simulate(lambda _: False, lambda _: False)
    assert outcome.delivered == list(range(300))
    assert outcome.nacks == 0 and outcome.plis == 0


@pytest.mark.parametrize(
    ("rate", "min_delivered"), [(0.01, 300), (0.05, 297), (0.20, 150)], ids=["1%", "5%", "20%"]
)
def test_random_loss_is_repaired_or_skipped_cleanly(rate: float, min_delivered: int) -> None:
    outcome = simulate(random_loss(rate, seed=11), random_loss(rate, seed=12))
    check_clean(outcome)
    assert outcome.nacks > 0 and outcome.recovered > 0
    assert len(outcome.delivered) >= min_delivered, outcome
    assert outcome.delivered[-1] >= 290  # the stream is alive at the end


def test_burst_loss_longer_than_the_budget_resumes_at_a_keyframe() -> None:
    # 60 datagrams in a row (about a second of this stream) plus a short burst: the long one
    # outlasts every retransmission, so the viewer must skip to a keyframe it asked for.
    outcome = simulate(burst_loss([(200, 60), (500, 5)]), burst_loss([(40, 10)]))
    check_clean(outcome)
    assert outcome.plis >= 1 and len(outcome.keyframes) >= 2
    assert outcome.delivered[-1] == 299


def test_feedback_lost_in_bursts_still_recovers() -> None:
    # About 0.8 s and 1.6 s without any feedback getting through: NACKs and PLIs are lost
    # too, so frames are skipped until a PLI gets through after each burst.
    outcome = simulate(random_loss(0.05, seed=5), burst_loss([(0, 5), (30, 20), (80, 40)]))
    check_clean(outcome)
    assert len(outcome.delivered) >= 200 and outcome.delivered[-1] == 299
