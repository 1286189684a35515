"""The timestamp strip: exact round trips on raw planes, and through a real H.264 encoder."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.capture.stamp import (
    STAMP_MIN_HEIGHT,
    STAMP_MIN_WIDTH,
    Stamp,
    U8Array,
    clear_stamp_chroma,
    draw_stamp,
    planes,
    read_stamp,
    stamp_block_size,
    stamp_rows,
)
from shared.capture.testpattern import TestPattern
from shared.errors import ConfigError

SIZES = [(176, 144), (320, 180), (640, 360), (1280, 720), (1920, 1080)]
STAMPS = [
    Stamp(0, 0),
    Stamp(2**32 - 1, 2**63 - 1),
    Stamp(2**32 - 1, 2**64 - 1),
    Stamp(1, 1),
    Stamp(123_456, 1_700_000_000_123_456),
]
CODE_BITS = 144


def noise_plane(width: int, height: int, seed: int = 1) -> U8Array:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)


def block_origin(cell: int, width: int) -> tuple[int, int]:
    """Top-left pixel (row, column) of the block that carries bit ``cell``."""
    block = stamp_block_size(width)
    row, column = divmod(cell, width // block)
    return row * block, column * block


@pytest.mark.parametrize(("width", "height"), SIZES)
@pytest.mark.parametrize("stamp", STAMPS, ids=str)
def test_round_trip_on_raw_plane(width: int, height: int, stamp: Stamp) -> None:
    y = noise_plane(width, height)
    draw_stamp(y, stamp)
    assert read_stamp(y) == stamp


@pytest.mark.parametrize(
    ("width", "height", "rows"),
    [
        (160, 96, 64),
        (176, 144, 56),
        (320, 180, 32),
        (638, 360, 16),
        (640, 360, 64),
        (1280, 720, 32),
        (1920, 1080, 32),
        (3840, 2160, 16),
    ],
)
def test_stamp_rows(width: int, height: int, rows: int) -> None:
    assert stamp_rows(height, width) == rows


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_draw_leaves_rows_below_the_strip_alone(width: int, height: int) -> None:
    y = noise_plane(width, height)
    before = y.copy()
    draw_stamp(y, Stamp(7, 8))
    rows = stamp_rows(height, width)
    assert np.array_equal(y[rows:], before[rows:])
    assert set(np.unique(y[:rows])) <= {16, 235}


def test_smallest_frame() -> None:
    y = noise_plane(STAMP_MIN_WIDTH, STAMP_MIN_HEIGHT)
    draw_stamp(y, Stamp(5, 6))
    assert read_stamp(y) == Stamp(5, 6)


@pytest.mark.parametrize(("width", "height"), [(158, 96), (160, 94), (96, 160), (16, 16)])
def test_too_small_frame(width: int, height: int) -> None:
    y = noise_plane(width, height)
    with pytest.raises(ConfigError, match="too small"):
        draw_stamp(y, Stamp(0, 0))
    with pytest.raises(ConfigError):
        stamp_rows(height, width)
    assert read_stamp(y) is None


def test_strided_view_into_a_larger_buffer() -> None:
    width, height = 640, 360
    backing = np.full((height + 10, width + 48), 77, dtype=np.uint8)
    view = backing[5 : 5 + height, 16 : 16 + width]
    assert not view.flags.c_contiguous
    draw_stamp(view, Stamp(42, 1_700_000_000_000_000))

    assert read_stamp(view) == Stamp(42, 1_700_000_000_000_000)
    assert read_stamp(np.ascontiguousarray(view)) == Stamp(42, 1_700_000_000_000_000)
    outside = np.ones(backing.shape, dtype=bool)
    outside[5 : 5 + height, 16 : 16 + width] = False
    assert (backing[outside] == 77).all()


@pytest.mark.parametrize(("width", "height"), [(176, 144), (640, 360), (1920, 1080)])
def test_every_single_block_error_is_detected(width: int, height: int) -> None:
    """Marker, payload or CRC: inverting any one block reads as None, never a wrong stamp."""
    y = noise_plane(width, height)
    draw_stamp(y, Stamp(0x1234_5678, 0x0123_4567_89AB_CDEF))
    block = stamp_block_size(width)
    for cell in range(CODE_BITS):
        top, left = block_origin(cell, width)
        corrupt = y.copy()
        corrupt[top : top + block, left : left + block] ^= 0xFF  # 16 <-> 239, 235 <-> 20
        assert read_stamp(corrupt) is None, f"bit {cell} flipped and still read"


def test_half_a_block_of_damage_still_reads() -> None:
    """Damage confined to a block's outer ring (where deblocking works) does not matter."""
    width, height = 640, 360
    y = noise_plane(width, height)
    draw_stamp(y, Stamp(9, 10))
    top, left = block_origin(20, width)
    y[top : top + 16, left : left + 4] = 128
    y[top : top + 4, left : left + 16] = 128
    assert read_stamp(y) == Stamp(9, 10)


def test_noise_does_not_flip_bits() -> None:
    width, height = 1280, 720
    y = np.zeros((height, width), dtype=np.uint8)
    draw_stamp(y, Stamp(2**31, 2**62))
    noise = np.random.default_rng(3).integers(-60, 61, size=y.shape)
    noisy = np.clip(y.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    assert read_stamp(noisy) == Stamp(2**31, 2**62)


@pytest.mark.parametrize("level", [0, 16, 128, 235, 255])
def test_blank_frame_reads_none(level: int) -> None:
    assert read_stamp(np.full((720, 1280), level, dtype=np.uint8)) is None


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_noise_frame_reads_none(width: int, height: int) -> None:
    for seed in range(20):
        assert read_stamp(noise_plane(width, height, seed)) is None


def test_stamp_at_another_size_reads_none() -> None:
    """A stamp drawn at one width does not read at another block layout."""
    y = noise_plane(1280, 720)
    draw_stamp(y, Stamp(1, 2))
    assert read_stamp(np.ascontiguousarray(y[:, :600])) is None


@given(
    frame_number=st.integers(0, 2**32 - 1),
    capture_us=st.integers(0, 2**64 - 1),
)
@settings(max_examples=200, deadline=None)
def test_round_trip_any_value(frame_number: int, capture_us: int) -> None:
    y = np.full((180, 320), 128, dtype=np.uint8)
    draw_stamp(y, Stamp(frame_number, capture_us))
    assert read_stamp(y) == Stamp(frame_number, capture_us)


@pytest.mark.parametrize(("frame_number", "capture_us"), [(-1, 0), (2**32, 0), (0, -1), (0, 2**64)])
def test_stamp_out_of_range(frame_number: int, capture_us: int) -> None:
    with pytest.raises(ConfigError):
        Stamp(frame_number, capture_us)


@pytest.mark.parametrize(
    "plane",
    [
        np.zeros((360, 640, 3), dtype=np.uint8),
        np.zeros((360, 640), dtype=np.float32),
        np.zeros(360 * 640, dtype=np.uint8),
    ],
    ids=["3-D", "float", "1-D"],
)
def test_bad_plane(plane: U8Array) -> None:
    with pytest.raises(ConfigError):
        draw_stamp(plane, Stamp(0, 0))
    with pytest.raises(ConfigError):
        read_stamp(plane)


def test_clear_stamp_chroma() -> None:
    width, height = 640, 360
    u = np.full((height // 2, width // 2), 50, dtype=np.uint8)
    v = np.full((height // 2, width // 2), 200, dtype=np.uint8)
    clear_stamp_chroma(u, v, width, height)
    rows = stamp_rows(height, width) // 2
    assert (u[:rows] == 128).all() and (v[:rows] == 128).all()
    assert (u[rows:] == 50).all() and (v[rows:] == 200).all()


def test_clear_stamp_chroma_checks_shapes() -> None:
    u = np.zeros((180, 320), dtype=np.uint8)
    with pytest.raises(ConfigError, match="4:2:0"):
        clear_stamp_chroma(u, np.zeros((360, 640), dtype=np.uint8), 640, 360)
    with pytest.raises(ConfigError, match="too small"):
        clear_stamp_chroma(u[:40, :70], u[:40, :70], 140, 80)


def test_planes_are_views() -> None:
    width, height = 320, 180
    buf = np.zeros(width * height * 3 // 2, dtype=np.uint8)
    y, u, v = planes(buf, width, height)
    assert (y.shape, u.shape, v.shape) == ((180, 320), (90, 160), (90, 160))
    y[0, 0], u[0, 0], v[-1, -1] = 1, 2, 3
    assert (buf[0], buf[width * height], buf[-1]) == (1, 2, 3)
    two_d = buf.reshape(height * 3 // 2, width)  # the shape VideoFrame.to_ndarray() gives
    assert planes(two_d, width, height)[1][0, 0] == 2


@pytest.mark.parametrize(
    ("buf", "width", "height"),
    [
        (np.zeros(320 * 180 * 3 // 2 - 1, dtype=np.uint8), 320, 180),
        (np.zeros(321 * 180 * 3 // 2, dtype=np.uint8), 321, 180),
        (np.zeros(320 * 180 * 3, dtype=np.uint8)[::2], 320, 180),
        (np.zeros(320 * 180 * 3 // 2, dtype=np.int16), 320, 180),
    ],
    ids=["short", "odd", "strided", "int16"],
)
def test_planes_rejects(buf: U8Array, width: int, height: int) -> None:
    with pytest.raises(ConfigError):
        planes(buf, width, height)


# -- through H.264 ---------------------------------------------------------------------------


def encode_decode(
    pattern: TestPattern, stamps: list[Stamp], bit_rate: int
) -> tuple[dict[int, U8Array], int]:
    """Encode the pattern's frames with libx264 at ``bit_rate``.

    Returns the decoded luma planes by pts, and the size of the stream in bits.
    """
    width, height = pattern.width, pattern.height
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.bit_rate = bit_rate
    encoder.time_base = fractions.Fraction(1, pattern.framerate)
    encoder.framerate = fractions.Fraction(pattern.framerate)
    encoder.options = {"tune": "zerolatency", "preset": "veryfast"}
    decoder = av.CodecContext.create("h264", "r")

    decoded: dict[int, U8Array] = {}
    stream_bits = 0

    def take(frames: list[av.VideoFrame]) -> None:
        for frame in frames:
            assert frame.pts is not None and frame.pts not in decoded
            decoded[frame.pts] = np.asarray(frame.to_ndarray()[:height], dtype=np.uint8)

    for pts, stamp in enumerate(stamps):
        buf = pattern.render(stamp.frame_number, stamp.capture_us)
        frame = av.VideoFrame.from_ndarray(buf.reshape(height * 3 // 2, width), format="yuv420p")
        frame.pts = pts
        for packet in encoder.encode(frame):
            stream_bits += 8 * packet.size
            take(decoder.decode(packet))
    for packet in encoder.encode(None):
        stream_bits += 8 * packet.size
        take(decoder.decode(packet))
    take(decoder.decode(None))
    return decoded, stream_bits


@pytest.mark.parametrize(
    ("width", "height", "bit_rate", "first_frame"),
    [
        (640, 360, 300_000, 0),
        (1280, 720, 1_000_000, 0),
        (320, 180, 150_000, 0),  # 8-pixel blocks
        (640, 360, 300_000, 2**32 - 45),  # the frame number wraps mid-run
    ],
)
def test_every_frame_reads_exactly_after_h264(
    width: int, height: int, bit_rate: int, first_frame: int
) -> None:
    fps = 30
    pattern = TestPattern(width, height, fps)
    capture_base = 1_700_000_000_000_000
    stamps = [
        Stamp((first_frame + i) % 2**32, capture_base + i * 1_000_000 // fps) for i in range(90)
    ]
    decoded, stream_bits = encode_decode(pattern, stamps, bit_rate)

    # The premise: the encoder really was starved (so the picture really was degraded).
    assert stream_bits * fps / len(stamps) < 1.5 * bit_rate
    assert sorted(decoded) == list(range(90))
    read = [read_stamp(decoded[pts]) for pts in range(90)]
    assert read == stamps
