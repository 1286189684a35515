"""``kizuna-stream viewers``: see and decide who watches a running server's streams.

    kizuna-stream viewers list [--stream ID] [--json]
    kizuna-stream viewers approve REQUEST [--stream ID] [--viewer NAME] [--can-record] ...
    kizuna-stream viewers deny REQUEST [--stream ID] [--reason TEXT]
    kizuna-stream viewers revoke (--viewer ID | --token-id JTI) [--stream ID]
    kizuna-stream viewers notify TEXT [--data JSON] [--stream ID]

It joins the server's Ray cluster (``--address``, else ``RAY_ADDRESS``, else the cluster a
``serve`` on this machine started) and talks to the server's supervisor, found by name
(``--server`` picks one when several run).  ``--stream`` may be left out when the server has
one stream.  ``list`` shows the viewers waiting for approval (with the address and the
certificate fingerprint they came from, and the name they gave, which anyone can claim) and
those with tickets; ``revoke`` cuts a live viewer at once and keeps its token or id out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from actors.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    add_server_arguments,
    find_supervisor,
    print_json,
    report_error,
)
from shared.errors import KizunaError
from shared.models import QualityPreset, ViewerPermissions

ACTIONS = ("list", "approve", "deny", "revoke", "notify")


def register(commands: Any) -> None:
    viewers = commands.add_parser(
        "viewers",
        help="list, approve, deny or revoke the viewers of a running server; send a notice",
        description=(__doc__ or "").split("\n\n")[0],
    )
    viewers.add_argument("action", choices=ACTIONS)
    viewers.add_argument("target", nargs="?", help="approve/deny: the request id; notify: the text")
    viewers.add_argument("--stream", help="the stream (default: the server's only one)")
    viewers.add_argument("--viewer", help="revoke: the viewer id; approve: the id to give it")
    viewers.add_argument("--token-id", help="revoke: the token's id (its jti)")
    viewers.add_argument("--reason", default="", help="deny: the reason the viewer is told")
    viewers.add_argument("--data", help="notify: a JSON object sent with the text")
    viewers.add_argument("--can-record", action="store_true", help="approve: may record")
    viewers.add_argument(
        "--can-control-quality", action="store_true", help="approve: may choose its rung"
    )
    viewers.add_argument(
        "--max-quality",
        default=QualityPreset.ULTRA.value,
        choices=[p.value for p in QualityPreset if p is not QualityPreset.CUSTOM],
        help="approve: the best rung it may get (default: no cap)",
    )
    add_server_arguments(viewers)
    viewers.add_argument("--json", action="store_true", help="print one JSON object")
    viewers.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    if args.action in ("approve", "deny", "notify") and not args.target:
        what = "the text" if args.action == "notify" else "the request id (from viewers list)"
        raise UsageError(f"viewers {args.action} needs {what}")
    if args.action == "revoke" and not (args.viewer or args.token_id):
        raise UsageError("viewers revoke needs --viewer ID or --token-id JTI")
    if args.data is not None:
        try:
            data = json.loads(args.data)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--data is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError("--data must be a JSON object, e.g. '{\"eta_s\": 300}'")


def run(args: argparse.Namespace) -> int:
    try:
        _check(args)
        result = asyncio.run(_act(args))
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


async def _act(args: argparse.Namespace) -> dict[str, Any]:
    from actors.handles import Handle
    from actors.supervisor import Supervisor

    supervisor = Handle[Supervisor](find_supervisor(args.address, args.server))
    stream = args.stream or await _only_stream(supervisor)
    result: dict[str, Any] = {"action": args.action, "stream": stream}
    if args.action == "list":
        requests = await supervisor.call(Supervisor.viewer_requests, stream)
        now = time.monotonic()
        result["pending"] = [
            {
                "request": r.request_id,
                "viewer": r.viewer,
                "name": r.name,
                "address": r.peer.address,
                "certificate": r.peer.certificate_fingerprint,
                "expires_in_s": round(max(0.0, r.expires_at - now), 1),
            }
            for r in requests
        ]
        statuses = await supervisor.call(Supervisor.get_viewer_status, stream)
        result["viewers"] = [
            {
                "viewer": s.viewer_id,
                "state": s.state,
                "shard": s.shard,
                "bytes_sent": s.bytes_sent,
                "connection": str(s.connection_quality),
            }
            for s in statuses
        ]
    elif args.action == "approve":
        permissions = ViewerPermissions(
            can_record=args.can_record,
            can_control_quality=args.can_control_quality,
            max_quality=QualityPreset(args.max_quality),
        )
        await supervisor.call(
            Supervisor.approve_viewer_request, stream, args.target, permissions, args.viewer
        )
        result["request"] = args.target
    elif args.action == "deny":
        await supervisor.call(Supervisor.deny_viewer_request, stream, args.target, args.reason)
        result["request"] = args.target
    elif args.action == "revoke":
        result["cut"] = await supervisor.call(
            Supervisor.revoke_viewer, stream, token_id=args.token_id, viewer_id=args.viewer
        )
        result["viewer"], result["token_id"] = args.viewer, args.token_id
    else:
        data = json.loads(args.data) if args.data else None
        result["sent"] = await supervisor.call(
            Supervisor.broadcast_to_viewers, stream, args.target, data
        )
    return result


async def _only_stream(supervisor: Any) -> str:
    from actors.supervisor import Supervisor

    streams = await supervisor.call(Supervisor.get_active_streams)
    if len(streams) != 1:
        ids = ", ".join(s.session_id for s in streams) or "none"
        raise UsageError(f"the server has {len(streams)} streams ({ids}): pick one with --stream")
    session_id: str = streams[0].session_id
    return session_id


def _print(action: str, result: dict[str, Any]) -> None:
    stream = result["stream"]
    if action == "list":
        pending = result["pending"]
        print(f"stream {stream}: {len(pending)} waiting for approval")
        for r in pending:
            who = " ".join(
                part
                for part in (
                    r["viewer"] and f"viewer {r['viewer']}",
                    r["name"] and f"name {r['name']!r}",
                    f"from {r['address']}",
                    r["certificate"] and f"cert {r['certificate'][:23]}...",
                )
                if part
            )
            print(f"  {r['request']}  {who}  (lapses in {r['expires_in_s']:.0f} s)")
        print(f"{len(result['viewers'])} viewers with tickets")
        for v in result["viewers"]:
            print(f"  {v['viewer']}  {v['state']}  {v['connection']}  {v['bytes_sent']} bytes")
    elif action in ("approve", "deny"):
        print(f"stream {stream}: request {result['request']} {action}d")
    elif action == "revoke":
        who = f"viewer {result['viewer']}" if result["viewer"] else f"token {result['token_id']}"
        print(f"stream {stream}: {who} revoked, {result['cut']} connection(s) cut")
    else:
        print(f"stream {stream}: notice sent to {result['sent']} viewer(s)")
