"""``kizuna-stream view URL``: watch a stream, optionally save or show it, and report.

Runs the viewer (``shared.viewer.client``) in this process; no Ray.  ``--out FILE`` remuxes the
received H.264 without re-encoding (``.h264`` writes the raw Annex B stream; any other
extension a container PyAV can write, e.g. ``.mp4`` or ``.mkv``); ``--display`` pipes the
same bitstream into ``ffplay``.  A status line updates as it runs; ``--json`` prints one JSON
line at the end instead.  It ends after ``--frames`` pictures, ``--seconds``, when the server
ends the stream, or on Ctrl-C (exit code 130).

Access (``shared.auth.control``): the viewer presents ``--token`` (or ``$KIZUNA_TOKEN``);
without one a server may let it ask the operator's approval, under ``--name``.  What the server
says is printed as it comes: that the viewer waits for approval (with the request id the
operator sees), that it was admitted, each notice (``notice: TEXT`` and its data as compact
JSON).  With ``--json`` the pending status and the notices are JSON lines of their own
(``{"type": "pending", ...}``, ``{"type": "notice", ...}``) before the final one.  A refused
viewer exits 1 with the server's reason (``reason: text``) on stderr (and in the ``--json``
error object).  The token itself is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from actors.cli.access import add_access_arguments, check_access
from actors.cli.common import (
    StatusLine,
    UsageError,
    consume_until_stopped,
    print_json,
    run_command,
)
from shared.auth.control import Notice, Pending, ServerMessage, Welcome
from shared.errors import ConfigError, NetworkError
from shared.roq.url import StreamUrl

if TYPE_CHECKING:
    from shared.viewer.client import ViewerReport

_TIME_BASE = fractions.Fraction(1, 90_000)
#: How often the status line is redrawn (each redraw takes a full viewer report).
STATUS_INTERVAL_S = 0.5


def register(commands: Any) -> None:
    view = commands.add_parser("view", help="watch a stream URL (roq://...) and report")
    view.add_argument("url", help="the stream URL that serve printed")
    view.add_argument("--out", metavar="FILE", help="save the received video (.h264, .mp4, .mkv)")
    view.add_argument("--display", action="store_true", help="show the video (needs ffplay)")
    view.add_argument("--frames", type=int, help="stop after this many decoded pictures")
    view.add_argument("--seconds", type=float, help="stop after this long")
    view.add_argument("--ca", metavar="FILE", help="trust this CA for a URL without fp=")
    view.add_argument(
        "--streams", action="store_true", help="ask for QUIC stream mode instead of datagrams"
    )
    view.add_argument(
        "--latency-budget",
        type=float,
        default=200.0,
        metavar="MS",
        help="how long to wait for a retransmission before skipping (default 200 ms)",
    )
    view.add_argument(
        "--json", action="store_true", help="print one JSON line instead of a status line"
    )
    add_access_arguments(view, name=True)
    view.set_defaults(run=run)


class _VideoSink:
    """Received access units to a file (remuxed, not re-encoded) and/or to ffplay."""

    def __init__(self, out: str | None, display: bool) -> None:
        self._raw: Any = None
        self._container: Any = None
        self._stream: Any = None
        self._player: subprocess.Popen[bytes] | None = None
        self._first_ts: int | None = None
        self._last_pts = -1
        if out is not None:
            path = Path(out)
            if not path.parent.exists():
                raise UsageError(f"--out {out}: folder {path.parent} does not exist")
            if path.suffix.lower() in (".h264", ".264"):
                self._raw = path.open("wb")
            else:
                import av

                self._container = av.open(str(path), "w")
        if display:
            player = shutil.which("ffplay")
            if player is None:
                raise UsageError("--display needs ffplay (FFmpeg) on the PATH")
            self._player = subprocess.Popen(
                [
                    player,
                    "-loglevel",
                    "error",
                    "-fflags",
                    "nobuffer",
                    "-flags",
                    "low_delay",
                    "-framedrop",
                    "-f",
                    "h264",
                    "-i",
                    "-",
                ],
                stdin=subprocess.PIPE,
            )

    def write(self, frame: Any) -> None:
        data: bytes = frame.access_unit
        if self._raw is not None:
            self._raw.write(data)
        if self._player is not None and self._player.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self._player.stdin.write(data)
                self._player.stdin.flush()
        if self._container is not None:
            self._mux(frame, data)

    def _mux(self, frame: Any, data: bytes) -> None:
        import av

        if self._stream is None:
            if not frame.keyframe:
                return  # a file starts at a keyframe
            self._stream = self._container.add_stream("h264", rate=30)
            self._stream.width, self._stream.height = frame.frame.width, frame.frame.height
            self._stream.time_base = _TIME_BASE
            self._first_ts = frame.rtp_timestamp
        assert self._first_ts is not None
        pts = (frame.rtp_timestamp - self._first_ts) % 2**32
        pts = max(pts, self._last_pts + 1)  # the muxer needs strictly increasing timestamps
        self._last_pts = pts
        packet = av.Packet(data)
        packet.pts = packet.dts = pts
        packet.time_base = _TIME_BASE
        packet.stream = self._stream
        packet.is_keyframe = frame.keyframe
        self._container.mux(packet)

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
        if self._container is not None:
            self._container.close()
        if self._player is not None:
            if self._player.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self._player.stdin.close()
            self._player.wait()


def _status_text(report: ViewerReport, elapsed_s: float) -> str:
    p50 = report.latency_p50_ms
    return (
        f"[{elapsed_s:5.1f}s] {report.mode} | {report.frames_decoded} frames"
        f" | {report.frames_dropped} dropped | p50 "
        + (f"{p50:.0f} ms" if p50 is not None else "-")
        + f" | rtt {report.rtt_ms:.0f} ms | lost {report.packets_lost}"
        + f" recovered {report.packets_recovered}"
    )


def _printable(text: str) -> str:
    """``text`` with any control character (a terminal escape from a hostile server) shown as
    U+FFFD; printable text is left exactly as the server wrote it."""
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


class _ControlEcho:
    """Says on the terminal (or in JSON lines) what the server says on the control stream."""

    def __init__(self, status: StatusLine, json_lines: bool) -> None:
        self.status = status
        self.json_lines = json_lines

    def __call__(self, message: ServerMessage) -> None:
        if isinstance(message, Notice):
            if self.json_lines:
                print_json({"type": "notice", "text": message.text, "data": message.data})
                return
            data = msgspec.json.encode(message.data).decode() if message.data else ""
            self.status.above(_printable(f"notice: {message.text}" + (f" {data}" if data else "")))
        elif isinstance(message, Pending):
            if self.json_lines:
                print_json(
                    {
                        "type": "pending",
                        "request": message.request,
                        "expires_in": message.expires_in,
                    }
                )
                return
            text = _printable(
                f"waiting for the operator's approval (request {message.request}, "
                f"expires in {message.expires_in:.0f} s)"
            )
            self.status.above(text)
            self.status.show(text)
        elif isinstance(message, Welcome) and not self.json_lines:
            self.status.above(
                _printable(
                    f"admitted to stream {message.stream} as viewer {message.viewer} "
                    f"(max quality {message.permissions.max_quality})"
                )
            )


def run(args: argparse.Namespace) -> int:
    return run_command(args, lambda stop: watch(args, stop), _print_summary)


def _print_summary(result: dict[str, Any]) -> None:
    report = result["report"]
    print(
        f"{report['frames_decoded']} frames decoded, {report['frames_dropped']} dropped, "
        f"latency p50 {report['latency_p50_ms']} ms, {report['reconnects']} reconnects"
    )


async def watch(args: argparse.Namespace, stop: asyncio.Event) -> dict[str, Any]:
    try:
        url = StreamUrl.parse(args.url)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    token = check_access(args, url)
    if args.frames is not None and args.frames <= 0:
        raise UsageError(f"--frames must be positive, got {args.frames}")
    if args.seconds is not None and args.seconds <= 0:
        raise UsageError(f"--seconds must be positive, got {args.seconds}")
    from shared.viewer.client import DecodedFrame, Viewer

    sink = _VideoSink(args.out, args.display)
    status = StatusLine(enabled=not args.json)
    status.show(f"connecting to {args.url} ...")
    viewer = await Viewer.connect(
        url,
        ca_file=args.ca,
        datagrams=not args.streams,
        latency_budget_s=args.latency_budget / 1000,
        token=token,
        name=args.name,
        on_message=_ControlEcho(status, json_lines=args.json),
    )
    started = time.monotonic()
    next_status = started

    async def consume() -> None:
        nonlocal next_status
        async for item in viewer.media():
            if isinstance(item, DecodedFrame):
                sink.write(item)
                # Per frame only O(1) work: the full report (latency percentiles over up to
                # 100,000 samples) is taken at the status line's rate and once at the end.
                if args.frames is not None and viewer.frames_decoded >= args.frames:
                    return
                now = time.monotonic()
                if status.enabled and now >= next_status:
                    next_status = now + STATUS_INTERVAL_S
                    status.show(_status_text(viewer.report(), now - started))

    try:
        await consume_until_stopped(consume(), stop, args.seconds)
    finally:
        report = viewer.report()
        stats = viewer.stream_stats()
        termination = viewer.termination
        refused = viewer.refusal_reason
        welcome = viewer.welcome
        await viewer.close()
        sink.close()
        status.done()
    if refused is not None:
        # In the server's words: "<reason>: <text>" (e.g. "expired: the token expired 5 s ago").
        raise NetworkError(f"the server refused this viewer: {_printable(refused)}")
    if termination is not None and termination[0] != 0:
        # The server ended it on purpose with a reason (e.g. the stream is full).
        raise NetworkError(f"the server closed the stream: {_printable(termination[1])}")
    return {
        "url": args.url,
        "seconds": round(time.monotonic() - started, 2),
        "interrupted": stop.is_set(),
        "report": msgspec.to_builtins(report),
        "stats": msgspec.to_builtins(stats),
        "welcome": msgspec.to_builtins(welcome) if welcome is not None else None,
        "out": str(Path(args.out).resolve()) if args.out else None,
    }
