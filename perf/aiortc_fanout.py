"""The aiortc arm of the fan-out benchmark: one source served to N peers, one encoder per peer.

This is how aiortc's examples serve video (``examples/server``, ``examples/webcam``): each
peer connection gets its own ``VideoStreamTrack``, and aiortc's ``RTCRtpSender`` encodes that
track for that peer alone, so the encoding cost grows with the number of peers.  Here every
track hands out the same test-pattern picture (:class:`shared.capture.testpattern.TestPattern`,
rendered once per frame and shared), so the per-peer cost is aiortc's encoder, packetizer,
SRTP and congestion control, not the picture.

The server peers run in a child process (``python -m perf.aiortc_fanout --serve``) so that
their CPU can be measured apart from the receiving side; the parent runs the N receiving
peers, as aiortc's clients do (``track.recv()``, which decodes every frame).  Signalling is
one JSON line each way over the child's stdin and stdout: the offers, then the answers; a
``stop`` line asks the child to close every peer and report how many tasks were left.

The codec is aiortc's default (VP8, the first it offers; ``codec="h264"`` asks for H.264 through
``setCodecPreferences``).  aiortc's VP8 encoder starts at 500 kbps and follows the receiver's
REMB up to its own cap of 1.5 Mbps; the bitrate actually received is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import re
import sys
import time
from typing import Any

import av
import psutil
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpsender import RTCRtpSender

from shared.capture.testpattern import TestPattern

__all__ = ["CODECS", "run_aiortc"]

CODECS = ("vp8", "h264")
#: Peers served "at the frame rate" receive at least this share of it.
SERVED_FPS_SHARE = 0.9
#: Frames before the measured window: the first keyframe and REMB's ramp are not steady state.
WARMUP_S = 2.0
#: How long the setup (offers, ICE on loopback, DTLS) may take before the arm gives up.
SETUP_TIMEOUT_S = 60.0


def _configuration() -> RTCConfiguration:
    # No ICE servers: aiortc's default is a public STUN server, and loopback needs none.
    return RTCConfiguration(iceServers=[])


class _SharedPattern:
    """One rendered picture per frame number, whichever track asks first."""

    def __init__(self, width: int, height: int, fps: int) -> None:
        self.pattern = TestPattern(width, height, fps)
        self.width, self.height = width, height
        self._index = -1
        self._frame: av.VideoFrame | None = None

    def frame(self, index: int) -> av.VideoFrame:
        if index != self._index or self._frame is None:
            pixels = self.pattern.render(index, time.time_ns() // 1000)
            picture = pixels.reshape(self.height * 3 // 2, self.width)
            self._frame = av.VideoFrame.from_ndarray(picture, format="yuv420p")
            self._index = index
        return self._frame


class PatternTrack(VideoStreamTrack):
    """A peer's own track (as in aiortc's examples), paced by ``VideoStreamTrack`` at 30 fps."""

    def __init__(self, source: _SharedPattern, fps: int) -> None:
        super().__init__()
        self._source = source
        self._fps = fps

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        # VideoStreamTrack paces at 30 fps on a 90 kHz clock: pts / 3000 is the frame number.
        index = int(pts * time_base * self._fps)
        shared = self._source.frame(index)
        # A new frame object per peer: the encoder reads pts and time_base from it.
        frame = av.VideoFrame.from_ndarray(shared.to_ndarray(), format="yuv420p")
        frame.pts, frame.time_base = pts, fractions.Fraction(time_base)
        return frame


async def _read_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def _close_all(peers: list[RTCPeerConnection]) -> int:
    """Close every peer; the number of tasks of this loop still alive afterwards."""
    await asyncio.gather(*(pc.close() for pc in peers), return_exceptions=True)
    await asyncio.sleep(0)  # let the closing callbacks run once
    current = asyncio.current_task()
    return sum(1 for task in asyncio.all_tasks() if task is not current and not task.done())


async def serve(width: int, height: int, fps: int) -> None:
    """The child: answer the offers on stdin, serve until ``stop``, then close and report."""
    source = _SharedPattern(width, height, fps)
    request = json.loads(await _read_line())
    peers: list[RTCPeerConnection] = []
    answers = []
    for offer in request["offers"]:
        pc = RTCPeerConnection(_configuration())
        peers.append(pc)
        pc.addTrack(PatternTrack(source, fps))
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        answers.append(pc.localDescription.sdp)
    sys.stdout.write(json.dumps({"answers": answers}) + "\n")
    sys.stdout.flush()
    # "stats": the bytes each peer's sender has sent; "stop" (or EOF, the parent gone): close.
    while (await _read_line()).strip() == "stats":
        sent = [await _bytes_sent(pc) for pc in peers]
        sys.stdout.write(json.dumps({"bytes_sent": sent}) + "\n")
        sys.stdout.flush()
    leaked = await _close_all(peers)
    sys.stdout.write(json.dumps({"leaked_tasks": leaked}) + "\n")
    sys.stdout.flush()


async def _bytes_sent(pc: RTCPeerConnection) -> int:
    stats = await pc.getStats()
    return sum(int(getattr(s, "bytesSent", 0)) for s in stats.values() if s.type == "outbound-rtp")


def _negotiated_codec(answer: str) -> str:
    """The codec an SDP answer chose: the first payload type of its video section."""
    media = re.search(r"^m=video \S+ \S+ (\d+)", answer, re.MULTILINE)
    if media is None:
        return "none"
    rtpmap = re.search(rf"^a=rtpmap:{media.group(1)} ([^/\s]+)", answer, re.MULTILINE)
    return rtpmap.group(1) if rtpmap else "unknown"


class _Receiver:
    """One receiving peer: counts the decoded frames it gets from ``track.recv()``."""

    def __init__(self, codec: str) -> None:
        self.pc = RTCPeerConnection(_configuration())
        transceiver = self.pc.addTransceiver("video", direction="recvonly")
        if codec == "h264":
            preferred = [
                c for c in RTCRtpSender.getCapabilities("video").codecs if c.name == "H264"
            ]
            transceiver.setCodecPreferences(preferred)
        self.frames = 0
        self.first_frame = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self.task = asyncio.create_task(self._consume(track))

    async def _consume(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                await track.recv()
                self.frames += 1
                if not self.first_frame.done():
                    self.first_frame.set_result(None)
        except MediaStreamError:
            return

    async def close(self) -> None:
        await self.pc.close()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def run_aiortc(
    peers: int, seconds: float, *, width: int, height: int, fps: int, codec: str = "vp8"
) -> dict[str, Any]:
    """Serve ``peers`` receiving peers for ``seconds`` after a warm-up; the figures."""
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r}: choose from {', '.join(CODECS)}")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "perf.aiortc_fanout",
        "--serve",
        f"--size={width}x{height}",
        f"--fps={fps}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    receivers: list[_Receiver] = []
    try:
        receivers = [_Receiver(codec) for _ in range(peers)]
        offers = []
        for receiver in receivers:
            await receiver.pc.setLocalDescription(await receiver.pc.createOffer())
            offers.append(receiver.pc.localDescription.sdp)
        child.stdin.write((json.dumps({"offers": offers}) + "\n").encode())
        await child.stdin.drain()
        reply = json.loads(await asyncio.wait_for(child.stdout.readline(), SETUP_TIMEOUT_S))
        for receiver, answer in zip(receivers, reply["answers"], strict=True):
            await receiver.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.wait_for(asyncio.gather(*(r.first_frame for r in receivers)), SETUP_TIMEOUT_S)
        await asyncio.sleep(WARMUP_S)

        server, client = psutil.Process(child.pid), psutil.Process()
        server_cpu0, client_cpu0 = _cpu_s(server), _cpu_s(client)
        frames0 = [r.frames for r in receivers]
        bytes0 = await _ask(child, "stats")
        started = time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - started
        server_cores = (_cpu_s(server) - server_cpu0) / elapsed
        client_cores = (_cpu_s(client) - client_cpu0) / elapsed
        server_rss_mb = server.memory_info().rss / 2**20
        fps_each = [(r.frames - f0) / elapsed for r, f0 in zip(receivers, frames0, strict=True)]
        bytes1 = await _ask(child, "stats")
        mbps = sum(bytes1["bytes_sent"]) - sum(bytes0["bytes_sent"])
        mbps = mbps * 8 / elapsed / 1e6
        codecs = sorted({_negotiated_codec(answer) for answer in reply["answers"]})
        closing = await _ask(child, "stop")
    finally:
        await asyncio.gather(*(r.close() for r in receivers), return_exceptions=True)
        if child.returncode is None:
            child.stdin.close()
            try:
                await asyncio.wait_for(child.wait(), 10)
            except TimeoutError:
                child.kill()
                await child.wait()
    current = asyncio.current_task()
    client_leaked = sum(1 for t in asyncio.all_tasks() if t is not current and not t.done())
    served = sum(1 for value in fps_each if value >= SERVED_FPS_SHARE * fps)
    return {
        "peers": peers,
        "codec": ",".join(codecs),
        "fps_min": round(min(fps_each), 2),
        "fps_mean": round(sum(fps_each) / peers, 2),
        "peers_served": served,
        "mbps_per_peer": round(mbps / peers, 3),
        "server_cpu_cores": round(server_cores, 3),
        "server_cpu_per_peer": round(server_cores / peers, 4),
        "server_rss_mb": round(server_rss_mb, 1),
        "client_cpu_cores": round(client_cores, 3),
        "viewers_per_core": round(served / server_cores, 2) if server_cores > 0 else None,
        "leaked_tasks": {"server": closing["leaked_tasks"], "client": client_leaked},
    }


async def _ask(child: asyncio.subprocess.Process, line: str) -> dict[str, Any]:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(f"{line}\n".encode())
    await child.stdin.drain()
    reply: dict[str, Any] = json.loads(
        await asyncio.wait_for(child.stdout.readline(), SETUP_TIMEOUT_S)
    )
    return reply


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help="be the child (server peers)")
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--peers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--codec", choices=CODECS, default="vp8")
    args = parser.parse_args(argv)
    width, _, height = args.size.partition("x")
    if args.serve:
        asyncio.run(serve(int(width), int(height), args.fps))
        return
    result = asyncio.run(
        run_aiortc(
            args.peers,
            args.seconds,
            width=int(width),
            height=int(height),
            fps=args.fps,
            codec=args.codec,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
