"""The ``kizuna-stream`` command line.

``kizuna-stream demo`` runs a whole broadcast on this machine: a Ray cluster (embedded, or the
one at ``--address`` / RAY_ADDRESS), the test pattern encoded once, N viewers decoding it over
RTP over QUIC on loopback, and optionally a recording.  ``--json`` prints one JSON line for
scripts; otherwise a status line updates while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from shared.errors import KizunaError
from shared.models import (
    QualityPreset,
    RecordingConfig,
    Resolution,
    StreamConfig,
    StreamQuality,
    parse_source,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _quality(args: argparse.Namespace) -> StreamQuality:
    base = StreamQuality.from_preset(QualityPreset(args.preset))
    if args.size is None and args.fps is None and args.bitrate is None:
        return base
    width, height = base.resolution.width, base.resolution.height
    if args.size is not None:
        try:
            width, height = (int(part) for part in args.size.lower().split("x"))
        except ValueError:
            raise KizunaError(
                f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 1280x720"
            ) from None
    return StreamQuality(
        resolution=Resolution(width, height),
        framerate=args.fps if args.fps is not None else base.framerate,
        bitrate=int(args.bitrate * 1000) if args.bitrate is not None else base.bitrate,
    )


class _StatusLine:
    """One line on stderr, rewritten in place (only when stderr is a terminal or forced)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._width = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        sys.stderr.write("\r" + text.ljust(self._width))
        sys.stderr.flush()
        self._width = len(text)

    def done(self) -> None:
        if self.enabled and self._width:
            sys.stderr.write("\n")
            sys.stderr.flush()


async def run_demo(args: argparse.Namespace, stop: asyncio.Event) -> dict[str, Any]:
    from actors.manager import StreamManager
    from shared.viewer import Viewer

    parse_source(args.source)
    record = None
    if args.record:
        path = Path(args.record).resolve()
        record = RecordingConfig(output_path=str(path))
    config = StreamConfig(source=args.source, quality=_quality(args), record=record)
    status = _StatusLine(enabled=not args.json)
    status.show("starting Ray and the stream actors ...")
    async with StreamManager.start(address=args.address, dashboard=args.dashboard) as manager:
        session = await manager.start_camera_stream(config)
        sid = session.session_id
        tickets = [
            await manager.add_viewer(sid, peer_id=f"demo-viewer-{i + 1}")
            for i in range(args.viewers)
        ]
        viewers = [await Viewer.connect(ticket.url) for ticket in tickets]

        async def consume(viewer: Viewer) -> None:
            async for _ in viewer.frames():
                pass

        tasks = [asyncio.create_task(consume(viewer)) for viewer in viewers]
        started = time.monotonic()
        deadline = started + args.seconds
        interrupted = False
        while (remaining := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(0.5, remaining))
            if stop.is_set():
                interrupted = True
                break
            if status.enabled:
                current = await manager.get_stream(sid)
                parts = [
                    f"[{time.monotonic() - started:4.1f}/{args.seconds:g}s]",
                    f"{current.state}",
                    f"enc {current.stats.frames_encoded} fr {current.stats.current_bitrate / 1000:.0f} kbps",
                ]
                for index, viewer in enumerate(viewers, 1):
                    report = viewer.report()
                    p50 = (
                        f"{report.latency_p50_ms:.0f}ms"
                        if report.latency_p50_ms is not None
                        else "-"
                    )
                    parts.append(f"v{index} {report.frames_decoded} fr p50 {p50}")
                status.show(" | ".join(parts))
        streamed = time.monotonic() - started
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        reports = [viewer.report() for viewer in viewers]
        for viewer in viewers:
            await viewer.close()
        final = await manager.stop_stream(sid)
    status.done()
    assert final is not None
    recording = final.recording
    return {
        "session_id": sid,
        "source": args.source,
        "resolution": str(config.quality.resolution),
        "framerate": config.quality.framerate,
        "seconds": round(streamed, 2),
        "interrupted": interrupted,
        "state": str(final.state),
        "error": msgspec.to_builtins(final.error) if final.error else None,
        "viewers": [
            {
                "viewer_id": ticket.viewer_id,
                "frames_decoded": report.frames_decoded,
                "frames_dropped": report.frames_dropped,
                "decode_errors": report.decode_errors,
                "keyframe_requests": report.keyframe_requests,
                "latency_p50_ms": _round(report.latency_p50_ms),
                "latency_p99_ms": _round(report.latency_p99_ms),
            }
            for ticket, report in zip(tickets, reports, strict=True)
        ],
        "encoder": {
            "frames_encoded": final.stats.frames_encoded,
            "fps": round(final.stats.encoder_fps, 2),
            "bitrate": final.stats.current_bitrate,
        },
        "frames_dropped": final.stats.frames_dropped,
        "recording": (
            {
                "path": recording.output_path,
                "size_bytes": recording.file_size,
                "frames": recording.frames_written,
                "duration_s": round(recording.duration, 3),
                "state": str(recording.state),
            }
            if recording
            else None
        ),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _print_summary(result: dict[str, Any]) -> None:
    print(
        f"stream {result['session_id']}: {result['resolution']}@{result['framerate']} for {result['seconds']} s"
    )
    encoder = result["encoder"]
    print(
        f"  encoder: {encoder['frames_encoded']} frames, {encoder['fps']} fps, {encoder['bitrate'] / 1000:.0f} kbps"
    )
    for viewer in result["viewers"]:
        print(
            f"  viewer {viewer['viewer_id']}: {viewer['frames_decoded']} frames decoded, "
            f"latency p50 {viewer['latency_p50_ms']} ms p99 {viewer['latency_p99_ms']} ms"
        )
    print(f"  frames dropped: {result['frames_dropped']}")
    if result["recording"]:
        rec = result["recording"]
        print(f"  recording: {rec['path']} ({rec['size_bytes']} bytes, {rec['frames']} frames)")


def _run_with_signals(args: argparse.Namespace) -> int:
    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():  # a second Ctrl-C: stop waiting for a clean shutdown
                os._exit(EXIT_INTERRUPTED)
            if not args.json:
                sys.stderr.write("\nstopping (Ctrl-C again to quit at once) ...\n")
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        return await run_demo(args, stop)

    try:
        result = asyncio.run(main())
    except KizunaError as exc:
        _error(args, exc)
        return EXIT_ERROR
    if args.json:
        sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    else:
        _print_summary(result)
    return EXIT_INTERRUPTED if result["interrupted"] else EXIT_OK


def _error(args: argparse.Namespace, exc: BaseException) -> None:
    if getattr(args, "json", False):
        sys.stdout.write(
            msgspec.json.encode(
                {"error": {"kind": type(exc).__name__, "message": str(exc)}}
            ).decode()
            + "\n"
        )
    print(f"kizuna-stream: error: {exc}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kizuna-stream", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a whole broadcast on this machine and report it")
    demo.add_argument("--seconds", type=float, default=10.0, help="how long to stream (default 10)")
    demo.add_argument("--viewers", type=int, default=2, help="viewer clients to start (default 2)")
    demo.add_argument(
        "--source", default="test", help="test (default), camera:N, screen[:M][@X,Y,WxH], file:PATH"
    )
    demo.add_argument(
        "--preset",
        default="medium",
        choices=[p.value for p in QualityPreset if p is not QualityPreset.CUSTOM],
    )
    demo.add_argument("--size", help="override the preset's resolution, e.g. 640x360")
    demo.add_argument("--fps", type=int, help="override the preset's frame rate")
    demo.add_argument("--bitrate", type=float, help="override the preset's bitrate, in kbps")
    demo.add_argument("--record", metavar="FILE", help="record the stream to FILE (MP4)")
    demo.add_argument(
        "--address", help="join this Ray cluster (default: RAY_ADDRESS, else start one)"
    )
    demo.add_argument(
        "--dashboard", action="store_true", help="start the Ray dashboard with the local cluster"
    )
    demo.add_argument(
        "--json", action="store_true", help="print one JSON line instead of a status line"
    )
    demo.add_argument("-v", "--verbose", action="store_true", help="log what the actors do")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command == "demo":
        if args.seconds <= 0:
            _error(args, KizunaError(f"--seconds must be positive, got {args.seconds}"))
            return EXIT_USAGE
        if args.viewers < 0:
            _error(args, KizunaError(f"--viewers must be >= 0, got {args.viewers}"))
            return EXIT_USAGE
        try:
            return _run_with_signals(args)
        except KizunaError as exc:
            _error(args, exc)
            return EXIT_ERROR
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
