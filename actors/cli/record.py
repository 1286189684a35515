"""``kizuna-stream record URL --out FILE``: record a stream from a server, as a viewer would.

It connects like ``view`` (the certificate pinned by the URL's fingerprint, reconnecting with
backoff), and writes the H.264 it receives without re-encoding.  What to write and when is
decided by the same ``RecordingCore`` the recorder actor drives, and written by the same
``StreamRecorder``.  File time comes from the RTP timestamps (mapped by the core's
``RtpMediaClock``), so the file keeps the sender's timing whatever the network did.
``--max-size`` and ``--max-duration`` rotate into numbered segments at the next keyframe once a
limit is (nearly) reached (``talk.mp4``, ``talk-001.mp4``, ...); a viewer cannot ask for a
keyframe, so that is the stream's next periodic one.  A progress line shows what has been written; ``--json`` prints one line
at the end.

It presents ``--token`` (or ``$KIZUNA_TOKEN``) as ``view`` does; a refused viewer exits 1 with
the server's reason.

Audio is not recorded by this command: the viewer decodes it and a copy would have to be
re-encoded; record on the server (``StreamManager.start_recording``) to keep the Opus track.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from actors.cli.access import add_access_arguments, check_access
from actors.cli.common import StatusLine, UsageError, consume_until_stopped, run_command
from shared.errors import ConfigError, NetworkError, RecordingError
from shared.models import VideoFormat
from shared.recording.core import (
    CloseSegment,
    Failed,
    OpenSegment,
    RecordingCore,
    RecordingEvent,
    RecordingPlan,
    WriteVideo,
)
from shared.recording.muxer import StreamRecorder
from shared.recording.policy import FileLimits
from shared.roq.url import StreamUrl

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
    add_access_arguments(record)
    record.set_defaults(run=run)


class _SegmentFiles:
    """Carries out what the recording core decides: one StreamRecorder per segment."""

    def __init__(self, video_format: VideoFormat) -> None:
        self._format = video_format
        self._recorder: StreamRecorder | None = None
        self.bytes_closed = 0
        #: The picture size of the latest frame: a segment opens at that size.
        self.width = self.height = 0

    @property
    def size_bytes(self) -> int:
        return self.bytes_closed + (self._recorder.size_bytes if self._recorder else 0)

    def apply(self, events: list[RecordingEvent]) -> int | None:
        """Carry out ``events``; returns the open segment's muxed size afterwards, if one is."""
        for event in events:
            if isinstance(event, OpenSegment):
                self._recorder = StreamRecorder(
                    event.path,
                    width=self.width,
                    height=self.height,
                    framerate=NOMINAL_FPS,
                    video_format=self._format,
                )
            elif isinstance(event, WriteVideo):
                assert self._recorder is not None
                self._recorder.write_video(
                    event.data, file_us=event.file_us, keyframe=event.keyframe
                )
            elif isinstance(event, CloseSegment):
                self.close()
            elif isinstance(event, Failed):
                recorder, self._recorder = self._recorder, None
                if recorder is not None:
                    with contextlib.suppress(RecordingError):
                        recorder.close()
            # A viewer cannot ask the encoder for a keyframe (rotation waits for the next
            # periodic one), has no audio track to write, no quota and no motion detector.
        return self._recorder.size_bytes if self._recorder is not None else None

    def close(self) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            recorder.close()
            self.bytes_closed += recorder.size_bytes


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

    try:
        url = StreamUrl.parse(args.url)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    token = check_access(args, url)
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
    # Nothing here is timed (no schedule, no motion trigger): the core's only deadline is its
    # start keyframe request, which a viewer cannot make, so no timer is armed for it.
    core = RecordingCore(
        RecordingPlan(
            first_path=str(out), framerate=NOMINAL_FPS, limits=limits, rtp_clock_rate=RTP_CLOCK
        ),
        now=time.monotonic(),
    )
    files = _SegmentFiles(VideoFormat(args.format or suffix))
    status = StatusLine(enabled=not args.json)
    status.show(f"connecting to {args.url} ...")
    viewer = await Viewer.connect(url, ca_file=args.ca, token=token)
    started = time.monotonic()
    last_status = 0.0

    async def consume() -> None:
        nonlocal last_status
        async for item in viewer.media():
            if not isinstance(item, DecodedFrame) or not item.access_unit:
                continue
            now = time.monotonic()
            events = core.receive_rtp_video(
                item.access_unit, rtp_timestamp=item.rtp_timestamp, keyframe=item.keyframe, now=now
            )
            files.width, files.height = item.frame.width, item.frame.height
            try:
                size = files.apply(events)
            except RecordingError as exc:  # disk full: keep the file so far, then report it
                files.apply(core.write_failed(str(exc)))
                raise
            if size is not None:
                core.segment_size(size)  # what it asks for is a keyframe, which a viewer cannot
            if status.enabled and now - last_status >= 0.5:
                last_status = now
                status.show(
                    f"[{now - started:6.1f}s] {core.frames_written} frames | {files.size_bytes / 1e6:.1f} MB"
                    f" | {len(core.segments)} file(s) | {core.segments[-1] if core.segments else '-'}"
                )

    try:
        await consume_until_stopped(consume(), stop, args.seconds)
    finally:
        refused = viewer.refusal_reason
        await viewer.close()
        files.apply(core.stop(time.monotonic()))
        status.done()
    if refused is not None:
        raise NetworkError(f"the server refused this viewer: {refused}")
    return {
        "url": args.url,
        "seconds": round(time.monotonic() - started, 2),
        "interrupted": stop.is_set(),
        "frames": core.frames_written,
        "size_bytes": files.size_bytes,
        "segments": core.segments,
    }
