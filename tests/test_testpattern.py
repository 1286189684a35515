"""The synthetic source: I420 layout, motion, the stamp, argument checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.capture.stamp import Stamp, U8Array, read_stamp, stamp_rows
from shared.capture.testpattern import TestPattern, planes
from shared.errors import ConfigError

US = 1_700_000_000_000_000


def test_frame_bytes() -> None:
    assert TestPattern(1280, 720, 30).frame_bytes == 1280 * 720 * 3 // 2
    assert TestPattern(160, 96, 1).frame_bytes == 160 * 96 * 3 // 2


@pytest.mark.parametrize(
    ("width", "height", "framerate"),
    [
        (641, 360, 30),
        (640, 361, 30),
        (158, 96, 30),
        (160, 94, 30),
        (0, 0, 30),
        (8194, 480, 30),
        (640, 360, 0),
        (640, 360, 241),
        (640, 360, -30),
    ],
)
def test_bad_arguments(width: int, height: int, framerate: int) -> None:
    with pytest.raises(ConfigError):
        TestPattern(width, height, framerate)


@pytest.mark.parametrize(
    ("width", "height"), [(160, 96), (176, 144), (640, 360), (1280, 720), (1920, 1080)]
)
def test_stamp_reads_back(width: int, height: int) -> None:
    pattern = TestPattern(width, height, 60)
    for frame_number in (0, 1, 2, 1000, 2**32 - 1):
        y, u, v = planes(pattern.render(frame_number, US + frame_number), width, height)
        assert read_stamp(y) == Stamp(frame_number, US + frame_number)
        rows = stamp_rows(height, width) // 2
        assert (u[:rows] == 128).all() and (v[:rows] == 128).all()


@pytest.mark.parametrize(("width", "height"), [(160, 96), (640, 360), (1920, 1080)])
def test_consecutive_frames_move(width: int, height: int) -> None:
    """Below the strip, much of the luma and some of the chroma changes every frame."""
    pattern = TestPattern(width, height, 30)
    rows = stamp_rows(height, width)
    previous = planes(pattern.render(0, US), width, height)
    for n in range(1, 8):
        current = planes(pattern.render(n, US), width, height)
        changed = [
            np.mean(
                before[rows * before.shape[0] // height :]
                != after[rows * after.shape[0] // height :]
            )
            for before, after in zip(previous, current, strict=True)
        ]
        assert changed[0] > 0.3, f"frame {n}: only {changed[0]:.0%} of the luma changed"
        assert min(changed[1:]) > 0, f"frame {n}: the chroma did not move"
        previous = current


def test_frames_are_deterministic() -> None:
    a, b = TestPattern(640, 360, 30), TestPattern(640, 360, 30)
    assert np.array_equal(a.render(17, US), b.render(17, US))


def test_render_into_writes_a_view_and_nothing_else() -> None:
    pattern = TestPattern(640, 360, 30)
    offset = 4096
    shared_memory = bytearray(b"\xaa" * (offset + pattern.frame_bytes + offset))
    out = np.frombuffer(shared_memory, dtype=np.uint8, count=pattern.frame_bytes, offset=offset)

    pattern.render_into(out, 5, US)

    assert np.array_equal(out, pattern.render(5, US))
    assert shared_memory[:offset] == b"\xaa" * offset
    assert shared_memory[offset + pattern.frame_bytes :] == b"\xaa" * offset
    assert read_stamp(planes(out, 640, 360)[0]) == Stamp(5, US)


@pytest.mark.parametrize(
    "out",
    [
        np.zeros(640 * 360 * 3 // 2 - 2, dtype=np.uint8),
        np.zeros(640 * 360 * 3, dtype=np.uint8)[::2],
        np.zeros((540, 640), dtype=np.uint8),
        np.zeros(640 * 360 * 3 // 2, dtype=np.float32),
        np.frombuffer(bytes(640 * 360 * 3 // 2), dtype=np.uint8),
    ],
    ids=["short", "strided", "2-D", "float", "read-only"],
)
def test_render_into_rejects(out: U8Array) -> None:
    with pytest.raises(ConfigError):
        TestPattern(640, 360, 30).render_into(out, 0, US)


@pytest.mark.parametrize(("frame_number", "capture_us"), [(-1, US), (0, -1), (0, 2**64)])
def test_render_rejects_bad_stamp_values(frame_number: int, capture_us: int) -> None:
    with pytest.raises(ConfigError):
        TestPattern(640, 360, 30).render(frame_number, capture_us)


@given(frame_number=st.integers(0, 2**48))
@settings(max_examples=100, deadline=None)
def test_any_frame_number_renders_and_the_stamp_wraps(frame_number: int) -> None:
    """The box and scroll stay in frame forever; the stamp carries the number modulo 2**32."""
    y = planes(TestPattern(176, 144, 30).render(frame_number, US), 176, 144)[0]
    assert read_stamp(y) == Stamp(frame_number % 2**32, US)


def test_not_collected_by_pytest() -> None:
    assert TestPattern.__test__ is False
