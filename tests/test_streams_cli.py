"""``kizuna-stream streams``: a running server's streams listed, added, paused, resumed and
removed from another process, found without an address beyond the cluster's."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest

from actors import StreamManager
from shared.models import (
    AccessMode,
    Resolution,
    StreamAccess,
    StreamConfig,
    StreamQuality,
    StreamState,
)
from tests.conftest import wait_for_no_leaks
from tests.test_serve_view import REPO

pytestmark = pytest.mark.ray

SMALL = StreamQuality(resolution=Resolution(320, 180), framerate=15, bitrate=200_000)


async def streams_cli(address: str, *args: str, expect: int = 0) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "actors.cli",
        "streams",
        *args,
        "--json",
        "--address",
        address,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == expect, stderr.decode()
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    return result


def test_streams_list_add_pause_resume_remove(ray_cluster: str) -> None:
    async def main() -> list[str]:
        async with StreamManager.start() as manager:
            config = StreamConfig(
                name="main", quality=SMALL, access=StreamAccess(mode=AccessMode.OPEN)
            )
            sid = (await manager.start_camera_stream(config)).session_id
            await manager.open_shards(sid, 1, port=0)

            listed = await streams_cli(ray_cluster, "list")
            [row] = listed["streams"]
            assert (row["id"], row["name"], row["state"]) == (sid, "main", "active")
            assert row["quality"] == "320x180@15 200 kbps"
            assert row["urls"] and row["urls"][0].startswith("roq://127.0.0.1:")

            # By name; the supervisor's state says it happened, not only the CLI.
            paused = await streams_cli(ray_cluster, "pause", "main")
            assert paused["streams"][0]["state"] == "paused"
            assert (await manager.get_stream(sid)).state is StreamState.PAUSED
            await streams_cli(ray_cluster, "resume", sid)
            assert (await manager.get_stream(sid)).state is StreamState.ACTIVE

            added = await streams_cli(
                ray_cluster,
                "add",
                "--source",
                "test",
                "--name",
                "extra",
                "--size",
                "256x144",
                "--fps",
                "10",
                "--bitrate",
                "150",
                "--access",
                "open",
            )
            [new] = added["streams"]
            assert new["name"] == "extra" and new["state"] == "active"
            assert new["urls"][0].startswith("roq://127.0.0.1:")
            streams = {s.name: s for s in await manager.get_active_streams()}
            assert set(streams) == {"main", "extra"}
            assert streams["extra"].quality.resolution == Resolution(256, 144)

            removed = await streams_cli(ray_cluster, "remove", "extra")
            assert removed["streams"][0]["state"] == "stopped"
            assert [s.name for s in await manager.get_active_streams()] == ["main"]

            missing = await streams_cli(ray_cluster, "pause", "nope", expect=1)
            assert missing["error"]["kind"] == "StreamNotFoundError"
            assert "no stream 'nope' (it has: main)" in missing["error"]["message"]
            return [sid, new["id"]]

    for sid in asyncio.run(main()):
        wait_for_no_leaks(sid)


def test_streams_usage_errors_are_one_clear_line() -> None:
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    cases = [
        (["pause"], "streams pause needs the stream's id or name (streams list)"),
        (["add"], "streams add needs --source SPEC or --config FILE"),
        (
            ["add", "--source", "test", "--priority", "101"],
            "--priority must be between 0 and 100, got 101",
        ),
        (["list", "--source", "test"], "--config and --source are for streams add, not list"),
    ]

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "actors.cli", "streams", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    # Each its own process, as a user runs it; side by side, each answer checked on its own.
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(run, [args for args, _ in cases]))
    for (args, message), result in zip(cases, results, strict=True):
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.strip() == f"kizuna-stream: error: {message}"
