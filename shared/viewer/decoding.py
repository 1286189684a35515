"""The viewer's decode worker: whole frames in from the event loop, pictures and sound back.

Theory of operation
-------------------
The viewer's event loop does protocol work only: packets in, RTCP feedback out.  Decoding a
picture takes milliseconds (a large keyframe on a slow machine, far more); done on the loop it
would hold back every NACK and PLI behind it.  So the frames the jitter buffer releases go to
one decode thread, and what it decodes comes back to the loop:

- **Order.**  One thread takes jobs first in, first out, and hands each result back with
  ``loop.call_soon_threadsafe``, which runs callbacks in the order they were scheduled: pictures
  and sound come out in the order their frames were released.
- **Concurrency.**  PyAV releases the GIL while FFmpeg decodes, so the loop runs meanwhile.
  Decoders are made by factories on the thread that uses them, and only it touches them (the
  loop reads their error counters, plain integers).
- **Bound.**  :meth:`DecodeWorker.submit` never blocks.  When the oldest job still waiting was
  queued more than ``max_backlog_s`` ago (or ``max_jobs`` wait), the decoder is far behind: every
  waiting job is dropped and counted, and video resumes only at a keyframe, since the frames
  after a dropped one reference it.  :attr:`DecodeWorker.skipping_to_keyframe` tells the shell
  to ask the sender for one (a PLI) rather than wait for the next periodic keyframe.  The
  shell bounds what waits for its consumer the same way (:meth:`DecodeWorker.drop_waiting`), so
  a consumer that remuxes the pictures' access units never sees video resume mid-GOP either.
- **Latency** is measured where the picture is decoded: the wall clock is read on this thread
  right after the decoder returns, so a consumer slow to take the pictures adds nothing to it.
- **Errors.**  A decoder counts the errors of its input itself; anything it raises is a bug,
  handed to the loop and raised from ``Viewer.media()``, not swallowed.
- **Stopping.**  :meth:`DecodeWorker.stop` lets the frame being decoded finish, discards the
  rest, and returns once the thread has ended.  The thread is a daemon only so that a viewer
  nobody closed cannot hold the interpreter open at exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from shared.capture.stamp import Stamp, read_stamp
from shared.errors import ConfigError
from shared.media.codec import H264Decoder
from shared.rtp.h264 import to_annexb
from shared.rtp.jitter_buffer import BufferedFrame
from shared.rtp.opus import OpusDecoder

__all__ = [
    "DECODE_BACKLOG_S",
    "DecodeJob",
    "DecodeWorker",
    "Decoded",
    "DecodedAudio",
    "DecodedFrame",
    "Decoder",
    "DecoderFactory",
    "read_frame_stamp",
]

#: The decoder may fall this far behind (the age of the oldest frame waiting) before frames
#: are dropped to catch up.
DECODE_BACKLOG_S = 1.0
#: However young, no more frames than this wait (a burst of tiny frames is bounded too).
MAX_DECODE_JOBS = 512


class Decoder(Protocol):
    """A codec wrapper as the worker uses it (:class:`H264Decoder`, :class:`OpusDecoder`)."""

    @property
    def decode_errors(self) -> int:
        """Inputs it could not decode (counted, not raised)."""
        ...

    def decode(self, data: bytes, /) -> list[Any]:
        """One access unit (H.264, Annex B) or packet (Opus) -> decoded PyAV frames."""
        ...


DecoderFactory = Callable[[], Decoder]


@dataclasses.dataclass(frozen=True, slots=True)
class DecodedFrame:
    frame: Any  # av.VideoFrame
    stamp: Stamp | None
    latency_ms: float | None
    rtp_timestamp: int = 0
    capture_us: int | None = None
    """Capture time on the sender's clock (from its SR), None before the first SR."""
    keyframe: bool = False
    access_unit: bytes = b""
    """The H.264 access unit (Annex B) the picture was decoded from, for remuxing."""


@dataclasses.dataclass(frozen=True, slots=True)
class DecodedAudio:
    frame: Any  # av.AudioFrame
    rtp_timestamp: int
    capture_us: int | None
    latency_ms: float | None


def read_frame_stamp(frame: Any) -> Stamp | None:
    """Read the test source's timestamp from a decoded yuv420p frame without copying it all."""
    plane = frame.planes[0]
    # A view of the decoder's plane (no copy); read_stamp only touches the strip rows.
    luma = np.frombuffer(plane, dtype=np.uint8).reshape(-1, plane.line_size)
    return read_stamp(luma[: frame.height, : frame.width])


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeJob:
    """One whole frame for the decoder."""

    frame: BufferedFrame
    audio: bool
    capture_us: int | None
    """When the sender captured it (its SR's mapping), None before the first SR."""
    queued_at: float
    """Monotonic seconds when it was submitted: how far behind the decoder is."""


@dataclasses.dataclass(frozen=True, slots=True)
class Decoded:
    """What one job gave (often one item, none after a decode error) and when."""

    items: list[DecodedFrame | DecodedAudio]
    queued_at: float
    """The job's :attr:`DecodeJob.queued_at`: how long its items have waited, in all."""
    decoded_us: int
    """Wall-clock microseconds when the decoder returned (capture-to-decode delays)."""
    decoded_at: float
    """Monotonic seconds, the same instant (time to first frame)."""


class DecodeWorker:
    """One decode thread fed by a bounded queue (see the module doc).

    The loop side (:meth:`start`, :meth:`submit`, :meth:`drop_waiting`, :meth:`stop`,
    :attr:`outstanding`) runs on the event loop's thread only; results reach ``on_result``
    there, one per accepted job that was not dropped.
    """

    def __init__(
        self,
        *,
        video_decoder: DecoderFactory = H264Decoder,
        audio_decoder: DecoderFactory = OpusDecoder,
        max_backlog_s: float = DECODE_BACKLOG_S,
        max_jobs: int = MAX_DECODE_JOBS,
    ) -> None:
        if max_backlog_s <= 0 or max_jobs < 1:
            raise ConfigError("the decode backlog limits must be positive")
        self.max_backlog_s = max_backlog_s
        self.max_jobs = max_jobs
        self._factories = (video_decoder, audio_decoder)
        self._video: Decoder | None = None
        self._audio: Decoder | None = None
        self._jobs: collections.deque[DecodeJob] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._on_result: Callable[[Decoded | Exception], None] | None = None
        self._exited: asyncio.Future[None] | None = None
        self._skipping = False
        #: Jobs accepted whose result has not reached ``on_result`` yet.
        self.outstanding = 0
        #: Frames dropped from the queue to catch up (video: until the next keyframe).
        self.video_dropped = 0
        self.audio_dropped = 0

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def skipping_to_keyframe(self) -> bool:
        """Video frames are being dropped until a keyframe comes: ask the sender for one."""
        return self._skipping

    @property
    def video_decode_errors(self) -> int:
        return self._video.decode_errors if self._video is not None else 0

    @property
    def audio_decode_errors(self) -> int:
        return self._audio.decode_errors if self._audio is not None else 0

    # -- the loop's side ----------------------------------------------------------------------

    def start(
        self, loop: asyncio.AbstractEventLoop, on_result: Callable[[Decoded | Exception], None]
    ) -> None:
        """Start the thread (a no-op while it runs); ``on_result`` runs on ``loop``."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._on_result = on_result
        self._stopping = False
        exited = self._exited = loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(loop, exited), name="viewer-decode", daemon=True
        )
        self._thread.start()

    def submit(self, job: DecodeJob) -> bool:
        """Queue a frame for decoding; False when it was dropped instead.  Never blocks."""
        with self._ready:
            waiting = self._jobs
            if waiting and (
                len(waiting) >= self.max_jobs
                or job.queued_at - waiting[0].queued_at > self.max_backlog_s
            ):
                self._drop_waiting(restart_video=False)  # far behind: what waits is stale
            if not job.audio and self._skipping:
                if not job.frame.keyframe:
                    self.video_dropped += 1
                    return False
                self._skipping = False
            waiting.append(job)
            self.outstanding += 1
            self._ready.notify()
        return True

    def drop_waiting(self, *, restart_video: bool) -> None:
        """Drop every job still waiting (the shell's consumer fell behind, not the decoder);
        ``restart_video``: the next video frame to decode must be a keyframe even if no video
        job was waiting (the shell dropped decoded pictures, and a picture stream given to a
        consumer that remuxes it must not resume mid-GOP)."""
        with self._ready:
            self._drop_waiting(restart_video=restart_video)

    def _drop_waiting(self, *, restart_video: bool) -> None:
        waiting = self._jobs
        video = sum(not queued.audio for queued in waiting)
        self.video_dropped += video
        self.audio_dropped += len(waiting) - video
        self.outstanding -= len(waiting)
        waiting.clear()
        # The frames after a dropped one reference it: video restarts at a keyframe.
        self._skipping |= restart_video or video > 0

    async def stop(self) -> None:
        """Let the frame being decoded finish, drop the rest, and end the thread.  Safe to
        call twice at once (the stream's end and :meth:`Viewer.close` may both)."""
        thread, exited = self._thread, self._exited
        if thread is None or exited is None:
            return
        with self._ready:
            self._stopping = True
            self._jobs.clear()
            self._ready.notify()
        if exited.get_loop() is asyncio.get_running_loop():
            # Awaited, not joined: the loop runs on while the last decode finishes.  Shielded,
            # so one caller cancelled does not cancel what another awaits.
            await asyncio.shield(exited)
        # Joined at once: it has returned (or, started under a loop that has since ended, it
        # finds nobody to hand results to and returns).
        thread.join()
        if self._thread is thread:
            self._thread = self._exited = None
            self.outstanding = 0
            self._skipping = False

    def _finished(self, result: Decoded | Exception) -> None:
        self.outstanding -= 1
        assert self._on_result is not None
        self._on_result(result)

    @staticmethod
    def _thread_exited(exited: asyncio.Future[None]) -> None:
        if not exited.done():
            exited.set_result(None)

    # -- the decode thread --------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, exited: asyncio.Future[None]) -> None:
        try:
            while True:
                with self._ready:
                    while not self._jobs and not self._stopping:
                        self._ready.wait()
                    if self._stopping:
                        return
                    job = self._jobs.popleft()
                result: Decoded | Exception
                try:
                    result = self._decode(job)
                except Exception as exc:  # a decoder bug: raised on the loop, from media()
                    result = exc
                loop.call_soon_threadsafe(self._finished, result)
        except RuntimeError:
            return  # the loop closed under us: nobody is left to hand anything to
        finally:
            with contextlib.suppress(RuntimeError):  # closed: nobody awaits stop() on it
                loop.call_soon_threadsafe(self._thread_exited, exited)

    def _decode(self, job: DecodeJob) -> Decoded:
        frame = job.frame
        if job.audio:
            if self._audio is None:
                self._audio = self._factories[1]()
            pcm = self._audio.decode(frame.units[0])
            decoded_us = time.time_ns() // 1000
            delay = None if job.capture_us is None else (decoded_us - job.capture_us) / 1000
            sounds: list[DecodedFrame | DecodedAudio] = [
                DecodedAudio(a, frame.rtp_timestamp, job.capture_us, delay) for a in pcm
            ]
            return Decoded(sounds, job.queued_at, decoded_us, time.monotonic())
        if self._video is None:
            self._video = self._factories[0]()
        access_unit = to_annexb(frame.units)
        pictures = self._video.decode(access_unit)
        decoded_us, decoded_at = time.time_ns() // 1000, time.monotonic()
        items: list[DecodedFrame | DecodedAudio] = []
        for picture in pictures:
            stamp = read_frame_stamp(picture)
            latency_ms = None if stamp is None else (decoded_us - stamp.capture_us) / 1000
            items.append(
                DecodedFrame(
                    frame=picture,
                    stamp=stamp,
                    latency_ms=latency_ms,
                    rtp_timestamp=frame.rtp_timestamp,
                    capture_us=job.capture_us,
                    keyframe=frame.keyframe,
                    access_unit=access_unit,
                )
            )
        return Decoded(items, job.queued_at, decoded_us, decoded_at)
