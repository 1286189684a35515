"""Recording decisions and storage, with literal times and a real folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from shared.errors import ConfigError, RecordingError
from shared.recording.policy import (
    FileLimits,
    MotionDetector,
    MotionTrigger,
    PreRollBuffer,
    RecordingSchedule,
    ScheduleAction,
    ScheduledRecording,
    Timeline,
)
from shared.recording.storage import StorageManager, segment_path


def test_timeline_starts_at_zero_and_cuts_out_pauses() -> None:
    timeline = Timeline(resume_gap_us=33_333)
    assert timeline.needs_keyframe
    assert timeline.to_file_us(5_000_000) == 0
    assert timeline.to_file_us(5_033_333) == 33_333
    timeline.pause()
    assert timeline.to_file_us(6_000_000) is None
    timeline.resume()
    assert timeline.needs_keyframe  # a decoder needs a keyframe after the cut
    assert timeline.to_file_us(9_000_000) == 66_666  # 3 s of pause gone, one frame after the last
    assert timeline.to_file_us(9_033_333) == 99_999
    assert not timeline.needs_keyframe
    assert timeline.duration_us == 99_999 + 33_333


def test_resume_before_anything_was_written_starts_at_zero() -> None:
    timeline = Timeline(resume_gap_us=1000)
    timeline.pause()
    timeline.resume()
    assert timeline.to_file_us(123) == 0


def test_file_limits() -> None:
    limits = FileLimits(max_bytes=1_000_000, max_duration_s=10)
    assert not limits.reached(size_bytes=999_999, duration_us=9_999_999)
    assert limits.reached(size_bytes=1_000_000, duration_us=0)
    assert limits.reached(size_bytes=0, duration_us=10_000_000)
    assert not FileLimits().reached(size_bytes=10**12, duration_us=10**12)
    with pytest.raises(ConfigError):
        FileLimits(max_bytes=10)
    with pytest.raises(ConfigError):
        FileLimits(max_duration_s=0.1)


@dataclass(frozen=True)
class Packet:
    media_us: int
    keyframe: bool


def test_pre_roll_keeps_the_span_from_a_keyframe() -> None:
    buffer = PreRollBuffer(seconds=2.0)
    buffer.add(Packet(0, False))  # nothing before the first keyframe is kept
    assert len(buffer) == 0
    for index in range(1, 301):  # 10 s at 30 fps, keyframe every second
        buffer.add(Packet(index * 33_333, index % 30 == 0))
    packets = buffer.drain()
    assert packets[0].keyframe
    newest = packets[-1].media_us
    span = newest - packets[0].media_us
    assert 2_000_000 <= span < 3_000_000  # at least the pre-roll, at most one GOP more
    assert len(buffer) == 0


def test_motion_detector_and_trigger() -> None:
    detector = MotionDetector(step=4)
    still = np.full((180, 320), 100, np.uint8)
    moved = still.copy()
    moved[40:120, 100:200] = 250
    assert detector.measure(still) == 0.0
    assert detector.measure(still) == 0.0
    assert detector.measure(moved) > 10
    trigger = MotionTrigger(threshold=5.0, hold_s=2.0)
    assert trigger.observe(0.5, now_us=0) is None
    assert trigger.observe(20.0, now_us=1_000_000) is True
    assert trigger.observe(20.0, now_us=1_500_000) is None
    assert trigger.observe(0.1, now_us=3_000_000) is None  # still within the hold
    assert trigger.observe(0.1, now_us=3_500_000) is False
    assert not trigger.active


def test_schedule_starts_and_stops_on_time() -> None:
    schedule = RecordingSchedule()
    schedule.add(ScheduledRecording(recording_id="a", start_at=100.0, duration_s=30.0), now=50.0)
    assert schedule.poll(now=99.0) == []
    assert [action for action, _ in schedule.poll(now=100.0)] == [ScheduleAction.START]
    assert schedule.poll(now=120.0) == []
    assert [action for action, _ in schedule.poll(now=130.0)] == [ScheduleAction.STOP]
    with pytest.raises(ConfigError, match="already be over"):
        schedule.add(ScheduledRecording(recording_id="b", start_at=0.0, duration_s=10.0), now=50.0)
    schedule.add(ScheduledRecording(recording_id="c", start_at=200.0, duration_s=1.0), now=50.0)
    schedule.cancel("c")
    assert schedule.poll(now=500.0) == []


def test_segment_names() -> None:
    first = Path("/rec/talk.mp4")
    assert segment_path(first, 0) == first
    assert segment_path(first, 1) == Path("/rec/talk-001.mp4")
    assert segment_path(first, 12) == Path("/rec/talk-012.mp4")


def test_quota_deletes_oldest_first_and_never_the_open_file(tmp_path: Path) -> None:
    for index, name in enumerate(["a.mp4", "b.mov", "c.webm", "notes.txt", "d.mp4"]):
        path = tmp_path / name
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1_000 + index, 1_000 + index))
    storage = StorageManager(tmp_path, quota_bytes=2500)
    assert storage.used_bytes() == 4000  # notes.txt is not a recording
    deleted = storage.enforce_quota(keep=[tmp_path / "a.mp4"])
    assert [p.name for p in deleted] == ["b.mov", "c.webm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "d.mp4", "notes.txt"]
    assert StorageManager(tmp_path).enforce_quota() == []


def test_storage_checks(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="does not exist"):
        StorageManager(tmp_path / "missing").check_writable()
    with pytest.raises(ConfigError):
        StorageManager(tmp_path, quota_bytes=0)
