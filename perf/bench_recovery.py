"""Recovery after SIGKILL, per actor kind: how long a real viewer waits for its next frame.

One stream (320x240 at 30 fps) on a local Ray cluster with one viewer decoding it over QUIC on
loopback and one recording.  Each actor kind in turn (capture, encoder, quality controller,
sender shard, recorder) is killed with SIGKILL, and the viewer's decoded frames say:

* ``recover_s``: from the kill to the first frame the viewer decodes that was *captured after
  the kill* (frames already in flight do not count as recovered).  For the quality controller
  and the recorder, which no frame passes through, this is the pipeline's ordinary latency:
  their death costs viewers nothing.
* ``frames_lost``: frames the stream should have shown during the longest pause in the
  viewer's decoding between the kill and that frame, at the stream's rate (the pause minus one
  frame interval; the decode clock is the viewer's, so nothing depends on how the sender's
  reports map timestamps across a restart).

The recorder's row also has ``recording_resumed_s``: from the kill to its next segment holding
a frame.  Target (reported, not asserted): ``recover_s`` <= 3 s for every kind.

A SIGKILLed shard sends its viewers no CONNECTION_CLOSE: the viewer learns of its death from
its silence timer (``shared.viewer.liveness``: nothing, not even the SR the shard sends every
0.5 s, for 1.5 s), then reconnects to the address it knows, which a survivor or a new shard
serves by then.  Each row says how many of the viewer's reconnects during it came from the
silence timer (``viewer_silences``) and in all (``viewer_reconnects``).
``--viewer-idle-timeout`` sets the viewer's QUIC idle timeout (RFC 9000 §10.1; 5 s), the
backstop behind the silence timer.

Usage: python -m perf.bench_recovery [--kinds capture,encoder,...] [--viewer-idle-timeout S]
[--json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import ray

from actors import StreamManager
from perf._report import emit
from shared.models import RecordingConfig, Resolution, StreamConfig, StreamQuality
from shared.viewer.client import VIEWER_IDLE_TIMEOUT_S, Viewer

QUALITY = StreamQuality(resolution=Resolution(320, 240), framerate=30, bitrate=300_000)
KINDS: Final = ("capture", "encoder", "quality", "shard", "recorder")
TARGET_S: Final = 3.0
#: Longest a kind may take to recover before the run reports it as not recovered.
GIVE_UP_S: Final = 30.0
#: Frames flowing steadily before each kill, so one recovery does not overlap the next.
SETTLE_S: Final = 3.0


class FrameLog:
    """Every picture the viewer decodes: when (monotonic) and its capture time (wall-clock)."""

    def __init__(self) -> None:
        self.frames: list[tuple[float, int | None]] = []

    async def run(self, viewer: Viewer) -> None:
        async for frame in viewer.frames():
            self.frames.append((time.monotonic(), frame.capture_us))

    def first_captured_after(self, index: int, wall_s: float) -> int | None:
        """The index of the first frame from ``index`` on captured after ``wall_s``."""
        for i in range(index, len(self.frames)):
            capture_us = self.frames[i][1]
            if capture_us is not None and capture_us / 1e6 > wall_s:
                return i
        return None


async def pid_of(manager: StreamManager, sid: str, kind: str, recording: str) -> int:
    labels = {"shard": f"{sid}/sender-", "recorder": recording}
    label = labels.get(kind, f"{sid}/{kind}")
    for process in (await manager.resources()).processes:
        if process.label == label or (kind == "shard" and process.label.startswith(label)):
            return process.pid
    raise LookupError(f"no {kind} process in the stream")


async def kill_and_measure(
    manager: StreamManager, sid: str, kind: str, recording: str, log: FrameLog, viewer: Viewer
) -> dict[str, Any]:
    await asyncio.sleep(SETTLE_S)
    segments = len((await manager.get_recording_status(recording)).segments)
    pid = await pid_of(manager, sid, kind, recording)
    index = len(log.frames)
    before = viewer.report()
    killed_wall, killed = time.time(), time.monotonic()
    os.kill(pid, signal.SIGKILL)
    row: dict[str, Any] = {"kind": kind}
    deadline = killed + GIVE_UP_S
    found = None
    while found is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        found = log.first_captured_after(index, killed_wall)
    if found is None:
        return row | {"recover_s": None, "frames_lost": None, "error": "no frame within 30 s"}
    decoded_at = log.frames[found][0]
    # The longest pause in decoding from the last frame before the kill to the recovered one.
    times = [killed if index == 0 else log.frames[index - 1][0]] + [
        at for at, _ in log.frames[index : found + 1]
    ]
    pause = max(b - a for a, b in itertools.pairwise(times))
    lost = max(0, round(pause * QUALITY.framerate) - 1)
    after = viewer.report()
    row |= {
        "recover_s": round(decoded_at - killed, 3),
        "frames_lost": lost,
        "viewer_silences": after.silences - before.silences,
        "viewer_reconnects": after.reconnects - before.reconnects,
    }
    if kind == "recorder":
        while time.monotonic() < deadline:
            status = await manager.get_recording_status(recording)
            if len(status.segments) > segments and status.frames_written > 0:
                row["recording_resumed_s"] = round(time.monotonic() - killed, 3)
                break
            await asyncio.sleep(0.05)
    return row


async def run(kinds: list[str], idle_timeout: float | None) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        async with StreamManager.start() as manager:
            config = StreamConfig(quality=QUALITY, max_restarts=10, restart_window_s=60.0)
            sid = (await manager.start_camera_stream(config)).session_id
            ticket = await manager.add_viewer(sid, "bench")
            viewer = await Viewer.connect(
                ticket.url, idle_timeout=idle_timeout or VIEWER_IDLE_TIMEOUT_S
            )
            log = FrameLog()
            decoding = asyncio.create_task(log.run(viewer))
            try:
                recording = await manager.start_recording(
                    sid, RecordingConfig(output_path=str(Path(folder) / "bench.mp4"))
                )
                for kind in kinds:
                    rows.append(
                        await kill_and_measure(
                            manager, sid, kind, recording.session_id, log, viewer
                        )
                    )
                await manager.stop_recording(recording.session_id)
            finally:
                decoding.cancel()
                await viewer.close()
                await manager.stop_stream(sid)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--viewer-idle-timeout", type=float, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    started = not ray.is_initialized()
    if started:
        # A cluster of its own ("local"), never one another program on this machine started.
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            namespace="kizuna",
        )
    try:
        rows = asyncio.run(run(kinds, args.viewer_idle_timeout))
    finally:
        if started:
            ray.shutdown()
    for row in rows:
        recover = row.get("recover_s")
        if args.viewer_idle_timeout is not None:
            row["viewer_idle_timeout_s"] = args.viewer_idle_timeout
        row["target_s"] = TARGET_S
        row["met"] = recover is not None and recover <= TARGET_S
        emit("recovery", row, as_json=args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
