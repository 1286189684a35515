"""``kizuna-stream serve``: broadcast until Ctrl-C: one source, or every stream of a file.

    kizuna-stream serve --source test --listen 0.0.0.0:4433 [--cert F --key F] [--senders N]
    kizuna-stream serve --config server.toml

``--config`` starts every ``[[streams]]`` of the file (``deploy/server.example.toml`` shows
each setting; ``shared.config`` validates it, and a mistake is one error naming the file and
the line, before anything starts).  Streams of the file that give the same ``listen`` address
share its port: one process serves them there, and each viewer gets the stream its URL names
(``actors.port_listeners``).  ``--source`` and its options are the one-stream shortcut.

Starts (or joins) a Ray cluster, starts the stream, and starts ``--senders`` sender actors
(default: one per CPU core) that all listen on the same UDP port with ``SO_REUSEPORT``; the
kernel spreads viewers across them and keeps each QUIC connection on one.  All share the
stream's TLS identity (``--cert``/``--key``, or a generated self-signed certificate), so one
URL, which carries the certificate's fingerprint, serves any number of viewers.

Who may watch (``--access``): by default a viewer needs a token (``kizuna-stream token
--stream ID`` on this machine prints one; ``view --token``) or an operator's approval of its
request (``kizuna-stream viewers list|approve|deny``); ``--access open`` lets anyone who
reaches the port watch.  Tokens are signed with the secret from ``--secret-file``,
``KIZUNA_TOKEN_SECRET``, or a file created on the first start, readable only by this user
(``shared.auth.secret_file``); the secret is never printed.

``--http HOST:PORT`` also serves browsers over WebRTC: the stream's WHEP endpoint (``POST`` an
SDP offer with ``Authorization: Bearer <token>``) and its player page are printed after the URL
(``--json``: ``whep`` and ``player``).

It prints the URL on stdout at once (``--json``: a JSON line ``{"url": ..., ...}``), shows a
status line of connected viewers while it runs, and on Ctrl-C (or after ``--seconds``) stops
the stream and prints a summary (``--json``: a second JSON line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    StatusLine,
    UsageError,
    add_quality_arguments,
    print_json,
    quality_from_args,
    report_error,
    run_until_signalled,
)
from shared.config import ServerConfig, StreamSpec, load_server_config
from shared.errors import ConfigError, KizunaError
from shared.models import AccessMode, StreamAccess, StreamConfig, parse_source

if TYPE_CHECKING:
    from actors.handles import SenderHandle


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="broadcast a source to any number of viewers")
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="serve every stream of this TOML file (see deploy/server.example.toml)",
    )
    serve.add_argument("--source", help="test (default), camera:N, screen[:M][@X,Y,WxH], file:PATH")
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="UDP address viewers connect to (default 127.0.0.1:4433; port 0 picks one)",
    )
    serve.add_argument("--cert", help="PEM certificate (default: a generated self-signed one)")
    serve.add_argument("--key", help="PEM private key for --cert")
    serve.add_argument(
        "--senders",
        type=int,
        default=os.cpu_count() or 1,
        help="sender actors sharing the port (default: one per CPU core)",
    )
    serve.add_argument(
        "--access",
        choices=[mode.value for mode in AccessMode],
        default=AccessMode.TOKEN.value,
        help="token (default): a token or an approved request; open: anyone who reaches the port",
    )
    serve.add_argument(
        "--no-requests",
        action="store_true",
        help="refuse viewers without a token instead of letting them ask for approval",
    )
    serve.add_argument(
        "--secret-file", help="file holding the token signing secret (default: see above)"
    )
    serve.add_argument(
        "--no-shedding",
        action="store_true",
        help="keep every rung and the full frame rate even when the CPU saturates",
    )
    serve.add_argument(
        "--fixed-rates",
        action="store_true",
        help="keep each rung at its configured bitrate, however simple the picture"
        " (default: a still or simple picture gets fewer bits)",
    )
    serve.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="also serve browsers over WebRTC: WHEP and a player page on this HTTP address",
    )
    add_quality_arguments(serve)
    serve.add_argument("--seconds", type=float, help="stop after this long (default: Ctrl-C)")
    serve.add_argument(
        "--address", help="join this Ray cluster (default: RAY_ADDRESS, else start one)"
    )
    serve.add_argument("--json", action="store_true", help="JSON lines instead of a status line")
    serve.set_defaults(run=run)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {value!r}: expected HOST:PORT, e.g. 0.0.0.0:4433")
    return host, int(port)


def free_port(host: str) -> int:
    """A UDP port nobody holds right now (for ``--listen HOST:0`` with several senders)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _config_from_file(args: argparse.Namespace) -> ServerConfig:
    """The file's streams; the one-stream options cannot be combined with it."""
    given = [
        option
        for option, value in (
            ("--source", args.source),
            ("--listen", args.listen),
            ("--cert", args.cert),
            ("--key", args.key),
            ("--http", args.http),
            ("--secret-file", args.secret_file),
            ("--size", args.size),
            ("--fps", args.fps),
            ("--bitrate", args.bitrate),
        )
        if value is not None
    ]
    if given:
        raise UsageError(
            f"--config declares every stream; {', '.join(given)} cannot be given with it"
        )
    try:
        text = Path(args.config).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--config {args.config}: {exc.strerror or exc}") from None
    try:
        return load_server_config(text, args.config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _config_from_args(args: argparse.Namespace) -> ServerConfig:
    """``--source`` and its options as a one-stream server."""
    host, port = parse_listen(args.listen or "127.0.0.1:4433")
    http = None
    if args.http is not None:
        try:
            http = parse_listen(args.http)
        except UsageError:
            raise UsageError(
                f"--http {args.http!r}: expected HOST:PORT, e.g. 0.0.0.0:8080"
            ) from None
    source = args.source or "test"
    parse_source(source)
    if args.senders < 1:
        raise UsageError(f"--senders must be >= 1, got {args.senders}")
    if (args.cert is None) != (args.key is None):
        raise UsageError("give both --cert and --key, or neither")
    access = StreamAccess(mode=AccessMode(args.access), allow_requests=not args.no_requests)
    config = StreamConfig(
        source=source,
        quality=quality_from_args(args),
        listen_host=host,
        tls_cert_path=args.cert,
        tls_key_path=args.key,
        access=access,
        shed_under_pressure=not args.no_shedding,
        content_aware_targets=not args.fixed_rates,
    )
    stream = StreamSpec(
        name="",
        config=config,
        listen_host=host,
        port=port,
        senders=args.senders,
        priority=0,
        http=http,
    )
    return ServerConfig(path="", streams=(stream,), secret_file=args.secret_file)


def run(args: argparse.Namespace) -> int:
    try:
        server = _config_from_file(args) if args.config else _config_from_args(args)
        if args.seconds is not None and args.seconds <= 0:
            raise UsageError(f"--seconds must be positive, got {args.seconds}")
        result = run_until_signalled(args, lambda stop: serve(args, server, stop))
    except UsageError as exc:
        report_error(args, exc)
        return EXIT_USAGE
    except KizunaError as exc:
        report_error(args, exc)
        return EXIT_ERROR
    if args.json:
        print_json(result)
    elif args.config:
        print(f"stopped after {result['seconds']} s:")
        for stream in result["streams"]:
            print(
                f"  {stream['name']} ({stream['session_id']}): {stream['frames_encoded']} frames"
                f" encoded, at most {stream['peak_viewers']} viewers,"
                f" {stream['bytes_sent']} bytes sent"
            )
    else:
        print(
            f"stream {result['session_id']} stopped after {result['seconds']} s: "
            f"{result['frames_encoded']} frames encoded, at most {result['peak_viewers']} "
            f"viewers, {result['bytes_sent']} bytes sent"
        )
    return EXIT_OK


async def _connected(handles: list[SenderHandle]) -> tuple[int, int]:
    """(viewers connected, bytes sent) summed over the sender shards."""
    stats = await asyncio.gather(*(h.stats() for h in handles), return_exceptions=True)
    live = [s for s in stats if not isinstance(s, BaseException)]
    return sum(len(s.peers) for s in live), sum(s.bytes_sent for s in live)


class _Running:
    """A started stream of the server, and what its summary needs."""

    def __init__(self, spec: StreamSpec, session_id: str, url: str, handles: list[SenderHandle]):
        self.spec = spec
        self.session_id = session_id
        self.url = url
        self.handles = handles
        self.peak = 0
        self.sent = 0


def _where(server: ServerConfig, spec: StreamSpec) -> str:
    """How an error names a stream of the file: its line and name."""
    return f"{server.path}:{spec.line}: stream {spec.name}: " if server.path else ""


async def serve(
    args: argparse.Namespace, server: ServerConfig, stop: asyncio.Event
) -> dict[str, Any]:
    import ray

    from actors.handles import SenderHandle
    from actors.manager import StreamManager
    from actors.placement import NAMESPACE
    from actors.port_listeners import StreamOnPortHandle
    from shared.auth.secret_file import load_secret

    tokens = any(s.config.access.mode == AccessMode.TOKEN for s in server.streams)
    secret = load_secret(server.secret_file, create=True) if tokens else None
    status = StatusLine(enabled=not args.json)
    status.show("starting Ray and the stream actors ...")
    running: list[_Running] = []
    async with StreamManager.start(
        address=args.address or server.address,
        token_secret=secret,
        max_streams=max(server.max_streams, len(server.streams)),
        gpu_sessions_per_gpu=server.gpu_sessions_per_gpu,
    ) as manager:
        if server.cpu_admission_percent is not None:
            await manager.set_admission(server.cpu_admission_percent)
        announced = []
        for spec in server.streams:
            try:
                session = await manager.start_camera_stream(spec.config)
                sid = session.session_id
                if spec.shared_port:
                    # One process serves every stream of the file on this port.
                    url = await manager.open_shared_port(sid, spec.port)
                else:
                    port = spec.port or free_port(spec.listen_host)
                    url = await manager.open_shards(sid, spec.senders, port=port)
                whep = await manager.open_whep(sid, *spec.http) if spec.http else None
            except KizunaError as exc:
                raise type(exc)(f"{_where(server, spec)}{exc}") from None
            named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
            handles = [
                SenderHandle(ray.get_actor(name, namespace=NAMESPACE))
                for name in named
                if name.startswith(f"kz-{sid}-shard-")
            ] + [
                StreamOnPortHandle(ray.get_actor(name, namespace=NAMESPACE), sid)
                for name in named
                if spec.shared_port and name.startswith(f"kz-port-{spec.port}-")
            ]
            running.append(_Running(spec, sid, url, handles))
            announced.append(
                {
                    "name": spec.name,
                    "url": url,
                    "session_id": sid,
                    "senders": len(handles),
                    "access": str(spec.config.access.mode),
                }
                | ({"whep": whep, "player": f"{whep}/player"} if whep else {})
            )
        if args.json:
            # The one-stream shortcut keeps its single object; a file's server lists them.
            print_json({"streams": announced} if server.path else announced[0])
        else:
            status.done()
            for entry in announced:
                label = f"{entry['name']}: " if server.path else ""
                print(f"{label}{entry['url']}")
                if "whep" in entry:
                    print(f"{label}WHEP {entry['whep']}\n{label}player {entry['player']}")
            if tokens:
                print(
                    "viewers need a token (kizuna-stream token --stream ID) or your approval"
                    " (kizuna-stream viewers list)",
                    file=sys.stderr,
                )
        sys.stdout.flush()
        started = time.monotonic()
        deadline = started + args.seconds if args.seconds else None
        while not stop.is_set():
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            line = []
            for stream in running:
                viewers, stream.sent = await _connected(stream.handles)
                stream.peak = max(stream.peak, viewers)
                if status.enabled:
                    current = await manager.get_stream(stream.session_id)
                    line.append(
                        f"{stream.spec.name or current.session_id} {current.state}, {viewers}"
                        f" viewers, {current.stats.current_bitrate / 1000:.0f} kbps"
                    )
            status.show(f"[{time.monotonic() - started:6.0f}s] " + " | ".join(line))
        summaries = []
        for stream in running:
            viewers, sent = await _connected(stream.handles)
            final = await manager.stop_stream(stream.session_id)
            assert final is not None
            summaries.append(
                {
                    "name": stream.spec.name,
                    "session_id": stream.session_id,
                    "url": stream.url,
                    "state": str(final.state),
                    "peak_viewers": max(stream.peak, viewers),
                    "bytes_sent": max(sent, stream.sent, final.stats.bytes_sent),
                    "frames_encoded": final.stats.frames_encoded,
                }
            )
    status.done()
    common = {"seconds": round(time.monotonic() - started, 2), "interrupted": stop.is_set()}
    if server.path:
        return common | {"streams": summaries}
    single = summaries[0]
    del single["name"]
    return single | common
