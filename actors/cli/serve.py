"""``kizuna-stream serve``: broadcast one source at one address until Ctrl-C.

    kizuna-stream serve --source test --listen 0.0.0.0:4433 [--cert F --key F] [--senders N]

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
from shared.errors import KizunaError
from shared.models import AccessMode, StreamAccess, StreamConfig, parse_source

if TYPE_CHECKING:
    from actors.handles import SenderHandle


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="broadcast a source to any number of viewers")
    serve.add_argument(
        "--source", default="test", help="test (default), camera:N, screen[:M][@X,Y,WxH], file:PATH"
    )
    serve.add_argument(
        "--listen",
        default="127.0.0.1:4433",
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


def run(args: argparse.Namespace) -> int:
    try:
        host, port = parse_listen(args.listen)
        if args.http is not None:
            try:
                parse_listen(args.http)
            except UsageError:
                raise UsageError(
                    f"--http {args.http!r}: expected HOST:PORT, e.g. 0.0.0.0:8080"
                ) from None
        parse_source(args.source)
        if args.senders < 1:
            raise UsageError(f"--senders must be >= 1, got {args.senders}")
        if (args.cert is None) != (args.key is None):
            raise UsageError("give both --cert and --key, or neither")
        if args.seconds is not None and args.seconds <= 0:
            raise UsageError(f"--seconds must be positive, got {args.seconds}")
        result = run_until_signalled(args, lambda stop: serve(args, host, port, stop))
    except UsageError as exc:
        report_error(args, exc)
        return EXIT_USAGE
    except KizunaError as exc:
        report_error(args, exc)
        return EXIT_ERROR
    if args.json:
        print_json(result)
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


async def serve(
    args: argparse.Namespace, host: str, port: int, stop: asyncio.Event
) -> dict[str, Any]:
    import ray

    from actors.handles import SenderHandle
    from actors.manager import StreamManager
    from actors.placement import NAMESPACE
    from shared.auth.secret_file import load_secret

    access = StreamAccess(mode=AccessMode(args.access), allow_requests=not args.no_requests)
    secret = load_secret(args.secret_file, create=True) if access.mode == AccessMode.TOKEN else None
    config = StreamConfig(
        source=args.source,
        quality=quality_from_args(args),
        listen_host=host,
        tls_cert_path=args.cert,
        tls_key_path=args.key,
        access=access,
        shed_under_pressure=not args.no_shedding,
    )
    if port == 0:
        port = free_port(host)
    status = StatusLine(enabled=not args.json)
    status.show("starting Ray and the stream actors ...")
    async with StreamManager.start(address=args.address, token_secret=secret) as manager:
        session = await manager.start_camera_stream(config)
        sid = session.session_id
        url = await manager.open_shards(sid, args.senders, port=port)
        whep = None
        if args.http is not None:
            whep = await manager.open_whep(sid, *parse_listen(args.http))
        handles = [
            SenderHandle(ray.get_actor(actor["name"], namespace=NAMESPACE))
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["name"].startswith(f"kz-{sid}-shard-")
        ]
        if args.json:
            print_json(
                {"url": url, "session_id": sid, "senders": len(handles), "access": args.access}
                | ({"whep": whep, "player": f"{whep}/player"} if whep else {})
            )
        else:
            status.done()
            print(url)
            if whep is not None:
                print(f"WHEP {whep}\nplayer {whep}/player")
            if access.mode == AccessMode.TOKEN:
                print(
                    f"viewers need a token (kizuna-stream token --stream {sid}) or your approval"
                    " (kizuna-stream viewers list)"
                    if access.allow_requests
                    else f"viewers need a token (kizuna-stream token --stream {sid})",
                    file=sys.stderr,
                )
        sys.stdout.flush()
        started = time.monotonic()
        deadline = started + args.seconds if args.seconds else None
        peak = 0
        while not stop.is_set():
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            viewers, sent = await _connected(handles)
            peak = max(peak, viewers)
            if status.enabled:
                current = await manager.get_stream(sid)
                status.show(
                    f"[{time.monotonic() - started:6.0f}s] {current.state} | {viewers} viewers "
                    f"on {len(handles)} senders | {current.stats.current_bitrate / 1000:.0f} kbps"
                    f" | {sent / 1e6:.1f} MB sent"
                )
        viewers, sent = await _connected(handles)
        final = await manager.stop_stream(sid)
    status.done()
    assert final is not None
    return {
        "session_id": sid,
        "url": url,
        "seconds": round(time.monotonic() - started, 2),
        "interrupted": stop.is_set(),
        "state": str(final.state),
        "peak_viewers": max(peak, viewers),
        "bytes_sent": max(sent, final.stats.bytes_sent),
        "frames_encoded": final.stats.frames_encoded,
    }
