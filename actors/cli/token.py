"""``kizuna-stream token``: print a viewer token for one stream.

The token is a JWT signed with the server's HS256 secret (``shared.auth.tokens``), read from
``--secret-file``, ``KIZUNA_TOKEN_SECRET`` or the default file a server creates on its first
start (``shared.auth.secret_file``), never from the command line, where other users of the
machine could read it in ``ps``.  The token goes to stdout alone (or in one JSON object with
``--json``), so ``TOKEN=$(kizuna-stream token --stream ID)`` works.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from actors.cli.common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, UsageError, print_json, report_error
from shared.auth.secret_file import SECRET_ENV, load_secret
from shared.auth.tokens import (
    DEFAULT_TTL_S,
    MAX_TTL_S,
    TokenIssuer,
    TokenKey,
    check_stream_id,
    check_viewer_id,
)
from shared.errors import ConfigError, KizunaError
from shared.models import QualityPreset, ViewerPermissions


def register(commands: Any) -> None:
    token = commands.add_parser(
        "token",
        # Without this, argparse takes `--secret VALUE` for `--secret-file VALUE` and then
        # prints VALUE (the secret) in its "does not exist" error.
        allow_abbrev=False,
        help="print a viewer token for a stream",
        description=(
            "Print a viewer token (a signed JWT) that lets one viewer watch one stream. "
            f"The secret comes from --secret-file, {SECRET_ENV}, or the file a server on this "
            "machine creates on its first start; never from the command line."
        ),
    )
    token.add_argument("--stream", required=True, help="the stream id the token opens")
    token.add_argument("--viewer", help="the viewer id the token is for (default: any)")
    token.add_argument(
        "--can-record", action="store_true", help="allow recording requests on the server"
    )
    token.add_argument("--can-control-quality", action="store_true", help="allow choosing a rung")
    token.add_argument(
        "--max-quality",
        default=QualityPreset.ULTRA.value,
        choices=[p.value for p in QualityPreset if p is not QualityPreset.CUSTOM],
        help="the best rung the viewer may receive (default ultra: no cap)",
    )
    token.add_argument(
        "--ttl",
        type=float,
        default=DEFAULT_TTL_S,
        help=f"seconds until the token expires (default {DEFAULT_TTL_S:g})",
    )
    token.add_argument("--secret-file", help="file holding the signing secret")
    token.add_argument(
        "--json", action="store_true", help="print one JSON object: the token and its claims"
    )
    token.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        _check_arguments(args)
        key = TokenKey.hs256(load_secret(args.secret_file))
        permissions = ViewerPermissions(
            can_record=args.can_record,
            can_control_quality=args.can_control_quality,
            max_quality=QualityPreset(args.max_quality),
        )
        token, grant = TokenIssuer(key).issue(
            stream=args.stream,
            viewer=args.viewer,
            permissions=permissions,
            ttl_s=args.ttl,
            now=time.time(),
        )
    except UsageError as exc:
        report_error(args, exc)
        return EXIT_USAGE
    except KizunaError as exc:
        report_error(args, exc)
        return EXIT_ERROR
    if args.json:
        print_json(
            {
                "token": token,
                "stream": grant.stream,
                "viewer": grant.viewer,
                "token_id": grant.token_id,
                "expires_at": grant.expires_at,
                "permissions": permissions,
            }
        )
    else:
        print(token)
    return EXIT_OK


def _check_arguments(args: argparse.Namespace) -> None:
    """Bad arguments are usage errors (exit 2), found before the secret is looked for."""
    if not (0 < args.ttl <= MAX_TTL_S):
        raise UsageError(f"--ttl {args.ttl:g}: must be between 0 and {MAX_TTL_S:g} seconds")
    try:
        check_stream_id(args.stream)
        if args.viewer is not None:
            check_viewer_id(args.viewer)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
