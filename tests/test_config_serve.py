"""``kizuna-stream serve --config``: every stream of a file runs; two on one address share its
port, each viewer getting its own stream."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import pytest

from shared.viewer.client import Viewer
from tests.conftest import wait_for_no_leaks
from tests.test_serve_view import REPO, cli, free_udp_port, read_json_line, secret_env

pytestmark = pytest.mark.ray


async def first_frame_width(url: str, frames: int = 5) -> int:
    """The width of the pictures a viewer of ``url`` decodes (after ``frames`` of them)."""
    viewer = await Viewer.connect(url)
    try:
        seen = 0
        async for frame in viewer.frames():
            seen += 1
            if seen >= frames:
                width: int = frame.frame.width
                return width
    finally:
        await viewer.close()
    raise AssertionError(f"{url}: the stream ended before {frames} frames")


def test_serve_config_runs_every_stream_of_the_file(ray_cluster: str, tmp_path: Path) -> None:
    # Both on one port: the "two healthy streams of different sources on one port".
    port = free_udp_port()
    config = tmp_path / "server.toml"
    config.write_text(
        f"""
[[streams]]
name = "wide"
listen = "127.0.0.1:{port}"
access = {{ mode = "open" }}
# Not under the pressure policy: on a busy test machine it would refuse the second stream
# (CPU over 85 % and nothing of its priority left to shed), as it should on a server.
shed_under_pressure = false
quality = {{ preset = "custom", resolution = "320x180", framerate = 15, bitrate = 200_000 }}

[[streams]]
name = "small"
listen = "127.0.0.1:{port}"
access = {{ mode = "open" }}
shed_under_pressure = false
quality = {{ preset = "custom", resolution = "256x144", framerate = 15, bitrate = 150_000 }}
[streams.capture]
buffer_count = 3
"""
    )
    serve = subprocess.Popen(
        cli("serve", "--config", str(config), "--json", "--address", ray_cluster),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=secret_env(),
    )
    try:
        try:
            started = read_json_line(serve, timeout=120)
        except AssertionError:
            serve.kill()
            _, stderr = serve.communicate(timeout=60)
            raise AssertionError(f"serve --config printed no JSON line: {stderr}") from None
        assert "streams" in started, started
        streams = {s["name"]: s for s in started["streams"]}
        assert set(streams) == {"wide", "small"}
        for name in ("wide", "small"):
            assert streams[name]["url"].startswith(f"roq://127.0.0.1:{port}/")
            assert streams[name]["access"] == "open"
            assert streams[name]["senders"] == 1  # the port's one process

        async def watch_both() -> tuple[int, int]:
            wide, small = await asyncio.wait_for(
                asyncio.gather(
                    first_frame_width(streams["wide"]["url"]),
                    first_frame_width(streams["small"]["url"]),
                ),
                timeout=60,
            )
            return wide, small

        # Each viewer gets its own stream's pictures.
        assert asyncio.run(watch_both()) == (320, 256)
        serve.send_signal(signal.SIGINT)
        stdout, stderr = serve.communicate(timeout=120)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert [s["name"] for s in summary["streams"]] == ["wide", "small"]
    assert all(s["state"] == "stopped" and s["frames_encoded"] > 0 for s in summary["streams"])
    for stream in summary["streams"]:
        wait_for_no_leaks(stream["session_id"])


def test_serve_config_errors_name_the_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[[streams]]\nname = "a"\n[streams.quality]\nframerate = 500\n')
    result = subprocess.run(
        cli("serve", "--config", str(config)), cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"kizuna-stream: error: {config}:4: streams[0] (a).quality.framerate: "
        "Expected `int` <= 240, got 500"
    )
    both = subprocess.run(
        cli("serve", "--config", str(config), "--source", "test"),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert both.returncode == 2 and "--source cannot be given with it" in both.stderr
