"""``kizuna-stream loadtest URL --viewers N --seconds S``: many light viewers, one report.

Runs N light viewers (``shared.viewer.light``) of one stream in this process, on one event
loop; no Ray.  They parse RTP and send the feedback a real viewer sends (NACK, PLI,
transport-wide feedback, receiver reports) but decode nothing, so one process can stand in for
hundreds of viewers: the tool to run before an event, and the load generator of a fan-out
benchmark.  A status line updates while it runs; at the end a summary and a table of viewers
(``--json``: exactly one JSON line).  Ctrl-C stops it with the report so far (exit code 130);
it exits 1 when no viewer could connect.  Every viewer presents ``--token`` (or
``$KIZUNA_TOKEN``); a refused one is ``closed`` with the server's reason.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import msgspec

from actors.cli.access import add_access_arguments, check_access
from actors.cli.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    StatusLine,
    UsageError,
    print_json,
    report_error,
    run_until_signalled,
)
from shared.errors import ConfigError, KizunaError
from shared.roq.url import StreamUrl

#: With more viewers than this the table lists only those worth a look (and says so).
TABLE_ROWS = 30

DEFINITIONS = """\
definitions:
  frame   a complete video frame (every packet of one access unit, retransmissions included)
  fps     frames after the first per second, from the first frame to the end of the run
  late    a frame whose last packet arrives more than 100 ms after the time its RTP timestamp
          gives, on a clock aligned at the first frame (its arrival <-> its RTP timestamp,
          90 kHz video clock, monotonic); late ratio = late frames / frames
  lost    RTP packets never received, after NACK repair (RFC 3550 A.3, video and audio)
  bytes   RTP and RTCP bytes received (no QUIC/UDP overhead)
  cpu     this process's CPU time over the run, in cores (1.0 = one core busy)
"""


def register(commands: Any) -> None:
    loadtest = commands.add_parser(
        "loadtest",
        help="N light viewers of a stream in one process: fps, late frames, loss, bytes",
        description="Start N light viewers of a stream in this process, on one event loop: they\n"
        "receive RTP and send a real viewer's feedback (NACK, PLI, transport-wide feedback,\n"
        "receiver reports) but decode nothing.  Reports each viewer and the run as a whole,\n"
        "with this process's own CPU and memory.",
        epilog=DEFINITIONS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    loadtest.add_argument("url", help="the stream URL that serve printed (roq://...)")
    loadtest.add_argument(
        "--viewers", type=int, required=True, metavar="N", help="light viewers to start"
    )
    loadtest.add_argument(
        "--seconds", type=float, required=True, metavar="S", help="how long the run lasts"
    )
    loadtest.add_argument(
        "--ramp",
        type=float,
        default=0.0,
        metavar="S",
        help="spread the connects over S seconds (default 0: as fast as a few handshakes "
        "at a time allow)",
    )
    loadtest.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="give up on a connection after S seconds (default 10)",
    )
    loadtest.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="S",
        help="count a connection silent for S seconds as dropped (default 5; the server's own"
        " limit still applies)",
    )
    loadtest.add_argument(
        "--latency-budget",
        type=float,
        default=200.0,
        metavar="MS",
        help="how long a viewer waits for a retransmission (default 200 ms)",
    )
    loadtest.add_argument(
        "--streams", action="store_true", help="ask for QUIC stream mode instead of datagrams"
    )
    loadtest.add_argument(
        "--json", action="store_true", help="print one JSON line instead of a status line"
    )
    add_access_arguments(loadtest)
    loadtest.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        url = _check(args)
        token = check_access(args, url)
        report = run_until_signalled(args, lambda stop: load(args, url, token, stop))
    except UsageError as exc:
        report_error(args, exc)
        return EXIT_USAGE
    except KizunaError as exc:
        report_error(args, exc)
        return EXIT_ERROR
    if args.json:
        print_json(report)
    else:
        _print_report(report)
    if report["interrupted"]:
        return EXIT_INTERRUPTED
    return EXIT_OK if report["summary"]["connected"] else EXIT_ERROR


def _check(args: argparse.Namespace) -> StreamUrl:
    if args.viewers < 1:
        raise UsageError(f"--viewers must be at least 1, got {args.viewers}")
    if not args.seconds > 0:
        raise UsageError(f"--seconds must be positive, got {args.seconds}")
    if not 0 <= args.ramp < args.seconds:
        raise UsageError(f"--ramp must be at least 0 and shorter than --seconds, got {args.ramp}")
    if not args.connect_timeout > 0:
        raise UsageError(f"--connect-timeout must be positive, got {args.connect_timeout}")
    if args.idle_timeout is not None and not args.idle_timeout > 0:
        raise UsageError(f"--idle-timeout must be positive, got {args.idle_timeout}")
    if not args.latency_budget >= 0:
        raise UsageError(f"--latency-budget must be at least 0, got {args.latency_budget}")
    try:
        return StreamUrl.parse(args.url)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


async def load(
    args: argparse.Namespace, url: StreamUrl, token: str | None, stop: asyncio.Event
) -> dict[str, Any]:
    from shared.viewer.load import LoadSummary, LoadTest

    test = LoadTest(
        url,
        args.viewers,
        args.seconds,
        ramp_s=args.ramp,
        connect_timeout_s=args.connect_timeout,
        latency_budget_s=args.latency_budget / 1000,
        datagrams=not args.streams,
        token=token,
        **({} if args.idle_timeout is None else {"idle_timeout_s": args.idle_timeout}),
    )
    status = StatusLine(enabled=not args.json)
    status.show(f"connecting {args.viewers} viewers to {url} ...")
    started = time.monotonic()

    def show(summary: LoadSummary) -> None:
        status.show(_status_text(summary, time.monotonic() - started))

    try:
        report = await test.run(stop, on_status=show if status.enabled else None)
    finally:
        status.done()
    result: dict[str, Any] = msgspec.to_builtins(report)
    return result


def _fps(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _status_text(summary: Any, elapsed_s: float) -> str:
    return (
        f"[{elapsed_s:5.1f}s] {summary.watching}/{summary.viewers} watching"
        f" ({summary.still_connecting} connecting, {summary.failed} failed,"
        f" {summary.closed} closed) | fps min {_fps(summary.fps_min)}"
        f" med {_fps(summary.fps_median)} | late {summary.late_frame_ratio:.2%}"
        f" | lost {summary.lost} | {summary.mbps:.1f} Mbps | cpu {summary.cpu_cores:.2f}"
    )


def _print_report(report: dict[str, Any]) -> None:
    summary = report["summary"]
    viewers = report["viewers"]
    rows = viewers
    note = ""
    if len(viewers) > TABLE_ROWS:
        median = summary["fps_median"] or 0.0
        # Only the viewers worth a look: not watching, late, lossy, or well below the median.
        rows = [
            v
            for v in viewers
            if v["state"] != "watching" or v["late"] or v["lost"] or v["fps"] < 0.9 * median
        ]
        rows = sorted(rows, key=lambda v: v["fps"])[:TABLE_ROWS]
        note = f"({len(rows)} of {len(viewers)} viewers shown: the others watched cleanly)"
    if rows:
        print(
            f"{'viewer':>6} {'state':<12} {'fps':>6} {'frames':>7} {'late':>5} {'lost':>5}"
            f" {'MB':>8} {'reconn':>6}  reason"
        )
        for v in rows:
            print(
                f"{v['index']:>6} {v['state']:<12} {v['fps']:>6.1f} {v['frames']:>7}"
                f" {v['late']:>5} {v['lost']:>5} {v['bytes'] / 1e6:>8.2f} {v['reconnects']:>6}"
                f"  {v['reason'] or ''}"
            )
    if note:
        print(note)
    reasons = "; ".join(f"{count} x {reason}" for reason, count in summary["reasons"].items())
    print(
        f"{summary['connected']}/{summary['viewers']} viewers connected"
        f" ({summary['still_connecting']} still connecting at the end, {summary['failed']} failed,"
        f" {summary['closed']} closed by the server,"
        f" {summary['reconnects']} reconnects) in {summary['seconds']:.1f} s"
        + (" (stopped early)" if report["interrupted"] else "")
        + (f": {reasons}" if reasons else "")
    )
    print(
        f"fps min {_fps(summary['fps_min'])} median {_fps(summary['fps_median'])}"
        f" | late frames {summary['late']}/{summary['frames']} ({summary['late_frame_ratio']:.2%})"
        + (
            f", delay p99 {summary['delay_p99_ms']:.0f} ms"
            if summary["delay_p99_ms"] is not None
            else ""
        )
        + f" | lost {summary['lost']} packets ({summary['loss']:.2%})"
        f" | {summary['mbps']:.2f} Mbps received"
    )
    print(
        f"load generator: {summary['cpu_cores']:.2f} cores"
        f" ({summary['cpu_per_viewer'] * 100:.2f} % of a core per viewer),"
        f" {summary['rss_mb']:.0f} MiB resident ({summary['rss_start_mb']:.0f} MiB before the viewers)"
    )
