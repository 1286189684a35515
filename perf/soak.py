"""Soak: one 720p30 stream for minutes with 20 viewers and a recording; does anything grow?

The real broadcast on a local Ray cluster: a test-pattern stream at the MEDIUM preset
(1280x720, 30 fps, 1.5 Mbps), one sender shard opened for ticketless viewers and 20 light
viewers on it (``kizuna-stream loadtest``, its own process), a recording to a temporary MP4
(the recorder actor), and one full viewer in this process that decodes every picture and reads
its capture stamp (the latency).  Every ``--sample-s`` seconds it reads, for every process of
the run (this one and all its descendants: Ray's GCS and raylet, every actor's worker, the
load generator), the resident set (RSS) and the open file descriptors (``/proc/<pid>/fd``), and
the shared-memory segments the run holds mapped (the ``/dev/shm`` paths in each process's
``/proc/<pid>/maps``: other people's segments in a shared ``/dev/shm`` are not ours).

Growth is measured from a start window to an end window, each the median of
``WINDOW_SAMPLES`` samples; the start window opens after a warm-up (``min(60 s, 20 %)`` of the
run) in which the encoder, the jitter buffers and the allocators reach their working sizes:

* ``rss_growth_pct``: summed RSS of the processes alive at both ends, end over start, in %;
* ``fd_growth``: summed fd count of those processes, end minus start;
* ``segment_growth``: mapped segments, end minus start;
* ``latency_drift_ms``: the full viewer's p50 latency over the last window of the run minus
  its p50 over the first window after the warm-up (each window ``max(30 s, 10 %)``).

Targets (the issue's): RSS growth under 5 %, no fd growth and no segment growth; a drift
target is not set (it is reported).  ``processes_gone`` counts processes alive at the start
window and gone at the end (an actor that died and was restarted would show here).

Usage: python -m perf.soak [--minutes M] [--viewers N] [--sample-s S] [--series-out FILE]
       [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import msgspec
import psutil
import ray

from actors import StreamManager
from perf._report import emit
from shared.models import QualityPreset, RecordingConfig, StreamConfig, StreamQuality
from shared.viewer.client import Viewer

QUALITY: Final = StreamQuality.from_preset(QualityPreset.MEDIUM)
#: Samples in each of the start and end windows whose medians are compared.
WINDOW_SAMPLES: Final = 3
TARGET_RSS_GROWTH_PCT: Final = 5.0
#: How long after the soak the load generator may take to finish and print its summary.
LOADTEST_GRACE_S: Final = 120.0


class ProcessSample(msgspec.Struct, frozen=True):
    pid: int
    label: str
    rss_bytes: int
    fds: int


class Sample(msgspec.Struct, frozen=True):
    """One reading of every process of the run, ``t_s`` seconds after the load started."""

    t_s: float
    processes: list[ProcessSample]
    segments: int
    latency_p50_ms: float | None
    """The full viewer's p50 over the frames since the previous sample."""


class SoakResult(msgspec.Struct, frozen=True, kw_only=True):
    rss_growth_pct: float
    fd_growth: int
    segment_growth: int
    latency_drift_ms: float | None
    processes_gone: int


def _label(proc: psutil.Process, labels: dict[int, str]) -> str:
    if proc.pid in labels:
        return labels[proc.pid]
    with contextlib.suppress(psutil.Error):
        cmdline = proc.cmdline()
        if any("loadtest" in part for part in cmdline):
            return "loadtest"
        if proc.pid == os.getpid():
            return "driver"
        return proc.name()
    return f"pid {proc.pid}"


def _mapped_segments(pid: int) -> set[str]:
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return {line.split()[-1] for line in maps if "/dev/shm/" in line}
    except OSError:  # the process ended between the listing and the read
        return set()


def read_sample(t_s: float, labels: dict[int, str], latency_p50_ms: float | None) -> Sample:
    me = psutil.Process()
    processes: list[ProcessSample] = []
    segments: set[str] = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            rss, fds = proc.memory_info().rss, proc.num_fds()
        except psutil.Error:
            continue
        processes.append(ProcessSample(proc.pid, _label(proc, labels), rss, fds))
        segments |= _mapped_segments(proc.pid)
    return Sample(t_s, processes, len(segments), latency_p50_ms)


def growth(
    samples: list[Sample], latencies: list[tuple[float, float]], seconds: float
) -> SoakResult:
    """The growth figures from the samples and ``(t_s, latency_ms)`` of every decoded frame.

    Pure: the unit tests feed it fabricated samples.
    """
    warmup = min(60.0, 0.2 * seconds)
    steady = [s for s in samples if s.t_s >= warmup]
    if len(steady) < 2 * WINDOW_SAMPLES:
        raise ValueError(
            f"need {2 * WINDOW_SAMPLES} samples after the {warmup:.0f} s warm-up,"
            f" have {len(steady)}: run longer or sample more often"
        )
    start, end = steady[:WINDOW_SAMPLES], steady[-WINDOW_SAMPLES:]
    both = {p.pid for p in start[-1].processes} & {p.pid for p in end[0].processes}

    def total(window: list[Sample], field: str) -> float:
        sums = [float(sum(getattr(p, field) for p in s.processes if p.pid in both)) for s in window]
        return float(statistics.median(sums))

    rss0, rss1 = total(start, "rss_bytes"), total(end, "rss_bytes")
    fd0, fd1 = total(start, "fds"), total(end, "fds")
    seg0 = statistics.median(s.segments for s in start)
    seg1 = statistics.median(s.segments for s in end)
    span = max(30.0, 0.1 * seconds)
    first = [ms for t, ms in latencies if warmup <= t < warmup + span]
    last = [ms for t, ms in latencies if t >= seconds - span]
    drift = round(statistics.median(last) - statistics.median(first), 2) if first and last else None
    return SoakResult(
        rss_growth_pct=round((rss1 - rss0) / rss0 * 100, 2) if rss0 else 0.0,
        fd_growth=round(fd1 - fd0),
        segment_growth=round(seg1 - seg0),
        latency_drift_ms=drift,
        processes_gone=len(
            {p.pid for p in start[-1].processes} - {p.pid for p in end[-1].processes}
        ),
    )


async def soak(seconds: float, viewers: int, sample_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kz-soak-") as tmp:
        async with StreamManager.start() as manager:
            session = await manager.start_camera_stream(
                StreamConfig(source="test", quality=QUALITY)
            )
            sid = session.session_id
            url = await manager.open_shards(sid, 1)
            recording = await manager.start_recording(
                sid, RecordingConfig(output_path=str(Path(tmp) / "soak.mp4"))
            )
            ticket = await manager.add_viewer(sid, "soak")
            viewer = await Viewer.connect(ticket.url)
            load = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "actors.cli", "loadtest", url),
                *(f"--viewers={viewers}", f"--seconds={seconds}", "--json"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            began = time.monotonic()
            latencies: list[tuple[float, float]] = []

            async def consume() -> None:
                async for frame in viewer.frames():
                    if frame.latency_ms is not None:
                        latencies.append((time.monotonic() - began, frame.latency_ms))

            consumer = asyncio.create_task(consume())
            samples: list[Sample] = []
            try:
                seen = 0
                while (now := time.monotonic() - began) < seconds:
                    labels = {p.pid: p.label for p in (await manager.resources()).processes}
                    recent = [ms for _, ms in latencies[seen:]]
                    seen = len(latencies)
                    p50 = round(statistics.median(recent), 2) if recent else None
                    samples.append(read_sample(round(now, 2), labels, p50))
                    sys.stderr.write(
                        f"soak: {now:5.0f}/{seconds:.0f} s, rss"
                        f" {sum(p.rss_bytes for p in samples[-1].processes) / 2**20:.0f} MiB,"
                        f" fds {sum(p.fds for p in samples[-1].processes)},"
                        f" segments {samples[-1].segments}, latency p50 {p50} ms\n"
                    )
                    await asyncio.sleep(
                        max(0.0, began + len(samples) * sample_s - time.monotonic())
                    )
                # The load generator's window starts once its viewers are in, so it ends a
                # little after ours; past the grace it is stopped and reported, not waited on.
                try:
                    out, err = await asyncio.wait_for(load.communicate(), LOADTEST_GRACE_S)
                except TimeoutError:
                    load.terminate()
                    out, err = await load.communicate()
                    err += f"loadtest still running {LOADTEST_GRACE_S:g} s after the soak".encode()
            finally:
                if load.returncode is None:
                    load.kill()
                    await load.wait()
                consumer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer
            report = viewer.report()
            await viewer.close()
            stopped = await manager.stop_recording(recording.session_id)
            await manager.stop_stream(sid)
    lines = out.decode().strip().splitlines()
    summary: dict[str, Any] = {}
    with contextlib.suppress(ValueError, AttributeError):  # stopped mid-line, or no summary
        summary = json.loads(lines[-1]).get("summary", {}) if lines else {}
    result = growth(samples, latencies, seconds)
    return {
        "quality": f"{QUALITY.resolution}@{QUALITY.framerate} {QUALITY.bitrate // 1000} kbps",
        "seconds": seconds,
        "viewers": viewers,
        "samples": len(samples),
        **msgspec.to_builtins(result),
        "viewer_frames_decoded": report.frames_decoded,
        "viewer_frames_dropped": report.frames_dropped,
        "loadtest_connected": summary.get("connected"),
        "loadtest_late_frame_ratio": summary.get("late_frame_ratio"),
        "recording_frames_written": stopped.frames_written,
        "recording_bytes": stopped.file_size,
        "recording_error": stopped.error.message if stopped.error else None,
        "loadtest_error": None if summary else (err.decode().strip()[-500:] or "no summary"),
        "targets": {
            "rss_growth_pct_lt": TARGET_RSS_GROWTH_PCT,
            "fd_growth_eq": 0,
            "segment_growth_eq": 0,
        },
        "targets_met": {
            "rss_growth": result.rss_growth_pct < TARGET_RSS_GROWTH_PCT,
            "fd_growth": result.fd_growth <= 0,
            "segment_growth": result.segment_growth <= 0,
        },
        "_series": msgspec.to_builtins(samples),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    parser.add_argument("--viewers", type=int, default=20, help="light viewers (default 20)")
    parser.add_argument(
        "--sample-s",
        type=float,
        default=None,
        help="seconds between samples (default: 1/60 of the run, at least 2)",
    )
    parser.add_argument("--series-out", metavar="FILE", help="write every sample as JSON")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not args.minutes > 0:
        parser.error(f"--minutes must be positive, not {args.minutes}")
    if args.viewers < 1:
        parser.error(f"--viewers must be at least 1, not {args.viewers}")
    seconds = args.minutes * 60
    sample_s = args.sample_s if args.sample_s is not None else max(2.0, seconds / 60)
    if not sample_s > 0:
        parser.error(f"--sample-s must be positive, not {sample_s}")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = asyncio.run(soak(seconds, args.viewers, sample_s))
    except ValueError as exc:
        sys.exit(f"soak: {exc}")
    finally:
        if started_here:
            ray.shutdown()
    series = result.pop("_series")
    if args.series_out:
        Path(args.series_out).write_text(json.dumps(series))
    emit("soak", result, as_json=args.json)


if __name__ == "__main__":
    main()
