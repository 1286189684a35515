"""``kizuna-stream record URL --out FILE``: record a stream from a server, as a viewer would.

It connects like ``view`` (the certificate pinned by the URL's fingerprint, reconnecting with
backoff), and writes the H.264 it receives without re-encoding through the same
``StreamRecorder`` the recorder actor uses.  File time comes from the RTP timestamps, so the
file keeps the sender's timing whatever the network did.  ``--max-size`` and ``--max-duration``
rotate into numbered segments at the next keyframe after a limit is reached (``talk.mp4``,
``talk-001.mp4``, ...).  A progress line shows what has been written; ``--json`` prints one line
at the end.

Audio is not recorded by this command: the viewer decodes it and a copy would have to be
re-encoded; record on the server (``StreamManager.start_recording``) to keep the Opus track.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from actors.cli.common import StatusLine, UsageError, consume_until_stopped, run_command
from shared.models import VideoFormat
from shared.recording.muxer import StreamRecorder
from shared.recording.policy import FileLimits
from shared.recording.storage import segment_path

#: The RTP clock for H.264 (RFC 6184 §8.2.1).
RTP_CLOCK = 90_000
#: Nominal frame rate written into the container; the real timing comes from the timestamps.
NOMINAL_FPS = 30


def register(commands: Any) -> None:
    record = commands.add_parser("record", help="record a stream from a server, as a viewer would")
    record.add_argument("url", help="roq://HOST:PORT/SESSION?fp=sha256:... as serve prints it")
    record.add_argument(
        "--out", required=True, metavar="FILE", help="the recording (.mp4, .mov, .avi, .webm)"
    )
    record.add_argument(
        "--format", choices=[f.value for f in VideoFormat], help="default: from --out's suffix"
    )
    record.add_argument(
        "--max-size", type=float, metavar="MB", help="rotate to a new segment at this size"
    )
    record.add_argument(
        "--max-duration", type=float, metavar="S", help="rotate to a new segment at this length"
    )
    record.add_argument(
        "--seconds",
        type=float,
        help="stop after this long (default: until Ctrl-C or the stream ends)",
    )
    record.add_argument("--ca", metavar="FILE", help="trust this CA for a URL without fp=")
    record.add_argument("--json", action="store_true", help="print one JSON line at the end")
    record.set_defaults(run=run)


class _RtpClock:
    """RTP timestamps (32-bit, wrapping) to microseconds since the first one."""

    def __init__(self) -> None:
        self._first: int | None = None
        self._last = 0
        self._wraps = 0

    def micros(self, timestamp: int) -> int:
        if self._first is None:
            self._first = self._last = timestamp
        if timestamp < self._last and self._last - timestamp > 1 << 31:
            self._wraps += 1
        self._last = timestamp
        ticks = timestamp + (self._wraps << 32) - self._first
        return ticks * 1_000_000 // RTP_CLOCK


class _SegmentWriter:
    def __init__(self, first: Path, video_format: VideoFormat, limits: FileLimits) -> None:
        self._first = first
        self._format = video_format
        self._limits = limits
        self._recorder: StreamRecorder | None = None
        self._segment = 0
        self._segment_start_us = 0
        self._rotate = False
        self.segments: list[str] = []
        self.frames = 0
        self.bytes_closed = 0

    def write(
        self, access_unit: bytes, *, stream_us: int, keyframe: bool, width: int, height: int
    ) -> None:
        if self._rotate and keyframe and self._recorder is not None:
            self._close()
            self._segment += 1
            self._rotate = False
        if self._recorder is None:
            if not keyframe:
                return  # a file starts at a keyframe
            path = segment_path(self._first, self._segment)
            self._recorder = StreamRecorder(
                path, width=width, height=height, framerate=NOMINAL_FPS, video_format=self._format
            )
            self._segment_start_us = stream_us
            self.segments.append(str(path))
        recorder = self._recorder
        recorder.write_video(
            access_unit, file_us=stream_us - self._segment_start_us, keyframe=keyframe
        )
        self.frames += 1
        if self._limits.reached(size_bytes=recorder.size_bytes, duration_us=recorder.duration_us):
            self._rotate = True

    @property
    def size_bytes(self) -> int:
        return self.bytes_closed + (self._recorder.size_bytes if self._recorder else 0)

    def _close(self) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.close()
            self.bytes_closed += recorder.size_bytes

    def close(self) -> None:
        self._close()


def run(args: argparse.Namespace) -> int:
    return run_command(args, lambda stop: record(args, stop), _print_summary)


def _print_summary(result: dict[str, Any]) -> None:
    segments = result["segments"]
    print(
        f"recorded {result['frames']} frames, {result['size_bytes']} bytes in "
        f"{len(segments)} file(s): {', '.join(segments) or '-'}"
    )


async def record(args: argparse.Namespace, stop: asyncio.Event) -> dict[str, Any]:
    from shared.viewer.client import DecodedFrame, Viewer

    out = Path(args.out).resolve()
    if not out.parent.is_dir():
        raise UsageError(f"--out {args.out}: folder {out.parent} does not exist")
    suffix = out.suffix.lstrip(".").lower()
    if args.format is None and suffix not in {f.value for f in VideoFormat}:
        raise UsageError(
            f"--out {args.out}: use a .mp4, .mov, .avi or .webm name, or give --format"
        )
    limits = FileLimits(
        max_bytes=int(args.max_size * 1_000_000) if args.max_size is not None else None,
        max_duration_s=args.max_duration,
    )
    writer = _SegmentWriter(out, VideoFormat(args.format or suffix), limits)
    clock = _RtpClock()
    status = StatusLine(enabled=not args.json)
    status.show(f"connecting to {args.url} ...")
    viewer = await Viewer.connect(args.url, ca_file=args.ca)
    started = time.monotonic()
    last_status = 0.0

    async def consume() -> None:
        nonlocal last_status
        async for item in viewer.media():
            if not isinstance(item, DecodedFrame) or not item.access_unit:
                continue
            writer.write(
                item.access_unit,
                stream_us=clock.micros(item.rtp_timestamp),
                keyframe=item.keyframe,
                width=item.frame.width,
                height=item.frame.height,
            )
            now = time.monotonic()
            if status.enabled and now - last_status >= 0.5:
                last_status = now
                status.show(
                    f"[{now - started:6.1f}s] {writer.frames} frames | {writer.size_bytes / 1e6:.1f} MB"
                    f" | {len(writer.segments)} file(s) | {writer.segments[-1] if writer.segments else '-'}"
                )

    try:
        await consume_until_stopped(consume(), stop, args.seconds)
    finally:
        await viewer.close()
        writer.close()
        status.done()
    return {
        "url": args.url,
        "seconds": round(time.monotonic() - started, 2),
        "interrupted": stop.is_set(),
        "frames": writer.frames,
        "size_bytes": writer.size_bytes,
        "segments": writer.segments,
    }
