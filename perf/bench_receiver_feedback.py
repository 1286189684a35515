"""Repair latency when the viewer ticks at its session's deadline vs on a 20 ms poll.

The sender and viewer cores (:class:`BroadcastSender`, :class:`ReceiverSession`) are wired
together on a virtual clock with a fixed one-way delay; the downlink loses RTP packets.  The
baseline is the viewer's former shell, which ticked the session every 20 ms, so a NACK left
0-20 ms after its gap was seen; the measured run is the shell now, which ticks when
:meth:`ReceiverSession.next_deadline` comes (at once after a gap).  Both runs see the same
frames and lose the same packets: whether a datagram is lost is drawn from a generator seeded
by its sequence number and how often it was sent, not by its place in the run.

Reported per run: capture-to-release latency (a frame leaving the jitter buffer, before any
decoding) over all frames and over the frames a retransmission completed, and the ratio of the
measured run's figures to the baseline's.  No sockets, no codec: the figures are the protocol's
alone.

Usage: python -m perf.bench_receiver_feedback [--seconds S] [--loss P] [--delay MS] [--json]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
from collections.abc import Callable, Sequence
from typing import Any

from perf._report import emit, percentiles_ms
from shared.rtp.h264 import H264PayloadFormat
from shared.rtp.packet import RtpPacket
from shared.rtp.receiver import ReceiverSession
from shared.rtp.sender import VIDEO_TRACK, BroadcastSender

FPS = 30
POLL_S = 0.02  # the former shell's TICK_S
WALL_OFFSET_S = 1_700_000_000.0
SPS, PPS = b"\x67\x42\x00\x1f\xab", b"\x68\xce\x38\x80"


def access_unit(index: int, rng: random.Random) -> tuple[bytes, bool]:
    """A synthetic H.264 access unit (the jitter buffer only reads NAL types): an IDR with its
    parameter sets every two seconds, P slices of a few kilobytes between."""
    if index % (2 * FPS) == 0:
        units = [SPS, PPS, b"\x65" + rng.randbytes(30_000)]
    else:
        units = [b"\x41" + rng.randbytes(rng.randrange(2_000, 6_000))]
    return b"".join(b"\x00\x00\x00\x01" + unit for unit in units), len(units) > 1


class Link:
    """Loses an RTP packet by a draw seeded with (sequence number, times sent)."""

    def __init__(self, loss: float, seed: int) -> None:
        self.loss, self.seed = loss, seed
        self._sent: dict[int, int] = {}

    def passes(self, flow_id: int, data: bytes) -> bool:
        if flow_id != VIDEO_TRACK.flow_id:
            return True  # SRs pass: the run is about repairing media
        sequence = RtpPacket.parse(data).sequence_number
        attempt = self._sent[sequence] = self._sent.get(sequence, 0) + 1
        return random.Random(f"{self.seed}:{sequence}:{attempt}").random() >= self.loss


class Connection:
    """What the sender sees of the viewer: datagrams onto the simulated downlink."""

    def __init__(self, deliver: Callable[[int, bytes], None]) -> None:
        self.deliver = deliver
        self.backlog = 0
        self.transport_rtt_s = 0.0

    def send_media(
        self, flow_id: int, packets: Sequence[bytes], *, keyframe: bool, urgent: bool = False
    ) -> None:
        for packet in packets:
            self.deliver(flow_id, packet)

    def send_rtcp(self, flow_id: int, packet: bytes) -> None:
        self.deliver(flow_id, packet)


def simulate(*, at_deadline: bool, seconds: float, loss: float, one_way_s: float) -> dict[str, Any]:
    now = 100.0
    events: list[tuple[float, int, str, Any]] = []
    order = itertools.count()

    def at(when: float, kind: str, data: Any = None) -> None:
        heapq.heappush(events, (when, next(order), kind, data))

    link = Link(loss, seed=11)

    def down(flow_id: int, packet: bytes) -> None:
        if link.passes(flow_id, packet):
            at(now + one_way_s, "down", (flow_id, packet))

    connection = Connection(down)
    connection.transport_rtt_s = 2 * one_way_s
    sender = BroadcastSender([VIDEO_TRACK], initial_bps=2_000_000, rng=random.Random(3))
    peer = sender.add(connection, now)
    receiver = ReceiverSession([(VIDEO_TRACK, H264PayloadFormat())], latency_budget_s=0.25)
    captured: dict[int, float] = {}  # RTP timestamp -> capture time
    latencies: list[int] = []
    repaired: list[int] = []
    rng = random.Random(5)
    frames = int(seconds * FPS)
    for index in range(frames):
        at(now + index / FPS, "frame", index)
    end = now + seconds + 1.0
    if not at_deadline:
        for step in range(int((end - now) / POLL_S)):
            at(now + step * POLL_S, "tick")

    def tick() -> None:
        released, feedback = receiver.tick(now, 2 * one_way_s)
        release(released)
        for _, packet in feedback:
            at(now + one_way_s, "up", packet)

    def release(found: list[Any]) -> None:
        for _, frame in found:
            latency = int((now - captured[frame.rtp_timestamp]) * 1e9)
            latencies.append(latency)
            if frame.recovered:
                repaired.append(latency)

    armed: list[float | None] = [None]

    def service() -> None:
        """The shell now: tick while the deadline has come, else arm one timer for it."""
        while (deadline := receiver.next_deadline()) is not None and deadline <= now:
            tick()
        if deadline is not None and deadline != armed[0]:
            armed[0] = deadline
            at(deadline, "timer")

    while events and events[0][0] <= end:
        now, _, kind, data = heapq.heappop(events)
        if kind == "frame":
            unit, keyframe = access_unit(data, rng)
            captured[peer.streams[0].timestamp(data * 3000)] = now
            sender.send(
                0,
                unit,
                pts=data * 3000,
                capture_us=int((now + WALL_OFFSET_S) * 1e6),
                keyframe=keyframe,
                now=now,
                wall_now=now + WALL_OFFSET_S,
            )
            sender.poll(now, now + WALL_OFFSET_S)
            continue
        if kind == "down":
            release(receiver.on_packet(data[0], data[1], now))
        elif kind == "up":
            sender.on_rtcp(connection, data, now)
        elif kind == "tick":
            tick()
        if at_deadline and kind in ("down", "timer"):
            service()
    buffer = receiver.tracks[VIDEO_TRACK.flow_id].buffer
    return {
        "frames": percentiles_ms(latencies),
        "repaired_frames": percentiles_ms(repaired) if repaired else None,
        "frames_released": len(latencies),
        "frames_repaired": len(repaired),
        "nacks_sent": buffer.nacks_sent,
        "keyframe_requests": receiver.keyframe_requests,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--loss", type=float, default=0.02, help="downlink loss, 0..1")
    parser.add_argument("--delay", type=float, default=20.0, help="one-way delay in ms")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    options = {"seconds": args.seconds, "loss": args.loss, "one_way_s": args.delay / 1000}
    polled = simulate(at_deadline=False, **options)
    timed = simulate(at_deadline=True, **options)
    ratios = {
        f"ratio_{group}_{stat}": round(timed[group][stat] / polled[group][stat], 3)
        for group in ("frames", "repaired_frames")
        for stat in ("p50_ms", "p99_ms", "mean_ms")
        if polled[group] and timed[group]
    }
    emit(
        "receiver_feedback_timing",
        {**vars(args), "baseline_poll_20ms": polled, "next_deadline": timed, **ratios},
        as_json=args.json,
    )


if __name__ == "__main__":
    main()
