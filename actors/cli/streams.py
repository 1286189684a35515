"""``kizuna-stream streams``: add, remove, pause, resume and list a running server's streams.

    kizuna-stream streams list [--json]
    kizuna-stream streams add --source SPEC [--name N] [--listen HOST:PORT] [--senders N] ...
    kizuna-stream streams add --config server.toml [--only NAME ...]
    kizuna-stream streams remove|pause|resume STREAM

STREAM is a stream's id or its name.  Like ``viewers``, it joins the server's Ray cluster
(``--address``, else RAY_ADDRESS, else the cluster a ``serve`` on this machine started) and
talks to the server's supervisor, found by name (``--server`` picks one when several run).
A paused stream keeps its viewers connected (they keep the last picture) and its recordings
paused until ``resume``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from actors.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_quality_arguments,
    add_server_arguments,
    find_supervisor,
    print_json,
    quality_from_args,
    report_error,
)
from shared.config import StreamSpec, load_server_config
from shared.errors import ConfigError, KizunaError, StreamNotFoundError
from shared.models import AccessMode, StreamAccess, StreamConfig, StreamSession, parse_source

ACTIONS = ("list", "add", "remove", "pause", "resume")


def register(commands: Any) -> None:
    streams = commands.add_parser(
        "streams",
        help="add, remove, pause, resume or list the streams of a running server",
        description=(__doc__ or "").split("\n\n")[0],
    )
    streams.add_argument("action", choices=ACTIONS)
    streams.add_argument("stream", nargs="?", help="remove/pause/resume: the stream's id or name")
    add = streams.add_argument_group("add")
    add.add_argument("--config", metavar="FILE", help="add the streams of this server file")
    add.add_argument(
        "--only", action="append", metavar="NAME", help="with --config: only this stream"
    )
    add.add_argument("--source", help="the new stream's source (test, camera:N, screen, file:PATH)")
    add.add_argument("--name", default="", help="the new stream's name")
    add.add_argument(
        "--listen",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="its viewers' UDP address (default: a free port on 127.0.0.1)",
    )
    add.add_argument("--senders", type=int, default=1, help="sender processes on that port")
    add.add_argument(
        "--access", choices=[m.value for m in AccessMode], default=AccessMode.TOKEN.value
    )
    add.add_argument("--priority", type=int, default=0, help="higher gives way last (0..100)")
    add_quality_arguments(add)
    add_server_arguments(streams)
    streams.add_argument("--json", action="store_true", help="print one JSON object")
    streams.set_defaults(run=run)


def _specs(args: argparse.Namespace) -> list[StreamSpec]:
    """The streams ``add`` starts."""
    from actors.cli.serve import parse_listen

    if args.config and args.source:
        raise UsageError("streams add takes --config or --source, not both")
    if args.config:
        try:
            text = Path(args.config).read_text(encoding="utf-8")
            server = load_server_config(text, args.config)
        except OSError as exc:
            raise UsageError(f"--config {args.config}: {exc.strerror or exc}") from None
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        specs = list(server.streams)
        if args.only:
            unknown = sorted(set(args.only) - {s.name for s in specs})
            if unknown:
                raise UsageError(f"{args.config} has no stream {', '.join(unknown)}")
            specs = [s for s in specs if s.name in args.only]
        return specs
    if not args.source:
        raise UsageError("streams add needs --source SPEC or --config FILE")
    parse_source(args.source)
    if args.senders < 1:
        raise UsageError(f"--senders must be >= 1, got {args.senders}")
    if not 0 <= args.priority <= 100:
        raise UsageError(f"--priority must be between 0 and 100, got {args.priority}")
    host, port = parse_listen(args.listen)
    config = StreamConfig(
        source=args.source,
        name=args.name,
        quality=quality_from_args(args),
        listen_host=host,
        access=StreamAccess(mode=AccessMode(args.access)),
        priority=args.priority,
        shed_under_pressure=True,
    )
    return [
        StreamSpec(
            name=args.name,
            config=config,
            listen_host=host,
            port=port,
            senders=args.senders,
            priority=args.priority,
        )
    ]


def _check(args: argparse.Namespace) -> None:
    if args.action in ("remove", "pause", "resume") and not args.stream:
        raise UsageError(f"streams {args.action} needs the stream's id or name (streams list)")
    if args.action != "add" and (args.config or args.source):
        raise UsageError(f"--config and --source are for streams add, not {args.action}")


def run(args: argparse.Namespace) -> int:
    try:
        _check(args)
        specs = _specs(args) if args.action == "add" else []
        result = asyncio.run(_act(args, specs))
    except UsageError as exc:
        report_error(args, exc)
        return EXIT_USAGE
    except KizunaError as exc:
        report_error(args, exc)
        return EXIT_ERROR
    if args.json:
        print_json(result)
    else:
        _print(args.action, result)
    return EXIT_OK


def _row(session: StreamSession, urls: list[str] | None = None) -> dict[str, Any]:
    quality = session.quality
    return {
        "id": session.session_id,
        "name": session.name,
        "state": str(session.state),
        "quality": f"{quality.resolution}@{quality.framerate} {quality.bitrate // 1000} kbps",
        "viewers": len(session.viewers),
        "error": f"{session.error.kind}: {session.error.message}" if session.error else None,
    } | ({"urls": urls} if urls is not None else {})


async def resolve_stream(supervisor: Any, key: str) -> str:
    """The id of the stream whose id or name is ``key``."""
    from actors.supervisor import Supervisor

    sessions: list[StreamSession] = await supervisor.call(Supervisor.get_active_streams)
    matches = [s.session_id for s in sessions if key in (s.session_id, s.name)]
    if not matches:
        known = ", ".join(s.name or s.session_id for s in sessions) or "none"
        raise StreamNotFoundError(f"the server has no stream {key!r} (it has: {known})")
    if len(matches) > 1:
        raise UsageError(f"several streams are named {key!r}: give the id ({', '.join(matches)})")
    return matches[0]


async def _act(args: argparse.Namespace, specs: list[StreamSpec]) -> dict[str, Any]:
    from actors.handles import Handle
    from actors.supervisor import Supervisor

    supervisor = Handle[Supervisor](find_supervisor(args.address, args.server), timeout=60.0)
    result: dict[str, Any] = {"action": args.action}
    if args.action == "list":
        overview = await supervisor.call(Supervisor.overview)
        urls = {s.session_id: s.urls for s in overview.streams}
        sessions = await supervisor.call(Supervisor.get_active_streams)
        result["streams"] = [_row(s, urls.get(s.session_id, [])) for s in sessions]
    elif args.action == "add":
        added = []
        for spec in specs:
            session = await supervisor.call(Supervisor.start_stream, spec.config, None, None)
            try:
                if spec.shared_port:
                    url = await supervisor.call(
                        Supervisor.open_shared_port, session.session_id, spec.port
                    )
                else:
                    url = await supervisor.call(
                        Supervisor.open_shards, session.session_id, spec.senders, spec.port
                    )
            except BaseException:
                await supervisor.call(Supervisor.stop_stream, session.session_id)
                raise
            added.append(_row(session, [url]))
        result["streams"] = added
    else:
        sid = await resolve_stream(supervisor, args.stream)
        if args.action == "remove":
            final = await supervisor.call(Supervisor.stop_stream, sid)
            result["streams"] = [_row(final)] if final is not None else []
        elif args.action == "pause":
            result["streams"] = [_row(await supervisor.call(Supervisor.pause_stream, sid))]
        else:
            result["streams"] = [_row(await supervisor.call(Supervisor.resume_stream, sid))]
    return result


def _print(action: str, result: dict[str, Any]) -> None:
    streams = result["streams"]
    if action == "list":
        print(f"{len(streams)} stream(s)")
    for s in streams:
        name = f" {s['name']}" if s["name"] else ""
        line = f"{s['id']}{name}  {s['state']}  {s['quality']}  {s['viewers']} viewer(s)"
        if s.get("urls"):
            line += "  " + " ".join(s["urls"])
        if s["error"]:
            line += f"  ({s['error']})"
        print(line if action == "list" else f"{action}: {line}")
