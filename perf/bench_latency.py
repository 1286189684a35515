"""Capture-to-decode latency at 720p30 over loopback, read from the decoded pictures.

The pipeline figure is the real broadcast: capture, encoder and sender actors on a local Ray
cluster, RTP over QUIC on loopback, a viewer decoding and reading each picture's timestamp.
The baseline, measured in the same run, is the unavoidable work alone: the same frames encoded,
packetized, depacketized and decoded in one process with no Ray, no QUIC and no sockets.  The
ratio says what distributing the stages costs.

Usage: python -m perf.bench_latency [--seconds S] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import ray

from actors import StreamManager
from perf._report import emit, percentiles_ms
from perf.frame_assembler import FrameAssembler
from perf.rtp_single import H264RtpSender
from shared.capture.testpattern import TestPattern
from shared.media.codec import EncoderConfig, H264Decoder, H264Encoder
from shared.models import QualityPreset, StreamConfig, StreamQuality
from shared.rtp.packet import RtpPacket
from shared.viewer.client import Viewer, read_frame_stamp

QUALITY = StreamQuality.from_preset(QualityPreset.MEDIUM)


def in_process_baseline(frames: int) -> list[int]:
    width, height, fps = QUALITY.resolution.width, QUALITY.resolution.height, QUALITY.framerate
    pattern = TestPattern(width, height, fps)
    encoder = H264Encoder(
        EncoderConfig(
            width=width,
            height=height,
            framerate=fps,
            bitrate=QUALITY.bitrate,
            keyframe_interval=2 * fps,
        )
    )
    sender = H264RtpSender(ssrc=1, initial_sequence=0, timestamp_offset=0)
    assembler, decoder = FrameAssembler(), H264Decoder()
    latencies = []
    for index in range(frames):
        capture_us = time.time_ns() // 1000
        pixels = pattern.render(index, capture_us)
        for unit in encoder.encode(pixels, pts=index * 3000, capture_us=capture_us):
            for data in sender.packetize(unit.data, pts=unit.pts):
                for assembled in assembler.push(RtpPacket.parse(data)):
                    for frame in decoder.decode(assembled.annexb):
                        stamp = read_frame_stamp(frame)
                        assert stamp is not None
                        latencies.append(time.time_ns() - stamp.capture_us * 1000)
        time.sleep(max(0.0, 1 / fps - (time.time_ns() // 1000 - capture_us) / 1e6))
    return latencies


async def pipeline(seconds: float) -> tuple[list[int], dict[str, Any]]:
    async with StreamManager.start() as manager:
        session = await manager.start_camera_stream(StreamConfig(source="test", quality=QUALITY))
        ticket = await manager.add_viewer(session.session_id, "bench")
        viewer = await Viewer.connect(ticket.url)
        latencies: list[int] = []

        async def consume() -> None:
            async for frame in viewer.frames():
                if frame.latency_ms is not None:
                    latencies.append(int(frame.latency_ms * 1e6))

        task = asyncio.create_task(consume())
        await asyncio.sleep(
            1.0
        )  # the first keyframe and the encoder's warm-up are not steady state
        latencies.clear()
        await asyncio.sleep(seconds)
        task.cancel()
        report = viewer.report()
        await viewer.close()
        await manager.stop_stream(session.session_id)
    return latencies, {
        "frames_decoded": report.frames_decoded,
        "frames_dropped": report.frames_dropped,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    baseline = in_process_baseline(int(args.seconds * QUALITY.framerate))
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        measured, counts = asyncio.run(pipeline(args.seconds))
    finally:
        if started_here:
            ray.shutdown()
    pipeline_ms, baseline_ms = percentiles_ms(measured), percentiles_ms(baseline)
    emit(
        "capture_to_decode_latency",
        {
            "quality": f"{QUALITY.resolution}@{QUALITY.framerate} {QUALITY.bitrate // 1000} kbps",
            "seconds": args.seconds,
            "pipeline": pipeline_ms,
            "in_process_baseline": baseline_ms,
            "ratio_p50": round(pipeline_ms["p50_ms"] / baseline_ms["p50_ms"], 2),
            "ratio_p99": round(pipeline_ms["p99_ms"] / baseline_ms["p99_ms"], 2),
            "targets": "pipeline p50 <= 30 ms, p99 <= 60 ms",
            **counts,
        },
        as_json=args.json,
    )


if __name__ == "__main__":
    main()
