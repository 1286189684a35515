"""Fan-out: how many viewers one sender shard serves, per core, against aiortc's way.

Our arm is the real broadcast on a local Ray cluster: a test-pattern stream
(``StreamManager.start_camera_stream``), one sender shard opened for viewers without a ticket
(``open_shards``), and the load generator, ``kizuna-stream loadtest`` (N light viewers in one
process, :mod:`shared.viewer.load`), run in a separate process for each viewer count.  The
shard process's CPU and resident memory are read with psutil (its pid from
``manager.resources()``) while the load runs:

* ``sender_cpu_cores``: the shard's CPU time over the run, in cores.  The load generator's
  run window is ``seconds`` inside the subprocess's lifetime (its start-up and closing are
  outside it); the shard's CPU outside the window is counted at its idle rate (measured with no
  viewers before the first run) and taken off.
* ``sender_cpu_per_viewer``: what the viewers add, (``sender_cpu_cores`` - idle) / viewers.
* ``rss_mb_per_viewer``: the shard's peak RSS during the run, less its RSS with no viewers,
  per viewer (MiB).
* ``late_frame_ratio``, ``fps_min``, ``loadgen_cpu_cores``: the load generator's own figures
  (:mod:`actors.cli.loadtest` gives their definitions).

Viewer counts rise until the machine saturates (late frame ratio above 0.5 or fps_min under 5);
the load generator shares the machine's cores with the shard, the capture and the encoder, so
on a small machine it is usually what saturates first (a light viewer costs some 5 % of a core
at 1.5 Mbps, mostly aioquic).  ``viewers_per_core`` is the most viewers served with at most 1 %
late frames (every viewer connected) over the sender cores at that count.

The aiortc arm (:mod:`perf.aiortc_fanout`) serves the same kind of source to N peers the way
aiortc's examples do, one encoder per peer, aiortc receiving and decoding on the other end;
its ``viewers_per_core`` is peers served at 90 % of the frame rate or more over the server
process's cores.  ``ratio_viewers_per_core_vs_aiortc`` is ours over its best.

The stalled arm measures isolation: N light viewers of a fresh stream run twice for the same
``seconds``, once alone and once beside one more light viewer (its own ``loadtest`` process)
frozen with SIGSTOP once the N are connected: it reads nothing and acknowledges nothing until
the shard drops it at the QUIC idle timeout (10 s).  ``delay_p99_ratio`` is the N viewers'
frame delay p99 with the frozen one over without (:mod:`shared.viewer.light` defines the
delay); the target is under 1.10.  ``stalled_frames_expired`` shows the frozen viewer's media
expiring in its own queue meanwhile.

Targets (reported, not asserted): sender CPU <= 0.5 % of a core per 1.5 Mbps viewer; >= 100
concurrent 720p30 viewers with <= 1 % late frames; <= 2 MB per viewer; >= 20x aiortc's viewers
per core.

Usage: python -m perf.bench_fanout [--viewers 10,50,100,200] [--seconds S] [--bitrate KBPS]
       [--aiortc-peers 1,2,4] [--stalled-viewers 20] [--arms ours,aiortc,stalled] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import psutil

from actors import StreamManager
from perf._report import emit
from perf.aiortc_fanout import CODECS, run_aiortc
from shared.models import QualityPreset, Resolution, StreamConfig, StreamQuality

ARMS: Final = ("ours", "aiortc", "stalled")
DEFAULT_VIEWERS: Final = (10, 50, 100, 200)
DEFAULT_AIORTC_PEERS: Final = (1, 2, 4)
#: Saturated: stop adding viewers past a run this bad.
SATURATED_LATE_RATIO: Final = 0.5
SATURATED_FPS_MIN: Final = 5.0
#: Served: a run with every viewer connected and at most this share of late frames.
SERVED_LATE_RATIO: Final = 0.01
#: The shard's idle CPU and memory are measured over this long before the first run.
IDLE_S: Final = 3.0
SAMPLE_INTERVAL_S: Final = 0.25
#: The issue's targets.
TARGET_CPU_PER_VIEWER: Final = 0.005
TARGET_VIEWERS: Final = 100
TARGET_MB_PER_VIEWER: Final = 2.0
TARGET_RATIO_VS_AIORTC: Final = 20.0
TARGET_STALLED_P99_RATIO: Final = 1.10
#: The stalled arm's stream: light enough that the N viewers, their load generator, the
#: encoder and the shard leave a 2-core machine idle time, so that what the frozen viewer
#: changes is not lost in CPU contention.
STALLED_QUALITY: Final = StreamQuality(
    resolution=Resolution(640, 360), framerate=30, bitrate=500_000
)
#: The frozen viewer's own idle timeout: longer than the shard's, so the shard decides.
STALLED_IDLE_TIMEOUT_S: Final = 60.0


class ShardProbe:
    """The shard process's CPU seconds and RSS, sampled while a run goes on."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak_rss = 0

    def cpu_s(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    async def sample_rss(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, self.rss())
            await asyncio.sleep(SAMPLE_INTERVAL_S)


async def _shard_pid(manager: StreamManager, session_id: str, before: set[str]) -> int:
    snapshot = await manager.resources()
    prefix = f"{session_id}/sender-shard-"
    new = [p for p in snapshot.processes if p.label.startswith(prefix) and p.label not in before]
    if len(new) != 1:
        raise RuntimeError(f"expected one new sender shard, found {[p.label for p in new]}")
    return new[0].pid


def _loadtest_process(url: str, viewers: int, seconds: float, *extra: str) -> Any:
    return asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "actors.cli",
        "loadtest",
        url,
        f"--viewers={viewers}",
        f"--seconds={seconds}",
        "--json",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _loadtest(url: str, viewers: int, seconds: float) -> dict[str, Any]:
    process = await _loadtest_process(url, viewers, seconds)
    out, err = await process.communicate()
    lines = out.decode().strip().splitlines()
    if not lines:
        raise RuntimeError(f"loadtest printed nothing (exit {process.returncode}): {err.decode()}")
    report: dict[str, Any] = json.loads(lines[-1])
    if "summary" not in report:
        raise RuntimeError(f"loadtest failed (exit {process.returncode}): {lines[-1]}")
    return report


async def run_ours(
    counts: tuple[int, ...], seconds: float, quality: StreamQuality, *, as_json: bool
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async with StreamManager.start() as manager:
        session = await manager.start_camera_stream(StreamConfig(source="test", quality=quality))
        sid = session.session_id
        before = {p.label for p in (await manager.resources()).processes}
        url = await manager.open_shards(sid, 1)
        probe = ShardProbe(await _shard_pid(manager, sid, before))

        # The shard with no viewers: its CPU rate and memory, the baseline of every run.
        await asyncio.sleep(1.0)
        cpu0, started = probe.cpu_s(), time.monotonic()
        await asyncio.sleep(IDLE_S)
        idle_cores = (probe.cpu_s() - cpu0) / (time.monotonic() - started)
        idle_rss = probe.rss()

        for viewers in counts:
            probe.peak_rss = 0
            sampler = asyncio.create_task(probe.sample_rss())
            cpu0, started = probe.cpu_s(), time.monotonic()
            try:
                report = await _loadtest(url, viewers, seconds)
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            lifetime = time.monotonic() - started
            summary = report["summary"]
            window = summary["seconds"]
            outside = max(0.0, lifetime - window)
            sender_cores = max(0.0, (probe.cpu_s() - cpu0 - idle_cores * outside) / window)
            row = {
                "viewers": viewers,
                "connected": summary["connected"],
                "quality": _quality_text(quality),
                "seconds": round(window, 2),
                "late_frame_ratio": round(summary["late_frame_ratio"], 4),
                "fps_min": summary["fps_min"],
                "fps_median": summary["fps_median"],
                "loss": round(summary["loss"], 5),
                "mbps_total": round(summary["mbps"], 2),
                "sender_cpu_cores": round(sender_cores, 3),
                "sender_cpu_idle_cores": round(idle_cores, 3),
                "sender_cpu_per_viewer": round((sender_cores - idle_cores) / viewers, 5),
                "sender_rss_mb": round(probe.peak_rss / 2**20, 1),
                "rss_mb_per_viewer": round(max(0, probe.peak_rss - idle_rss) / 2**20 / viewers, 3),
                "loadgen_cpu_cores": round(summary["cpu_cores"], 3),
                "loadgen_rss_mb": round(summary["rss_mb"], 1),
            }
            rows.append(row)
            if as_json:
                emit("fanout", row, as_json=True)
            if _saturated(row):
                break
        await manager.stop_stream(sid)
    return rows


async def _shard_stats(session_id: str) -> Callable[[], Awaitable[Any]]:
    """A reader of the stream's only sender shard's stats."""
    import ray

    from actors.handles import SenderHandle
    from actors.placement import NAMESPACE

    names = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"kz-{session_id}-") and "-shard-" in actor["name"]
    ]
    if len(names) != 1:
        raise RuntimeError(f"expected one sender shard of {session_id}, found {names}")
    handle = SenderHandle(ray.get_actor(names[0], namespace=NAMESPACE))

    async def read() -> Any:
        return await handle.stats()

    return read


async def _until(read: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], what: str) -> Any:
    deadline = time.monotonic() + 60.0
    while True:
        value = await read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what}")
        await asyncio.sleep(SAMPLE_INTERVAL_S)


async def run_stalled(
    viewers: int, seconds: float, quality: StreamQuality, rounds: int
) -> dict[str, Any]:
    """N viewers alone, then N viewers beside a frozen one, ``rounds`` times in turn (so a
    slow start or a neighbour's burst on the machine lands on both sides): their delay p99s,
    and the ratio of the medians."""
    alone: list[dict[str, Any]] = []
    beside: list[dict[str, Any]] = []
    expired: list[int] = []
    async with StreamManager.start() as manager:
        session = await manager.start_camera_stream(StreamConfig(source="test", quality=quality))
        sid = session.session_id
        url = await manager.open_shards(sid, 1)
        stats = await _shard_stats(sid)
        await asyncio.sleep(2.0)  # the encoder's first GOPs, before any run is timed
        for _ in range(rounds):
            alone.append((await _loadtest(url, viewers, seconds))["summary"])
            summary, frames_expired = await _beside_a_frozen_viewer(url, viewers, seconds, stats)
            beside.append(summary)
            expired.append(frames_expired)
        await manager.stop_stream(sid)
    p99_alone = [s["delay_p99_ms"] for s in alone]
    p99_beside = [s["delay_p99_ms"] for s in beside]
    ratio = None
    if None not in p99_alone and None not in p99_beside:
        before, after = statistics.median(p99_alone), statistics.median(p99_beside)
        ratio = round(after / before, 3) if before > 0 else None
    return {
        "viewers": viewers,
        "quality": _quality_text(quality),
        "seconds": seconds,
        "rounds": rounds,
        "delay_p99_ms_alone": p99_alone,
        "delay_p99_ms_beside_stalled": p99_beside,
        "delay_p99_ratio": ratio,
        "late_frame_ratio_alone": [s["late_frame_ratio"] for s in alone],
        "late_frame_ratio_beside_stalled": [s["late_frame_ratio"] for s in beside],
        "fps_min_alone": [s["fps_min"] for s in alone],
        "fps_min_beside_stalled": [s["fps_min"] for s in beside],
        "stalled_frames_expired": expired,
        "target_p99_change_lt_10pct": None if ratio is None else ratio < TARGET_STALLED_P99_RATIO,
    }


async def _beside_a_frozen_viewer(
    url: str, viewers: int, seconds: float, stats: Callable[[], Awaitable[Any]]
) -> tuple[dict[str, Any], int]:
    """One more light viewer connects, then N; once all are in it is frozen (SIGSTOP).  The
    N's summary, and how many of the frozen one's frames expired in its queue."""
    frozen = await _loadtest_process(url, 1, 600.0, f"--idle-timeout={STALLED_IDLE_TIMEOUT_S}")
    expired = 0
    try:
        first = await _until(stats, lambda s: len(s.peers) == 1, "the frozen viewer")
        [frozen_peer] = [p.peer_id for p in first.peers]
        load = asyncio.create_task(_loadtest(url, viewers, seconds))
        await _until(stats, lambda s: len(s.peers) == viewers + 1, "every viewer")
        os.kill(frozen.pid, signal.SIGSTOP)
        while not load.done():
            now = await stats()
            expired = max(
                [expired] + [p.frames_expired for p in now.peers if p.peer_id == frozen_peer]
            )
            await asyncio.wait([load], timeout=SAMPLE_INTERVAL_S)
        summary: dict[str, Any] = load.result()["summary"]
    finally:
        if frozen.returncode is None:
            frozen.kill()
        await frozen.communicate()
    # The shard drops the frozen viewer at its idle timeout; wait for that, so the next run
    # starts from N alone.
    await _until(stats, lambda s: not s.peers, "the shard to be empty")
    return summary, expired


def _saturated(row: dict[str, Any]) -> bool:
    fps_min = row["fps_min"]
    return bool(
        row["late_frame_ratio"] > SATURATED_LATE_RATIO
        or fps_min is None
        or fps_min < SATURATED_FPS_MIN
    )


def _served(row: dict[str, Any]) -> bool:
    return bool(row["connected"] == row["viewers"] and row["late_frame_ratio"] <= SERVED_LATE_RATIO)


def _quality_text(quality: StreamQuality) -> str:
    return f"{quality.resolution}@{quality.framerate} {quality.bitrate // 1000} kbps"


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give counts like 10,50,100") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give counts of at least 1, like 10,50,100")
    return tuple(sorted(set(counts)))


def _arms(text: str) -> tuple[str, ...]:
    chosen = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(chosen - set(ARMS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or 'nothing'}: choose from {', '.join(ARMS)}"
        )
    return tuple(name for name in ARMS if name in chosen)


def _print_table(rows: list[dict[str, Any]], aiortc: list[dict[str, Any]]) -> None:
    if rows:
        print(f"== fanout (ours): {rows[0]['quality']}, {rows[0]['seconds']:.0f} s a run")
        print(
            f"{'viewers':>7} {'conn':>5} {'late':>7} {'fps min':>7} {'sender':>7}"
            f" {'%core/v':>8} {'MiB/v':>6} {'loadgen':>7}"
        )
        for r in rows:
            fps = "-" if r["fps_min"] is None else f"{r['fps_min']:.1f}"
            print(
                f"{r['viewers']:>7} {r['connected']:>5} {r['late_frame_ratio']:>7.2%} {fps:>7}"
                f" {r['sender_cpu_cores']:>7.3f} {r['sender_cpu_per_viewer'] * 100:>8.3f}"
                f" {r['rss_mb_per_viewer']:>6.2f} {r['loadgen_cpu_cores']:>7.2f}"
            )
        print("  (sender and loadgen in cores; %core/v: sender CPU per viewer, idle taken off)")
    if aiortc:
        print(f"== aiortc: one {aiortc[0]['codec']} encoder per peer")
        print(
            f"{'peers':>7} {'served':>6} {'fps min':>7} {'Mbps/p':>7} {'server':>7}"
            f" {'%core/p':>8} {'client':>7} {'v/core':>7}"
        )
        for a in aiortc:
            print(
                f"{a['peers']:>7} {a['peers_served']:>6} {a['fps_min']:>7.1f}"
                f" {a['mbps_per_peer']:>7.2f} {a['server_cpu_cores']:>7.3f}"
                f" {a['server_cpu_per_peer'] * 100:>8.1f} {a['client_cpu_cores']:>7.3f}"
                f" {a['viewers_per_core'] or 0:>7.2f}"
            )


def summarize(rows: list[dict[str, Any]], aiortc: list[dict[str, Any]]) -> dict[str, Any]:
    served = [r for r in rows if _served(r) and r["sender_cpu_cores"] > 0]
    best = max(served, key=lambda r: r["viewers"], default=None)
    ours = round(best["viewers"] / best["sender_cpu_cores"], 1) if best else None
    theirs = max((a["viewers_per_core"] or 0.0 for a in aiortc), default=None)
    per_viewer = [r["sender_cpu_per_viewer"] for r in served]
    return {
        "viewers_per_core": ours,
        "viewers_served": best["viewers"] if best else 0,
        "aiortc": {"viewers_per_core": theirs, "runs": aiortc},
        "ratio_viewers_per_core_vs_aiortc": (
            round(ours / theirs, 1) if ours is not None and theirs else None
        ),
        "targets": {
            "sender_cpu_per_viewer_le_0.5pct": (
                min(per_viewer) <= TARGET_CPU_PER_VIEWER if per_viewer else None
            ),
            "viewers_ge_100_le_1pct_late": bool(best and best["viewers"] >= TARGET_VIEWERS),
            "rss_le_2mb_per_viewer": (
                max(r["rss_mb_per_viewer"] for r in rows) <= TARGET_MB_PER_VIEWER if rows else None
            ),
            "ge_20x_aiortc": (
                ours / theirs >= TARGET_RATIO_VS_AIORTC if ours is not None and theirs else None
            ),
        },
    }


async def _run(args: argparse.Namespace) -> None:
    quality = StreamQuality(
        resolution=Resolution(1280, 720), framerate=30, bitrate=args.bitrate * 1000
    )
    if args.bitrate == 1500:
        quality = StreamQuality.from_preset(QualityPreset.MEDIUM)
    rows: list[dict[str, Any]] = []
    aiortc: list[dict[str, Any]] = []
    if "ours" in args.arms:
        rows = await run_ours(args.viewers, args.seconds, quality, as_json=args.json)
    if "aiortc" in args.arms:
        for peers in args.aiortc_peers:
            run = await run_aiortc(
                peers,
                args.seconds,
                width=quality.resolution.width,
                height=quality.resolution.height,
                fps=quality.framerate,
                codec=args.codec,
            )
            aiortc.append(run)
    result = summarize(rows, aiortc)
    stalled = (
        await run_stalled(args.stalled_viewers, args.seconds, STALLED_QUALITY, args.stalled_rounds)
        if "stalled" in args.arms
        else None
    )
    result["stalled"] = stalled
    if args.json:
        emit("fanout_vs_aiortc", result, as_json=True)
        return
    _print_table(rows, aiortc)
    print(
        f"viewers per core: ours {result['viewers_per_core']}"
        f" ({result['viewers_served']} viewers with <= 1 % late frames),"
        f" aiortc {result['aiortc']['viewers_per_core']},"
        f" ratio {result['ratio_viewers_per_core_vs_aiortc']}"
    )
    print("targets: " + ", ".join(f"{k} {v}" for k, v in result["targets"].items()))
    if stalled is not None:
        print(
            f"stalled viewer: {stalled['viewers']} viewers' delay p99"
            f" {stalled['delay_p99_ms_alone']} ms alone, {stalled['delay_p99_ms_beside_stalled']} ms"
            f" beside a frozen one (ratio of the medians {stalled['delay_p99_ratio']}, target < 1.10;"
            f" its frames expired: {stalled['stalled_frames_expired']})"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--viewers",
        type=_counts,
        default=DEFAULT_VIEWERS,
        help="viewer counts, rising until the machine saturates (default 10,50,100,200)",
    )
    parser.add_argument(
        "--aiortc-peers",
        type=_counts,
        default=DEFAULT_AIORTC_PEERS,
        help="aiortc peer counts (default 1,2,4)",
    )
    parser.add_argument(
        "--stalled-viewers",
        type=int,
        default=20,
        metavar="N",
        help="viewers beside the frozen one in the stalled arm (default 20)",
    )
    parser.add_argument(
        "--stalled-rounds",
        type=int,
        default=3,
        metavar="R",
        help="alone/beside pairs in the stalled arm (default 3)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="each run (default 10)")
    parser.add_argument(
        "--bitrate", type=int, default=1500, metavar="KBPS", help="720p30 at KBPS (default 1500)"
    )
    parser.add_argument("--codec", choices=CODECS, default="vp8", help="aiortc's codec")
    parser.add_argument(
        "--arms",
        type=_arms,
        default=ARMS,
        help="comma-separated: ours,aiortc,stalled (default all)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not args.seconds > 0:
        parser.error(f"--seconds must be positive, not {args.seconds}")
    if args.bitrate <= 0:
        parser.error(f"--bitrate must be positive, not {args.bitrate}")
    if args.stalled_rounds < 1:
        parser.error(f"--stalled-rounds must be at least 1, not {args.stalled_rounds}")
    if args.stalled_viewers < 1:
        parser.error(f"--stalled-viewers must be at least 1, not {args.stalled_viewers}")
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
