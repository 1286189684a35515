"""``kizuna-stream record URL``: a stream recorded from a server, as a viewer would."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import shm_snapshot, wait_for_no_leaks
from tests.test_recording import probe
from tests.test_serve_view import REPO, TINY, cli, free_udp_port, read_json_line

pytestmark = pytest.mark.ray


def test_record_from_a_server_with_rotation(ray_cluster: str, tmp_path: Path) -> None:
    before = shm_snapshot()
    port = free_udp_port()
    serve = subprocess.Popen(
        cli(
            "serve",
            "--access",
            "open",
            "--listen",
            f"127.0.0.1:{port}",
            "--senders",
            "1",
            "--json",
            "--address",
            ray_cluster,
            *TINY,
        ),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = read_json_line(serve, timeout=120)["url"]
        out = tmp_path / "talk.mp4"
        result = subprocess.run(
            cli(
                "record", url, "--out", str(out), "--max-duration", "2", "--seconds", "7", "--json"
            ),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        segments = [Path(s) for s in report["segments"]]
        assert [s.name for s in segments[:2]] == ["talk.mp4", "talk-001.mp4"]
        total = 0
        for segment in segments:
            info = probe(segment)
            frames = int(info["streams"]["video"]["nb_read_frames"])
            total += frames
            assert info["streams"]["video"]["codec_name"] == "h264" and frames > 0
        # Every segment but the last rotated at the first keyframe after 2 s (GOP 2 s).
        for segment in segments[:-1]:
            assert probe(segment)["duration"] <= 2.0 + 2.1
        assert total == report["frames"]

        bad = subprocess.run(
            cli("record", url, "--out", str(tmp_path / "x.xyz")),
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 2 and "use a .mp4" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        serve.send_signal(signal.SIGINT)
        serve.communicate(timeout=60)
    assert serve.returncode == 0
    wait_for_no_leaks(since=before)
