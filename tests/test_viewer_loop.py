"""The viewer's shell: one timer, feedback in the pass that sees a gap, decoding off the loop.

A :class:`Viewer` runs here over an in-memory transport (what it uses of ``RoqClient``), with
decoders made by the factories it really takes.  A gated decoder holds each frame until the
test opens the gate, so "the loop keeps doing protocol work while a frame decodes" is checked
by events, not by timing.  The decode worker's drop policy is tested on its own with literal
times.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any, cast

import av
import pytest

from shared.errors import ConfigError
from shared.roq.transport import RoqClient
from shared.roq.url import StreamUrl
from shared.rtp.jitter_buffer import BufferedFrame
from shared.rtp.packet import RtpPacket
from shared.rtp.rtcp import RtcpNack, RtcpPli, parse_rtcp_compound
from shared.rtp.sender import AUDIO_TRACK, VIDEO_TRACK
from shared.viewer.client import DecodedAudio, DecodedFrame, Viewer
from shared.viewer.decoding import Decoded, DecodeJob, DecodeWorker
from tests.test_jitter_buffer import flat, stream
from tests.test_receiver_timers import OPUS
from tests.test_roq_loopback import until

#: Hang guard for a gate the test forgot to open: far beyond any test's needs.
GATE_TIMEOUT_S = 30.0
#: A decode backlog bound no test that holds the decoder on purpose comes near.
NEVER_BEHIND_S = 600.0


class MemoryClient:
    """What the viewer uses of ``RoqClient``, in memory, with a log of what happened in order:
    ``("in", flow, seq)`` per delivered packet, ``"idle"`` each time the viewer waits on an
    empty queue, ``("nack", seqs)`` / ``("pli",)`` / ``("rtcp",)`` per packet it sends."""

    mode = "datagram"
    malformed = 0
    rtt_ms = 0.0
    termination = (0, "stream stopped")
    probe_timeout_s = 0.0
    abandoned: str | None = None

    @property
    def last_received_at(self) -> float:
        return time.monotonic()  # in memory: never silent (the silence timer never fires)

    def abandon(self, reason: str) -> None:
        self.abandoned = reason
        self.end()

    def __init__(self) -> None:
        self._queue: collections.deque[tuple[int, bytes, float] | None] = collections.deque()
        self._ready = asyncio.Event()
        self.log: list[Any] = []
        self.closed = False

    def deliver(self, flow_id: int, packet: RtpPacket) -> None:
        self._queue.append((flow_id, packet.serialize(), time.monotonic()))
        self.log.append(("in", flow_id, packet.sequence_number))
        self._ready.set()

    def end(self) -> None:
        self._queue.append(None)
        self._ready.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def receive_nowait(self) -> tuple[int, bytes, float] | None:
        if not self._queue or self._queue[0] is None:
            return None
        return self._queue.popleft()

    async def receive_timed(self) -> tuple[int, bytes, float] | None:
        while not self._queue:
            self.log.append("idle")
            self._ready.clear()
            await self._ready.wait()
        item = self._queue.popleft()
        if item is None:
            self._queue.append(None)
        return item

    def send(self, flow_id: int, packet: bytes) -> None:
        for rtcp in parse_rtcp_compound(packet):
            if isinstance(rtcp, RtcpNack):
                self.log.append(("nack", rtcp.sequences()))
            elif isinstance(rtcp, RtcpPli):
                self.log.append(("pli",))
            else:
                self.log.append(("rtcp",))

    def nacked(self) -> list[int]:
        return [s for entry in self.log if entry[0] == "nack" for s in entry[1]]

    def plis(self) -> int:
        return self.log.count(("pli",))

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.end()  # as a closed connection does: the receive side reports the end


class InstantDecoder:
    """Decodes anything into one blank picture (video) or 20 ms of silence (audio)."""

    decode_errors = 0

    def __init__(self, audio: bool = False) -> None:
        self.audio = audio
        self.calls = 0

    def decode(self, data: bytes, /) -> list[Any]:
        self.calls += 1
        if self.audio:
            return [av.AudioFrame(format="s16", layout="stereo", samples=960)]
        return [av.VideoFrame(64, 48, "yuv420p")]


class GatedDecoder:
    """A video decoder that holds every frame until the test opens ``gate``."""

    decode_errors = 0

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.threads: list[threading.Thread] = []

    def decode(self, data: bytes, /) -> list[Any]:
        self.threads.append(threading.current_thread())
        self.entered.set()
        if not self.gate.wait(GATE_TIMEOUT_S):
            raise TimeoutError("the test never opened the decoder's gate")
        return [av.VideoFrame(64, 48, "yuv420p")]


def viewer_on(client: MemoryClient, *, video: Any = None, backlog_s: float = 1.0) -> Viewer:
    return Viewer(
        StreamUrl(host="127.0.0.1", port=1, session_id="t"),
        cast(RoqClient, client),
        started=time.monotonic(),
        connect_options={},
        reconnect=False,
        video_decoder=video or InstantDecoder,
        audio_decoder=lambda: InstantDecoder(audio=True),
        decode_backlog_s=backlog_s,
    )


def opus(seq: int) -> RtpPacket:
    return RtpPacket(
        payload_type=111, sequence_number=seq, timestamp=960 * seq, ssrc=7, payload=OPUS
    )


async def collect(viewer: Viewer, into: list[DecodedFrame | DecodedAudio]) -> None:
    async for item in viewer.media():
        into.append(item)


def test_a_gap_is_nacked_in_the_pass_that_sees_it_before_the_viewer_waits_again() -> None:
    async def main() -> list[Any]:
        client = MemoryClient()
        viewer = viewer_on(client)
        items: list[DecodedFrame | DecodedAudio] = []
        task = asyncio.create_task(collect(viewer, items))
        await until(lambda: "idle" in client.log, "the viewer to wait for packets")
        for seq in (1, 2, 4):  # one batch: 3 is missing
            client.deliver(AUDIO_TRACK.flow_id, opus(seq))
        await until(lambda: 3 in client.nacked(), "the NACK for 3")
        client.end()
        await asyncio.wait_for(task, 10)
        await viewer.close()
        assert len(items) == 2  # 1 and 2; 4 waits behind 3, and the stream ended
        return client.log

    log = asyncio.run(main())
    after = log[log.index(("in", AUDIO_TRACK.flow_id, 4)) + 1 :]
    # No polling interval: the NACK went out before the viewer next waited for anything.
    first = next(e for e in after if e == "idle" or e[0] == "nack")
    assert first == ("nack", [3])


def test_decoding_runs_off_the_loop_which_keeps_handling_packets_and_sending_feedback() -> None:
    decoder = GatedDecoder()

    async def main() -> tuple[list[DecodedFrame | DecodedAudio], Viewer, list[int]]:
        client = MemoryClient()
        viewer = viewer_on(client, video=lambda: decoder, backlog_s=NEVER_BEHIND_S)
        items: list[DecodedFrame | DecodedAudio] = []
        task = asyncio.create_task(collect(viewer, items))
        frames = stream("IPPP")
        for packet in frames[0]:
            client.deliver(VIDEO_TRACK.flow_id, packet)
        await until(decoder.entered.is_set, "the decoder to take the keyframe")
        # The decoder is stuck inside the keyframe.  The loop is not: it sees the gap in
        # frame 1 and NACKs it, takes the retransmission, and queues frames 1-3.
        lost = frames[1].pop(1)
        for packet in flat(frames[1:]):
            client.deliver(VIDEO_TRACK.flow_id, packet)
        await until(lambda: lost.sequence_number in client.nacked(), "a NACK meanwhile")
        client.deliver(VIDEO_TRACK.flow_id, lost)
        await until(lambda: viewer.report().packets_recovered == 1, "the resend handled")
        assert items == [] and not decoder.gate.is_set()
        decoder.gate.set()
        await until(lambda: len(items) == 4, "the four pictures")
        client.end()
        await asyncio.wait_for(task, 10)
        await viewer.close()
        return items, viewer, [f[0].timestamp for f in stream("IPPP")]

    items, viewer, timestamps = asyncio.run(main())
    assert [item.rtp_timestamp for item in items] == timestamps  # in order
    assert [cast(DecodedFrame, item).keyframe for item in items] == [True, False, False, False]
    assert {id(thread) for thread in decoder.threads} == {id(decoder.threads[0])}
    assert decoder.threads[0] is not threading.main_thread()
    assert not decoder.threads[0].is_alive()  # the stream ended: the worker stopped
    report = viewer.report()
    assert report.frames_decoded == 4 and report.frames_recovered == 1
    assert report.decode_queue_dropped == 0


def test_close_lets_the_frame_being_decoded_finish_then_ends_the_thread() -> None:
    decoder = GatedDecoder()

    async def main() -> None:
        client = MemoryClient()
        viewer = viewer_on(client, video=lambda: decoder, backlog_s=NEVER_BEHIND_S)
        items: list[DecodedFrame | DecodedAudio] = []
        task = asyncio.create_task(collect(viewer, items))
        for packet in stream("I")[0]:
            client.deliver(VIDEO_TRACK.flow_id, packet)
        await until(decoder.entered.is_set, "the decoder to take the keyframe")
        closing = asyncio.create_task(viewer.close())
        await until(lambda: client.closed, "the connection to close")
        assert not closing.done()  # the decode thread is still inside the decoder
        decoder.gate.set()
        await asyncio.wait_for(closing, 10)
        await asyncio.wait_for(task, 10)  # media() ends once the viewer is closed

    asyncio.run(main())
    assert not decoder.threads[0].is_alive()


def test_a_decoder_far_behind_drops_to_the_next_keyframe_and_asks_for_one() -> None:
    decoder = GatedDecoder()
    backlog_s = 0.05

    async def main() -> tuple[list[DecodedFrame | DecodedAudio], Viewer, MemoryClient]:
        client = MemoryClient()
        viewer = viewer_on(client, video=lambda: decoder, backlog_s=backlog_s)
        items: list[DecodedFrame | DecodedAudio] = []
        task = asyncio.create_task(collect(viewer, items))
        frames = stream("IPPI")
        for packet in frames[0]:
            client.deliver(VIDEO_TRACK.flow_id, packet)
        await until(decoder.entered.is_set, "the decoder to take the keyframe")
        for packet in frames[1]:  # queued behind the stuck keyframe
            client.deliver(VIDEO_TRACK.flow_id, packet)
        handled = len(frames[0]) + len(frames[1])
        await until(lambda: viewer.report().packets_received == handled, "frame 1 queued")
        # Not a wait for an event: the monotonic clock must pass the backlog bound.
        await asyncio.sleep(backlog_s * 1.2)
        for packet in frames[2]:  # frame 1 is now too old: both are dropped
            client.deliver(VIDEO_TRACK.flow_id, packet)
        await until(lambda: client.plis() == 1, "a PLI for the keyframe to resume at")
        assert viewer.report().decode_queue_dropped == 2
        for packet in frames[3]:
            client.deliver(VIDEO_TRACK.flow_id, packet)
        # Handed to the decoder before it frees up: frame 0, long stale by then, would
        # otherwise be dropped too, by the consumer-side bound, when frame 3 comes.
        handled += sum(len(frame) for frame in frames[2:])
        await until(lambda: viewer.report().packets_received == handled, "frame 3 queued")
        decoder.gate.set()
        await until(lambda: len(items) == 2, "the two keyframes")
        client.end()
        await asyncio.wait_for(task, 10)
        await viewer.close()
        return items, viewer, client

    items, viewer, client = asyncio.run(main())
    assert [cast(DecodedFrame, item).keyframe for item in items] == [True, True]
    assert viewer.report().keyframe_requests == 1 and client.plis() == 1


def test_a_consumer_far_behind_loses_what_waits_for_it_and_resumes_at_a_keyframe() -> None:
    decoder = InstantDecoder()
    backlog_s = 0.05

    async def main() -> tuple[list[DecodedFrame | DecodedAudio], Viewer]:
        client = MemoryClient()
        viewer = viewer_on(client, video=lambda: decoder, backlog_s=backlog_s)
        frames = stream("IPPIP")
        for packet in flat(frames[:3]):
            client.deliver(VIDEO_TRACK.flow_id, packet)
        media = viewer.media()
        items = [await media.__anext__()]  # then the consumer dawdles: frames 1 and 2 wait
        await until(lambda: decoder.calls == 3, "frames 1 and 2 decoded")
        # Not a wait for an event: the monotonic clock must pass the backlog bound.
        await asyncio.sleep(backlog_s * 1.2)
        for packet in flat(frames[3:]):
            client.deliver(VIDEO_TRACK.flow_id, packet)
        items += [await media.__anext__(), await media.__anext__()]
        client.end()
        items += [item async for item in media]
        await viewer.close()
        return items, viewer

    items, viewer = asyncio.run(main())
    timestamps = [f[0].timestamp for f in stream("IPPIP")]
    assert [item.rtp_timestamp for item in items] == [timestamps[0], *timestamps[3:]]
    assert [cast(DecodedFrame, item).keyframe for item in items] == [True, True, False]
    assert viewer.report().decode_queue_dropped == 2


def test_a_decoder_that_raises_ends_media_with_its_error() -> None:
    class Broken:
        decode_errors = 0

        def decode(self, data: bytes, /) -> list[Any]:
            raise RuntimeError("decoder bug")

    async def main() -> None:
        client = MemoryClient()
        viewer = viewer_on(client, video=Broken)
        for packet in stream("I")[0]:
            client.deliver(VIDEO_TRACK.flow_id, packet)
        with pytest.raises(RuntimeError, match="decoder bug"):
            await asyncio.wait_for(collect(viewer, []), 10)
        await viewer.close()

    asyncio.run(main())


# -- the worker on its own, with literal times ---------------------------------------------------


def job(index: int, at: float, *, keyframe: bool = False, audio: bool = False) -> DecodeJob:
    frame = BufferedFrame(
        rtp_timestamp=index,
        units=[OPUS] if audio else [b"\x65" if keyframe else b"\x41"],
        keyframe=keyframe or audio,
        first_sequence=index,
        last_sequence=index,
        ssrc=1,
        first_arrival=at,
        recovered=False,
    )
    return DecodeJob(frame, audio, None, at)


def test_the_worker_drops_what_waits_past_the_backlog_and_resumes_at_a_keyframe() -> None:
    decoder = GatedDecoder()

    async def main() -> list[int]:
        worker = DecodeWorker(
            video_decoder=lambda: decoder,
            audio_decoder=lambda: InstantDecoder(audio=True),
            max_backlog_s=1.0,
        )
        done: list[int] = []

        def on_result(result: Decoded | Exception) -> None:
            assert isinstance(result, Decoded)
            done.extend(item.rtp_timestamp for item in result.items)

        worker.start(asyncio.get_running_loop(), on_result)
        assert worker.submit(job(0, 10.0, keyframe=True))
        await until(decoder.entered.is_set, "the keyframe in the decoder")
        assert worker.submit(job(1, 10.25))
        assert worker.submit(job(2, 10.5))
        assert worker.submit(job(3, 10.75, audio=True))
        assert worker.submit(job(4, 11.25))  # the oldest waiting is exactly 1.0 s old: kept
        assert worker.outstanding == 5 and not worker.skipping_to_keyframe
        assert not worker.submit(job(5, 11.5))  # 1.25 s: all four waiting go, and this too
        assert worker.skipping_to_keyframe
        assert (worker.video_dropped, worker.audio_dropped) == (4, 1)
        assert worker.submit(job(6, 11.5, audio=True))  # sound goes on
        assert not worker.submit(job(7, 11.75))  # video waits for a keyframe
        assert worker.submit(job(8, 12.0, keyframe=True))
        assert not worker.skipping_to_keyframe and worker.video_dropped == 5
        assert worker.outstanding == 3
        decoder.gate.set()
        await until(lambda: worker.outstanding == 0, "the three left decoded")
        await worker.stop()
        assert not decoder.threads[0].is_alive()
        assert worker.outstanding == 0 and not worker.running
        return done

    done = asyncio.run(main())
    assert done == [0, 6, 8]  # in order; job 6's one sound frame, job 0 and 8 one picture each


def test_the_worker_bounds_the_jobs_that_wait_however_young() -> None:
    decoder = GatedDecoder()

    async def main() -> None:
        worker = DecodeWorker(video_decoder=lambda: decoder, max_jobs=3)
        worker.start(asyncio.get_running_loop(), lambda result: None)
        worker.submit(job(0, 5.0, keyframe=True))
        await until(decoder.entered.is_set, "the keyframe in the decoder")
        for index in (1, 2, 3):
            assert worker.submit(job(index, 5.0))
        assert not worker.submit(job(4, 5.0))  # three wait: they and this one are dropped
        assert worker.video_dropped == 4
        decoder.gate.set()
        await worker.stop()

    asyncio.run(main())


def test_worker_limits_are_validated() -> None:
    with pytest.raises(ConfigError):
        DecodeWorker(max_backlog_s=0)
    with pytest.raises(ConfigError):
        DecodeWorker(max_jobs=0)
