"""Capture-to-decode latency over real loopback QUIC at 0 %, 1 % and 5 % packet loss.

A sender process (as the sender actor is one): the test source rendered and encoded
(libx264), sent by a :class:`BroadcastSender` through a :class:`RoqServer`; in this process
the userspace impairment relay
(``tests/impairment.py``: the loss rate in both directions and ``--delay`` ms each way), to a
:class:`Viewer` that NACKs, waits within its latency budget, decodes, and reads each picture's
capture stamp.  The baseline is the 0 % run of the same benchmark; each lossy run reports its
p50/p99 and their ratio to it: what repairing loss costs in latency.

Usage: python -m perf.bench_network_latency [--seconds S] [--size WxH] [--delay MS] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import time
from multiprocessing.connection import Connection
from typing import Any

from perf._report import emit, percentiles_ms
from shared.capture.testpattern import TestPattern
from shared.media.codec import EncoderConfig, H264Encoder
from shared.roq.tls import generate_self_signed
from shared.roq.transport import RoqConnection, RoqServer
from shared.roq.url import StreamUrl
from shared.rtp.sender import VIDEO_TRACK, BroadcastSender
from shared.viewer.client import Viewer
from tests.impairment import Impairment, ImpairmentRelay

FPS = 30


def _sender_process(width: int, height: int, frames: int, conn: Connection) -> None:
    """The sending side in a process of its own, as the sender actor is."""
    asyncio.run(_send(width, height, frames, conn))


async def _send(width: int, height: int, frames: int, conn: Connection) -> None:
    identity = generate_self_signed("127.0.0.1")
    sender = BroadcastSender([VIDEO_TRACK], initial_bps=1_500_000, rng=random.Random(1))
    encoder = H264Encoder(
        EncoderConfig(
            width=width, height=height, framerate=FPS, bitrate=1_500_000, keyframe_interval=2 * FPS
        )
    )

    def on_packet(connection: RoqConnection, flow_id: int, data: bytes) -> None:
        sender.on_rtcp(connection, data, time.monotonic())
        if sender.take_keyframe_request():
            encoder.request_keyframe()

    def on_connect(connection: RoqConnection) -> None:
        sender.add(connection, time.monotonic())

    def on_disconnect(connection: RoqConnection) -> None:
        sender.remove(connection)

    server = RoqServer(
        identity, on_packet=on_packet, on_connect=on_connect, on_disconnect=on_disconnect
    )
    await server.start("127.0.0.1", 0)
    conn.send((server.port, identity.fingerprint))
    while not sender.peers:
        await asyncio.sleep(0.01)
    pattern = TestPattern(width, height, FPS)
    started = time.monotonic()
    for index in range(frames):
        capture_us = time.time_ns() // 1000
        pixels = pattern.render(index, capture_us)
        units = await asyncio.to_thread(
            encoder.encode, pixels, pts=index * 3000, capture_us=capture_us
        )
        for unit in units:
            sender.send(
                0,
                unit.data,
                pts=unit.pts,
                capture_us=capture_us,
                keyframe=unit.keyframe,
                now=time.monotonic(),
                wall_now=time.time(),
            )
        await asyncio.sleep(max(0.0, started + (index + 1) / FPS - time.monotonic()))
    await asyncio.sleep(0.5)
    await server.close()


async def run(
    loss: float, seconds: float, width: int, height: int, delay_ms: float
) -> dict[str, Any]:
    frames = int((seconds + 1) * FPS)
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_sender_process, args=(width, height, frames, child))
    process.start()
    try:
        port, fingerprint = await asyncio.to_thread(parent.recv)
        impairment = Impairment(loss=loss, delay_s=delay_ms / 1000)
        relay = ImpairmentRelay(("127.0.0.1", port), down=impairment, up=impairment, seed=42)
        relay_port = await relay.start()
        viewer = await Viewer.connect(
            StreamUrl(host="127.0.0.1", port=relay_port, session_id="b", fingerprint=fingerprint),
            reconnect=False,
        )
        latencies: list[int] = []
        seen: list[int] = []
        async for frame in viewer.frames():  # until the sender closes the stream
            if frame.latency_ms is not None and frame.stamp is not None:
                seen.append(frame.stamp.frame_number)
                if frame.stamp.frame_number >= FPS:  # the first second is warm-up
                    latencies.append(int(frame.latency_ms * 1e6))
        report = viewer.report()
        await viewer.close()
        relay.close()
    finally:
        await asyncio.to_thread(process.join, 30)
        if process.is_alive():
            process.kill()
    steady = {n for n in seen if n >= FPS}
    return {
        "latency": percentiles_ms(latencies),
        "frames_skipped": (frames - FPS) - len(steady),
        "packets_recovered": report.packets_recovered,
        "keyframe_requests": report.keyframe_requests,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--delay", type=float, default=5.0, help="one-way delay in ms")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    results = {
        loss: asyncio.run(run(loss, args.seconds, width, height, args.delay))
        for loss in (0.0, 0.01, 0.05)
    }
    base = results[0.0]["latency"]
    emit(
        "network_capture_to_decode_latency",
        {
            "quality": f"{width}x{height}@{FPS} 1500 kbps",
            "one_way_delay_ms": args.delay,
            "seconds": args.seconds,
            **{
                f"loss_{int(loss * 100)}pct": {
                    **result,
                    "ratio_p50": round(result["latency"]["p50_ms"] / base["p50_ms"], 2),
                    "ratio_p99": round(result["latency"]["p99_ms"] / base["p99_ms"], 2),
                }
                for loss, result in results.items()
            },
        },
        as_json=args.json,
    )


if __name__ == "__main__":
    main()
