"""``kizuna-stream status``: what a running server is doing, as a table or as JSON.

    kizuna-stream status [--address ADDR] [--server NAME] [--json] [--watch [--interval S]]

It finds the server as ``viewers`` and ``streams`` do (``--address``, else RAY_ADDRESS, else
the cluster a ``serve`` on this machine started; the supervisor by its name) and asks its
supervisor for an overview (``Supervisor.overview``): every stream with its rungs, viewers,
bitrate, frame rate, latency, restarts and resource use, the node's CPU and memory, and every
actor with its ``role`` (capture, encoder, shard, recorder, quality, webrtc, supervisor), its
stream, node and ``pid``.  ``--json`` prints that overview as one JSON object; ``--watch``
redraws the table (or prints one JSON line) every ``--interval`` seconds until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import msgspec

from actors.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_server_arguments,
    find_supervisor,
    print_json,
    report_error,
    run_until_signalled,
)
from shared.errors import KizunaError

if TYPE_CHECKING:
    from rich.console import Group

    from shared.control.overview import ServerOverview


def register(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="show a running server's streams, viewers, figures and actors",
        description=(__doc__ or "").split("\n\n")[0],
    )
    add_server_arguments(status)
    status.add_argument("--json", action="store_true", help="print the overview as JSON")
    status.add_argument("--watch", action="store_true", help="keep it updated until Ctrl-C")
    status.add_argument(
        "--interval", type=float, default=2.0, help="--watch: seconds between updates (2)"
    )
    status.set_defaults(run=run)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def render(overview: ServerOverview) -> Group:
    """The overview as rich tables: the streams, then the actors."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text(
        f"server {overview.supervisor} on node {overview.node[:12]}: CPU "
        f"{overview.cpu_percent:.0f}% of {overview.cpu_count} cores, memory "
        f"{_megabytes(overview.memory_used_bytes)} of {_megabytes(overview.memory_total_bytes)}"
        f", network {overview.net_sent_per_s / 1000:.0f} kB/s out"
        f" {overview.net_received_per_s / 1000:.0f} kB/s in"
        + (f" (over: {', '.join(overview.over_thresholds)})" if overview.over_thresholds else "")
    )
    streams = Table(title="streams", title_justify="left")
    for column, justify in (
        ("stream", "left"),
        ("state", "left"),
        ("source", "left"),
        ("rungs", "left"),
        ("viewers", "right"),
        ("kbps", "right"),
        ("fps", "right"),
        ("latency", "right"),
        ("restarts", "right"),
        ("CPU", "right"),
        ("memory", "right"),
        ("sent", "right"),
    ):
        streams.add_column(column, justify=justify)  # type: ignore[arg-type]
    for s in overview.streams:
        rungs = "\n".join(
            f"{r.resolution}@{r.framerate} {r.bitrate // 1000}/{r.target_bitrate // 1000}k"
            for r in s.rungs
        )
        state = s.state if s.error is None else f"{s.state}: {s.error}"
        streams.add_row(
            f"{s.name} {s.session_id}" if s.name else s.session_id,
            state,
            s.source,
            rungs or "-",
            str(s.viewers),
            f"{s.bitrate / 1000:.0f}",
            f"{s.fps:.1f}",
            f"{s.latency_ms} ms",
            str(s.restarts),
            f"{s.cpu_percent:.0f}%",
            _megabytes(s.rss_bytes),
            f"{s.bytes_per_s / 1000:.0f} kB/s",
        )
    actors = Table(title="actors", title_justify="left")
    for column in ("role", "stream", "name", "node", "pid", "CPU", "memory"):
        actors.add_column(column)
    for a in overview.actors:
        actors.add_row(
            a.role,
            a.stream or "-",
            a.name,
            a.node[:12],
            str(a.pid) + ("" if a.alive else " (gone)"),
            f"{a.cpu_percent:.0f}%",
            _megabytes(a.rss_bytes),
        )
    return Group(head, streams, actors)


def run(args: argparse.Namespace) -> int:
    try:
        if args.interval <= 0:
            raise UsageError(f"--interval must be positive, got {args.interval}")
        run_until_signalled(args, lambda stop: _show(args, stop))
    except UsageError as exc:
        report_error(args, exc)
        return EXIT_USAGE
    except KizunaError as exc:
        report_error(args, exc)
        return EXIT_ERROR
    return EXIT_OK


async def _show(args: argparse.Namespace, stop: asyncio.Event) -> None:
    from actors.handles import Handle
    from actors.supervisor import Supervisor

    supervisor = Handle[Supervisor](find_supervisor(args.address, args.server), timeout=60.0)

    async def fetch() -> ServerOverview:
        return await supervisor.call(Supervisor.overview)

    if not args.watch:
        overview = await fetch()
        if args.json:
            print_json(msgspec.to_builtins(overview))
        else:
            from rich.console import Console

            Console().print(render(overview))
        return
    if args.json:
        while not stop.is_set():
            print_json(msgspec.to_builtins(await fetch()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
        return
    from rich.live import Live

    with Live(render(await fetch()), auto_refresh=False) as live:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
            if not stop.is_set():
                live.update(render(await fetch()), refresh=True)
