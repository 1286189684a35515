"""RecordingCore: every recording decision, with literal times and no files.

Video is 30 fps (a frame every 33_333 us).  Each packet carries two capture stamps, as the
capture actor gives them: ``capture_us`` on the wall clock (which a test may step, as NTP
does) and ``media_us`` on the monotonic clock, with a different origin so a swap shows;
``now`` is the shell's monotonic clock in seconds.
"""

from __future__ import annotations

import pytest

from shared.errors import ConfigError
from shared.models import MotionTriggerConfig, RecordingState
from shared.recording.core import (
    MOTION_INTERVAL_S,
    STOP_GRACE_S,
    CloseSegment,
    EnforceQuota,
    Failed,
    Finished,
    MeasureMotion,
    OpenSegment,
    RecordingCore,
    RecordingEvent,
    RecordingPlan,
    RequestKeyframe,
    RtpMediaClock,
    WriteAudio,
    WriteVideo,
)
from shared.recording.policy import FileLimits

FRAME_US = 33_333
#: Capture time of frame 0: wall-clock second 1000.
BASE_US = 1_000_000_000
#: Media time of frame 0: monotonic second 5 (the monotonic clock counts from boot).
MEDIA_BASE_US = 5_000_000
#: An NTP step of the wall clock.
HOUR_US = 3_600_000_000
FIRST = "/rec/talk.mp4"


def plan(**fields: object) -> RecordingPlan:
    return RecordingPlan(first_path=FIRST, framerate=30, **fields)  # type: ignore[arg-type]


def capture(frame: int) -> int:
    """Wall-clock capture stamp of frame ``frame`` (before any step of the wall clock)."""
    return BASE_US + frame * FRAME_US


def media(frame: int) -> int:
    """Media time (monotonic capture stamp) of frame ``frame``."""
    return MEDIA_BASE_US + frame * FRAME_US


def video(
    core: RecordingCore,
    frame: int,
    *,
    keyframe: bool = False,
    now: float = 0.0,
    wall_step_us: int = 0,
) -> list[RecordingEvent]:
    """Frame ``frame`` of the stream; its bytes name it, so tests can tell which was written.
    ``wall_step_us``: how far the wall clock has been stepped by then."""
    data = f"v{frame}".encode()
    return core.receive_video(
        data,
        capture_us=capture(frame) + wall_step_us,
        media_us=media(frame),
        keyframe=keyframe,
        now=now,
    )


def feed(
    core: RecordingCore,
    frames: range,
    *,
    gop: int = 30,
    keyframes: frozenset[int] = frozenset(),
    wall_step_us: int = 0,
) -> list[RecordingEvent]:
    """Frames in order; a keyframe every ``gop`` frames and at ``keyframes``."""
    events: list[RecordingEvent] = []
    for frame in frames:
        keyframe = frame % gop == 0 or frame in keyframes
        events += video(core, frame, keyframe=keyframe, wall_step_us=wall_step_us)
    return events


def written(events: list[RecordingEvent]) -> list[tuple[str, int]]:
    """(frame name, file time) of every video write, in order."""
    return [(e.data.decode(), e.file_us) for e in events if isinstance(e, WriteVideo)]


def started_core(**fields: object) -> RecordingCore:
    core = RecordingCore(plan(**fields), now=0.0)
    assert core.handle_timer(0.0) == [RequestKeyframe()]
    return core


# --- the start: a keyframe, always ------------------------------------------------------------


def test_a_recording_never_starts_on_a_p_frame() -> None:
    core = RecordingCore(plan(), now=5.0)
    assert core.next_deadline() == 5.0  # the start keyframe is asked for at once
    assert core.handle_timer(5.0) == [RequestKeyframe()]
    assert core.next_deadline() is None
    assert feed(core, range(1, 4), gop=1000) == []  # P-frames: no file yet
    assert not core.segment_open
    events = video(core, 4, keyframe=True)
    assert events == [OpenSegment(0, FIRST), WriteVideo(b"v4", 0, True)]
    assert video(core, 5) == [WriteVideo(b"v5", FRAME_US, False)]
    assert core.frames_written == 2 and core.segments == [FIRST]


def test_audio_is_written_only_into_a_file_opened_by_video() -> None:
    core = started_core()
    assert core.receive_audio(b"a0", media_us=media(0), now=0.0) == []  # no file yet
    video(core, 1, keyframe=True)
    # Captured before the keyframe that opened the file: it has no place in it.
    assert core.receive_audio(b"a-early", media_us=media(1) - 5_000, now=0.0) == []
    assert core.receive_audio(b"a1", media_us=media(1) + 20_000, now=0.0) == [
        WriteAudio(b"a1", 20_000)
    ]


# --- pause and resume -------------------------------------------------------------------------


def test_pause_and_resume_cut_the_pause_out_of_one_timeline() -> None:
    core = started_core()
    feed(core, range(30))  # 1 s: frames 0..29
    assert core.pause(now=1.0) == []
    paused = core.state  # a name of its own: mypy would keep core.state narrowed to PAUSED
    assert paused is RecordingState.PAUSED
    assert feed(core, range(30, 90)) == []  # 2 s paused: nothing written
    assert core.receive_audio(b"a", media_us=media(60), now=2.0) == []
    assert core.resume(now=3.0) == [RequestKeyframe()]  # the file continues at a keyframe
    assert core.state is RecordingState.RECORDING
    assert feed(core, range(90, 95), gop=1000) == []  # P-frames after the cut: not decodable
    events = video(core, 95, keyframe=True)
    # One frame after the last one before the pause, in the same file.
    assert written(events) == [("v95", 30 * FRAME_US)]
    assert not any(isinstance(e, (OpenSegment, CloseSegment)) for e in events)
    assert core.duration_us == 31 * FRAME_US
    assert core.segments == [FIRST]


# --- the wall clock steps (NTP) -----------------------------------------------------------------


def test_a_wall_clock_step_back_mid_recording_leaves_the_file_continuous() -> None:
    """The bug: file time was each packet's wall-clock stamp less the first one's, so once NTP
    stepped the clock back an hour every packet mapped before the file's start and was dropped,
    while the recording stayed Recording.  File time now comes from the media (monotonic) time.
    """
    core = started_core(limits=FileLimits(max_duration_s=10.0))
    events = feed(core, range(60))  # 2 s, keyframes at 0 and 30
    events += feed(core, range(60, 100), wall_step_us=-HOUR_US)  # keyframes at 60 and 90
    events += core.receive_audio(b"a100", media_us=media(100) + 5_000, now=3.3)
    events += feed(core, range(100, 120), wall_step_us=-HOUR_US)
    assert written(events) == [(f"v{i}", i * FRAME_US) for i in range(120)]  # none dropped
    assert [e for e in events if isinstance(e, WriteAudio)] == [
        WriteAudio(b"a100", 100 * FRAME_US + 5_000)
    ]
    assert events[0] == OpenSegment(0, FIRST)
    assert not any(isinstance(e, OpenSegment | CloseSegment | RequestKeyframe) for e in events[1:])
    assert core.frames_written == 120 and core.duration_us == 120 * FRAME_US
    assert core.state is RecordingState.RECORDING and core.segments == [FIRST]


def test_a_wall_clock_step_forward_mid_recording_neither_tears_a_gap_nor_rotates() -> None:
    """Before, an hour forward put an hour of nothing into the file, and the duration limit,
    reached at once, rotated the file at the next keyframe."""
    core = started_core(limits=FileLimits(max_duration_s=10.0))
    events = feed(core, range(60))
    events += feed(core, range(60, 100), wall_step_us=HOUR_US)
    events += core.receive_audio(b"a100", media_us=media(100) + 5_000, now=3.3)
    events += feed(core, range(100, 120), wall_step_us=HOUR_US)
    assert written(events) == [(f"v{i}", i * FRAME_US) for i in range(120)]
    assert [e for e in events if isinstance(e, WriteAudio)] == [
        WriteAudio(b"a100", 100 * FRAME_US + 5_000)
    ]
    assert events[0] == OpenSegment(0, FIRST)
    assert not any(isinstance(e, OpenSegment | CloseSegment | RequestKeyframe) for e in events[1:])
    assert core.duration_us == 120 * FRAME_US and core.segments == [FIRST]


def test_a_schedule_cuts_on_the_wall_clock_stamps_while_the_file_runs_on_media_time() -> None:
    # Scheduled from wall second 1001 to 1003 (frames 30 and 90 while the wall clock is true).
    core = scheduled_core(now=10.0, wall_now=999.0)
    assert core.handle_timer(11.9) == [RequestKeyframe()]
    # From frame 10 the wall clock is half a second (15 frames) behind: start_at is now the
    # stamp of frame 45, and the newest keyframe before it is frame 40.
    events = feed(core, range(10))
    events += feed(
        core, range(10, 60), gop=1000, keyframes=frozenset({40}), wall_step_us=-15 * FRAME_US
    )
    assert events[0] == OpenSegment(0, FIRST)
    assert written(events)[:6] == [(f"v{i}", (i - 40) * FRAME_US) for i in range(40, 46)]
    # From frame 60 it is half a second ahead: stop_at is the stamp of frame 75.
    events += feed(core, range(60, 81), gop=1000, wall_step_us=15 * FRAME_US)
    # The file itself runs on unbroken through both steps.
    assert written(events) == [(f"v{i}", (i - 40) * FRAME_US) for i in range(40, 75)]
    assert events[-2:] == [CloseSegment(0, FIRST), Finished()]
    assert core.state is RecordingState.STOPPED


# --- rotation ---------------------------------------------------------------------------------


def test_duration_rotation_asks_for_the_keyframe_early_enough_to_stay_within_the_limit() -> None:
    core = started_core(limits=FileLimits(max_duration_s=1.0))
    events = feed(core, range(27), gop=1000)
    assert RequestKeyframe() not in events
    # After frame 27 the file lasts 28 frames (0.93 s): within keyframe_lead_s (0.1 s) of 1 s.
    assert video(core, 27) == [WriteVideo(b"v27", 27 * FRAME_US, False), RequestKeyframe()]
    assert video(core, 28) == [WriteVideo(b"v28", 28 * FRAME_US, False)]  # asked once only
    events = video(core, 29, keyframe=True)  # the encoder's answer, two frames later
    assert events == [
        CloseSegment(0, FIRST),
        OpenSegment(1, "/rec/talk-001.mp4"),
        WriteVideo(b"v29", 0, True),
    ]
    assert core.segment_index == 1 and core.segments == [FIRST, "/rec/talk-001.mp4"]
    # The closed file held frames 0..28: 29 frames, 0.97 s, within the 1 s limit.


def test_rotation_waits_for_a_keyframe() -> None:
    core = started_core(limits=FileLimits(max_duration_s=1.0))
    events = feed(core, range(60), gop=1000)  # the keyframe asked for never comes
    assert not any(isinstance(e, CloseSegment) for e in events)
    assert written(events)[-1] == ("v59", 59 * FRAME_US)  # still the first file
    assert video(core, 60, keyframe=True)[0] == CloseSegment(0, FIRST)


def test_size_rotation_counts_what_the_muxer_reports() -> None:
    core = started_core(limits=FileLimits(max_bytes=100_000))
    feed(core, range(10), gop=1000)
    assert core.segment_size(99_999) == []
    assert core.segment_size(100_000) == [RequestKeyframe()]
    assert core.segment_size(120_000) == []  # already asked
    assert written(video(core, 10)) == [("v10", 10 * FRAME_US)]  # a P-frame cannot start a file
    events = video(core, 11, keyframe=True)
    assert events[:2] == [CloseSegment(0, FIRST), OpenSegment(1, "/rec/talk-001.mp4")]
    assert core.segment_size(500) == []  # a new file: counting starts over


def test_quota_is_enforced_after_each_closed_segment_keeping_it() -> None:
    core = started_core(limits=FileLimits(max_bytes=100_000), quota=True)
    feed(core, range(5), gop=1000)
    core.segment_size(100_000)
    events = video(core, 5, keyframe=True)
    assert events[:3] == [
        CloseSegment(0, FIRST),
        EnforceQuota(keep=FIRST),
        OpenSegment(1, "/rec/talk-001.mp4"),
    ]
    second = "/rec/talk-001.mp4"
    assert core.stop(now=9.0) == [CloseSegment(1, second), EnforceQuota(keep=second), Finished()]


def test_without_a_quota_nothing_is_deleted() -> None:
    core = started_core(limits=FileLimits(max_bytes=100_000))
    feed(core, range(5), gop=1000)
    core.segment_size(100_000)
    assert not any(isinstance(e, EnforceQuota) for e in video(core, 5, keyframe=True))


def test_a_failed_write_ends_the_recording_in_error() -> None:
    core = started_core(limits=FileLimits(max_duration_s=1.0), quota=True)
    feed(core, range(10))
    assert core.write_failed("disk full while writing /rec/talk.mp4") == [
        Failed("disk full while writing /rec/talk.mp4")
    ]
    assert core.state is RecordingState.ERROR and core.done
    assert core.error == "disk full while writing /rec/talk.mp4"
    assert feed(core, range(10, 70)) == []
    assert core.receive_audio(b"a", media_us=media(70), now=3.0) == []
    assert core.stop(now=3.0) == []  # nothing left to close: the shell closed what it could
    assert core.next_deadline() is None


# --- scheduled start and stop -----------------------------------------------------------------


def scheduled_core(*, now: float, wall_now: float, **fields: object) -> RecordingCore:
    """A recording scheduled from wall second 1001 (frame 30) to 1003 (frame 90)."""
    return RecordingCore(
        plan(start_at_us=capture(30), stop_at_us=capture(90), **fields), now=now, wall_now=wall_now
    )


def test_scheduled_start_asks_for_its_keyframe_just_before_the_start() -> None:
    # Made at wall second 999, monotonic 10.0: the start is 2 s away.
    core = scheduled_core(now=10.0, wall_now=999.0)
    assert core.next_deadline() == pytest.approx(11.9, abs=1e-4)  # keyframe_lead_s (0.1 s) before
    assert core.handle_timer(11.8) == []
    assert core.handle_timer(11.9) == [RequestKeyframe()]
    # The stream until then, periodic keyframe at frame 0; the answer is frame 28 (0.07 s early).
    assert feed(core, range(30), keyframes=frozenset({28})) == []
    events = video(core, 30)
    assert written(events) == [("v28", 0), ("v29", FRAME_US), ("v30", 2 * FRAME_US)]
    assert events[0] == OpenSegment(0, FIRST)


def test_a_recorder_that_opens_after_its_start_still_records_from_the_start() -> None:
    """The bug: a 2 s scheduled recording was 0.6 s short.  The recorder's process, spawned
    1 s ahead, opened 0.5 s after start_at; it read the ring from "next" and asked for a keyframe
    then, so the file began 0.55 s late.  Now it is given the ring from its newest keyframe and
    starts at the newest keyframe captured at or before start_at."""
    # Opened at wall second 1001.5 (frame 45), 0.5 s after the start.
    core = scheduled_core(now=50.0, wall_now=1001.5)
    assert core.handle_timer(50.0) == [RequestKeyframe()]  # overdue: at once
    # The ring, from its newest keyframe (frame 20, before the start) up to now, then live,
    # with the keyframe just asked for at frame 47.
    events = feed(core, range(20, 91), gop=1000, keyframes=frozenset({20, 47}))
    frames = written(events)
    assert frames[0] == ("v20", 0)  # before start_at (frame 30): the whole window is covered
    assert [name for name, _ in frames] == [f"v{i}" for i in range(20, 90)]
    assert events[-2:] == [CloseSegment(0, FIRST), Finished()]  # frame 90 is the stop


def test_audio_of_the_kept_gop_is_written_with_it() -> None:
    core = scheduled_core(now=10.0, wall_now=999.0)
    assert core.receive_audio(b"a-none", media_us=media(27), now=11.0) == []  # no GOP yet
    video(core, 28, keyframe=True)
    assert core.receive_audio(b"a28", media_us=media(28) + 10_000, now=11.9) == []  # kept
    events = video(core, 30)
    assert events[1:] == [
        WriteVideo(b"v28", 0, True),
        WriteAudio(b"a28", 10_000),
        WriteVideo(b"v30", 2 * FRAME_US, False),
    ]


def test_a_scheduled_start_without_an_earlier_keyframe_waits_for_the_next() -> None:
    core = scheduled_core(now=10.0, wall_now=999.0)
    assert feed(core, range(1, 32), gop=1000) == []  # no keyframe before the start in view
    assert written(video(core, 32, keyframe=True)) == [("v32", 0)]


def test_scheduled_stop_ends_with_the_last_frame_before_it() -> None:
    core = scheduled_core(now=10.0, wall_now=999.0)
    core.handle_timer(11.9)
    feed(core, range(30, 60), gop=30)
    # Monotonic 14.0 is wall second 1003: the stop.  The frames up to it are still on their way.
    assert core.next_deadline() == pytest.approx(14.0 + STOP_GRACE_S, abs=1e-4)
    assert not core.awaiting_scheduled_stop(13.9)
    assert core.awaiting_scheduled_stop(14.0)
    events = feed(core, range(60, 91), gop=30)
    assert written(events)[-1] == ("v89", 59 * FRAME_US)  # 60 frames: exactly 2 s
    assert events[-2:] == [CloseSegment(0, FIRST), Finished()]
    assert core.state is RecordingState.STOPPED and not core.awaiting_scheduled_stop(14.0)
    assert video(core, 91) == [] and core.next_deadline() is None


def test_a_stalled_stream_ends_a_scheduled_recording_at_its_deadline() -> None:
    core = scheduled_core(now=10.0, wall_now=999.0)
    core.handle_timer(11.9)
    feed(core, range(30, 60), gop=30)  # then nothing more arrives
    assert core.handle_timer(14.0 + STOP_GRACE_S - 0.01) == []
    assert core.handle_timer(14.0 + STOP_GRACE_S) == [CloseSegment(0, FIRST), Finished()]


def test_audio_past_the_stop_does_not_end_the_recording() -> None:
    core = scheduled_core(now=10.0, wall_now=999.0)
    feed(core, range(30, 60), gop=30)
    assert core.receive_audio(b"a", media_us=media(95), now=14.1) == [
        WriteAudio(b"a", 65 * FRAME_US)
    ]
    assert not core.done  # video before the stop may still be in its own ring


def test_a_schedule_needs_the_wall_clock_and_a_stop_after_the_start() -> None:
    with pytest.raises(ConfigError, match="wall_now"):
        RecordingCore(plan(start_at_us=capture(30)), now=0.0)
    with pytest.raises(ConfigError, match="stop after"):
        plan(start_at_us=capture(30), stop_at_us=capture(30))


# --- motion trigger and pre-roll --------------------------------------------------------------


def motion_core() -> RecordingCore:
    trigger = MotionTriggerConfig(threshold=5.0, pre_roll_s=1.0, hold_s=1.0)
    return RecordingCore(plan(trigger=trigger), now=0.0)


def test_motion_starts_a_file_with_its_pre_roll_from_a_keyframe() -> None:
    core = motion_core()
    assert core.next_deadline() == 0.0
    assert core.handle_timer(0.0) == [MeasureMotion()]  # no keyframe request: none is needed
    assert core.next_deadline() == MOTION_INTERVAL_S
    assert feed(core, range(90)) == []  # 3 s still: only kept, keyframes at 0, 30, 60
    assert core.observe_motion(0.5, media_us=media(89), now=3.0) == []
    events = core.observe_motion(20.0, media_us=media(89), now=3.2)
    frames = written(events)
    # At least pre_roll_s (1 s) before the motion, from a keyframe: frames 30..89.
    assert frames[0] == ("v30", 0) and frames[-1] == ("v89", 59 * FRAME_US)
    assert events[0] == OpenSegment(0, FIRST)
    assert written(video(core, 90)) == [("v90", 60 * FRAME_US)]


def test_motion_ending_closes_the_file_and_the_next_motion_opens_another() -> None:
    core = motion_core()
    feed(core, range(30))
    core.observe_motion(20.0, media_us=media(29), now=1.0)
    feed(core, range(30, 60))
    assert core.observe_motion(0.0, media_us=media(59), now=2.0) == []  # within hold_s
    assert core.observe_motion(0.0, media_us=media(60), now=2.1) == [CloseSegment(0, FIRST)]
    assert core.state is RecordingState.RECORDING  # armed again: the recording goes on
    assert feed(core, range(61, 120)) == []
    events = core.observe_motion(30.0, media_us=media(119), now=4.0)
    assert events[0] == OpenSegment(1, "/rec/talk-001.mp4")
    assert written(events)[0] == ("v90", 0)  # a new file, its own time from zero


def test_a_wall_clock_step_bends_neither_the_pre_roll_nor_its_file_time() -> None:
    core = motion_core()
    feed(core, range(45))
    feed(core, range(45, 90), wall_step_us=-HOUR_US)  # keyframes at 0, 30, 60
    events = core.observe_motion(20.0, media_us=media(89), now=3.2)
    # pre_roll_s (1 s) back from the motion, from a keyframe, on media time: frames 30..89.
    assert written(events) == [(f"v{i}", (i - 30) * FRAME_US) for i in range(30, 90)]


# --- the media clock for a viewer (kizuna-stream record) --------------------------------------


def test_rtp_clock_maps_90khz_ticks_and_extends_across_the_wrap() -> None:
    clock = RtpMediaClock(90_000)
    first = 2**32 - 3000
    assert clock.to_us(first) == 0
    assert clock.to_us(first + 3000 - 2**32) == 33_333  # 0: wrapped, 3000 ticks later
    assert clock.to_us(3000) == 66_666
    assert clock.to_us(1500) == 50_000  # a little earlier, not 2**32 ticks later
    assert clock.to_us(9000) == 133_333


def test_viewer_recording_takes_file_time_from_rtp_timestamps() -> None:
    core = RecordingCore(plan(), now=0.0)
    first = 2**32 - 6000
    events = core.receive_rtp_video(b"k", rtp_timestamp=first, keyframe=True, now=0.0)
    events += core.receive_rtp_video(b"p1", rtp_timestamp=first + 3000, keyframe=False, now=0.1)
    events += core.receive_rtp_video(b"p2", rtp_timestamp=0, keyframe=False, now=0.2)
    assert written(events) == [("k", 0), ("p1", 33_333), ("p2", 66_666)]


def test_a_viewer_recording_cannot_be_scheduled() -> None:
    """RTP time stands in for the wall-clock stamps, so it cannot be held against a schedule."""
    core = scheduled_core(now=10.0, wall_now=999.0)
    with pytest.raises(ConfigError, match="RTP time"):
        core.receive_rtp_video(b"k", rtp_timestamp=0, keyframe=True, now=10.0)
