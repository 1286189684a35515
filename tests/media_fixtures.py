"""Real media for the capture tests: an Xvfb X server, a PulseAudio server, generated clips.

Importing this module fixes, for the whole test session, the X display and PulseAudio socket
the fixtures will serve (``DISPLAY`` and ``PULSE_SERVER``).  It must happen at import (test
collection), before the session's Ray cluster starts: Ray's worker processes inherit the
environment of that moment, and the capture actors inside them open the display and the
audio device.  The servers themselves start only when a test asks for them and stop when the
session ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import av
import numpy as np
import pytest

from actors.handles import EncoderHandle
from shared.capture.testpattern import TestPattern
from tests.conftest import require_tool

__all__ = [
    "CLIP_FPS",
    "CLIP_SIZE",
    "CLIP_TONE_HZ",
    "FakeEncoder",
    "FrameCollector",
    "LocalHandle",
    "PulseServer",
    "XServer",
    "collect_frames",
    "fresh_session_id",
    "i420_to_rgb",
    "make_clip",
    "public_tmp",
    "pulse",
    "run_as_nobody",
    "tone",
    "xvfb",
]


def _free_display() -> int:
    """A display number no X server here uses, spread by pid so parallel sessions differ."""
    for offset in range(400):
        number = 200 + (os.getpid() + offset) % 700
        if not (
            Path(f"/tmp/.X{number}-lock").exists() or Path(f"/tmp/.X11-unix/X{number}").exists()
        ):
            return number
    raise RuntimeError("no free X display number between :200 and :899")


DISPLAY_NUMBER = _free_display()
PULSE_DIR = Path(tempfile.gettempdir()) / f"kizuna-test-pulse-{os.getpid()}"
os.environ["DISPLAY"] = f":{DISPLAY_NUMBER}"
os.environ["PULSE_SERVER"] = f"unix:{PULSE_DIR / 'native'}"
# A desktop session the tests run in must not leak into what they test.
os.environ.pop("WAYLAND_DISPLAY", None)

NULL_SINK = "kz_null"
T = TypeVar("T")


def require_library(name: str, package: str) -> None:
    """Skip (fail in CI) when a shared library the test needs is missing, as require_tool."""
    if ctypes.util.find_library(name) is None:
        message = f"lib{name} is not installed (apt-get install {package})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


# --- Xvfb ------------------------------------------------------------------------------------


class _X11:
    """The few libX11 calls the tests draw with (ctypes; no toolkit needed)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("X11") or "libX11.so.6")
        vp, ul, ci, cu = ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_uint
        signatures: dict[str, tuple[list[Any], Any]] = {
            "XOpenDisplay": ([ctypes.c_char_p], vp),
            "XCloseDisplay": ([vp], ci),
            "XDefaultRootWindow": ([vp], ul),
            "XCreateSimpleWindow": ([vp, ul, ci, ci, cu, cu, cu, ul, ul], ul),
            "XMapRaised": ([vp, ul], ci),
            "XMoveWindow": ([vp, ul, ci, ci], ci),
            "XDestroyWindow": ([vp, ul], ci),
            "XSetWindowBackground": ([vp, ul, ul], ci),
            "XClearWindow": ([vp, ul], ci),
            "XWarpPointer": ([vp, ul, ul, ci, ci, cu, cu, ci, ci], ci),
            "XSync": ([vp, ci], ci),
        }
        for name, (argtypes, restype) in signatures.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, restype
        self.lib = lib


def _pixel(rgb: tuple[int, int, int]) -> int:
    # Xvfb's 24-bit visual is TrueColor: a pixel value is 0xRRGGBB.
    return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]


@dataclass
class XServer:
    """A running Xvfb and a connection to draw on it."""

    display: str
    width: int
    height: int
    process: subprocess.Popen[bytes]
    _x: _X11 = field(default_factory=_X11)
    _dpy: Any = None
    _windows: list[int] = field(default_factory=list)

    def connect(self) -> None:
        self._dpy = self._x.lib.XOpenDisplay(self.display.encode())
        if not self._dpy:
            raise RuntimeError(f"cannot open {self.display}")
        self.root = self._x.lib.XDefaultRootWindow(self._dpy)

    def sync(self) -> None:
        """Wait until the server has carried out everything asked so far."""
        self._x.lib.XSync(self._dpy, 0)

    def fill(self, rgb: tuple[int, int, int]) -> None:
        """Paint the whole screen (the root window's background) one colour."""
        self._x.lib.XSetWindowBackground(self._dpy, self.root, _pixel(rgb))
        self._x.lib.XClearWindow(self._dpy, self.root)
        self.sync()

    def rectangle(self, x: int, y: int, width: int, height: int, rgb: tuple[int, int, int]) -> int:
        """A borderless window of one colour (no window manager: it lands exactly there)."""
        window = self._x.lib.XCreateSimpleWindow(
            self._dpy, self.root, x, y, width, height, 0, 0, _pixel(rgb)
        )
        self._x.lib.XMapRaised(self._dpy, window)
        self._windows.append(window)
        self.sync()
        return int(window)

    def move(self, window: int, x: int, y: int) -> None:
        self._x.lib.XMoveWindow(self._dpy, window, x, y)
        self.sync()

    def clear(self) -> None:
        """Remove every rectangle drawn so far."""
        for window in self._windows:
            self._x.lib.XDestroyWindow(self._dpy, window)
        self._windows.clear()
        self.sync()

    def warp_pointer(self, x: int, y: int) -> None:
        self._x.lib.XWarpPointer(self._dpy, 0, self.root, 0, 0, 0, 0, x, y)
        self.sync()

    def close(self) -> None:
        if self._dpy:
            self.clear()
            self._x.lib.XCloseDisplay(self._dpy)
            self._dpy = None


@pytest.fixture(scope="session")
def xvfb() -> Iterator[XServer]:
    """Xvfb on this session's display, 640x480x24, stopped at the end of the session."""
    binary = require_tool("Xvfb")
    require_library("Xfixes", "libxfixes3")
    display = os.environ["DISPLAY"]
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    process = subprocess.Popen(
        # -noreset: without it the server resets (forgetting the root colour) whenever its
        # last client disconnects, which each capture does.
        [binary, display, "-screen", "0", "640x480x24", "-nolisten", "tcp", "-noreset"],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    server = XServer(display=display, width=640, height=480, process=process)
    try:
        deadline = time.monotonic() + 20
        while not Path(f"/tmp/.X11-unix/X{DISPLAY_NUMBER}").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"Xvfb {display} did not start: {log.read().decode()[-2000:]}")
            time.sleep(0.05)
        while True:  # the socket exists slightly before the server accepts on it
            try:
                server.connect()
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield server
    finally:
        server.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


# --- PulseAudio -----------------------------------------------------------------------------


@dataclass
class PulseServer:
    """A private PulseAudio with one null sink; its monitor is the default input."""

    directory: Path
    process: subprocess.Popen[bytes]
    players: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def play(self, wav: Path) -> subprocess.Popen[bytes]:
        """Play a WAV file into the null sink (stopped at the end of the session, or by the
        caller)."""
        player = subprocess.Popen(
            [require_tool("paplay"), "--device", NULL_SINK, "--latency-msec=20", str(wav)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.players.append(player)
        return player

    def stop_players(self) -> None:
        for player in self.players:
            if player.poll() is None:
                player.terminate()
            player.wait(timeout=10)
        self.players.clear()


def refresh_portaudio() -> None:
    """Make PortAudio (initialised when sounddevice was imported) see the server's devices."""
    if "sounddevice" in sys.modules:
        sd: Any = sys.modules["sounddevice"]
        sd._terminate()
        sd._initialize()


@pytest.fixture(scope="session")
def pulse() -> Iterator[PulseServer]:
    """PulseAudio on this session's socket, stopped at the end of the session."""
    binary = require_tool("pulseaudio")
    pactl = require_tool("pactl")
    require_library("portaudio", "libportaudio2")
    PULSE_DIR.mkdir(mode=0o700, exist_ok=True)
    socket = PULSE_DIR / "native"
    script = PULSE_DIR / "default.pa"
    script.write_text(
        f"load-module module-native-protocol-unix socket={socket} auth-anonymous=1\n"
        f"load-module module-null-sink sink_name={NULL_SINK} rate=48000 channels=2\n"
        f"set-default-sink {NULL_SINK}\n"
        f"set-default-source {NULL_SINK}.monitor\n"
    )
    env = {
        **os.environ,
        "HOME": str(PULSE_DIR),
        "XDG_RUNTIME_DIR": str(PULSE_DIR),
        "PULSE_RUNTIME_PATH": str(PULSE_DIR),
        "PULSE_STATE_PATH": str(PULSE_DIR),
    }
    env.pop("DISPLAY", None)  # no X11 session integration
    log = open(PULSE_DIR / "log", "wb")  # noqa: SIM115 - closed in the finally below
    process = subprocess.Popen(
        [
            binary,
            "-n",
            "-F",
            str(script),
            "--daemonize=no",
            "--exit-idle-time=-1",
            "--use-pid-file=no",
            "--log-target=stderr",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    server = PulseServer(directory=PULSE_DIR, process=process)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run([pactl, "info"], capture_output=True).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    "PulseAudio did not start: "
                    + (PULSE_DIR / "log").read_text(errors="replace")[-2000:]
                )
            time.sleep(0.1)
        refresh_portaudio()
        yield server
    finally:
        server.stop_players()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(PULSE_DIR, ignore_errors=True)
        refresh_portaudio()


def tone(
    path: Path, *, hz: float, seconds: float, rate: int = 48_000, amplitude: int = 12_000
) -> Path:
    """A mono 16-bit WAV of a sine tone."""
    t = np.arange(int(seconds * rate)) / rate
    samples = (np.sin(2 * np.pi * hz * t) * amplitude).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return path


# --- generated clips -------------------------------------------------------------------------

CLIP_SIZE = (320, 240)
CLIP_FPS = 10
CLIP_TONE_HZ = 440.0


def make_clip(
    path: Path,
    *,
    seconds: float = 1.0,
    fps: int = CLIP_FPS,
    size: tuple[int, int] = CLIP_SIZE,
    audio: bool = True,
    tone_hz: float = CLIP_TONE_HZ,
    flash_at: float | None = None,
) -> Path:
    """An H.264 + AAC MP4 made with PyAV.

    Frame n is the test pattern stamped with frame number n and ``capture_us`` n/fps seconds,
    so a reader recovers which frame of the clip it is looking at.  The audio is a sine at
    ``tone_hz``.  With ``flash_at``, the picture turns white and a 1 kHz beep starts at that
    media time (video and audio silent/dark before it), to measure A/V sync.
    """
    width, height = size
    pattern = TestPattern(width, height, fps)
    frames = round(seconds * fps)
    with av.open(str(path), "w") as container:
        video: Any = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": "ultrafast", "g": str(fps)}
        sound: Any = None
        if audio:
            sound = container.add_stream("aac", rate=48_000)
            sound.layout = "stereo"
        for n in range(frames):
            if flash_at is None:
                pixels = pattern.render(n, n * 1_000_000 // fps)
            else:
                luma = 235 if n / fps >= flash_at else 16
                pixels = np.full(width * height * 3 // 2, 128, np.uint8)
                pixels[: width * height] = luma
            frame = av.VideoFrame.from_ndarray(
                pixels.reshape(height * 3 // 2, width), format="yuv420p"
            )
            frame.pts = n
            frame.time_base = Fraction(1, fps)
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode(None):
            container.mux(packet)
        if sound is not None:
            rate, block = 48_000, 1024
            total = round(seconds * rate)
            t = np.arange(total) / rate
            if flash_at is None:
                signal = np.sin(2 * np.pi * tone_hz * t) * 0.4
            else:
                signal = np.where(t >= flash_at, np.sin(2 * np.pi * 1000 * t) * 0.5, 0.0)
            for start in range(0, total, block):
                chunk = signal[start : start + block].astype(np.float32)
                planar = np.stack([chunk, chunk])
                samples = av.AudioFrame.from_ndarray(planar, format="fltp", layout="stereo")
                samples.sample_rate = rate
                samples.pts = start
                samples.time_base = Fraction(1, rate)
                for packet in sound.encode(samples):
                    container.mux(packet)
            for packet in sound.encode(None):
                container.mux(packet)
    return path


# --- driving a CaptureActor without Ray -----------------------------------------------------


class _Remote:
    """Stands in for a Ray actor method: ``handle.method.remote(...)`` calls ``function``."""

    def __init__(self, function: Any) -> None:
        self.remote = function


class _RecordingEncoderActor:
    """Stands in for the encoder actor behind a real EncoderHandle, recording its calls."""

    def __init__(self, outer: FakeEncoder) -> None:
        self.request_keyframe = _Remote(outer.record_keyframe_request)


class FakeEncoder(EncoderHandle):
    """An encoder handle whose actor records what the capture actor calls on it."""

    def __init__(self) -> None:
        self.keyframe_requests = 0
        super().__init__(_RecordingEncoderActor(self))

    def record_keyframe_request(self, rung: int | None = 0) -> None:
        self.keyframe_requests += 1


class LocalHandle:
    """An actor object called the way Ray calls it (``handle.method.remote(...)``), in this
    process and event loop: wires real actors together without Ray."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self._tasks: set[Any] = set()

    def __getattr__(self, name: str) -> _Remote:
        import asyncio

        method = getattr(self.actor, name)

        def remote(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if asyncio.iscoroutine(result):
                task = asyncio.ensure_future(result)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return task
            return result

        return _Remote(remote)


_SESSIONS = iter(range(1_000_000))


def fresh_session_id() -> str:
    """A session id no other test (or parallel run) uses; segments are ``kz_<id>_<role>``."""
    return f"t{os.getpid()}x{next(_SESSIONS)}"


class FrameCollector:
    """Copies frames out of a pool as they come (one reader, attached once), woken by the
    pool's doorbell as the encoder is: a capture that stopped ringing leaves it waiting."""

    def __init__(self, pool_name: str) -> None:
        from shared.pool.frame_pool import FramePool, FramePoolReader

        self._pool = FramePool.attach(pool_name)
        self._bell = self._pool.listen()
        self._reader = FramePoolReader(self._pool)
        self.frames: list[Any] = []

    @property
    def announced(self) -> int:
        """The newest sequence the pool's doorbell announced so far."""
        return self._bell.drain()

    async def until(self, done: Callable[[list[Any]], bool], *, timeout: float = 30.0) -> list[Any]:
        """Collect until ``done(frames)`` holds (all frames so far); returns the new ones.

        ``timeout`` only stops a broken test from hanging; nothing asserts on time.
        """
        import asyncio

        loop = asyncio.get_running_loop()
        rung = asyncio.Event()
        loop.add_reader(self._bell.fileno(), rung.set)
        first = len(self.frames)
        try:
            async with asyncio.timeout(timeout):
                while not done(self.frames):
                    self._bell.drain()
                    frame = self._reader.read_latest()
                    if frame is None:
                        rung.clear()
                        await rung.wait()
                    else:
                        self.frames.append(frame)
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(self._bell.fileno())
        return self.frames[first:]

    def drain(self) -> list[Any]:
        """The newest frame not yet collected, if any (latest-frame semantics)."""
        self._bell.drain()
        frame = self._reader.read_latest()
        if frame is None:
            return []
        self.frames.append(frame)
        return [frame]

    def drain_every(self) -> list[Any]:
        """Every frame written since the last drain that the pool still holds, in order."""
        self._bell.drain()
        new = []
        for sequence in range(self._reader.last_sequence + 1, self._pool.latest_sequence() + 1):
            frame = self._reader.read(sequence)
            if frame is not None:
                new.append(frame)
        self.frames += new
        return new

    def close(self) -> None:
        self._bell.close()
        self._pool.close()


async def collect_frames(
    pool_name: str, until: Callable[[list[Any]], bool], *, timeout: float = 30.0
) -> list[Any]:
    """Frames copied out of a pool as they come, until ``until(frames)`` holds."""
    collector = FrameCollector(pool_name)
    try:
        return await collector.until(until, timeout=timeout)
    finally:
        collector.close()


def i420_to_rgb(pixels: Any, width: int, height: int) -> Any:
    """A yuv420p frame as an H x W x 3 RGB array (BT.601 limited range, as it was made)."""
    import cv2

    return cv2.cvtColor(pixels.reshape(height * 3 // 2, width), cv2.COLOR_YUV2RGB_I420)


# --- permissions -------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A temporary folder every user can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="kizuna-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_as_nobody(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a forked child that has dropped root: its result, or its error
    raised here.

    Root bypasses file permissions, so a permission error is only real for a user without
    it.  The child is forked, not executed, because the interpreter may live where an
    unprivileged user cannot run it; what ``function`` needs must be imported beforehand.
    As a non-root user the child keeps the current user, whose permissions already apply.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            try:
                outcome: tuple[str, Any] = ("returned", function(*args))
            except BaseException as exc:
                outcome = ("raised", exc)
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump(outcome, pipe)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "raised":
        raise value
    result: T = value
    return result
