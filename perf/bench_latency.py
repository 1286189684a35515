"""Capture-to-decode latency at 720p30 over loopback, read from the decoded pictures.

The pipeline figure is the real broadcast: capture, encoder and sender actors on a local Ray
cluster, RTP over QUIC on loopback, a viewer decoding and reading each picture's timestamp.
Two yardsticks are measured in the same run, one after the other:

* ``in_process_baseline``: the unavoidable work alone, the same frames encoded, packetized,
  depacketized and decoded in one process with no Ray, no QUIC and no sockets.  ``ratio_p50``
  and ``ratio_p99`` (pipeline over baseline) say what distributing the stages costs.
* ``ffmpeg``: stock FFmpeg's live pipeline fed the same stamped frames at the same size, rate,
  bitrate and GOP, x264 ``zerolatency`` -> RTP over UDP on loopback -> a low-delay ``ffmpeg``
  receiver (see :mod:`perf.ffmpeg_pipeline` for exactly what it spans).
  ``pipeline_p99_over_ffmpeg`` says how the tail compares with the tool everyone knows.
* ``gstreamer``: GStreamer's live pipeline fed the same way (``x264enc tune=zerolatency !
  rtph264pay`` -> UDP -> ``rtph264depay ! avdec_h264``, Debian's packages; see
  :mod:`perf.gstreamer_pipeline`).  ``pipeline_p99_over_gstreamer`` is the pipeline's p99 over
  its p99.

Targets (reported, not asserted): pipeline p50 <= 30 ms and p99 <= 60 ms; pipeline p50 <=
1.3x in-process p50; pipeline p99 <= FFmpeg's p99 and <= GStreamer's p99.

``--samples-out FILE`` writes every arm's latencies (ms) as one JSON object, for plots.

Usage: python -m perf.bench_latency [--seconds S] [--arms in_process,ffmpeg,gstreamer,pipeline]
       [--samples-out FILE] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any, Final

import ray

from actors import StreamManager
from perf._report import emit, percentiles_ms
from perf.ffmpeg_pipeline import find_ffmpeg, run_ffmpeg
from perf.frame_assembler import FrameAssembler
from perf.gstreamer_pipeline import find_gstreamer, run_gstreamer
from perf.rtp_single import H264RtpSender
from shared.capture.testpattern import TestPattern
from shared.errors import EncodingError
from shared.media.codec import EncoderConfig, H264Decoder, H264Encoder
from shared.models import QualityPreset, StreamConfig, StreamQuality
from shared.rtp.packet import RtpPacket
from shared.viewer.client import Viewer, read_frame_stamp

QUALITY = StreamQuality.from_preset(QualityPreset.MEDIUM)
#: The arms, in the order they run (Ray's cluster last, so it never shares the CPUs).
ARMS: Final = ("in_process", "ffmpeg", "gstreamer", "pipeline")
#: The issue's targets, as ratios: pipeline p50 over in-process p50, pipeline p99 over FFmpeg's.
TARGET_P50_OVER_IN_PROCESS: Final = 1.3
TARGET_P99_OVER_FFMPEG: Final = 1.0


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


def _arms(text: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in chosen if name not in ARMS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or 'nothing'}: choose from {', '.join(ARMS)}"
        )
    return tuple(name for name in ARMS if name in chosen)


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 2)  # latencies: the denominator is never 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--arms",
        type=_arms,
        default=ARMS,
        help=f"comma-separated arms to run (default: all of {','.join(ARMS)})",
    )
    parser.add_argument("--samples-out", metavar="FILE", help="write each arm's latencies (ms)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error(f"--seconds must be positive, not {args.seconds}")
    arms: tuple[str, ...] = args.arms
    if "ffmpeg" in arms:
        try:
            find_ffmpeg()  # before any arm runs: fail in a second, not after a minute
        except EncodingError as exc:
            parser.error(str(exc))
    if "gstreamer" in arms:
        try:
            find_gstreamer()
        except EncodingError as exc:
            parser.error(str(exc))
    samples: dict[str, list[float]] = {}

    result: dict[str, Any] = {
        "quality": f"{QUALITY.resolution}@{QUALITY.framerate} {QUALITY.bitrate // 1000} kbps",
        "seconds": args.seconds,
    }
    if "in_process" in arms:
        baseline = in_process_baseline(int(args.seconds * QUALITY.framerate))
        result["in_process_baseline"] = percentiles_ms(baseline) | {"frames": len(baseline)}
        samples["in_process_baseline"] = [ns / 1e6 for ns in baseline]
    if "ffmpeg" in arms:
        try:
            run = run_ffmpeg(QUALITY, args.seconds)
        except EncodingError as exc:
            sys.exit(f"bench_latency: ffmpeg arm: {exc}")
        if not run.latencies_ns:
            sys.exit("bench_latency: ffmpeg arm: no frame of the window came out decoded")
        result["ffmpeg"] = percentiles_ms(run.latencies_ns) | {
            "frames": run.frames_decoded,
            "frames_sent": run.frames_sent,
            "frames_lost": run.frames_sent - run.frames_decoded,
            "frames_unstamped": run.frames_unstamped,
            "frames_skipped": run.frames_skipped,
        }
        samples["ffmpeg"] = [ns / 1e6 for ns in run.latencies_ns]
    if "gstreamer" in arms:
        try:
            gst = run_gstreamer(QUALITY, args.seconds)
        except EncodingError as exc:
            sys.exit(f"bench_latency: gstreamer arm: {exc}")
        if not gst.latencies_ns:
            sys.exit("bench_latency: gstreamer arm: no frame of the window came out decoded")
        result["gstreamer"] = percentiles_ms(gst.latencies_ns) | {
            "frames": gst.frames_decoded,
            "frames_sent": gst.frames_sent,
            "frames_lost": gst.frames_sent - gst.frames_decoded,
            "frames_unstamped": gst.frames_unstamped,
            "frames_skipped": gst.frames_skipped,
        }
        samples["gstreamer"] = [ns / 1e6 for ns in gst.latencies_ns]
    if "pipeline" in arms:
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            measured, counts = asyncio.run(pipeline(args.seconds))
        finally:
            if started_here:
                ray.shutdown()
        result["pipeline"] = percentiles_ms(measured) | {"frames": len(measured)}
        result |= counts
        samples["pipeline"] = [ns / 1e6 for ns in measured]
    if args.samples_out:
        with open(args.samples_out, "w") as out:
            json.dump(samples, out)
    result |= _ratios(result)
    if args.json:
        emit("capture_to_decode_latency", result, as_json=True)
    else:
        _print_table(result)


def _ratios(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's ratios, and whether each target is met, for the arms that ran."""
    pipe, base, ff, gst = (
        result.get(k) for k in ("pipeline", "in_process_baseline", "ffmpeg", "gstreamer")
    )
    ratios: dict[str, Any] = {}
    met: dict[str, bool] = {}
    if pipe is not None and base is not None:
        ratios["ratio_p50"] = _ratio(pipe["p50_ms"], base["p50_ms"])
        ratios["ratio_p99"] = _ratio(pipe["p99_ms"], base["p99_ms"])
        met["pipeline_p50_within_1.3x_in_process"] = (
            ratios["ratio_p50"] <= TARGET_P50_OVER_IN_PROCESS
        )
    if pipe is not None and ff is not None:
        ratios["pipeline_p99_over_ffmpeg"] = _ratio(pipe["p99_ms"], ff["p99_ms"])
        met["pipeline_p99_within_ffmpeg"] = (
            ratios["pipeline_p99_over_ffmpeg"] <= TARGET_P99_OVER_FFMPEG
        )
    if pipe is not None and gst is not None:
        ratios["pipeline_p99_over_gstreamer"] = _ratio(pipe["p99_ms"], gst["p99_ms"])
        met["pipeline_p99_within_gstreamer"] = (
            ratios["pipeline_p99_over_gstreamer"] <= TARGET_P99_OVER_FFMPEG
        )
    if pipe is not None:
        met["pipeline_p50_within_30ms"] = pipe["p50_ms"] <= 30
        met["pipeline_p99_within_60ms"] = pipe["p99_ms"] <= 60
    ratios["targets"] = (
        "pipeline p50 <= 30 ms, p99 <= 60 ms; "
        f"pipeline p50 <= {TARGET_P50_OVER_IN_PROCESS}x in-process p50; "
        "pipeline p99 <= ffmpeg p99 and <= gstreamer p99"
    )
    if met:
        ratios["targets_met"] = met
    return ratios


def _print_table(result: dict[str, Any]) -> None:
    """One line per arm, then the ratios against the targets."""
    print(f"== capture_to_decode_latency: {result['quality']}, {result['seconds']} s an arm")
    print(f"  {'arm':<22}{'frames':>8}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}  notes")
    notes = {
        "in_process_baseline": "",
        "ffmpeg": "lost {frames_lost} of {frames_sent}, {frames_unstamped} unreadable",
        "gstreamer": "lost {frames_lost} of {frames_sent}, {frames_unstamped} unreadable",
        "pipeline": "viewer: {frames_decoded} decoded, {frames_dropped} dropped",
    }
    for arm, note in notes.items():
        if arm in result:
            row = result[arm]
            line = f"  {arm:<22}{row['frames']:>8}"
            line += f"{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}{row['mean_ms']:>10.1f}"
            print(line + "  " + note.format(**(result | row)))
    wanted = {
        "ratio_p50": f"pipeline p50 / in-process p50 (target <= {TARGET_P50_OVER_IN_PROCESS})",
        "ratio_p99": "pipeline p99 / in-process p99",
        "pipeline_p99_over_ffmpeg": f"pipeline p99 / ffmpeg p99 (target <= {TARGET_P99_OVER_FFMPEG})",
        "pipeline_p99_over_gstreamer": (
            f"pipeline p99 / gstreamer p99 (target <= {TARGET_P99_OVER_FFMPEG})"
        ),
    }
    for key, label in wanted.items():
        if key in result:
            print(f"  {label}: {result[key]:.2f}")
    for name, ok in result.get("targets_met", {}).items():
        print(f"  {name}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
