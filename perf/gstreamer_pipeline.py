"""GStreamer's live pipeline over RTP on loopback: the second yardstick of ``perf.bench_latency``.

What it measures
----------------
Capture-to-decode latency of two ``gst-launch-1.0`` processes built from Debian's stock
plugins (``gstreamer1.0-plugins-ugly`` for ``x264enc``, ``-good`` for the RTP elements and
``udpsrc``/``udpsink``, ``gstreamer1.0-libav`` for ``avdec_h264``), fed the project's own test
source exactly as the FFmpeg arm is (:mod:`perf.ffmpeg_pipeline`: same stamped frames, same
pacing, same reader of the decoded pictures):

* sender: ``fdsrc fd=0 ! rawvideoparse (1280x720 I420 30/1) ! x264enc tune=zerolatency
  speed-preset=ultrafast bitrate=1500 key-int-max=60 ! rtph264pay config-interval=-1 !
  udpsink host=127.0.0.1 sync=false``;
* receiver: ``udpsrc (RTP H.264 caps) ! rtph264depay ! avdec_h264 thread-type=slice !
  videoconvert ! I420 ! fdsink fd=1 sync=false``, whole pictures read off its stdout.

``config-interval=-1`` sends SPS and PPS with every IDR (RFC 6184 s. 8.4 leaves the parameter
sets' transport to the application), so a receiver that listens before the sender starts shows
the very first picture.  ``thread-type=slice`` is the counterpart of FFmpeg's
``-flags low_delay``: libavcodec's frame threading holds one picture per extra thread, and
a live receiver wants none held.  ``sync=false`` on both sinks: each buffer goes out as soon as
it exists, never held for its running time.  There is no ``rtpjitterbuffer`` (the issue's
pipeline has none, and on loopback nothing is reordered): what is left is GStreamer's own.

Process hygiene is :class:`perf.ffmpeg_pipeline._Processes`'s: both processes are stopped on
every way out.  The receiver gets no end-of-stream over UDP, so it is stopped once the window's
pictures are out.  A missing ``gst-launch-1.0`` or plugin raises
:class:`~shared.errors.EncodingError` naming the Debian packages.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

from perf.ffmpeg_pipeline import (
    _DRAIN_TIMEOUT_S,
    _EXIT_TIMEOUT_S,
    _START_TIMEOUT_S,
    _TAIL_FRAMES,
    KEYFRAME_INTERVAL_S,
    PRESET,
    FfmpegRun,
    _Feed,
    _PictureReader,
    _port_pair,
    _Processes,
)
from shared.capture.testpattern import TestPattern
from shared.errors import EncodingError
from shared.models import StreamQuality

__all__ = ["PACKAGES", "find_gstreamer", "receiver_command", "run_gstreamer", "sender_command"]

#: Debian's packages the arm needs (``deploy/quickstart.sh --perf`` installs them).
PACKAGES: Final = (
    "gstreamer1.0-tools",
    "gstreamer1.0-plugins-base",
    "gstreamer1.0-plugins-good",
    "gstreamer1.0-plugins-ugly",
    "gstreamer1.0-libav",
)
#: The elements the two pipelines use, each checked with ``gst-inspect-1.0`` up front.
_ELEMENTS: Final = (
    "fdsrc",
    "rawvideoparse",
    "x264enc",
    "rtph264pay",
    "udpsink",
    "udpsrc",
    "rtph264depay",
    "avdec_h264",
    "videoconvert",
    "fdsink",
)
_PAYLOAD_TYPE: Final = 96


def find_gstreamer() -> str:
    """``gst-launch-1.0`` on ``PATH`` with every element; :class:`EncodingError` if not."""
    launch, inspect = shutil.which("gst-launch-1.0"), shutil.which("gst-inspect-1.0")
    install = f"install them (Debian: `apt-get install {' '.join(PACKAGES)}`)"
    if launch is None or inspect is None:
        raise EncodingError(
            f"the gstreamer arm needs gst-launch-1.0 and gst-inspect-1.0 on PATH: {install}"
            " or leave the arm out with --arms"
        )
    missing = [
        element
        for element in _ELEMENTS
        if subprocess.run([inspect, "--exists", element], capture_output=True).returncode != 0
    ]
    if missing:
        raise EncodingError(f"GStreamer lacks the element(s) {', '.join(missing)}: {install}")
    return launch


def _rtp_caps() -> str:
    return (
        f"application/x-rtp,media=video,clock-rate=90000,encoding-name=H264,payload={_PAYLOAD_TYPE}"
    )


def sender_command(launch: str, quality: StreamQuality, port: int) -> list[str]:
    """Raw I420 on stdin -> x264enc (zerolatency) -> RTP to ``127.0.0.1:port``."""
    width, height, fps = quality.resolution.width, quality.resolution.height, quality.framerate
    return [
        launch,
        "-q",
        *("fdsrc", "fd=0", f"blocksize={width * height * 3 // 2}", "!"),
        *("rawvideoparse", "format=i420", f"width={width}", f"height={height}"),
        *(f"framerate={fps}/1", "!"),
        *("x264enc", "tune=zerolatency", f"speed-preset={PRESET}"),
        *(f"bitrate={quality.bitrate // 1000}", f"key-int-max={KEYFRAME_INTERVAL_S * fps}", "!"),
        *("rtph264pay", "config-interval=-1", f"pt={_PAYLOAD_TYPE}", "!"),
        *("udpsink", "host=127.0.0.1", f"port={port}", "sync=false", "async=false"),
    ]


def receiver_command(launch: str, port: int) -> list[str]:
    """RTP on ``127.0.0.1:port`` -> depacketize -> avdec_h264 -> raw I420 on stdout."""
    return [
        launch,
        "-q",  # stdout carries the pictures: gst-launch must print nothing of its own
        *("udpsrc", "address=127.0.0.1", f"port={port}", f"caps={_rtp_caps()}", "!"),
        *("rtph264depay", "!", "avdec_h264", "thread-type=slice", "!"),
        *("videoconvert", "!", "video/x-raw,format=I420", "!"),
        *("fdsink", "fd=1", "sync=false"),
    ]


def run_gstreamer(quality: StreamQuality, seconds: float, warmup_s: float = 1.0) -> FfmpegRun:
    """Stream the test pattern through GStreamer and measure ``seconds`` after a warm-up.

    The window opens ``warmup_s`` after the capture of the receiver's first picture, as in
    :func:`perf.ffmpeg_pipeline.run_ffmpeg`; the result has the same fields.
    """
    if seconds <= 0 or warmup_s < 0:
        raise ValueError(f"need seconds > 0 and warmup_s >= 0, not {seconds} and {warmup_s}")
    launch = find_gstreamer()
    pattern = TestPattern(quality.resolution.width, quality.resolution.height, quality.framerate)
    with tempfile.TemporaryDirectory(prefix="kz-gst-") as tmp, _Processes("gstreamer") as procs:
        workdir = Path(tmp)
        with _port_pair() as port:  # held until the receiver binds it itself
            pass
        receiver = procs.start("receiver", receiver_command(launch, port), workdir, read=True)
        reader = _PictureReader(receiver, pattern)
        reader.start()
        procs.wait_bound(receiver, port)

        sender = procs.start("sender", sender_command(launch, quality, port), workdir)
        feed = _Feed(sender, pattern, procs)
        first_by = time.monotonic() + KEYFRAME_INTERVAL_S + _START_TIMEOUT_S
        while (first := reader.first_capture_us()) is None:
            if time.monotonic() > first_by:
                raise EncodingError("the gstreamer receiver decoded no picture in time")
            feed.send_next()
        window = (first + int(warmup_s * 1e6), first + int((warmup_s + seconds) * 1e6))
        while feed.last_capture_us < window[1]:
            feed.send_next()
        for _ in range(_TAIL_FRAMES):
            feed.send_next()
        in_window = {n: us for n, us in feed.captured.items() if window[0] <= us < window[1]}
        reader.wait_for(max(in_window, default=-1), _DRAIN_TIMEOUT_S)
        feed.close()
        procs.stop(receiver)  # UDP carries no end of stream to it
        reader.join(_EXIT_TIMEOUT_S)
        if reader.error is not None:
            raise EncodingError(f"reading the gstreamer receiver's pictures: {reader.error}")

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
