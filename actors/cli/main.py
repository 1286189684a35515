"""The ``kizuna-stream`` entry point: the parser of every command in ``COMMANDS``, and ``main``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from actors.cli import (
    cameras,
    demo,
    encoders,
    loadtest,
    record,
    serve,
    status,
    streams,
    token,
    view,
    viewers,
)
from actors.cli.common import EXIT_USAGE

#: Every command, in the order ``--help`` lists them; each module has ``register(subparsers)``.
COMMANDS: tuple[ModuleType, ...] = (
    demo,
    serve,
    streams,
    status,
    view,
    viewers,
    loadtest,
    record,
    token,
    cameras,
    encoders,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kizuna-stream",
        description="Real-time streaming: H.264 encoded once, fanned out over RTP over QUIC, run as Ray actors.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the actors do")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    run = getattr(args, "run", None)
    if run is None:
        return EXIT_USAGE
    code: int = run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
