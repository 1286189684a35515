"""The access arguments of the commands that connect as a viewer (``view``, ``record``, ``loadtest``).

``--token`` (default: the ``KIZUNA_TOKEN`` environment variable) is the viewer token the hello
on the control stream presents (``shared.auth.control``); ``--name`` is shown to the operator
when a viewer without a token asks for approval.  The token is a bearer credential: it is held
in a :class:`ViewerToken`, whose repr hides it, so a printed argument namespace or a traceback
shows no token, and no message of these commands quotes it.
"""

from __future__ import annotations

import argparse
import os
from typing import Final

from actors.cli.common import UsageError
from shared.errors import ConfigError
from shared.roq.url import StreamUrl
from shared.viewer.access import ViewerAccess

__all__ = ["TOKEN_ENV", "ViewerToken", "add_access_arguments", "check_access"]

#: The environment variable ``--token`` defaults to (a command line is visible to other users
#: of the machine, the environment of a process is not).
TOKEN_ENV: Final = "KIZUNA_TOKEN"


class ViewerToken(str):
    """A token as the command line gave it: a plain string, except that its repr hides it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<redacted token>"


def add_access_arguments(parser: argparse.ArgumentParser, *, name: bool = False) -> None:
    """``--token`` on ``parser`` (and ``--name`` when ``name``)."""
    parser.add_argument(
        "--token",
        type=ViewerToken,
        # Read when the parser is built; an empty variable counts as unset.
        default=os.environ.get(TOKEN_ENV) or None,
        metavar="TOKEN",
        help=f"the viewer token to present (default: ${TOKEN_ENV}; prefer the variable, "
        "which other users cannot read the way they can read a command line)",
    )
    if name:
        parser.add_argument(
            "--name",
            metavar="NAME",
            help="a name the operator sees if this viewer has to ask for approval "
            "(up to 64 characters)",
        )


def check_access(args: argparse.Namespace, url: StreamUrl) -> str | None:
    """The token to present, as a plain ``str`` (what the hello's encoder takes; None for
    none), once the hello it makes is one the server can read: a :class:`UsageError` (which
    quotes no token) otherwise."""
    token = str(args.token) if args.token else None
    try:
        ViewerAccess(
            stream=url.session_id,
            token=token,
            viewer=url.viewer,
            name=getattr(args, "name", None),
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return token
