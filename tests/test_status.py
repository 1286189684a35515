"""``kizuna-stream status`` against a real running stream: every actor with its role, stream,
node and pid (checked against the process itself), the stream's figures, and the table."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray

from actors import StreamManager
from actors.placement import SUPERVISOR_PREFIX
from shared.models import AccessMode, RecordingConfig, StreamAccess, StreamConfig
from shared.viewer.client import Viewer
from tests.conftest import wait_for_no_leaks
from tests.test_pipeline import eventually
from tests.test_serve_view import REPO
from tests.test_streams_cli import SMALL

pytestmark = pytest.mark.ray

#: The actor class whose process each role names (Ray titles a worker ``ray::<Class>``).
CLASSES = {
    "supervisor": "Supervisor",
    "capture": "CaptureActor",
    "encoder": "EncoderActor",
    "quality": "QualityActor",
    "shard": "SenderActor",
    "recorder": "RecorderActor",
}


async def status_cli(address: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "actors.cli",
        "status",
        "--address",
        address,
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def test_status_lists_every_actor_and_the_stream(ray_cluster: str, tmp_path: Path) -> None:
    async def main() -> str:
        async with StreamManager.start() as manager:
            config = StreamConfig(
                name="main",
                quality=SMALL,
                access=StreamAccess(mode=AccessMode.OPEN),
                rungs=(),
                priority=7,
            )
            sid = (await manager.start_camera_stream(config)).session_id
            await manager.start_recording(sid, RecordingConfig(output_path=str(tmp_path / "r.mp4")))
            ticket = await manager.add_viewer(sid, "watcher")
            viewer = await Viewer.connect(ticket.url)
            watching = asyncio.create_task(viewer.watch(seconds=120))
            try:
                await eventually(lambda: viewer.frames_decoded, lambda n: n >= 10, "frames")
                await eventually(
                    manager.overview,
                    lambda o: o.streams and o.streams[0].viewers == 1 and o.streams[0].bitrate,
                    "the viewer and the bitrate in the overview",
                )
                code, stdout, stderr = await status_cli(ray_cluster, "--json")
                assert code == 0, stderr
                overview: dict[str, Any] = json.loads(stdout)
                code, table, stderr = await status_cli(ray_cluster)
                assert code == 0, stderr
                # Checked while the actors run: the pids are their processes.
                actors = overview["actors"]
                assert {a["role"] for a in actors} == set(CLASSES)
                for actor in actors:
                    assert actor["stream"] == (None if actor["role"] == "supervisor" else sid)
                    assert actor["node"] == overview["node"]
                    # The pid is the actor's own process: Ray titles it after the actor's class.
                    title = " ".join(psutil.Process(actor["pid"]).cmdline())
                    assert title.startswith(f"ray::{CLASSES[actor['role']]}"), (actor, title)
                    assert actor["rss_bytes"] > 0
                    # The name is the actor's Ray name: anything can look it up by it.
                    assert ray.get_actor(actor["name"], namespace="kizuna") is not None
            finally:
                watching.cancel()
                await viewer.close()
            await manager.stop_stream(sid)

        [stream] = overview["streams"]
        assert (stream["session_id"], stream["name"], stream["priority"]) == (sid, "main", 7)
        assert stream["state"] == "active" and stream["viewers"] == 1
        assert stream["bitrate"] > 0 and stream["fps"] > 0
        assert stream["rungs"][0]["resolution"] == "320x180"
        assert stream["urls"] and stream["urls"][0].startswith("roq://127.0.0.1:")
        assert stream["rss_bytes"] > 0 and stream["bytes_sent"] > 0
        assert [v["state"] for v in stream["viewer_list"]] == ["connected"]
        # The table names the stream and every role.
        assert f"main {sid}" in table
        for role in CLASSES:
            assert role in table
        return sid

    wait_for_no_leaks(asyncio.run(main()))


def test_status_of_a_cluster_without_a_server_says_so(ray_cluster: str) -> None:
    # An earlier test's supervisor is killed as its manager exits; its name goes a moment
    # later.  Until then there *is* a server on the cluster.
    wait_for_no_supervisor()
    code, stdout, _ = asyncio.run(status_cli(ray_cluster, "--json"))
    assert code == 1
    assert json.loads(stdout)["error"]["message"] == (
        f"no kizuna-stream server runs on the Ray cluster at {ray_cluster}"
    )


def wait_for_no_supervisor(timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        names = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(SUPERVISOR_PREFIX)
        ]
        if not names:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"supervisors still registered after {timeout} s: {names}")
        time.sleep(0.1)
