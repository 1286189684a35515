"""``kizuna-stream serve`` and ``view`` end to end, and the sender actor's audio track, on Ray."""

from __future__ import annotations

import asyncio
import fractions
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from actors import StreamManager
from shared.models import Resolution, StreamConfig, StreamQuality
from shared.pool.packet_ring import PacketRing
from shared.pool.shm import segment_name
from shared.viewer.client import DecodedAudio, DecodedFrame, Viewer
from tests.conftest import require_tool, wait_for_no_leaks

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
TINY = ["--size", "320x180", "--fps", "15", "--bitrate", "200"]
#: serve and token share the signing secret through the environment, as on one machine.
TEST_SECRET = "serve-view-test-secret-0123456789abcdef"


def secret_env() -> dict[str, str]:
    """This process's environment (as Ray left it once the cluster started) plus the secret."""
    return {**os.environ, "KIZUNA_TOKEN_SECRET": TEST_SECRET}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "actors.cli", *args]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def read_json_line(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The next stdout line of ``process`` as JSON, within ``timeout`` seconds."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    assert result and result[0], "no JSON line from serve"
    value: dict[str, Any] = json.loads(result[0])
    return value


def test_serve_one_address_many_viewers_then_ctrl_c(ray_cluster: str, tmp_path: Path) -> None:
    port = free_udp_port()
    serve = subprocess.Popen(
        cli(
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--senders",
            "2",
            "--json",
            "--address",
            ray_cluster,
            *TINY,
        ),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=secret_env(),
    )
    try:
        started = read_json_line(serve, timeout=120)
        url = started["url"]
        assert url.startswith(f"roq://127.0.0.1:{port}/") and "fp=sha256:" in url
        assert started["senders"] == 2 and started["access"] == "token"
        # Token access by default: `token` on the same machine mints one from the same secret.
        token = subprocess.run(
            cli("token", "--stream", started["session_id"]),
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            env=secret_env(),
        ).stdout.strip()
        saved = tmp_path / "seen.mp4"
        views = [
            subprocess.Popen(
                cli(
                    "view",
                    url,
                    "--frames",
                    "30",
                    "--seconds",
                    "60",
                    "--json",
                    "--token",
                    token,
                    *extra,
                ),
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for extra in (["--out", str(saved)], [], ["--streams"])
        ]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:  # garbage at the port
            for size in (1, 50, 1200):
                raw.sendto(bytes(size), ("127.0.0.1", port))
        reports = []
        for view in views:
            stdout, stderr = view.communicate(timeout=120)
            assert view.returncode == 0, stderr
            reports.append(json.loads(stdout))
        for result in reports:
            assert result["report"]["frames_decoded"] >= 30, result
            assert result["report"]["decode_errors"] == 0
        assert [r["report"]["mode"] for r in reports] == ["datagram", "datagram", "stream"]
        probe = subprocess.run(
            [
                require_tool("ffprobe"),
                "-v",
                "error",
                "-count_frames",
                "-show_entries",
                "stream=codec_name,width,nb_read_frames",
                "-of",
                "json",
                str(saved),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        stream = json.loads(probe.stdout)["streams"][0]
        assert stream["codec_name"] == "h264" and stream["width"] == 320
        assert int(stream["nb_read_frames"]) >= 25
        serve.send_signal(signal.SIGINT)
        stdout, stderr = serve.communicate(timeout=120)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert token not in stdout + stderr and TEST_SECRET not in stdout + stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["peak_viewers"] >= 1 and summary["state"] == "stopped"
    wait_for_no_leaks(started["session_id"])


def test_serve_and_view_bad_input_are_one_clear_line(ray_cluster: str) -> None:
    cases = [
        (["serve", "--listen", "nowhere"], "expected HOST:PORT"),
        (["serve", "--senders", "0"], "--senders"),
        (["serve", "--cert", "x.pem"], "--cert and --key"),
        (["view", "http://example.com"], "must start with roq://"),
        (["view", "roq://127.0.0.1:9/x", "--frames", "0"], "--frames"),
    ]

    def run(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cli(*args), cwd=REPO, capture_output=True, text=True, timeout=60)

    # Each command is its own process, as a user runs it; they run side by side (each is
    # mostly the interpreter starting), and each answer is checked on its own.
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(run, [args for args, _ in cases]))
    for (args, message), result in zip(cases, results, strict=True):
        assert result.returncode in (1, 2), (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, args


def test_view_of_nothing_is_a_network_error() -> None:
    port = free_udp_port()
    result = subprocess.run(
        cli("view", f"roq://127.0.0.1:{port}/x?fp=sha256:{'0' * 64}", "--json"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["kind"] == "NetworkError"


def _opus_writer(ring: PacketRing, stop: threading.Event) -> None:
    """What the audio capture actor does: 20 ms Opus packets, pts in 1/48000, capture_us."""
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate, encoder.layout, encoder.format = 48_000, "stereo", "s16"
    encoder.time_base = fractions.Fraction(1, 48_000)
    encoder.open()
    origin = time.time()
    index = 0
    while not stop.is_set():
        samples = (np.sin(np.arange(960) / 8 + index) * 6000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(
            np.stack([samples, samples]).T.reshape(1, -1), format="s16", layout="stereo"
        )
        frame.sample_rate, frame.pts = 48_000, index * 960
        capture_us, monotonic_us = time.time_ns() // 1000, time.monotonic_ns() // 1000
        for packet in encoder.encode(frame):
            ring.append(
                bytes(packet),
                pts=index * 960,
                capture_us=capture_us,
                monotonic_us=monotonic_us,
                keyframe=True,
            )
        index += 1
        time.sleep(max(0.0, origin + index * 0.02 - time.time()))


def test_sender_actor_carries_audio_when_the_stream_has_an_audio_ring(ray_cluster: str) -> None:
    quality = StreamQuality(resolution=Resolution(320, 180), framerate=15, bitrate=200_000)

    async def main() -> str:
        async with StreamManager.start() as manager:
            session = await manager.start_camera_stream(
                StreamConfig(source="test", quality=quality)
            )
            sid = session.session_id
            ring = PacketRing.create(segment_name(sid, "audio"), capacity_bytes=1 << 20)
            stop = threading.Event()
            writer = threading.Thread(target=_opus_writer, args=(ring, stop))
            writer.start()
            try:
                ticket = await manager.add_viewer(sid, "listener")
                viewer = await Viewer.connect(ticket.url)
                pictures = sounds = 0
                deadline = time.monotonic() + 30

                async def consume() -> None:
                    nonlocal pictures, sounds
                    async for item in viewer.media():
                        pictures += isinstance(item, DecodedFrame)
                        sounds += isinstance(item, DecodedAudio)
                        if (pictures >= 30 and sounds >= 100) or time.monotonic() > deadline:
                            return

                await consume()
                report = viewer.report()
                await viewer.close()
                assert pictures >= 30 and sounds >= 100, report
                assert report.audio_decode_errors == 0 and report.av_offset_ms is not None
                assert abs(report.av_offset_ms) < 500
                [status] = await manager.get_viewer_status(sid)
                assert status.bytes_sent > 0
            finally:
                stop.set()
                writer.join()
                await manager.stop_stream(sid)
                ring.close()
                ring.unlink()
            return sid

    wait_for_no_leaks(asyncio.run(main()))
