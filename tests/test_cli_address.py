"""Commands that talk to a running server, given an ``--address`` nobody serves, fail at once
with a clear error instead of waiting a minute for Ray's own connect retries."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from actors.cli.common import UsageError, check_reachable, cluster_endpoint
from shared.errors import KizunaError
from tests.test_serve_view import REPO


def closed_port() -> int:
    """A TCP port on loopback that nobody listens on (bound, then let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.parametrize(
    ("address", "endpoint"),
    [
        ("auto", None),
        ("local", None),
        ("10.0.0.5:6380", ("10.0.0.5", 6380)),
        ("head.example", ("head.example", 6379)),
        ("ray://head.example", ("head.example", 10001)),
        ("ray://head.example:10002/", ("head.example", 10002)),
        ("[::1]:6379", ("::1", 6379)),
        ("[::1]", ("::1", 6379)),
    ],
)
def test_a_ray_address_names_the_endpoint_to_try(
    address: str, endpoint: tuple[str, int] | None
) -> None:
    assert cluster_endpoint(address) == endpoint


@pytest.mark.parametrize("address", ["head:port", "head:0", "head:70000", ":6379"])
def test_an_address_that_is_not_host_port_is_a_usage_error(address: str) -> None:
    with pytest.raises(UsageError, match="is not host:port"):
        cluster_endpoint(address)


def test_nobody_at_the_address_is_said_at_once() -> None:
    port = closed_port()
    with pytest.raises(KizunaError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}: "):
        check_reachable(f"127.0.0.1:{port}", deadline_s=30.0)
    # A listener is all it checks: Ray says the rest.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}")


@pytest.mark.parametrize(
    "command", [["status"], ["viewers", "list"], ["streams", "list"]], ids=lambda c: c[0]
)
def test_each_server_command_fails_with_the_reason_on_a_wrong_address(command: list[str]) -> None:
    port = closed_port()
    result = subprocess.run(
        [sys.executable, "-m", "actors.cli", *command, "--address", f"127.0.0.1:{port}", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": ""},
        check=False,
    )
    assert result.returncode == 1, result.stderr
    message = json.loads(result.stdout)["error"]["message"]
    assert message.startswith(f"cannot reach the Ray cluster at 127.0.0.1:{port}: ")
    assert "check --address" in message
