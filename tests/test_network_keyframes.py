"""The sender's keyframe and staleness decisions (shared.rtp.keyframes), on literal times."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from shared.errors import ConfigError
from shared.pool.packet_ring import RingPacket
from shared.rtp.keyframes import AdmissionState, KeyframePolicy, VideoAdmission
from shared.rtp.rtcp import RtcpPli
from shared.rtp.sender import VIDEO_TRACK, BroadcastSender


def frames(capture_ms: Sequence[int], keyframes: Sequence[int] = ()) -> list[RingPacket]:
    """Ring packets captured at these milliseconds; ``keyframes`` are indexes."""
    return [
        RingPacket(
            sequence=index,
            pts=index * 3000,
            capture_us=ms * 1000,
            monotonic_us=ms * 1000,
            keyframe=index in keyframes,
            duration=3000,
            data=b"",
        )
        for index, ms in enumerate(capture_ms)
    ]


# -- KeyframePolicy.select: staleness -----------------------------------------------------


def test_a_batch_within_the_stale_span_is_sent_whole() -> None:
    policy = KeyframePolicy()
    batch = frames([0, 100, 250], keyframes=[2])  # 250 ms apart: not stale yet
    assert policy.select(batch, missed=0, video=True) == batch
    assert policy.frames_missed == 0


def test_a_stale_batch_starts_at_its_newest_keyframe() -> None:
    policy = KeyframePolicy()
    batch = frames([0, 33, 66, 100, 133, 166, 200, 233, 266, 300], keyframes=[0, 3, 6])
    assert [p.sequence for p in policy.select(batch, missed=0, video=True)] == [6, 7, 8, 9]
    assert policy.frames_missed == 6
    assert policy.requests_received == 0  # it resumed at a keyframe: nothing to ask for


def test_a_stale_batch_without_a_later_keyframe_is_sent_whole() -> None:
    policy = KeyframePolicy()
    batch = frames([0, 100, 200, 300], keyframes=[0])
    assert policy.select(batch, missed=0, video=True) == batch
    assert policy.frames_missed == 0


def test_audio_is_never_cut_but_its_losses_are_counted() -> None:
    policy = KeyframePolicy()
    batch = frames([0, 100, 200, 300, 400])  # stale, no keyframes: audio packets stand alone
    assert policy.select(batch, missed=3, video=False) == batch
    assert policy.select([], missed=2, video=False) == []
    assert policy.frames_missed == 5
    assert policy.requests_received == 0


def test_a_lapped_reader_with_nothing_to_resume_at_asks_for_a_keyframe() -> None:
    policy = KeyframePolicy()
    assert policy.select([], missed=40, video=True) == []
    assert policy.frames_missed == 40
    assert policy.poll(5.0)  # forwarded to the encoder
    # Lapped but resumed at a keyframe in the same batch: no request.
    resumed = frames([1000, 1033], keyframes=[0])
    assert policy.select(resumed, missed=7, video=True) == resumed
    assert policy.next_deadline() is None and not policy.poll(9.0)


# -- KeyframePolicy: the request throttle ----------------------------------------------------


def test_requests_are_forwarded_at_most_once_per_interval() -> None:
    policy = KeyframePolicy(request_interval_s=0.25)
    assert policy.next_deadline() is None and not policy.poll(1.0)  # nothing asked
    policy.request()
    assert policy.poll(1.0)  # the first goes at once
    assert policy.next_deadline() is None
    policy.request()
    policy.request()  # two PLIs inside the interval: one keyframe covers both
    assert policy.next_deadline() == 1.25
    assert not policy.poll(1.1)
    assert not policy.poll(1.2499)
    assert policy.poll(1.25)
    assert not policy.poll(1.3)  # coalesced: nothing left
    assert policy.requests_received == 3 and policy.requests_forwarded == 2


def test_a_request_after_a_quiet_spell_goes_at_once() -> None:
    policy = KeyframePolicy(request_interval_s=0.25)
    policy.request()
    assert policy.poll(1.0)
    policy.request()
    assert policy.next_deadline() == 1.25
    assert policy.poll(7.0)  # long after the interval: no extra wait
    assert policy.requests_forwarded == 2


def test_policy_limits_are_checked() -> None:
    with pytest.raises(ConfigError):
        KeyframePolicy(request_interval_s=-1.0)
    with pytest.raises(ConfigError):
        KeyframePolicy(stale_batch_us=0)
    with pytest.raises(ConfigError):
        VideoAdmission(max_backlog=0)


# -- VideoAdmission: which frames one viewer is sent ------------------------------------------


def state(admission: VideoAdmission) -> AdmissionState:
    return admission.state  # read through a call: each check sees the state anew


def test_a_joining_viewer_waits_for_a_keyframe_uncounted() -> None:
    admission = VideoAdmission(max_backlog=100)
    assert not admission.admit(keyframe=False, backlog=0)
    assert not admission.admit(keyframe=False, backlog=0)
    assert state(admission) is AdmissionState.JOINING
    assert admission.admit(keyframe=True, backlog=0)
    assert admission.admit(keyframe=False, backlog=100)  # at the limit, not past it
    assert state(admission) is AdmissionState.SENDING
    assert admission.frames_skipped == 0
    assert not admission.take_keyframe_wanted()  # joining is asked for on connect


def test_a_congested_viewer_drains_then_resumes_at_a_keyframe_it_asks_for() -> None:
    admission = VideoAdmission(max_backlog=100)
    assert admission.admit(keyframe=True, backlog=0)
    assert not admission.admit(keyframe=False, backlog=101)  # past the limit
    assert state(admission) is AdmissionState.DRAINING
    assert not admission.admit(keyframe=True, backlog=51)  # a keyframe, but still queued up
    assert not admission.take_keyframe_wanted()  # asking now would be wasted
    assert not admission.admit(keyframe=False, backlog=50)  # drained: only a keyframe is missing
    assert state(admission) is AdmissionState.RESUMING
    assert admission.take_keyframe_wanted()
    assert not admission.admit(keyframe=False, backlog=10)
    assert not admission.take_keyframe_wanted()  # asked once per episode
    assert admission.admit(keyframe=True, backlog=10)
    assert state(admission) is AdmissionState.SENDING
    assert admission.frames_skipped == 4


def test_a_resuming_viewer_that_congests_again_asks_again() -> None:
    admission = VideoAdmission(max_backlog=100)
    admission.admit(keyframe=True, backlog=0)
    admission.admit(keyframe=False, backlog=200)
    admission.admit(keyframe=False, backlog=0)
    assert admission.take_keyframe_wanted()
    assert not admission.admit(keyframe=True, backlog=80)  # queue rose past half again
    assert state(admission) is AdmissionState.DRAINING
    assert not admission.admit(keyframe=False, backlog=0)
    assert admission.take_keyframe_wanted()
    # A keyframe that comes while draining, once drained, is sent without asking.
    admission.admit(keyframe=True, backlog=0)
    admission.admit(keyframe=False, backlog=500)
    assert admission.admit(keyframe=True, backlog=0)
    assert not admission.take_keyframe_wanted()


# -- where the requests come from -------------------------------------------------------------


class QueueingConnection:
    """A MediaConnection whose send queue the test sets (``backlog``)."""

    def __init__(self) -> None:
        self.backlog = 0
        self.transport_rtt_s = 0.02
        self.media: list[tuple[int, int]] = []

    def send_media(
        self, flow_id: int, packets: Sequence[bytes], *, keyframe: bool, urgent: bool = False
    ) -> None:
        self.media.append((flow_id, len(packets)))

    def send_rtcp(self, flow_id: int, packet: bytes) -> None:
        pass


def test_join_pli_and_resume_become_keyframe_requests() -> None:
    sender = BroadcastSender([VIDEO_TRACK], initial_bps=1_000_000, rng=random.Random(1))
    assert not sender.take_keyframe_request()
    connection = QueueingConnection()
    peer = sender.add(connection, 1.0)
    assert sender.take_keyframe_request()  # a newcomer starts on a fresh IDR
    assert not sender.take_keyframe_request()

    def send(keyframe: bool, now: float) -> None:
        data = b"\x00\x00\x00\x01" + (b"\x65" if keyframe else b"\x41") + bytes(500)
        pts, wall_now = int(now * 90_000), 1_700_000_000.0 + now
        sender.send(0, data, pts=pts, capture_us=0, keyframe=keyframe, now=now, wall_now=wall_now)

    send(True, 1.0)
    assert connection.media and not sender.take_keyframe_request()
    # A PLI for another SSRC asks for nothing; one for this viewer's video does.
    stranger = RtcpPli(sender_ssrc=9, media_ssrc=peer.streams[0].ssrc ^ 1).serialize()
    sender.on_rtcp(connection, stranger, 1.1)
    assert not sender.take_keyframe_request()
    sender.on_rtcp(
        connection, RtcpPli(sender_ssrc=9, media_ssrc=peer.streams[0].ssrc).serialize(), 1.2
    )
    assert sender.take_keyframe_request()
    # Congestion: frames are dropped; once the queue drains, the viewer wants a keyframe.
    connection.backlog = 5000
    sent = len(connection.media)
    send(False, 1.3)
    assert not sender.take_keyframe_request()
    connection.backlog = 0
    send(False, 1.4)
    assert sender.take_keyframe_request()
    assert len(connection.media) == sent  # nothing went out while it waited
    send(True, 1.5)
    assert len(connection.media) == sent + 1
    assert peer.feedback.frames_skipped == 2
