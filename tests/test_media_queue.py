"""The age-bounded media queue of RoQ datagram mode, on a fake clock (literal times)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from shared.errors import ConfigError
from shared.roq.framing import AUDIO_FLOW_ID, VIDEO_FLOW_ID, encode_datagram
from shared.roq.media_queue import AUDIO, EXPIRED_MEMORY, VIDEO, MediaQueue
from shared.rtp.packet import RtpPacket
from shared.rtp.sender import VIDEO_TRACK, BroadcastSender

BUDGET = 0.3


def rtp(flow_id: int, sequence: int, size: int = 100) -> bytes:
    """A RoQ datagram carrying an RTP packet with ``sequence``."""
    packet = RtpPacket(
        payload_type=96, sequence_number=sequence, timestamp=0, ssrc=7, payload=bytes(size)
    )
    return encode_datagram(flow_id, packet.serialize())


class Frames:
    """Makes frames of numbered RTP packets: ``frame(2)`` is the next two sequence numbers."""

    def __init__(self, flow_id: int) -> None:
        self.flow_id, self.sequence = flow_id, 100

    def frame(self, packets: int) -> list[bytes]:
        out = [rtp(self.flow_id, self.sequence + i) for i in range(packets)]
        self.sequence += packets
        return out


def video(queue: MediaQueue, now: float, datagrams: Sequence[bytes], key: bool = False) -> bool:
    return queue.push(now, VIDEO_FLOW_ID, datagrams, keyframe=key, kind=VIDEO)


def audio(queue: MediaQueue, now: float, datagrams: Sequence[bytes]) -> bool:
    return queue.push(now, AUDIO_FLOW_ID, datagrams, keyframe=True, kind=AUDIO)


def test_media_leaves_in_order_in_parts_and_within_its_budget() -> None:
    queue = MediaQueue(BUDGET)
    v, a = Frames(VIDEO_FLOW_ID), Frames(AUDIO_FLOW_ID)
    first, second, sound = v.frame(3), v.frame(2), a.frame(1)
    video(queue, 1.0, first, key=True)
    audio(queue, 1.01, sound)
    video(queue, 1.02, second)
    assert len(queue) == 6 and queue.queued_bytes == sum(map(len, first + second + sound))
    assert queue.next_deadline() == pytest.approx(1.3)
    assert queue.pop(1.1, 2) == first[:2]  # a frame may leave in parts
    assert queue.next_deadline() == pytest.approx(1.3)  # its rest keeps the frame's deadline
    assert queue.pop(1.1, 10) == first[2:] + sound + second
    assert len(queue) == 0 and queue.queued_bytes == 0 and queue.next_deadline() is None
    assert queue.frames_expired == 0 and not queue.take_keyframe_needed()


def test_a_stale_video_frame_takes_the_p_frames_after_it_until_a_keyframe() -> None:
    queue = MediaQueue(BUDGET)
    v = Frames(VIDEO_FLOW_ID)
    i1, p1, p2, i2, p3 = v.frame(2), v.frame(1), v.frame(1), v.frame(2), v.frame(1)
    video(queue, 1.0, i1, key=True)
    video(queue, 1.2, p1)
    video(queue, 1.25, p2)
    video(queue, 1.28, i2, key=True)
    video(queue, 1.29, p3)
    assert queue.pop(1.29999, 0) == []  # age 0.29999: nothing is stale yet
    assert len(queue) == 7
    # At 1.3 the keyframe is 0.3 s old: it goes, and p1, p2 (fresh, but useless without it).
    assert queue.pop(1.3, 10) == i2 + p3
    assert queue.frames_expired == 3
    assert queue.bytes_expired == sum(map(len, i1 + p1 + p2))


def test_a_flow_waiting_for_a_keyframe_refuses_new_p_frames_and_asks_once_drained() -> None:
    queue = MediaQueue(BUDGET)
    v, a = Frames(VIDEO_FLOW_ID), Frames(AUDIO_FLOW_ID)
    video(queue, 0.0, v.frame(2), key=True)
    audio(queue, 0.1, a.frame(1))
    queue.expire(0.3)  # the keyframe is stale; the audio frame is not
    assert queue.frames_expired == 1
    # Audio still queued since 0.1 is 0.21 s old: more than half the budget, still congested.
    assert not video(queue, 0.31, v.frame(1))
    assert not queue.take_keyframe_needed()
    assert queue.pop(0.32, 10)  # the audio leaves: the queue has drained
    assert not video(queue, 0.33, v.frame(1))
    assert queue.take_keyframe_needed()
    assert not video(queue, 0.36, v.frame(1))
    assert not queue.take_keyframe_needed()  # once per gap
    assert queue.frames_expired == 4 and len(queue) == 0
    key = v.frame(3)
    assert video(queue, 0.4, key, key=True)  # the chain restarts
    after = v.frame(1)
    assert video(queue, 0.43, after)
    assert queue.pop(0.44, 10) == key + after


def test_a_gap_that_the_next_keyframe_closes_asks_for_nothing() -> None:
    queue = MediaQueue(BUDGET)
    v = Frames(VIDEO_FLOW_ID)
    video(queue, 0.0, v.frame(1))
    queue.expire(0.5)
    assert video(queue, 0.5, v.frame(2), key=True)
    assert not queue.take_keyframe_needed()


def test_a_video_frame_half_sent_when_its_deadline_comes_is_dropped_with_its_followers() -> None:
    queue = MediaQueue(BUDGET)
    v = Frames(VIDEO_FLOW_ID)
    big, p1 = v.frame(4), v.frame(1)
    video(queue, 0.0, big, key=True)
    video(queue, 0.1, p1)
    assert queue.pop(0.1, 1) == big[:1]
    assert queue.pop(0.3, 10) == []  # the rest of the keyframe is stale: p1 cannot decode
    assert queue.frames_expired == 2
    assert queue.bytes_expired == sum(map(len, big[1:] + p1))


def test_stale_audio_drops_alone() -> None:
    queue = MediaQueue(BUDGET)
    v, a = Frames(VIDEO_FLOW_ID), Frames(AUDIO_FLOW_ID)
    a1, a2, key, a3 = a.frame(1), a.frame(1), v.frame(1), a.frame(1)
    audio(queue, 0.0, a1)
    audio(queue, 0.1, a2)
    video(queue, 0.15, key, key=True)
    audio(queue, 0.2, a3)
    assert queue.pop(0.35, 10) == a2 + key + a3  # only a1 (0.35 s old) is stale
    assert queue.frames_expired == 1 and queue.bytes_expired == len(a1[0])
    assert audio(queue, 0.4, a.frame(1))
    assert video(queue, 0.4, v.frame(1))  # a lost audio frame breaks no video chain
    assert not queue.take_keyframe_needed()


def test_stale_audio_and_video_flows_are_independent() -> None:
    queue = MediaQueue(BUDGET)
    v, a = Frames(VIDEO_FLOW_ID), Frames(AUDIO_FLOW_ID)
    a1, key, a2, p1, a3 = a.frame(1), v.frame(2), a.frame(1), v.frame(1), a.frame(1)
    audio(queue, 0.0, a1)
    video(queue, 0.05, key, key=True)
    audio(queue, 0.1, a2)
    video(queue, 0.2, p1)
    audio(queue, 0.25, a3)
    # At 0.36 a1 and the keyframe are stale, p1 follows the keyframe; a2 is 0.26 s old.
    assert queue.pop(0.36, 10) == a2 + a3
    assert queue.frames_expired == 3
    assert not video(queue, 0.4, v.frame(1))  # video waits for a keyframe; audio never does
    assert audio(queue, 0.4, a.frame(1))


def test_deadlines_and_the_shell_timer() -> None:
    queue = MediaQueue(0.1)
    v = Frames(VIDEO_FLOW_ID)
    video(queue, 2.0, v.frame(1), key=True)
    video(queue, 2.05, v.frame(1))
    assert queue.next_deadline() == pytest.approx(2.1)
    queue.expire(queue.next_deadline() or 0)  # the shell's timer at the deadline drops it
    assert queue.next_deadline() is None and queue.frames_expired == 2
    # A clock that steps back never lets a later frame's deadline pass an earlier one's.
    video(queue, 3.0, v.frame(1), key=True)
    video(queue, 2.5, v.frame(1))
    assert queue.pop(3.0999, 10) and len(queue) == 0


def test_repairs_of_dropped_packets_and_of_a_broken_chain_are_refused() -> None:
    queue = MediaQueue(BUDGET)
    v, a = Frames(VIDEO_FLOW_ID), Frames(AUDIO_FLOW_ID)
    key, p1, sound = v.frame(2), v.frame(2), a.frame(1)
    video(queue, 0.0, key, key=True)
    audio(queue, 0.0, sound)
    sent = queue.pop(0.0, 1)  # key[0] leaves
    assert queue.repairs(VIDEO_FLOW_ID, sent) == sent  # a sent packet may be repaired
    queue.expire(0.3)  # the rest of the keyframe and the audio frame go stale
    # While the video flow waits for a keyframe, no repair on it is worth anything.
    assert queue.repairs(VIDEO_FLOW_ID, sent + key[1:]) == []
    assert queue.repairs(AUDIO_FLOW_ID, sound) == []  # dropped here: not resent either
    other = rtp(AUDIO_FLOW_ID, 5000)
    assert queue.repairs(AUDIO_FLOW_ID, [other]) == [other]
    assert queue.repairs_refused == 3
    video(queue, 0.4, v.frame(2), key=True)
    # The chain restarted: a repair of a packet sent before is fine again, a dropped one not.
    assert queue.repairs(VIDEO_FLOW_ID, sent + key[1:]) == sent
    assert queue.repairs(VIDEO_FLOW_ID, p1) == p1  # never queued here: nothing known against it
    assert queue.repairs_refused == 4


def test_dropped_sequence_numbers_are_remembered_within_a_bound() -> None:
    queue = MediaQueue(BUDGET)
    a = Frames(AUDIO_FLOW_ID)
    frames = [a.frame(1) for _ in range(EXPIRED_MEMORY + 10)]
    for frame in frames:
        audio(queue, 0.0, frame)
    queue.expire(1.0)
    assert queue.frames_expired == EXPIRED_MEMORY + 10
    assert queue.repairs(AUDIO_FLOW_ID, frames[0]) == frames[0]  # forgotten: the oldest
    assert queue.repairs(AUDIO_FLOW_ID, frames[-1]) == []


def test_non_rtp_datagrams_pass_through_without_a_sequence_number() -> None:
    queue = MediaQueue(BUDGET)
    odd = [encode_datagram(AUDIO_FLOW_ID, b"\x00not rtp"), encode_datagram(AUDIO_FLOW_ID, b"x")]
    audio(queue, 0.0, odd)
    queue.expire(1.0)
    assert queue.frames_expired == 1 and queue.repairs(AUDIO_FLOW_ID, odd) == odd


def test_a_random_workload_keeps_order_chains_and_the_budget() -> None:
    rng = random.Random(4)
    queue = MediaQueue(BUDGET)
    pushed_at: dict[bytes, float] = {}
    order: list[bytes] = []  # every datagram pushed, refused or not
    chain: list[tuple[bool, list[bytes]]] = []  # video frames: (keyframe, datagrams)
    out: list[bytes] = []
    now = 0.0
    for number in range(3000):
        now += rng.choice([0.0, 0.001, 0.01, 0.05])
        flow_id, kind = rng.choice([(VIDEO_FLOW_ID, VIDEO), (AUDIO_FLOW_ID, AUDIO)])
        datagrams = [rtp(flow_id, (number * 8 + i) & 0xFFFF) for i in range(rng.randint(1, 4))]
        keyframe = rng.random() < 0.1
        queue.push(now, flow_id, datagrams, keyframe=keyframe, kind=kind)
        pushed_at.update((datagram, now) for datagram in datagrams)
        order += datagrams
        if kind == VIDEO:
            chain.append((keyframe, datagrams))
        for datagram in queue.pop(now, rng.choice([0, 0, 1, 3])):
            assert now - pushed_at[datagram] < BUDGET  # nothing leaves stale
            out.append(datagram)
        deadline = queue.next_deadline()
        assert deadline is None or deadline > now
    out += queue.pop(now, len(order))  # what is still queued is fresh: all of it leaves
    assert len(queue) == 0 and queue.queued_bytes == 0
    # Order is kept, and every byte pushed either left or was counted as dropped.
    position = {datagram: index for index, datagram in enumerate(order)}
    assert [position[d] for d in out] == sorted(position[d] for d in out)
    assert sum(map(len, order)) == sum(map(len, out)) + queue.bytes_expired
    assert queue.frames_expired > 0
    # No P-frame left (even in part) unless every frame back to its keyframe left whole.
    sent = set(out)
    intact, gaps = False, 0  # intact: the chain so far decodes
    for keyframe, datagrams in chain:
        if any(d in sent for d in datagrams):
            assert keyframe or intact
        complete = all(d in sent for d in datagrams)
        gaps += not complete
        intact = complete and (keyframe or intact)
    assert gaps > 0


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="budget must be positive"):
        MediaQueue(0)
    with pytest.raises(ConfigError, match="track kind"):
        MediaQueue().push(0.0, 0, [b"\x00x"], keyframe=True, kind="subtitles")


class SignallingConnection:
    """A MediaConnection whose send queue dropped video (``take_keyframe_needed``)."""

    def __init__(self) -> None:
        self.backlog, self.transport_rtt_s = 0, 0.02
        self.needed = False

    def send_media(
        self, flow_id: int, packets: Sequence[bytes], *, keyframe: bool, urgent: bool = False
    ) -> None:
        pass

    def send_rtcp(self, flow_id: int, packet: bytes) -> None:
        pass

    def take_keyframe_needed(self) -> bool:
        needed, self.needed = self.needed, False
        return needed


def test_a_connection_that_dropped_video_makes_the_sender_ask_for_a_keyframe() -> None:
    sender = BroadcastSender([VIDEO_TRACK], initial_bps=1_000_000, rng=random.Random(1))
    connection = SignallingConnection()
    sender.add(connection, 1.0)
    assert sender.take_keyframe_request()  # the join

    def send(keyframe: bool, now: float) -> None:
        data = b"\x00\x00\x00\x01" + (b"\x65" if keyframe else b"\x41") + bytes(500)
        sender.send(0, data, pts=0, capture_us=0, keyframe=keyframe, now=now, wall_now=now)

    send(True, 1.0)
    send(False, 1.1)
    assert not sender.take_keyframe_request()
    connection.needed = True
    send(False, 1.2)
    assert sender.take_keyframe_request()
    send(False, 1.3)
    assert not sender.take_keyframe_request()
