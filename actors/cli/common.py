"""What every ``kizuna-stream`` command shares: exit codes, errors, signals, status output."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import msgspec

from shared.errors import KizunaError
from shared.models import QualityPreset, Resolution, StreamQuality

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: How long a command waits for the Ray cluster at ``--address`` to answer at all: Ray's own
#: connect retries for about a minute before it gives up on an address nobody serves.
CONNECT_DEADLINE_S = 5.0
#: Ray's GCS port and Ray Client's, when an address names none.
RAY_GCS_PORT, RAY_CLIENT_PORT = 6379, 10001

T = TypeVar("T")


class UsageError(KizunaError):
    """A command-line argument that cannot work (exit code 2)."""


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    presets = [p.value for p in QualityPreset if p is not QualityPreset.CUSTOM]
    parser.add_argument(
        "--preset",
        default="medium",
        choices=presets,
        help="quality preset (default medium: 720p30, 1.5 Mbps)",
    )
    parser.add_argument("--size", help="override the preset's resolution, e.g. 640x360")
    parser.add_argument("--fps", type=int, help="override the preset's frame rate")
    parser.add_argument("--bitrate", type=float, help="override the preset's bitrate, in kbps")


def quality_from_args(args: argparse.Namespace) -> StreamQuality:
    base = StreamQuality.from_preset(QualityPreset(args.preset))
    if args.size is None and args.fps is None and args.bitrate is None:
        return base
    width, height = base.resolution.width, base.resolution.height
    if args.size is not None:
        try:
            width, height = (int(part) for part in args.size.lower().split("x"))
        except ValueError:
            raise UsageError(
                f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 1280x720"
            ) from None
    return StreamQuality(
        resolution=Resolution(width, height),
        framerate=args.fps if args.fps is not None else base.framerate,
        bitrate=int(args.bitrate * 1000) if args.bitrate is not None else base.bitrate,
    )


class StatusLine:
    """One line on stderr, rewritten in place while a long command runs."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._width = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        sys.stderr.write("\r" + text.ljust(self._width))
        sys.stderr.flush()
        self._width = len(text)

    def above(self, text: str) -> None:
        """Print ``text`` on stdout, on a line of its own: the status line is wiped first (the
        next :meth:`show` draws it again below)."""
        if self.enabled and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def done(self) -> None:
        if self.enabled and self._width:
            sys.stderr.write("\n")
            sys.stderr.flush()


def report_error(args: argparse.Namespace, exc: BaseException) -> None:
    """One clear line on stderr (and a JSON error object on stdout with --json), no traceback."""
    if getattr(args, "json", False):
        error = {"error": {"kind": type(exc).__name__, "message": str(exc)}}
        sys.stdout.write(msgspec.json.encode(error).decode() + "\n")
    print(f"kizuna-stream: error: {exc}", file=sys.stderr)


def print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")


def run_until_signalled(
    args: argparse.Namespace, body: Callable[[asyncio.Event], Awaitable[T]]
) -> T:
    """Run ``body(stop)`` on a fresh event loop; SIGINT/SIGTERM set ``stop`` so the command
    can shut down cleanly, and a second signal exits at once."""

    async def main() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                os._exit(EXIT_INTERRUPTED)
            if not getattr(args, "json", False):
                sys.stderr.write("\nstopping (Ctrl-C again to quit at once) ...\n")
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        return await body(stop)

    return asyncio.run(main())


def run_command(
    args: argparse.Namespace,
    body: Callable[[asyncio.Event], Awaitable[dict[str, Any]]],
    summary: Callable[[dict[str, Any]], None],
) -> int:
    """Run a command's ``body`` until it ends or is signalled, then print its result.

    Errors become one clear line (exit 2 for a usage error, 1 for any other project error);
    the result is one JSON line with ``--json``, else ``summary``; exit 130 when interrupted.
    """
    try:
        result = run_until_signalled(args, body)
    except UsageError as exc:
        report_error(args, exc)
        return EXIT_USAGE
    except KizunaError as exc:
        report_error(args, exc)
        return EXIT_ERROR
    if getattr(args, "json", False):
        print_json(result)
    else:
        summary(result)
    return EXIT_INTERRUPTED if result.get("interrupted") else EXIT_OK


async def consume_until_stopped(
    consume: Coroutine[Any, Any, None], stop: asyncio.Event, timeout: float | None
) -> None:
    """Run ``consume`` until it returns, ``stop`` is set or ``timeout`` passes; a project
    error it raised is raised here (after both tasks are cancelled and awaited)."""
    consumer = asyncio.create_task(consume)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait(
            [consumer, stopper], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for task in (consumer, stopper):
            task.cancel()
        results = await asyncio.gather(consumer, stopper, return_exceptions=True)
    for result in results:
        if isinstance(result, KizunaError):
            raise result


def cluster_endpoint(address: str) -> tuple[str, int] | None:
    """The host and port a Ray address reaches (``host[:port]``, ``[v6][:port]`` or
    ``ray://host[:port]``), to try before Ray does; None for ``auto`` and ``local``, which Ray
    resolves from this machine and fails on at once when nothing runs.  UsageError for a port
    that is not a number."""
    if address in ("auto", "local"):
        return None
    default = RAY_GCS_PORT
    if address.startswith("ray://"):
        address, default = address.removeprefix("ray://"), RAY_CLIENT_PORT
    address = address.rstrip("/")
    if address.startswith("["):  # [v6] or [v6]:port
        host, _, rest = address[1:].partition("]")
        port = rest.removeprefix(":") or str(default)
    elif address.count(":") == 1:
        host, port = address.split(":")
    else:
        host, port = address, str(default)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--address {address!r} is not host:port")
    return host, int(port)


def check_reachable(address: str, deadline_s: float = CONNECT_DEADLINE_S) -> None:
    """KizunaError, within ``deadline_s``, when nothing accepts a connection at ``address``
    (a wrong host or port): Ray itself would retry for a minute before saying anything."""
    endpoint = cluster_endpoint(address)
    if endpoint is None:
        return
    try:
        with socket.create_connection(endpoint, timeout=deadline_s):
            pass
    except TimeoutError:
        raise KizunaError(
            f"cannot reach the Ray cluster at {address}: no answer within {deadline_s:g} s; "
            "check --address (or RAY_ADDRESS)"
        ) from None
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise KizunaError(
            f"cannot reach the Ray cluster at {address}: {why.lower()}; "
            "check --address (or RAY_ADDRESS)"
        ) from None


def find_supervisor(address: str | None, server: str | None = None) -> Any:
    """The Ray handle of a running server's supervisor: joins the Ray cluster at ``address``
    (else RAY_ADDRESS, else the one a ``serve`` on this machine started) and looks the
    supervisor up by its name (``server`` picks one when several run)."""
    import ray

    from actors.placement import NAMESPACE, SUPERVISOR_PREFIX

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    if not ray.is_initialized():
        check_reachable(address)
        try:
            ray.init(
                address=address,
                namespace=NAMESPACE,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise KizunaError(
                f"no running kizuna-stream server found (Ray cluster {address}: {exc}); "
                "start one with kizuna-stream serve, or pass --address"
            ) from None
    names = sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(SUPERVISOR_PREFIX)
    )
    if server:
        if server not in names:
            raise KizunaError(f"no server named {server!r}; running: {', '.join(names) or 'none'}")
        names = [server]
    if not names:
        raise KizunaError(f"no kizuna-stream server runs on the Ray cluster at {address}")
    if len(names) > 1:
        raise UsageError(f"several servers run ({', '.join(names)}): pick one with --server")
    return ray.get_actor(names[0], namespace=NAMESPACE)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """``--address`` and ``--server``, for commands that talk to a running server."""
    parser.add_argument(
        "--address", help="the server's Ray cluster (default: RAY_ADDRESS, else this machine's)"
    )
    parser.add_argument("--server", help="the supervisor's name, when several servers run")
