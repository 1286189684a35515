"""Browser viewers against QUIC viewers of the same stream: viewers per core and latency.

One run, one stream (the test source on a local Ray cluster, ``StreamManager``), served two
ways at once: its WebRTC shard (``open_whep``: WHEP, aiortc peers fed the encoder's packets,
:mod:`shared.webrtc`) and one RoQ sender shard (``open_shards``).  Each arm in turn:

* **load**: N viewers in a separate process.  WebRTC: N aiortc peers that POST their offers to
  the WHEP endpoint, as a browser does, and receive without decoding (aiortc's receiver decodes
  every frame in a thread; the load stands in for N browsers, whose decoding is theirs, so its
  decoder is replaced by one that returns nothing).  These are aiortc clients, not browsers:
  Chromium costs some 200 MB and a share of a core per instance, which a 2-core machine cannot
  run tens of; what the server does per peer (ICE, DTLS, SRTP, RTP packing, RTCP) is the same.
  QUIC: ``kizuna-stream loadtest`` (light viewers, no decoding either).
* **probe**: one more viewer of each kind, in this process, that decodes every frame and reads
  the test pattern's stamp (:mod:`shared.capture.stamp`): capture (wall clock at the encoder's
  source) to decoded picture, in ms.  WebRTC: an aiortc peer (jitter buffer, then PyAV's H.264
  decoder); QUIC: :class:`shared.viewer.client.Viewer` (its jitter buffer and decoder).
* **CPU**: the serving process's CPU time (psutil, its pid from the shard's stats or the
  manager's resources) over ``seconds`` once every load viewer is connected, less its rate with
  no viewer (measured first), per viewer: ``*_viewers_per_core`` is N (and the probe) over
  those cores.  ``mbps_total`` says what was sent meanwhile (WebRTC: the media handed to the
  peers' RTP senders; QUIC: what the load received), so that a stalled arm cannot pass for a
  cheap one.

``ratio`` is WebRTC's viewers per core over QUIC's.  The machine is shared: the figures are
what one run measured, with the load generators, the encoder and the probes on the same cores.

Usage: python -m perf.bench_webrtc [--viewers 8] [--seconds 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import aiohttp
import numpy as np
import psutil
import ray
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.codecs.base import Decoder

from actors import StreamManager
from actors.handles import WebRTCHandle
from actors.placement import NAMESPACE
from perf._report import emit
from shared.capture.stamp import read_stamp
from shared.models import Resolution, StreamConfig, StreamQuality
from shared.viewer.client import Viewer

__all__ = ["main", "run"]

QUALITY = StreamQuality(resolution=Resolution(640, 360), framerate=30, bitrate=800_000)
#: How long the load's viewers may take to connect.
CONNECT_TIMEOUT_S = 60.0
#: The serving processes' CPU with no viewers is measured over this long.
IDLE_S = 3.0


# -- the WebRTC load (a child process) -------------------------------------------------------


class _NoDecoder(Decoder):
    def decode(self, encoded_frame: Any) -> list[Any]:
        return []


async def _webrtc_load(url: str, peers: int) -> None:
    """N aiortc peers of ``url`` that do not decode; prints ``ready`` once every one has
    received video, then runs until stdin closes; prints the counts."""
    from aiortc import rtcrtpreceiver

    def no_decoder(codec: Any) -> Decoder:
        return _NoDecoder()

    setattr(rtcrtpreceiver, "get_decoder", no_decoder)  # noqa: B010 (not exported: mypy)
    base, stream = url.rsplit("/whep/", 1)
    connections: list[RTCPeerConnection] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(peers):
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            pc.addTransceiver("video", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())
            async with session.post(
                f"{base}/whep/{stream}",
                data=pc.localDescription.sdp,
                headers={"Content-Type": "application/sdp"},
            ) as response:
                if response.status != 201:
                    raise SystemExit(
                        f"WHEP refused a peer: {response.status} {await response.text()}"
                    )
                answer = await response.text()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            connections.append(pc)

        async def received(pc: RTCPeerConnection) -> int:
            stats = await pc.getStats()
            return sum(s.packetsReceived for s in stats.values() if s.type == "inbound-rtp")

        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            counts = [await received(pc) for pc in connections]
            if all(counts) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        print(json.dumps({"ready": sum(1 for c in counts if c)}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        counts = [await received(pc) for pc in connections]
        print(json.dumps({"connected": sum(1 for c in counts if c)}), flush=True)
        for pc in connections:
            await pc.close()


# -- probes ---------------------------------------------------------------------------------


async def _webrtc_probe(url: str, seconds: float) -> list[float]:
    """Latencies (ms) of every stamped picture an aiortc peer decodes over ``seconds``."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    latencies: list[float] = []
    tasks: list[asyncio.Task[None]] = []

    async def collect(track: Any) -> None:
        with contextlib.suppress(Exception):
            while True:
                frame = await track.recv()
                now_ms = time.time() * 1000
                stamp = read_stamp(frame.to_ndarray(format="gray"))
                if stamp is not None:
                    latencies.append(now_ms - stamp.capture_us / 1000)

    pc.on("track", lambda track: tasks.append(asyncio.create_task(collect(track))))
    try:
        await pc.setLocalDescription(await pc.createOffer())
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                url, data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
            ) as response,
        ):
            if response.status != 201:
                raise RuntimeError(f"WHEP refused the probe: {response.status}")
            answer = await response.text()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.sleep(seconds)
    finally:
        await pc.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return latencies


async def _quic_probe(url: str, seconds: float) -> list[float]:
    viewer = await Viewer.connect(url)
    latencies: list[float] = []

    async def consume() -> None:
        async for frame in viewer.frames():
            if frame.latency_ms is not None:
                latencies.append(frame.latency_ms)

    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(consume(), seconds)
    finally:
        await viewer.close()
    return latencies


# -- the run --------------------------------------------------------------------------------


class _Cpu:
    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)

    def seconds(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    async def rate(self, seconds: float) -> float:
        cpu0, started = self.seconds(), time.monotonic()
        await asyncio.sleep(seconds)
        return (self.seconds() - cpu0) / (time.monotonic() - started)


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p95 = np.percentile(values, [50, 95])
    return round(float(p50), 1), round(float(p95), 1)


async def _measure(cpu: _Cpu, idle: float, seconds: float, probe: Any) -> tuple[float, list[float]]:
    """The process's cores over ``seconds`` (less ``idle``) while the probe runs."""
    cpu0, started = cpu.seconds(), time.monotonic()
    latencies: list[float] = await probe
    cores = (cpu.seconds() - cpu0) / (time.monotonic() - started) - idle
    return max(cores, 1e-6), latencies


async def _webrtc_arm(
    whep: str, shard: WebRTCHandle, cpu: _Cpu, idle: float, viewers: int, seconds: float
) -> dict[str, Any]:
    load = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "perf.bench_webrtc",
        "--webrtc-load",
        whep,
        f"--viewers={viewers}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert load.stdin is not None and load.stdout is not None
    try:
        line = await asyncio.wait_for(load.stdout.readline(), CONNECT_TIMEOUT_S + 30)
        ready = json.loads(line)["ready"]
        sent0, started = (await shard.stats()).bytes_sent, time.monotonic()
        cores, latencies = await _measure(cpu, idle, seconds, _webrtc_probe(whep, seconds))
        mbps = ((await shard.stats()).bytes_sent - sent0) * 8 / 1e6 / (time.monotonic() - started)
        load.stdin.close()
        connected = json.loads(await asyncio.wait_for(load.stdout.readline(), 60))["connected"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            load.kill()
        await load.wait()
    p50, p95 = _percentiles(latencies)
    return {
        "viewers": viewers,
        "ready": ready,
        "connected": connected,
        "mbps_total": round(mbps, 2),
        "cores": round(cores, 3),
        "latency_p50_ms": p50,
        "latency_p95_ms": p95,
        "latency_samples": len(latencies),
    }


async def _quic_arm(
    url: str, cpu: _Cpu, idle: float, viewers: int, seconds: float
) -> dict[str, Any]:
    settle = 5.0  # the light viewers connect (each a QUIC handshake) before the window
    load = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "actors.cli",
        "loadtest",
        url,
        f"--viewers={viewers}",
        f"--seconds={seconds + settle + 5}",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.sleep(settle)
        cores, latencies = await _measure(cpu, idle, seconds, _quic_probe(url, seconds))
        out, _ = await asyncio.wait_for(load.communicate(), 120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            load.kill()
        await load.wait()
    lines = out.decode().strip().splitlines()
    summary = json.loads(lines[-1]).get("summary", {}) if lines else {}
    p50, p95 = _percentiles(latencies)
    return {
        "viewers": viewers,
        "connected": summary.get("connected"),
        "mbps_total": summary.get("mbps"),
        "cores": round(cores, 3),
        "latency_p50_ms": p50,
        "latency_p95_ms": p95,
        "latency_samples": len(latencies),
    }


async def run(viewers: int, seconds: float) -> dict[str, Any]:
    async with StreamManager.start() as manager:
        sid = (
            await manager.start_camera_stream(StreamConfig(source="test", quality=QUALITY))
        ).session_id
        whep = await manager.open_whep(sid)
        webrtc_shard = WebRTCHandle(ray.get_actor(f"kz-{sid}-webrtc", namespace=NAMESPACE))
        webrtc_cpu = _Cpu((await webrtc_shard.stats()).pid)
        before = {p.label for p in (await manager.resources()).processes}
        quic_url = await manager.open_shards(sid, 1)
        snapshot = await manager.resources()
        [shard] = [
            p
            for p in snapshot.processes
            if p.label.startswith(f"{sid}/sender-") and p.label not in before
        ]
        quic_cpu = _Cpu(shard.pid)
        webrtc_idle, quic_idle = await asyncio.gather(
            webrtc_cpu.rate(IDLE_S), quic_cpu.rate(IDLE_S)
        )
        webrtc = await _webrtc_arm(whep, webrtc_shard, webrtc_cpu, webrtc_idle, viewers, seconds)
        quic = await _quic_arm(quic_url, quic_cpu, quic_idle, viewers, seconds)
        await manager.stop_stream(sid)
    # The probe is one more viewer of each arm during the window.
    webrtc_per_core = (webrtc["connected"] + 1) / webrtc["cores"]
    quic_per_core = ((quic["connected"] or viewers) + 1) / quic["cores"]
    return {
        "quality": f"{QUALITY.resolution.width}x{QUALITY.resolution.height}"
        f"@{QUALITY.framerate} {QUALITY.bitrate // 1000} kbps",
        "seconds": seconds,
        "webrtc_load": "aiortc clients (no decoding) over WHEP, not browsers",
        "webrtc_viewers_per_core": round(webrtc_per_core, 1),
        "quic_viewers_per_core": round(quic_per_core, 1),
        "ratio": round(webrtc_per_core / quic_per_core, 3),
        "webrtc_latency_p50_ms": webrtc["latency_p50_ms"],
        "webrtc_latency_p95_ms": webrtc["latency_p95_ms"],
        "quic_latency_p50_ms": quic["latency_p50_ms"],
        "quic_latency_p95_ms": quic["latency_p95_ms"],
        "webrtc": webrtc | {"idle_cores": round(webrtc_idle, 3)},
        "quic": quic | {"idle_cores": round(quic_idle, 3)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--viewers", type=int, default=8, help="load viewers per arm (8)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window (10 s)")
    parser.add_argument("--json", action="store_true", help="one JSON line")
    parser.add_argument("--webrtc-load", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.viewers < 1 or args.seconds <= 0:
        parser.error("--viewers must be at least 1 and --seconds positive")
    if args.webrtc_load:
        asyncio.run(_webrtc_load(args.webrtc_load, args.viewers))
        return
    result = asyncio.run(run(args.viewers, args.seconds))
    emit("webrtc_vs_quic", result, as_json=args.json)


if __name__ == "__main__":
    main()
