"""Screen capture on a real X server (Xvfb): known colours and a moving rectangle drawn with
Xlib come back as the same pixels, regions crop exactly, the cursor is drawn in when asked,
and bad monitors and regions fail before any frame."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from actors.stages.capture import CaptureActor
from shared.capture.engine import CaptureEngine
from shared.capture.screen import (
    CursorImage,
    ScreenCapture,
    capture_box,
    composite_cursor,
    x11_display,
)
from shared.errors import CaptureError, ConfigError
from shared.models import (
    CaptureConfig,
    Resolution,
    ScreenConfig,
    ScreenRegion,
    ScreenSource,
    StreamQuality,
    parse_source,
)
from shared.pool.shm import list_segments, segment_name
from tests import media_fixtures
from tests.media_fixtures import (
    FakeEncoder,
    FrameCollector,
    XServer,
    fresh_session_id,
    i420_to_rgb,
)

xvfb = media_fixtures.xvfb  # a fixture, shared

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture
def screen(xvfb: XServer) -> Iterator[XServer]:
    """The session's Xvfb, cleared before and after the test."""
    xvfb.clear()
    xvfb.fill((0, 0, 0))
    yield xvfb
    xvfb.clear()


def grab_rgb(config: ScreenConfig, output: Resolution) -> np.ndarray:
    """One frame through ScreenCapture as the pool would hold it, back to RGB."""
    source = ScreenCapture.open(config, output)
    try:
        out = np.empty(output.width * output.height * 3 // 2, np.uint8)
        capture_us = source.grab(timeout=0.1)
        assert capture_us is not None
        source.fill(out, frame_number=0, capture_us=capture_us)
    finally:
        source.close()
    rgb: np.ndarray = i420_to_rgb(out, output.width, output.height).astype(int)
    return rgb


def close_to(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 4) -> bool:
    """Every pixel within ``tolerance`` of ``rgb`` (yuv420p round trip loses a little)."""
    return bool(np.abs(pixels - np.array(rgb)).max() <= tolerance)


# --- pure parts -----------------------------------------------------------------------------------


def test_display_detection() -> None:
    assert x11_display({"DISPLAY": ":3"}) == ":3"
    # XWayland: both set; X11 capture works.
    assert x11_display({"DISPLAY": ":0", "WAYLAND_DISPLAY": "wayland-0"}) == ":0"
    with pytest.raises(CaptureError, match="not supported on a Wayland session without X11"):
        x11_display({"WAYLAND_DISPLAY": "wayland-0"})
    with pytest.raises(CaptureError, match="not supported on a Wayland session"):
        x11_display({"XDG_SESSION_TYPE": "wayland"})
    with pytest.raises(CaptureError, match="DISPLAY is not set"):
        x11_display({})


MONITORS = [
    {"left": 0, "top": 0, "width": 3840, "height": 1080},
    {"left": 0, "top": 0, "width": 1920, "height": 1080},
    {"left": 1920, "top": 0, "width": 1920, "height": 1080, "is_primary": True},
]


def test_capture_box_resolves_monitors_and_regions() -> None:
    assert capture_box(MONITORS, None, None) == (
        2,
        {"left": 1920, "top": 0, "width": 1920, "height": 1080},
    )
    assert capture_box(MONITORS, 0, None)[1]["width"] == 3840
    # A region is relative to its monitor.
    assert capture_box(MONITORS, 2, ScreenRegion(100, 50, 640, 480)) == (
        2,
        {"left": 2020, "top": 50, "width": 640, "height": 480},
    )
    with pytest.raises(
        CaptureError, match="monitor 3 does not exist: this display has monitors 1 to 2"
    ):
        capture_box(MONITORS, 3, None)
    with pytest.raises(ConfigError, match="lies outside monitor 1 \\(1920x1080\\)"):
        capture_box(MONITORS, 1, ScreenRegion(1800, 0, 200, 100))


def test_cursor_compositing_blends_premultiplied_argb_and_clips() -> None:
    picture = np.zeros((4, 4, 4), np.uint8)
    picture[..., :3] = 100
    # Opaque white, half-transparent black (premultiplied: 0x80000000), fully transparent.
    argb = np.array([[0xFFFFFFFF, 0x80000000], [0x00000000, 0xFF0000FF]], np.uint32)
    composite_cursor(picture, CursorImage(left=13, top=21, argb=argb), box_left=10, box_top=20)
    assert picture[1, 3, :3].tolist() == [255, 255, 255]
    assert picture[2, 3, :3].tolist() == [100, 100, 100]  # transparent: unchanged
    # The right column fell outside the picture: clipped, nothing written out of bounds.
    assert picture[1, :3, :3].tolist() == [[100, 100, 100]] * 3
    half = np.zeros((1, 1, 4), np.uint8)
    half[..., :3] = 100
    composite_cursor(half, CursorImage(left=0, top=0, argb=argb[:1, 1:]), 0, 0)
    assert half[0, 0, :3].tolist() == [50, 50, 50]
    blue = np.zeros((2, 2, 4), np.uint8)
    composite_cursor(blue, CursorImage(left=-1, top=-1, argb=argb), 0, 0)
    assert blue[0, 0, :3].tolist() == [255, 0, 0]  # BGRA: the cursor's blue pixel


# --- on Xvfb -----------------------------------------------------------------------------------


@pytest.mark.parametrize("colour", [RED, GREEN, BLUE, WHITE])
def test_a_solid_screen_comes_back_as_that_colour(
    screen: XServer, colour: tuple[int, int, int]
) -> None:
    screen.fill(colour)
    rgb = grab_rgb(ScreenConfig(), Resolution(640, 480))
    assert close_to(rgb, colour)


def test_a_region_capture_crops_exactly(screen: XServer) -> None:
    screen.fill(BLUE)
    screen.rectangle(100, 60, 200, 120, RED)
    # Exactly the rectangle: nothing but red.
    inside = grab_rgb(ScreenConfig(region=ScreenRegion(100, 60, 200, 120)), Resolution(200, 120))
    assert close_to(inside, RED)
    # Shifted 40 px left and 20 px up: a 40 px blue band left, 20 px blue band on top.
    shifted = grab_rgb(ScreenConfig(region=ScreenRegion(60, 40, 200, 120)), Resolution(200, 120))
    assert close_to(shifted[:18, :], BLUE) and close_to(shifted[:, :38], BLUE)
    assert close_to(shifted[22:, 42:], RED)
    # Column and row of the edge land where they should (chroma blurs at most 2 pixels).
    red_columns = np.flatnonzero(np.abs(shifted[60] - RED).max(axis=1) <= 4)
    assert 40 <= red_columns[0] <= 42
    red_rows = np.flatnonzero(np.abs(shifted[:, 100] - RED).max(axis=1) <= 4)
    assert 20 <= red_rows[0] <= 22


def test_a_smaller_stream_gets_the_screen_scaled_to_fit(screen: XServer) -> None:
    screen.fill(GREEN)
    screen.rectangle(0, 0, 320, 480, RED)  # left half red
    rgb = grab_rgb(ScreenConfig(), Resolution(320, 180))
    # 640x480 (4:3) into 320x180 (16:9): 240x180 in the middle, black bars either side.
    assert close_to(rgb[:, :36], (0, 0, 0), 6) and close_to(rgb[:, -36:], (0, 0, 0), 6)
    assert close_to(rgb[:, 44:156], RED, 6) and close_to(rgb[:, 164:276], GREEN, 6)


def test_the_cursor_is_drawn_in_only_when_asked(screen: XServer) -> None:
    screen.fill(WHITE)
    screen.warp_pointer(200, 150)
    region = ScreenRegion(150, 100, 100, 100)
    plain = grab_rgb(ScreenConfig(region=region), Resolution(100, 100))
    with_cursor = grab_rgb(ScreenConfig(region=region, capture_cursor=True), Resolution(100, 100))
    assert close_to(plain, WHITE)
    changed = np.argwhere(np.abs(with_cursor - plain).max(axis=2) > 40)
    assert len(changed) > 10  # the cursor's pixels
    # ... around the pointer (its hot spot at 50, 50 of this region), nowhere else.
    assert np.abs(changed - [50, 50]).max() <= 32


def test_bad_monitor_and_region_fail_at_open(screen: XServer) -> None:
    with pytest.raises(
        CaptureError, match="monitor 5 does not exist: this display has only monitor 1"
    ):
        ScreenCapture.open(ScreenConfig(monitor_index=5), Resolution(640, 480))
    with pytest.raises(ConfigError, match="lies outside monitor 1 \\(640x480\\)"):
        ScreenCapture.open(
            ScreenConfig(region=ScreenRegion(600, 400, 100, 100)), Resolution(100, 100)
        )
    with pytest.raises(CaptureError, match="Wayland"):
        ScreenCapture.open(
            ScreenConfig(), Resolution(640, 480), env={"WAYLAND_DISPLAY": "wayland-1"}
        )
    # The engine's screen entry point, with a spec as the CLI spells it.
    source = parse_source("screen:1@0,0,640x480")
    assert isinstance(source, ScreenSource)
    engine = CaptureEngine()
    opened = engine.start_screen_capture(
        source.region, CaptureConfig(), Resolution(640, 480), screen=ScreenConfig(monitor_index=1)
    )
    engine.stop_capture(opened)


def test_the_capture_actor_streams_a_moving_rectangle_and_reports_its_rate(screen: XServer) -> None:
    screen.fill(BLUE)
    window = screen.rectangle(0, 200, 80, 80, RED)
    session = fresh_session_id()
    pool = segment_name(session, "frames")
    quality = StreamQuality(resolution=Resolution(640, 480), framerate=15, bitrate=500_000)
    actor = CaptureActor(session, ScreenSource(), quality, pool, 4)

    def red_left_edge(frame: object) -> int | None:
        row = i420_to_rgb(frame.pixels, 640, 480)[240].astype(int)  # type: ignore[attr-defined]
        red = np.flatnonzero(np.abs(row - RED).max(axis=1) <= 4)
        return int(red[0]) if red.size else None

    async def main() -> list[tuple[int, int | None]]:
        await actor.open()
        await actor.start(FakeEncoder())
        collector = FrameCollector(pool)
        seen: list[tuple[int, int | None]] = []
        for x in (0, 120, 240, 360, 480):
            screen.move(window, x, 200)
            # Wait for a frame captured after the move, and see where the rectangle is.
            moved_at = (await actor.stats()).frames_captured

            def after_move(frames: list[Any], moved_at: int = moved_at) -> bool:
                # moved_at + 1 may have been grabbed before the move; the next one was not.
                return bool(frames) and frames[-1].sequence > moved_at + 1

            await collector.until(after_move)
            seen.append((x, red_left_edge(collector.frames[-1])))
        collector.close()
        stats = await actor.stats()
        assert stats.fps > 0 and stats.average_fps > 0  # the achieved rate is reported
        assert stats.frames_captured > 0 and stats.error is None
        assert stats.source is not None and stats.source.kind == "screen"
        assert (stats.source.native_width, stats.source.native_height) == (640, 480)
        await actor.stop()
        return seen

    seen = asyncio.run(main())
    assert not list_segments(pool)
    for x, edge in seen:
        assert edge is not None and abs(edge - x) <= 2, seen


def test_a_missing_monitor_fails_the_actor_open_and_leaves_nothing(screen: XServer) -> None:
    session = fresh_session_id()
    pool = segment_name(session, "frames")
    quality = StreamQuality(resolution=Resolution(640, 480), framerate=15, bitrate=500_000)
    actor = CaptureActor(session, parse_source("screen:4"), quality, pool, 4)

    async def main() -> None:
        with pytest.raises(CaptureError, match="monitor 4 does not exist"):
            await actor.open()

    asyncio.run(main())
    assert not list_segments(f"kz_{session}_")
