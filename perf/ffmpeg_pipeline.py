"""Stock FFmpeg's live pipeline over RTP on loopback: the yardstick arm of ``perf.bench_latency``.

What it measures
----------------
Capture-to-decode latency of the ``ffmpeg`` command-line tool set up for low delay, fed the
project's own test source:

1. Python renders :class:`~shared.capture.testpattern.TestPattern` frames (the same moving
   picture, and the same stamp strip, that the capture actor writes), taking the capture time
   ``time.time_ns() // 1000`` just before rendering, as the capture actor and the in-process
   baseline do.  Frames are paced at the stream's rate on the capture actor's absolute schedule
   (:class:`~shared.capture.pacing.FramePacer`: late frames are skipped, never burst).
2. Each frame goes as ``rawvideo yuv420p`` down a pipe into a sender ``ffmpeg``:
   ``libx264 -preset ultrafast -tune zerolatency -b:v 1500k -g 60``, sent as RTP (RFC 6184,
   packetization-mode 1) to ``127.0.0.1``.
3. A receiver ``ffmpeg``, started and listening before the sender starts, opens the SDP,
   depacketizes and decodes with FFmpeg's low-delay flags (``-fflags nobuffer -flags low_delay
   -probesize 32 -analyzeduration 0``) and writes each picture as ``rawvideo yuv420p`` to its
   stdout.
4. A Python thread reads whole pictures off that pipe as they complete, takes the time first,
   then reads the stamp (:func:`shared.capture.stamp.read_stamp`): latency = now - capture.

So the figure spans render, the pipe into FFmpeg, x264, RTP packetization, UDP on loopback,
depacketization, H.264 decoding and the pipe back out.  The pipeline arm spans render, the
frame pool, x264, RTP packetization, QUIC on loopback, the viewer's jitter buffer and PyAV
decoding.  Both read the capture time off the decoded picture.

How it matches the pipeline arm: the same source (TestPattern, same frames), size (1280x720),
rate (30 fps, paced the same way), target bitrate (1.5 Mbps, ``QualityPreset.MEDIUM``) and GOP
(60 frames, the stream's 2 s keyframe interval); both encoders are x264 with the
``zerolatency`` tune (no B-frames, no lookahead).  It differs where the command line is stock:
x264 runs ``ultrafast`` (the project's encoder runs ``veryfast``, a little slower per frame) with
its own slice-thread count, rate control is plain ABR (the project's is CBR under a 0.5 s VBV),
x264 may cut a keyframe on a scene change (the test pattern has none), and the transport is
plain UDP (no retransmission, no congestion control).

Warm-up: ``-fflags nobuffer`` makes the receiver drop the packets its stream probe read, which
hold the first keyframe, so it shows its first picture at the second keyframe (2 s in).  The
measured window therefore starts ``warmup_s`` after the capture of the first picture the
receiver shows, and the sender runs on a little past the window so the pictures FFmpeg still
holds at the window's end come out and are counted.

Why neither ``ffmpeg``'s options nor the harness add a hold of their own (an ``-debug_ts``
trace shows each picture reaching the receiver's muxer within about 2 ms of its demuxer
handing the packet over):

* ``-flags low_delay`` turns off the H.264 decoder's frame threading (libavcodec only threads
  by frame without ``AV_CODEC_FLAG_LOW_DELAY``); without it the receiver adds two more frames
  on a 2-core machine (measured: about 139 ms instead of 74 ms at p50).
* ``-probesize 32 -analyzeduration 0``: the stream probe stops at the first packet.
* ``-fps_mode passthrough``: each decoded picture goes straight out, never duplicated, dropped
  or held for a constant-rate clock.
* ``-flush_packets 1``: the output ``AVIOContext`` is flushed after every picture, so the tail
  of picture n cannot wait in FFmpeg's 32 KiB buffer for picture n + 1 (FFmpeg 5.1 already
  flushes a pipe per packet: the figure did not move without the flag; it is there explicitly).
* The reader thread blocks in ``readinto`` on the pipe (grown to the 1 MiB the kernel allows an
  unprivileged process) and takes the time the moment a whole picture is in.

What remains is FFmpeg's own.  With FFmpeg 5.1 (the ``ffmpeg`` of Debian 12) the receiver
lets picture n out about 2 ms after the first packet of picture n + 2 arrives (measured with a
UDP relay between the two processes), so it holds each picture about two frame intervals; the
sender adds about 7 ms from capture to the picture's last packet.  Part of that hold is the
H.264 parser behind FFmpeg's RTP demuxer, which only knows a picture is complete when the next
one starts: FFmpeg 8.1's libraries (PyAV's build) demux picture n when picture n + 1's first
packet arrives, one frame interval.  Adding ``-fflags noparse -flags2 chunks``, ``-threads 1``
or ``-reorder_queue_size 0`` left the 5.1 figure where it was.  That is stock FFmpeg's live
pipeline, reported as it is.

Process hygiene: both processes are stopped on every way out of :func:`run_ffmpeg` (a
``finally``).  If this process dies outright (SIGKILL), the sender sees EOF on its stdin, sends
an RTCP BYE as it closes (``-rtpflags send_bye``), and the receiver takes the BYE as the end of
the stream and exits, so neither outlives it; only a death in the few milliseconds between the
receiver binding its port and the sender starting would leave the receiver waiting.  A missing
``ffmpeg`` raises :class:`~shared.errors.EncodingError` saying so.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Final

import msgspec
import numpy as np
import psutil

from shared.capture.pacing import FramePacer
from shared.capture.stamp import read_stamp
from shared.capture.testpattern import TestPattern
from shared.errors import EncodingError
from shared.models import StreamQuality

__all__ = ["FfmpegRun", "find_ffmpeg", "receiver_command", "run_ffmpeg", "sender_command"]

#: x264 speed preset of the FFmpeg arm (FFmpeg's streaming guide's choice for low latency).
PRESET: Final = "ultrafast"
#: Keyframe interval in seconds: the stream's default (``StreamConfig.keyframe_interval_s``).
KEYFRAME_INTERVAL_S: Final = 2
#: Frames sent past the window so that the pictures FFmpeg holds (two) come out and count.
_TAIL_FRAMES: Final = 10
#: Seconds for FFmpeg to write the SDP, for the receiver to bind, for a process to exit.
_START_TIMEOUT_S: Final = 10.0
_EXIT_TIMEOUT_S: Final = 5.0
#: After the last frame is sent, how long the last window frame may take to come out.
_DRAIN_TIMEOUT_S: Final = 2.0
#: Largest pipe an unprivileged process may ask for (``/proc/sys/fs/pipe-max-size``).
_PIPE_SIZE: Final = 1 << 20


class FfmpegRun(msgspec.Struct, kw_only=True):
    """One run of the FFmpeg arm: latencies of the frames in the window, and the counts."""

    latencies_ns: list[int]
    """``receive - capture`` of each frame captured in the window and decoded."""
    frames_sent: int
    """Frames captured in the window and written to the sender."""
    frames_decoded: int
    """Of those, frames that came out of the receiver with a readable stamp."""
    frames_unstamped: int
    """Pictures out of the receiver, over the whole run, whose stamp did not read."""
    frames_skipped: int
    """Frames the pacer skipped over the whole run because the writer fell an interval behind."""


def find_ffmpeg() -> str:
    """The ``ffmpeg`` executable on ``PATH``; :class:`EncodingError` if there is none."""
    path = shutil.which("ffmpeg")
    if path is None:
        raise EncodingError(
            "the ffmpeg arm needs the `ffmpeg` command-line tool (with libx264) on PATH: "
            "install it (Debian: `apt-get install ffmpeg`) or leave the arm out with --arms"
        )
    return path


def sender_command(
    ffmpeg: str, quality: StreamQuality, port: int, sdp: Path, *, frames: int | None = None
) -> list[str]:
    """Raw I420 on stdin -> libx264 (zerolatency) -> RTP to ``127.0.0.1:port``; SDP to ``sdp``."""
    width, height = quality.resolution.width, quality.resolution.height
    gop = KEYFRAME_INTERVAL_S * quality.framerate
    return [
        ffmpeg,
        *("-hide_banner", "-loglevel", "error"),
        *("-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{width}x{height}"),
        *("-r", str(quality.framerate), "-i", "pipe:"),
        *(("-frames:v", str(frames)) if frames is not None else ()),
        *("-c:v", "libx264", "-preset", PRESET, "-tune", "zerolatency"),
        *("-b:v", f"{quality.bitrate // 1000}k", "-g", str(gop)),
        # RTCP BYE on close (RFC 3550 s. 6.6): the receiver sees the end and exits by itself.
        *("-f", "rtp", "-rtpflags", "send_bye", "-sdp_file", str(sdp)),
        f"rtp://127.0.0.1:{port}",
    ]


def receiver_command(ffmpeg: str, sdp: Path) -> list[str]:
    """SDP -> RTP depacketize -> H.264 decode (low delay) -> raw I420 on stdout, unbuffered."""
    return [
        ffmpeg,
        *("-hide_banner", "-loglevel", "error", "-nostdin"),
        *("-protocol_whitelist", "file,udp,rtp"),
        *("-fflags", "nobuffer", "-flags", "low_delay"),
        *("-probesize", "32", "-analyzeduration", "0"),
        *("-i", str(sdp)),
        *("-map", "0:v:0", "-fps_mode", "passthrough"),
        *("-f", "rawvideo", "-pix_fmt", "yuv420p", "-flush_packets", "1", "pipe:1"),
    ]


def run_ffmpeg(quality: StreamQuality, seconds: float, warmup_s: float = 1.0) -> FfmpegRun:
    """Stream the test pattern through FFmpeg and measure ``seconds`` of it after a warm-up.

    The window opens ``warmup_s`` after the capture of the receiver's first picture.  Raises
    :class:`EncodingError` if ``ffmpeg`` is missing, fails, or shows no picture in time.
    """
    if seconds <= 0 or warmup_s < 0:
        raise ValueError(f"need seconds > 0 and warmup_s >= 0, not {seconds} and {warmup_s}")
    ffmpeg = find_ffmpeg()
    pattern = TestPattern(quality.resolution.width, quality.resolution.height, quality.framerate)
    with tempfile.TemporaryDirectory(prefix="kz-ffmpeg-") as tmp, _Processes() as procs:
        workdir = Path(tmp)
        sdp = workdir / "stream.sdp"
        with _port_pair() as port:  # bound by us (a sink for the probe's packets) until here
            _write_sdp(ffmpeg, quality, pattern, port, sdp)
        receiver = procs.start("receiver", receiver_command(ffmpeg, sdp), workdir, read=True)
        reader = _PictureReader(receiver, pattern)
        reader.start()
        procs.wait_bound(receiver, port)

        sender = procs.start("sender", sender_command(ffmpeg, quality, port, sdp), workdir)
        feed = _Feed(sender, pattern, procs)
        # The first picture may only come at the second keyframe (see the module docstring).
        first_by = time.monotonic() + 2 * KEYFRAME_INTERVAL_S + _START_TIMEOUT_S
        while (first := reader.first_capture_us()) is None:
            if time.monotonic() > first_by:
                raise EncodingError("the ffmpeg receiver decoded no picture in time")
            feed.send_next()
        window = (first + int(warmup_s * 1e6), first + int((warmup_s + seconds) * 1e6))
        while feed.last_capture_us < window[1]:
            feed.send_next()
        for _ in range(_TAIL_FRAMES):
            feed.send_next()
        in_window = {n: us for n, us in feed.captured.items() if window[0] <= us < window[1]}
        reader.wait_for(max(in_window, default=-1), _DRAIN_TIMEOUT_S)
        feed.close()  # the sender's BYE ends the receiver too
        procs.wait_ok(receiver)
        reader.join(_EXIT_TIMEOUT_S)
        if reader.error is not None:
            raise EncodingError(f"reading the ffmpeg receiver's pictures: {reader.error}")

    latencies = [
        received_ns - capture_us * 1000
        for number, capture_us, received_ns in reader.pictures
        if in_window.get(number) == capture_us
    ]
    return FfmpegRun(
        latencies_ns=latencies,
        frames_sent=len(in_window),
        frames_decoded=len(latencies),
        frames_unstamped=reader.unstamped,
        frames_skipped=feed.pacer.skipped,
    )


class _Feed:
    """Writes stamped test-pattern frames into the sender, paced like the capture actor."""

    def __init__(self, sender: subprocess.Popen[bytes], pattern: TestPattern, procs: _Processes):
        assert sender.stdin is not None
        self._sender, self._stdin = sender, sender.stdin
        self._pattern, self._procs = pattern, procs
        self._buffer = np.empty(pattern.frame_bytes, dtype=np.uint8)
        self.pacer = FramePacer(pattern.framerate, time.monotonic())
        #: Frame number -> capture time (wall-clock us) of every frame written.
        self.captured: dict[int, int] = {}
        self.last_capture_us = 0

    def send_next(self) -> None:
        """Sleep until the next frame is due, then stamp, render and write it."""
        while (wait := self.pacer.wait(time.monotonic())) > 0:
            time.sleep(wait)
        capture_us = time.time_ns() // 1000
        self._pattern.render_into(self._buffer, self.pacer.frame_number, capture_us)
        try:
            self._stdin.write(self._buffer.data)
        except BrokenPipeError:
            self._procs.wait_ok(self._sender)  # raises with ffmpeg's own message
            raise EncodingError("the ffmpeg sender stopped reading its input") from None
        self.captured[self.pacer.frame_number] = capture_us
        self.last_capture_us = capture_us
        self.pacer.taken()

    def close(self) -> None:
        """End of input: the sender sends what it has and exits."""
        self._stdin.close()
        self._procs.wait_ok(self._sender)


class _PictureReader(threading.Thread):
    """Reads whole I420 pictures off the receiver's stdout and times each as it completes."""

    def __init__(self, receiver: subprocess.Popen[bytes], pattern: TestPattern) -> None:
        super().__init__(name="ffmpeg-picture-reader", daemon=True)
        assert receiver.stdout is not None
        self._pipe = receiver.stdout
        self._shape = (pattern.height, pattern.width)
        self._frame_bytes = pattern.frame_bytes
        self._arrived = threading.Condition()
        #: (frame number, capture us, receive ns) of each picture whose stamp read.
        self.pictures: list[tuple[int, int, int]] = []
        self.unstamped = 0
        self.error: BaseException | None = None
        self._done = False  # EOF or error: nothing more will come

    def first_capture_us(self) -> int | None:
        with self._arrived:
            return self.pictures[0][1] if self.pictures else None

    def wait_for(self, frame_number: int, timeout: float) -> None:
        """Until frame ``frame_number`` or a later one came out, or ``timeout`` seconds."""
        with self._arrived:
            self._arrived.wait_for(
                lambda: self._done or any(n >= frame_number for n, _, _ in self.pictures[-3:]),
                timeout,
            )

    def run(self) -> None:
        buffer = np.empty(self._frame_bytes, dtype=np.uint8)
        view = buffer.data
        luma = buffer[: self._shape[0] * self._shape[1]].reshape(self._shape)
        try:
            while self._read_picture(view):
                received_ns = time.time_ns()  # first: the picture is out of FFmpeg now
                stamp = read_stamp(luma)
                with self._arrived:
                    if stamp is None:
                        self.unstamped += 1
                    else:
                        self.pictures.append((stamp.frame_number, stamp.capture_us, received_ns))
                    self._arrived.notify_all()
        except Exception as exc:  # handed to the caller, not lost with the thread
            self.error = exc
        finally:
            with self._arrived:
                self._done = True
                self._arrived.notify_all()

    def _read_picture(self, view: memoryview) -> bool:
        """Fill ``view`` from the pipe; False at EOF (a partial picture at EOF is dropped)."""
        filled = 0
        while filled < len(view):
            got = self._pipe.readinto(view[filled:])  # type: ignore[attr-defined]
            if not got:
                return False
            filled += got
        return True


class _Processes:
    """The FFmpeg processes of one run; every one is stopped when the block exits, however."""

    def __init__(self, tool: str = "ffmpeg") -> None:
        self._tool = tool  # names the process in errors: perf.gstreamer_pipeline shares this
        self._started: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def __enter__(self) -> _Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for _, proc, _ in reversed(self._started):
            self.stop(proc)

    def start(
        self, role: str, command: Sequence[str], workdir: Path, *, read: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start ``command``: its stdout (``read``) or its stdin is a pipe to us."""
        log = workdir / f"{role}.log"
        with log.open("wb") as stderr:  # a file: an unread stderr pipe could block ffmpeg
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL if read else subprocess.PIPE,
                stdout=subprocess.PIPE if read else subprocess.DEVNULL,
                stderr=stderr,
                bufsize=0,
            )
        self._started.append((role, proc, log))
        _grow_pipe(proc.stdout if read else proc.stdin)
        return proc

    def wait_bound(self, proc: subprocess.Popen[bytes], port: int) -> None:
        """Until ``proc`` has bound UDP ``port``: the receiver must listen before the sender."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        process = psutil.Process(proc.pid)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise self._failure(proc)
            with contextlib.suppress(psutil.Error):
                if any(c.laddr and c.laddr.port == port for c in process.net_connections("udp")):
                    return
            time.sleep(0.01)  # no event to wait on: the socket table is all there is
        raise EncodingError(f"the {self._role(proc)} did not bind UDP port {port} in time")

    def wait_ok(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait for ``proc`` to exit; :class:`EncodingError` with its log if it failed."""
        try:
            proc.wait(_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise EncodingError(f"the {self._role(proc)} did not exit in time") from None
        if proc.returncode != 0:
            raise self._failure(proc)

    @staticmethod
    def stop(proc: subprocess.Popen[bytes]) -> None:
        """Stop ``proc`` unless it has exited, and close our ends of its pipes.

        SIGTERM first; but an ``ffmpeg`` blocked reading RTP only gives up its read on a second
        signal, so after a short grace it is killed (nothing it still holds is wanted).
        """
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def _failure(self, proc: subprocess.Popen[bytes]) -> EncodingError:
        role = self._role(proc)
        log = next(log for _, p, log in self._started if p is proc)
        detail = log.read_text(errors="replace").strip()[-2000:] if log.exists() else ""
        return EncodingError(
            f"the {role} exited with status {proc.returncode}: {detail or 'no message'}"
        )

    def _role(self, proc: subprocess.Popen[bytes]) -> str:
        return self._tool + " " + next(role for role, p, _ in self._started if p is proc)


def _write_sdp(
    ffmpeg: str, quality: StreamQuality, pattern: TestPattern, port: int, sdp: Path
) -> None:
    """Have FFmpeg write the sender's SDP (``-sdp_file``) before any receiver starts.

    FFmpeg writes the SDP only once its encoder has the first picture, just before it sends, so
    the real sender's SDP would come too late for a receiver started first.  The same command
    run for one frame writes the same SDP: x264 here puts SPS and PPS in band (the RTP muxer
    asks for no global header), so the SDP carries no parameter sets that could differ.
    """
    frame = pattern.render(0, time.time_ns() // 1000)
    command = sender_command(ffmpeg, quality, port, sdp, frames=1)
    try:
        done = subprocess.run(
            command, input=frame.tobytes(), capture_output=True, timeout=_START_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise EncodingError("ffmpeg did not write the stream's SDP in time") from None
    if done.returncode != 0 or not sdp.exists():
        message = done.stderr.decode(errors="replace").strip()[-2000:]
        raise EncodingError(f"ffmpeg could not start an RTP sender: {message or 'no message'}")


@contextlib.contextmanager
def _port_pair() -> Iterator[int]:
    """An even UDP port and the next one (for RTCP, RFC 3550 s. 11), both bound while open."""
    for _ in range(100):
        with contextlib.ExitStack() as held:
            rtp = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            rtp.bind(("127.0.0.1", 0))
            port: int = rtp.getsockname()[1]
            if port % 2 or port >= 65535:
                continue
            rtcp = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            try:
                rtcp.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            yield port
            return
    raise EncodingError("found no free pair of UDP ports for the ffmpeg arm")


def _grow_pipe(pipe: IO[bytes] | None) -> None:
    """Ask for a 1 MiB pipe so a 1.4 MB picture crosses in two writes, not 21 (Linux only)."""
    if pipe is not None and hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):  # over the system's limit: keep the default
            fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
