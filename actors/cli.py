"""The ``kizuna-stream`` command line: one module per command, registered here."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

import actors
from actors.cli_common import EXIT_USAGE


def command_modules() -> list[ModuleType]:
    """Every ``actors/cli_<command>.py`` module; each has ``register(subparsers)``."""
    names = sorted(
        info.name
        for info in pkgutil.iter_modules(actors.__path__)
        if info.name.startswith("cli_") and info.name != "cli_common"
    )
    return [importlib.import_module(f"actors.{name}") for name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kizuna-stream",
        description="Real-time streaming: H.264 encoded once, fanned out over RTP over QUIC, run as Ray actors.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the actors do")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in command_modules():
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
