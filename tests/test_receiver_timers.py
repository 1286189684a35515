"""ReceiverSession's timer (aioquic's ``get_timer()`` contract) and immediate NACK / PLI.

Everything here runs on a fake clock with literal times: the session is told ``now``, says
when it next needs a tick (:meth:`ReceiverSession.next_deadline`), and a tick at that time does
the work it announced.  A gap is NACKed at the instant it is seen (RFC 4585 §3.2 lets feedback
go before the next regular report); a PLI leaves as soon as a frame is known lost, then at
most once per ``pli_interval_s`` while a keyframe is still wanted.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.rtp.h264 import H264PayloadFormat
from shared.rtp.jitter_buffer import JitterBuffer
from shared.rtp.opus import OpusPayloadFormat
from shared.rtp.packet import RtpPacket, with_transport_sequence
from shared.rtp.receiver import ReceiverSession
from shared.rtp.rtcp import (
    RtcpNack,
    RtcpPacket,
    RtcpPli,
    RtcpReceiverReport,
    RtcpSourceDescription,
    RtcpTransportFeedback,
    parse_rtcp_compound,
)
from shared.rtp.sender import AUDIO_TRACK, VIDEO_TRACK
from tests.test_jitter_buffer import flat, stream

SETTINGS = settings(max_examples=100, derandomize=True, deadline=None)
OPUS = b"\xfc\xff\xfe"  # one 20 ms Opus frame (RFC 6716 code 0), as the jitter tests use


def session(
    *,
    latency_budget_s: float = 0.2,
    pli_interval_s: float = 0.3,
    feedback_interval_s: float = 0.05,
    report_interval_s: float = 0.5,
) -> ReceiverSession:
    return ReceiverSession(
        [(VIDEO_TRACK, H264PayloadFormat()), (AUDIO_TRACK, OpusPayloadFormat())],
        cname="ticket-1",
        latency_budget_s=latency_budget_s,
        pli_interval_s=pli_interval_s,
        feedback_interval_s=feedback_interval_s,
        report_interval_s=report_interval_s,
    )


def audio(seq: int, *, transport: int | None = None) -> bytes:
    packet = RtpPacket(
        payload_type=111, sequence_number=seq, timestamp=960 * seq, ssrc=7, payload=OPUS
    )
    if transport is not None:
        with_transport_sequence(packet, transport)
    return packet.serialize()


def rtcp(feedback: list[tuple[int, bytes]]) -> list[tuple[int, RtcpPacket]]:
    return [(flow, p) for flow, data in feedback for p in parse_rtcp_compound(data)]


def nacked(feedback: list[tuple[int, bytes]]) -> list[int]:
    return [s for _, p in rtcp(feedback) if isinstance(p, RtcpNack) for s in p.sequences()]


def plis(feedback: list[tuple[int, bytes]]) -> int:
    return sum(isinstance(p, RtcpPli) for _, p in rtcp(feedback))


def test_no_traffic_no_timer() -> None:
    assert session().next_deadline() is None


def test_a_gap_makes_the_deadline_now_and_that_tick_nacks_it() -> None:
    receiver = session()
    for seq in (1, 2, 4):
        receiver.on_packet(AUDIO_TRACK.flow_id, audio(seq), 1.0)
    assert receiver.next_deadline() == 1.0
    _, feedback = receiver.tick(1.0)
    assert nacked(feedback) == [3]
    assert {flow for flow, p in rtcp(feedback) if isinstance(p, RtcpNack)} == {
        AUDIO_TRACK.rtcp_flow_id
    }
    # Nothing more is due at 1.0: the retry waits for the 10 ms floor (no RTT known yet).
    deadline = receiver.next_deadline()
    assert deadline is not None and deadline > 1.0
    assert deadline == 1.0 + 0.01
    assert receiver.tick(1.005) == ([], [])


def test_a_gap_filled_before_the_tick_is_never_nacked() -> None:
    receiver = session()
    for seq in (1, 2, 4, 3):  # 3 was overtaken, and is already here when the shell ticks
        receiver.on_packet(AUDIO_TRACK.flow_id, audio(seq), 1.0)
    _, feedback = receiver.tick(1.0)
    assert nacked(feedback) == []
    assert receiver.tracks[AUDIO_TRACK.flow_id].buffer.nacks_sent == 0


def test_in_order_traffic_only_schedules_the_reports() -> None:
    receiver = session()
    for seq in (1, 2, 3):
        receiver.on_packet(AUDIO_TRACK.flow_id, audio(seq), 1.0)
    assert receiver.next_deadline() == 1.0  # the first receiver report: a source appeared
    _, feedback = receiver.tick(1.0)
    # A compound RR carries the viewer's CNAME (RFC 3550 §6.1): the ticket it connected with.
    assert [type(p) for _, p in rtcp(feedback)] == [RtcpReceiverReport, RtcpSourceDescription]
    sdes = rtcp(feedback)[1][1]
    assert isinstance(sdes, RtcpSourceDescription)
    assert sdes.cname_of(receiver.ssrc) == "ticket-1"
    assert receiver.next_deadline() == 1.5  # report_interval_s later, and nothing sooner
    receiver.on_packet(AUDIO_TRACK.flow_id, audio(4), 1.2)
    assert receiver.next_deadline() == 1.5
    assert receiver.tick(1.2) == ([], [])


def test_nacks_repeat_a_round_trip_apart_until_a_resend_could_no_longer_arrive() -> None:
    receiver = session(latency_budget_s=0.2)
    for seq in (1, 2, 4):
        receiver.on_packet(AUDIO_TRACK.flow_id, audio(seq), 1.0)
    times: list[float] = []
    while (deadline := receiver.next_deadline()) is not None and deadline < 1.5:
        _, feedback = receiver.tick(deadline, rtt_s=0.05)
        assert nacked(feedback) in ([], [3])
        times += [deadline] * bool(nacked(feedback))
    # At once, then every 1.5 RTT (75 ms) while a resend, 25 ms away, can still arrive before
    # the budget ends at 1.2: at 1.0, 1.075 and 1.15, not at 1.225.
    assert times == [1.0, 1.0 + 0.075, 1.0 + 0.075 + 0.075]
    buffer = receiver.tracks[AUDIO_TRACK.flow_id].buffer
    assert buffer.packets_given_up == 1 and buffer.missing == 0


def test_a_late_tick_past_the_last_useful_nack_stops_the_nack_timer() -> None:
    buffer = JitterBuffer(OpusPayloadFormat(), latency_budget_s=0.2)
    buffer.rtt_s = 0.04
    for seq in (1, 2, 4):
        buffer.push(
            RtpPacket(payload_type=111, sequence_number=seq, timestamp=seq, ssrc=1, payload=OPUS),
            0.0,
        )
    assert buffer.next_deadline() == 0.0 and buffer.nacks(0.0) == [3]
    assert buffer.next_deadline() == 0.06
    # Woken late (the loop stalled): a resend asked for now would land past the budget.
    assert buffer.nacks(0.19) == []
    assert buffer.next_deadline() == 0.2  # only the give-up is left, not a retry in the past
    assert buffer.poll(0.2) != [] and buffer.next_deadline() is None


def test_no_nack_timer_for_a_resend_that_could_never_arrive() -> None:
    buffer = JitterBuffer(OpusPayloadFormat(), latency_budget_s=0.1)
    buffer.rtt_s = 0.5
    for seq in (1, 3):
        buffer.push(
            RtpPacket(payload_type=111, sequence_number=seq, timestamp=seq, ssrc=1, payload=OPUS),
            2.0,
        )
    assert buffer.next_deadline() == 2.1  # the give-up only


def test_a_pli_leaves_the_moment_a_frame_is_lost_then_at_most_every_interval() -> None:
    receiver = session(latency_budget_s=0.2, pli_interval_s=0.3)
    frames = stream("IPPPIP")
    lost = frames[1].pop(1)  # frame 1 never completes: frames 2 and 3 depend on it
    for packet in flat(frames[:4]):
        receiver.on_packet(VIDEO_TRACK.flow_id, packet.serialize(), 1.0)
    assert receiver.next_deadline() == 1.0
    _, feedback = receiver.tick(1.0)
    assert nacked(feedback) == [lost.sequence_number] and plis(feedback) == 0
    now, pli_at = 1.0, None
    while pli_at is None:
        deadline = receiver.next_deadline()
        assert deadline is not None and deadline > now
        now = deadline
        _, feedback = receiver.tick(now)
        if plis(feedback):
            pli_at = now
    assert pli_at == 1.0 + 0.2  # given up at the end of the budget, asked for in that tick
    assert receiver.tracks[VIDEO_TRACK.flow_id].buffer.keyframe_needed
    # Still needed: again pli_interval_s later, not before.
    assert receiver.next_deadline() == 1.2 + 0.3
    assert plis(receiver.tick(1.4)[1]) == 0
    assert plis(receiver.tick(1.5)[1]) == 1
    # The keyframe arrives: no PLI timer is left.
    released = []
    for packet in flat(frames[4:]):
        released += receiver.on_packet(VIDEO_TRACK.flow_id, packet.serialize(), 1.6)
    assert [frame.keyframe for _, frame in released] == [True, False]
    receiver.tick(1.6)
    deadline = receiver.next_deadline()
    assert deadline == 2.0  # the next receiver report
    assert plis(receiver.tick(2.0)[1]) == 0 and receiver.keyframe_requests == 2


def test_joining_mid_gop_asks_for_a_keyframe_on_the_packet_that_shows_it() -> None:
    receiver = session(pli_interval_s=0.3)
    packets = flat(stream("IPP"))[2:]  # the keyframe's first packets never came
    for packet in packets:
        receiver.on_packet(VIDEO_TRACK.flow_id, packet.serialize(), 3.0)
    assert receiver.tracks[VIDEO_TRACK.flow_id].buffer.keyframe_needed
    assert receiver.next_deadline() == 3.0
    assert plis(receiver.tick(3.0)[1]) == 1


def test_a_keyframe_the_shell_asks_for_is_requested_until_one_is_released() -> None:
    receiver = session(pli_interval_s=0.3)
    frames = stream("IPPI")
    for packet in flat(frames[:3]):
        receiver.on_packet(VIDEO_TRACK.flow_id, packet.serialize(), 1.0)
    receiver.tick(1.0)
    assert receiver.next_deadline() == 1.5
    receiver.request_keyframe(VIDEO_TRACK.flow_id, 1.1)  # the decoder skipped ahead
    assert receiver.next_deadline() == 1.1
    assert plis(receiver.tick(1.1)[1]) == 1
    assert receiver.next_deadline() == 1.1 + 0.3
    for packet in frames[3]:
        receiver.on_packet(VIDEO_TRACK.flow_id, packet.serialize(), 1.2)
    assert receiver.next_deadline() == 1.5  # the report only: the keyframe ended the request


def test_transport_feedback_waits_for_packets_and_keeps_its_interval() -> None:
    receiver = session(feedback_interval_s=0.05, report_interval_s=10.0)
    receiver.on_packet(AUDIO_TRACK.flow_id, audio(1, transport=1), 1.0)
    assert receiver.next_deadline() == 1.0
    _, feedback = receiver.tick(1.0)
    assert sum(isinstance(p, RtcpTransportFeedback) for _, p in rtcp(feedback)) == 1
    assert receiver.next_deadline() == 11.0  # nothing to report on: only the next RR
    receiver.on_packet(AUDIO_TRACK.flow_id, audio(2, transport=2), 1.01)
    assert receiver.next_deadline() == 1.0 + 0.05  # held to the interval, not sent at once
    assert receiver.tick(1.02) == ([], [])
    _, feedback = receiver.tick(1.05)
    assert sum(isinstance(p, RtcpTransportFeedback) for _, p in rtcp(feedback)) == 1


@SETTINGS
@given(
    st.integers(0, 2**32 - 1),
    st.floats(0.0, 0.3),
    st.floats(0.0, 0.3),
    st.sampled_from([0.0, 0.02, 0.1]),
)
def test_a_shell_that_ticks_at_each_deadline_never_finds_it_due_again(
    seed: int, loss: float, reorder: float, rtt_s: float
) -> None:
    """Driven as the viewer drives it (every packet in, then a tick whenever the deadline has
    come, else a wait until it), with loss, reordering and retransmissions: after tick(now) the
    deadline always lies after now, and every gap is NACKed at the instant it was seen."""
    rng = random.Random(seed)
    receiver = session(latency_budget_s=0.2)
    kinds = "".join("I" if i % 10 == 0 else "P" for i in range(40))
    packets = flat(stream(kinds, first_seq=rng.randrange(65536)))
    arrivals = sorted(
        (1.0 + index / 300 + (rng.random() * 0.05 if rng.random() < reorder else 0.0), index)
        for index in range(len(packets))
        if rng.random() >= loss
    )
    queue = [(when, index) for when, index in arrivals]
    arrived: set[int] = set()
    seen_missing: dict[int, float] = {}  # index -> when a later packet showed it missing
    first_nack: dict[int, float] = {}
    index_of = {p.sequence_number: index for index, p in enumerate(packets)}
    now, ticks = 1.0, 0
    while queue or receiver.next_deadline() is not None:
        deadline = receiver.next_deadline()
        if queue and (deadline is None or queue[0][0] <= deadline):
            now = max(now, queue[0][0])
            while queue and queue[0][0] <= now:  # every packet already here, then the tick
                index = queue.pop(0)[1]
                receiver.on_packet(VIDEO_TRACK.flow_id, packets[index].serialize(), now)
                arrived.add(index)
                for earlier in range(index):
                    if earlier not in arrived:
                        seen_missing.setdefault(earlier, now)
            continue
        assert deadline is not None
        if deadline > 3.0:
            break  # only the receiver reports (and perhaps a PLI) are left
        now = max(now, deadline)
        _, feedback = receiver.tick(now, rtt_s)
        ticks += 1
        after = receiver.next_deadline()
        assert after is None or after > now
        for seq in nacked(feedback):
            index = index_of[seq]
            first_nack.setdefault(index, now)
            queue.append((now + rtt_s, index))  # the sender resends; it lands a RTT later
            queue.sort()
    assert ticks < 2000
    for index, when in first_nack.items():
        assert when == seen_missing[index]
