"""``kizuna-stream demo``: a whole broadcast on this machine, reported.

A Ray cluster (embedded, or the one at ``--address`` / RAY_ADDRESS), a source encoded once,
N viewers decoding it over RTP over QUIC on loopback, and optionally a recording.  ``--json``
prints one JSON line for scripts; otherwise a status line updates while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil

from actors.cli.common import (
    StatusLine,
    UsageError,
    add_quality_arguments,
    quality_from_args,
    run_command,
)
from shared.control.resources import ResourceSnapshot
from shared.models import AudioConfig, RecordingConfig, StreamConfig, parse_source


def register(commands: Any) -> None:
    demo = commands.add_parser("demo", help="run a whole broadcast on this machine and report it")
    demo.add_argument("--seconds", type=float, default=10.0, help="how long to stream (default 10)")
    demo.add_argument("--viewers", type=int, default=2, help="viewer clients to start (default 2)")
    demo.add_argument(
        "--audio",
        nargs="?",
        const="",
        default=None,
        metavar="DEVICE",
        help="capture audio too: the default input, or DEVICE (index or name); "
        "with a file source, the file's own audio track",
    )
    demo.add_argument(
        "--source", default="test", help="test (default), camera:N, screen[:M][@X,Y,WxH], file:PATH"
    )
    add_quality_arguments(demo)
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
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return run_command(args, lambda stop: run_demo(args, stop), _print_summary)


async def run_demo(args: argparse.Namespace, stop: asyncio.Event) -> dict[str, Any]:
    from actors.manager import StreamManager
    from shared.viewer.client import Viewer

    if args.seconds <= 0:
        raise UsageError(f"--seconds must be positive, got {args.seconds}")
    if args.viewers < 0:
        raise UsageError(f"--viewers must be >= 0, got {args.viewers}")
    parse_source(args.source)
    record = None
    if args.record:
        path = Path(args.record).resolve()
        record = RecordingConfig(output_path=str(path))
    audio = None
    if args.audio is not None:
        device: int | str | None = args.audio or None
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        audio = AudioConfig(device=device)
    config = StreamConfig(
        source=args.source, quality=quality_from_args(args), record=record, audio=audio
    )
    status = StatusLine(enabled=not args.json)
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
        meter = StageCpu(sid)
        await manager.resources()  # starts the actors' CPU counters
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
        cpu = meter.per_second(await manager.resources())
        reports = [viewer.report() for viewer in viewers]
        # Closing a viewer ends its frame iterator; cancel as well, and never wait unbounded.
        for viewer in viewers:
            await viewer.close()
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=5) if tasks else None
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
        # Seconds of CPU per second of streaming, per actor role (summed over that role's
        # actors) and for this process, which runs the viewers: where the machine goes.
        "cpu": cpu,
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


class StageCpu:
    """CPU seconds per second of each actor role of one stream over the demo.

    The actors' figures come from the supervisor's ResourceMonitor, on the actors' node (which
    need not be this one): its first snapshot starts each process's CPU counter, the second
    reads the share used since.  Roles come from the process labels (``<stream>/capture``,
    ``<stream>/encoder``, ``<stream>/sender-<viewer>``, ``<stream>/quality``; a recording is
    labelled by its id): the senders' are summed into ``sender``, the recordings' into
    ``recorder``.  ``viewers`` is this process, which decodes for every demo viewer.
    """

    ROLES = ("capture", "encoder", "sender", "recorder", "quality", "viewers")

    def __init__(self, session_id: str) -> None:
        self._session_id = session_id
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # starts this process's counter

    def per_second(self, snapshot: ResourceSnapshot) -> dict[str, float]:
        used = dict.fromkeys(self.ROLES, 0.0)
        for usage in snapshot.processes:
            stream, _, role = usage.label.rpartition("/")
            if stream and stream != self._session_id:
                continue
            if not stream:
                role = "recorder"
            elif role.startswith("sender"):
                role = "sender"
            used[role] = used.get(role, 0.0) + usage.cpu_percent / 100
        used["viewers"] = self._process.cpu_percent(None) / 100
        result = {role: round(value, 3) for role, value in used.items()}
        result["total"] = round(sum(used.values()), 3)
        return result


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
    cpu = result["cpu"]
    print(
        "  CPU (cores busy): "
        + ", ".join(f"{role} {value:.2f}" for role, value in cpu.items() if role != "total")
        + f"; total {cpu['total']:.2f} of {psutil.cpu_count()}"
    )
    if result["recording"]:
        rec = result["recording"]
        print(f"  recording: {rec['path']} ({rec['size_bytes']} bytes, {rec['frames']} frames)")
