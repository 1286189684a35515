"""Raw video frames in shared memory: one writer, many readers, latest-frame semantics.

Theory of operation
-------------------
The pool is a ring of ``slots`` fixed-size slots.  Frame ``seq`` (1, 2, 3, ...) goes to slot
``(seq - 1) % slots``, so the pool always holds the newest ``slots`` frames.  The writer never
waits: a reader that falls behind simply finds its frame overwritten and is told how many it
``missed``.  Only sequence numbers travel between processes, through the pool's doorbell
(:mod:`shared.pool.doorbell`), rung after every commit; pixels stay here.

Each slot is guarded by a seqlock.  The writer makes the slot's generation odd, writes the
pixels and metadata, makes it even again, and only then publishes ``seq`` as the pool's latest.
A reader notes the generation, copies metadata and pixels out, and reads the generation again;
if it changed or was odd, the copy may be torn and is discarded (and retried against the
then-latest frame).

Memory ordering: header fields are 8-byte aligned int64 words accessed through a
``memoryview.cast("q")``, so every field access is a single aligned 8-byte load or store, and
CPython performs them in program order.  On x86-64 (TSO) stores become visible in program order
and loads are not reordered with loads, which is all a seqlock needs.  (glibc copies large
payloads with non-temporal stores, which may overtake the earlier "odd" store, but only by the
nanoseconds a store buffer takes to drain, against microseconds of Python in between; memcpy
ends with an sfence, so the closing "even" store cannot overtake them.)  Weakly ordered CPUs
(aarch64) would need barriers that Python cannot express; this module assumes x86-64.

Layout after the common shm header (all offsets multiples of 64)::

    pool header   64 B   slots, slot_bytes, slot stride, latest committed seq
    slot i        64 B   gen, seq, capture_us, width, height, pixel format, payload size,
                         monotonic_us
                  slot_bytes rounded up to 64: payload

Each frame carries two capture times, taken together when the picture was grabbed:
``capture_us`` on the wall clock, which is data (it travels to viewers, who measure latency
against their own wall clock, and lines video up with audio), and ``monotonic_us`` on
``CLOCK_MONOTONIC``, which is what timing decisions and the encoder's pts are derived from,
since NTP may step the wall clock at any moment.  ``CLOCK_MONOTONIC`` is one clock for every
process of the host, and the pool never leaves its host, so a reader may compare the writer's
stamps with each other (only differences mean anything).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from shared.errors import ConfigError, ResourceError
from shared.models import PixelFormat
from shared.pool.shm import Segment, SegmentHandle, SegmentKind, attach_segment, create_segment

__all__ = [
    "FramePool",
    "FramePoolReader",
    "FrameRead",
    "FrameReaderStats",
    "frame_bytes",
]

_LINE: Final = 64
_WORD: Final = 8
# Pool header words.
_P_SLOTS, _P_SLOT_BYTES, _P_STRIDE, _P_LATEST = 0, 1, 2, 3
# Slot header words, relative to the slot's first word.
_S_GEN, _S_SEQ, _S_CAPTURE_US, _S_WIDTH, _S_HEIGHT, _S_FORMAT, _S_SIZE, _S_MONOTONIC_US = range(8)
#: Attempts at a clean copy before read_latest gives up for this call.
_READ_ATTEMPTS: Final = 4

_FORMAT_CODES: Final = {
    PixelFormat.YUV420P: 1,
    PixelFormat.NV12: 2,
    PixelFormat.BGR24: 3,
    PixelFormat.RGB24: 4,
    PixelFormat.GRAY: 5,
}
_FORMATS_BY_CODE: Final = {code: fmt for fmt, code in _FORMAT_CODES.items()}

Pixels = npt.NDArray[np.uint8]


def frame_bytes(width: int, height: int, pixel_format: PixelFormat) -> int:
    """Payload size of one frame (4:2:0 chroma planes round odd edges up, as FFmpeg does)."""
    if width <= 0 or height <= 0:
        raise ConfigError(f"frame size {width}x{height} is impossible: edges must be positive")
    if pixel_format in (PixelFormat.YUV420P, PixelFormat.NV12):
        return width * height + 2 * ((width + 1) // 2) * ((height + 1) // 2)
    if pixel_format in (PixelFormat.BGR24, PixelFormat.RGB24):
        return width * height * 3
    if pixel_format is PixelFormat.GRAY:
        return width * height
    raise ConfigError(f"pixel format {pixel_format!r} has no frame pool layout")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclasses.dataclass(frozen=True, slots=True)
class FrameRead:
    """One frame copied out of the pool.  (A dataclass: msgspec cannot hold numpy arrays.)"""

    sequence: int
    #: Wall-clock capture time, microseconds since the epoch: data, never a timer.
    capture_us: int
    #: The same moment on the host's monotonic clock, microseconds: what pts come from.
    monotonic_us: int
    width: int
    height: int
    pixel_format: PixelFormat
    #: uint8, 1-D, exactly the payload size; a copy the pool will not touch again.
    pixels: Pixels
    #: Sequences this reader never saw between its previous frame and this one.
    missed: int


class _Miss(enum.Enum):
    TORN = "the slot changed while being copied"
    ABSENT = "not in the pool (not written yet, or overwritten)"


class FrameReaderStats(msgspec.Struct, kw_only=True):
    frames_read: int = 0
    frames_missed: int = 0
    #: Copies discarded because the writer reused the slot meanwhile.
    torn_retries: int = 0
    #: read_latest calls that returned None because every attempt was torn.
    torn_failures: int = 0


class FramePool(SegmentHandle):
    """A frame pool segment.  The creating handle writes; attached handles only read."""

    kind_name = "frame pool"

    def __init__(self, segment: Segment) -> None:
        super().__init__(segment)
        buf = segment.buf
        self._words: memoryview = buf.cast("q")
        self.slots: Final = self._words[_P_SLOTS]
        self.slot_bytes: Final = self._words[_P_SLOT_BYTES]
        self._stride: Final = self._words[_P_STRIDE]
        if self.slots <= 0 or self.slot_bytes <= 0 or _LINE * (1 + self.slots) > len(buf):
            self._release_views()
            raise ResourceError(f"frame pool {segment.name} has a corrupt header")
        # (slots, slot_bytes) view of every payload, skipping the slot headers between them.
        self._payloads: Pixels = np.ndarray(
            (self.slots, self.slot_bytes),
            dtype=np.uint8,
            buffer=buf,
            offset=2 * _LINE,
            strides=(self._stride, 1),
        )
        self._next_sequence = self._words[_P_LATEST] + 1

    @classmethod
    def create(cls, name: str, *, slot_bytes: int, slots: int) -> FramePool:
        """Create the pool segment ``name``; the returned handle is its only writer."""
        if slots < 2 or slot_bytes <= 0:
            raise ConfigError(f"frame pool {name}: need slots >= 2 and slot_bytes > 0")
        stride = _LINE + _round_up(slot_bytes, _LINE)

        def init(buf: memoryview) -> None:
            words = buf.cast("q")
            words[_P_SLOTS], words[_P_SLOT_BYTES], words[_P_STRIDE] = slots, slot_bytes, stride
            words.release()

        segment = create_segment(name, _LINE + slots * stride, SegmentKind.FRAME_POOL, init=init)
        return cls(segment)

    @classmethod
    def attach(cls, name: str) -> FramePool:
        """Attach to an existing pool for reading."""
        segment = attach_segment(name, SegmentKind.FRAME_POOL)
        try:
            return cls(segment)
        except BaseException:
            segment.close()
            raise

    def latest_sequence(self) -> int:
        """Newest committed sequence number (0 before the first frame)."""
        return int(self._words[_P_LATEST])

    # --- writer ---------------------------------------------------------------------------

    def write(
        self,
        pixels: npt.NDArray[Any] | bytes | bytearray | memoryview,
        *,
        capture_us: int,
        monotonic_us: int,
        width: int,
        height: int,
        pixel_format: PixelFormat,
    ) -> int:
        """Copy one frame into the next slot and publish it.  Returns its sequence number."""
        if isinstance(pixels, np.ndarray):
            flat = np.ascontiguousarray(pixels).reshape(-1).view(np.uint8)
        else:
            flat = np.frombuffer(pixels, np.uint8)
        size = frame_bytes(width, height, pixel_format)
        if flat.size != size:
            raise ConfigError(f"{width}x{height} {pixel_format} is {size} bytes, got {flat.size}")
        with self.writing(
            width=width,
            height=height,
            pixel_format=pixel_format,
            capture_us=capture_us,
            monotonic_us=monotonic_us,
        ) as view:
            view[:] = flat
        return self._next_sequence - 1

    @contextmanager
    def writing(
        self,
        *,
        width: int,
        height: int,
        pixel_format: PixelFormat,
        capture_us: int,
        monotonic_us: int,
    ) -> Iterator[Pixels]:
        """Zero-copy write: yields the next slot's payload as a writable uint8 view, committed
        when the block exits normally.  The view must not be used after the block.

        If the block raises, the slot is left holding no frame and nothing is published.
        """
        if not self.is_writer:
            raise ConfigError(f"frame pool {self.name} was attached read-only; its creator writes")
        size = frame_bytes(width, height, pixel_format)
        if size > self.slot_bytes:
            raise ConfigError(
                f"{width}x{height} {pixel_format} is {size} bytes, larger than the "
                f"{self.slot_bytes}-byte slots of frame pool {self.name}"
            )
        sequence = self._next_sequence
        slot = (sequence - 1) % self.slots
        words = self._words
        base = (_LINE + slot * self._stride) // _WORD
        view = self._payloads[slot, :size]
        generation = words[base + _S_GEN]
        words[base + _S_GEN] = generation + 1  # odd: readers discard what they copy now
        try:
            yield view
            try:
                words[base + _S_SEQ] = sequence
                words[base + _S_CAPTURE_US] = capture_us
                words[base + _S_WIDTH] = width
                words[base + _S_HEIGHT] = height
                words[base + _S_FORMAT] = _FORMAT_CODES[pixel_format]
                words[base + _S_SIZE] = size
                words[base + _S_MONOTONIC_US] = monotonic_us
            except (TypeError, ValueError) as exc:
                raise ConfigError(
                    "capture_us, monotonic_us, width and height must be int64 integers"
                ) from exc
        except BaseException:
            # Leave the slot even (a later write must start from even) and holding no frame.
            words[base + _S_SEQ] = 0
            words[base + _S_GEN] = generation + 2
            raise
        words[base + _S_GEN] = generation + 2
        words[_P_LATEST] = sequence
        self._next_sequence = sequence + 1
        self._ring(sequence)

    # --- reader primitive -------------------------------------------------------------------

    def _copy_out(self, sequence: int, out: Pixels | None) -> FrameRead | _Miss:
        """One seqlock read of ``sequence``."""
        if sequence < 1 or sequence > self._words[_P_LATEST]:
            return _Miss.ABSENT
        slot = (sequence - 1) % self.slots
        words = self._words
        base = (_LINE + slot * self._stride) // _WORD
        generation = words[base + _S_GEN]
        if generation & 1:
            return _Miss.TORN
        if words[base + _S_SEQ] != sequence:
            return _Miss.ABSENT
        capture_us = words[base + _S_CAPTURE_US]
        monotonic_us = words[base + _S_MONOTONIC_US]
        width = words[base + _S_WIDTH]
        height = words[base + _S_HEIGHT]
        code = words[base + _S_FORMAT]
        size = min(max(words[base + _S_SIZE], 0), self.slot_bytes)  # garbage if torn
        if out is None:
            pixels = self._payloads[slot, :size].copy()
        else:
            if out.dtype != np.uint8 or out.ndim != 1 or out.size < size:
                raise ConfigError(f"out must be a 1-D uint8 array of at least {size} bytes")
            pixels = out[:size]
            np.copyto(pixels, self._payloads[slot, :size])
        if words[base + _S_GEN] != generation or code not in _FORMATS_BY_CODE:
            return _Miss.TORN
        return FrameRead(
            sequence, capture_us, monotonic_us, width, height, _FORMATS_BY_CODE[code], pixels, 0
        )

    # --- lifetime ---------------------------------------------------------------------------

    def _release_views(self) -> None:
        self._payloads = np.empty((0, 0), np.uint8)
        self._words.release()


class FramePoolReader:
    """One consumer's position in a pool: returns each frame at most once, newest first."""

    def __init__(self, pool: FramePool) -> None:
        self.pool: Final = pool
        self._last_sequence = 0
        self._stats = FrameReaderStats()

    @property
    def stats(self) -> FrameReaderStats:
        """A snapshot of this reader's counters."""
        return msgspec.structs.replace(self._stats)

    @property
    def last_sequence(self) -> int:
        """The newest sequence this reader has returned (0 before the first)."""
        return self._last_sequence

    def latest_sequence(self) -> int:
        return self.pool.latest_sequence()

    def _accept(self, frame: FrameRead) -> FrameRead:
        missed = max(0, frame.sequence - self._last_sequence - 1)
        self._last_sequence = max(self._last_sequence, frame.sequence)
        self._stats.frames_read += 1
        self._stats.frames_missed += missed
        return dataclasses.replace(frame, missed=missed)

    def read_latest(self, out: Pixels | None = None) -> FrameRead | None:
        """The newest committed frame newer than the last one returned, or None.

        Copies into ``out`` (a 1-D uint8 array at least the payload size) when given;
        ``pixels`` is then a view of ``out``.  None also when every attempt was torn.
        """
        for _ in range(_READ_ATTEMPTS):
            latest = self.pool.latest_sequence()
            if latest <= self._last_sequence:
                return None
            result = self.pool._copy_out(latest, out)
            if isinstance(result, FrameRead):
                return self._accept(result)
            self._stats.torn_retries += 1
        self._stats.torn_failures += 1
        return None

    def read(self, sequence: int, out: Pixels | None = None) -> FrameRead | None:
        """Frame ``sequence`` if the pool still holds it intact, else None.

        Moves this reader's position forward (never back), counting frames skipped as missed.
        """
        for _ in range(_READ_ATTEMPTS):
            result = self.pool._copy_out(sequence, out)
            if isinstance(result, FrameRead):
                return self._accept(result)
            if result is _Miss.ABSENT:
                return None
            self._stats.torn_retries += 1
        return None
