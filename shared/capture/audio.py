"""AudioCapture: PCM from an input device (sounddevice) or a file, Opus-encoded into a ring.

Theory of operation
-------------------
An :class:`AudioSource` yields :class:`AudioBlock` s: int16 samples (frames x channels) and the
time of the first sample on two clocks, as video frames are stamped: ``capture_us`` on the
wall clock (``time.time_ns() // 1000``), which is data (viewers line audio up with video and
measure latency by it), and ``monotonic_us`` on the monotonic clock
(``time.monotonic_ns() // 1000``), which times things (a recording's file time) because NTP
may step the wall clock.  For a device both come from PortAudio's timing of each callback:
the block's first sample reached the converter ``currentTime - inputBufferAdcTime`` seconds
before the callback ran (:func:`block_start_us`), which is that long before both clocks'
readings in the callback.  Those per-callback measurements jitter by a scheduler tick, so an
:class:`AudioClock` per clock stamps blocks from the running sample count instead, anchored at
the first measurement and steered gently toward the measurements, and re-anchors only when
the two disagree by more than 100 ms (an overflow dropped samples; for the wall clock, also
an NTP step, which the monotonic stamps never see).

:class:`AudioPipeline` runs on its own thread: it reads blocks, encodes them to 20 ms Opus
packets (:mod:`shared.media.opus`) and appends each to a :class:`PacketRing` with ``pts`` in
1/48000 s, both capture stamps and ``keyframe=True`` (every Opus packet decodes on its own).
A packet's monotonic stamp is its block's plus the samples before it in the block; a source
that gives no monotonic stamp (a file, whose blocks are released when due) is stamped as its
blocks arrive, on the sample count.  Senders read the ring on their own timer; nobody is
called per packet.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Any, Final, NamedTuple, Protocol

import msgspec
import numpy as np
import numpy.typing as npt

from shared.capture.source import EndOfSource
from shared.errors import CaptureError, ConfigError
from shared.media.opus import OPUS_CLOCK, OpusEncoder
from shared.models import AudioConfig
from shared.pool.packet_ring import PacketRing

__all__ = [
    "AudioBlock",
    "AudioClock",
    "AudioInput",
    "AudioPipeline",
    "AudioSource",
    "AudioStats",
    "DeviceAudioSource",
    "block_start_us",
    "list_audio_inputs",
]

logger = logging.getLogger(__name__)

Pcm = npt.NDArray[np.int16]
#: Ring size for audio: 64 kbit/s Opus is 8 kB/s; this holds well over a minute.
AUDIO_RING_BYTES: Final = 1 << 20
AUDIO_RING_SLOTS: Final = 4096
#: A device block is 20 ms, one Opus frame: lower latency than PortAudio's default.
_BLOCK_MS: Final = 20
#: Blocks queued between the device callback and the encoder thread (2 s).
_QUEUE_BLOCKS: Final = 100


class AudioBlock(NamedTuple):
    pcm: Pcm
    #: The first sample's capture time on the wall clock (µs).
    capture_us: int
    #: The same on the monotonic clock (µs); None from a source that cannot tell, whose
    #: blocks the pipeline then stamps as they arrive.
    monotonic_us: int | None = None


class AudioSource(Protocol):
    sample_rate: int
    channels: int
    description: str

    def start(self) -> None: ...

    def read(self, timeout: float) -> AudioBlock | None:
        """The next block, or None when none arrived within ``timeout`` seconds."""
        ...

    def close(self) -> None: ...


class AudioStats(msgspec.Struct, kw_only=True):
    source: str
    sample_rate: int
    channels: int
    blocks: int = 0
    packets: int = 0
    bytes: int = 0
    #: Device overflows (samples lost before we read them) and blocks dropped by a full queue.
    overflows: int = 0
    #: Times the sample-count clock was re-anchored to the measured time.
    reanchors: int = 0
    last_capture_us: int = 0
    #: Blocks read and let go while the stream was paused (nothing of them is encoded).
    paused_blocks: int = 0
    #: A finite source (a file without loop) reached its end.
    ended: bool = False
    error: str | None = None


def block_start_us(
    *,
    now_us: int,
    current_time: float,
    adc_time: float,
    frames: int,
    sample_rate: int,
    latency_s: float,
) -> int:
    """Wall-clock time of a callback block's first sample.

    PortAudio's ``inputBufferAdcTime`` is when the first sample was captured, on the stream's
    clock, and ``currentTime`` is "now" on that clock; their difference is how long ago that
    was.  Host APIs that leave the ADC time at 0 (or give nonsense) fall back to the block's
    length plus the stream's reported latency.
    """
    age = current_time - adc_time
    if adc_time <= 0 or not 0 <= age < 1.0:
        age = frames / sample_rate + max(latency_s, 0.0)
    return now_us - round(age * 1_000_000)


class AudioClock:
    """Stamps consecutive blocks from their sample count, steered by the measured times.

    Each block is stamped ``anchor + samples / rate``: evenly spaced, as the samples are.
    The measured start times jitter by a device period or two (ALSA reports the delay in
    whole periods), so the anchor is only nudged by 1/32 of each disagreement: that follows a
    device clock that drifts against the wall clock without passing the jitter on.  A
    disagreement over ``jump_us`` is a real discontinuity (an overflow lost samples, the
    stream restarted): the measured time is taken as the new anchor.
    """

    def __init__(self, sample_rate: int, jump_us: int = 100_000) -> None:
        self._rate = sample_rate
        self._jump = jump_us
        self._anchor_us: float | None = None
        self._samples = 0
        self.reanchors = 0

    def stamp(self, frames: int, measured_us: int) -> int:
        """The capture time of a block of ``frames`` samples measured to start at ``measured_us``."""
        if self._anchor_us is not None:
            expected = self._anchor_us + self._samples * 1_000_000 / self._rate
            error = measured_us - expected
            if abs(error) <= self._jump:
                self._anchor_us += error / 32
                self._samples += frames
                return round(expected + error / 32)
            self.reanchors += 1
        self._anchor_us = float(measured_us)
        self._samples = frames
        return measured_us


class AudioInput(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    name: str
    channels: int
    default_sample_rate: float
    default: bool = False


def _sounddevice() -> Any:
    try:
        import sounddevice
    except OSError as exc:  # the module loads libportaudio at import
        raise CaptureError(
            f"audio capture needs the PortAudio library ({exc}): apt-get install libportaudio2"
        ) from None
    return sounddevice


def list_audio_inputs() -> list[AudioInput]:
    """Every input device PortAudio sees, the default marked."""
    sd = _sounddevice()
    try:
        default_input = sd.default.device[0]
    except (AttributeError, IndexError, TypeError):
        default_input = -1
    inputs = []
    for index, info in enumerate(sd.query_devices()):
        if info["max_input_channels"] > 0:
            inputs.append(
                AudioInput(
                    index=index,
                    name=str(info["name"]),
                    channels=int(info["max_input_channels"]),
                    default_sample_rate=float(info["default_samplerate"]),
                    default=index == default_input,
                )
            )
    return inputs


class DeviceAudioSource:
    """An input device through sounddevice (PortAudio): ALSA/PulseAudio, CoreAudio, WASAPI."""

    def __init__(self, config: AudioConfig) -> None:
        self.sample_rate = config.sample_rate
        self.channels = config.channels
        self._config = config
        self._queue: queue.Queue[AudioBlock] = queue.Queue(maxsize=_QUEUE_BLOCKS)
        self._clock = AudioClock(config.sample_rate)
        self._monotonic_clock = AudioClock(config.sample_rate)
        self.overflows = 0
        sd = _sounddevice()
        device = config.device
        if isinstance(device, str) and device.isdigit():
            device = int(device)  # "3" from a command line is device 3, not a name containing 3
        try:
            info = sd.query_devices(device, kind="input")
        except (ValueError, sd.PortAudioError) as exc:
            names = ", ".join(f"{i.index}: {i.name!r}" for i in list_audio_inputs()) or "none"
            wanted = "the default input" if device is None else f"audio input {device!r}"
            raise CaptureError(f"{wanted} does not exist ({exc}); inputs here: {names}") from None
        self.description = str(info["name"])
        if info["max_input_channels"] < config.channels:
            raise CaptureError(
                f"audio input {self.description!r} has {info['max_input_channels']} channels, "
                f"{config.channels} asked"
            )
        try:
            self._stream = sd.InputStream(
                device=info.get("index", device),
                channels=config.channels,
                samplerate=config.sample_rate,
                dtype="int16",
                blocksize=config.sample_rate * _BLOCK_MS // 1000,
                latency="low",
                callback=self._callback,
            )
        except sd.PortAudioError as exc:
            raise CaptureError(
                f"audio input {self.description!r} cannot capture {config.channels} channels "
                f"at {config.sample_rate} Hz: {exc}"
            ) from None
        self._latency = float(self._stream.latency)

    def _callback(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        # PortAudio's thread: copy out and return quickly; the pipeline thread does the rest.
        now_us = time.time_ns() // 1000
        monotonic_now_us = time.monotonic_ns() // 1000
        if status.input_overflow:
            self.overflows += 1
        start = block_start_us(
            now_us=now_us,
            current_time=time_info.currentTime,
            adc_time=time_info.inputBufferAdcTime,
            frames=frames,
            sample_rate=self.sample_rate,
            latency_s=self._latency,
        )
        # The first sample is as old on either clock.
        monotonic_start = monotonic_now_us - (now_us - start)
        try:
            self._queue.put_nowait(
                AudioBlock(np.array(indata, dtype=np.int16), start, monotonic_start)
            )
        except queue.Full:
            self.overflows += 1

    @property
    def reanchors(self) -> int:
        """Re-anchors of the wall-clock stamps (overflows, and NTP steps)."""
        return self._clock.reanchors

    def start(self) -> None:
        self._stream.start()

    def read(self, timeout: float) -> AudioBlock | None:
        try:
            block = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        frames = len(block.pcm)
        assert block.monotonic_us is not None  # the callback measures both
        return AudioBlock(
            block.pcm,
            self._clock.stamp(frames, block.capture_us),
            self._monotonic_clock.stamp(frames, block.monotonic_us),
        )

    def close(self) -> None:
        if not self._stream.closed:
            try:
                self._stream.stop()
            finally:
                self._stream.close()


class AudioPipeline:
    """Source -> Opus -> packet ring, on a thread of its own."""

    def __init__(
        self,
        source: AudioSource,
        ring: PacketRing,
        *,
        bitrate: int,
    ) -> None:
        if not ring.is_writer:
            raise ConfigError("the audio pipeline must own (create) its packet ring")
        self.source = source
        self.ring = ring
        self._encoder = OpusEncoder(
            sample_rate=source.sample_rate, channels=source.channels, bitrate=bitrate
        )
        self._stop = threading.Event()
        #: Set while the stream is paused: blocks are still read, so the device's buffer
        #: never overflows and the resume starts from the present, but none is encoded.
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None
        self._rate = source.sample_rate
        self._ticks_per_sample = OPUS_CLOCK // source.sample_rate
        #: Stamps the blocks of a source that gives no monotonic stamp, as they arrive.
        self._arrival_clock = AudioClock(source.sample_rate)
        #: (index of the first sample, monotonic_us) of each block whose samples may still be
        #: in the encoder; the oldest is dropped once a packet starts past it.
        self._blocks: collections.deque[tuple[int, int]] = collections.deque()
        self._samples = 0
        self._stats = AudioStats(
            source=source.description, sample_rate=source.sample_rate, channels=source.channels
        )

    def start(self) -> None:
        self.source.start()
        self._thread = threading.Thread(target=self._run, name="audio-capture", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                block = self.source.read(timeout=0.1)
                if block is None:
                    continue
                if self._paused.is_set():
                    self._stats.paused_blocks += 1
                    continue
                self._stats.blocks += 1
                self._note_block(block)
                for packet in self._encoder.encode(block.pcm, block.capture_us):
                    self.ring.append(
                        packet.data,
                        pts=packet.pts,
                        capture_us=packet.capture_us,
                        monotonic_us=self._monotonic_us(packet.pts),
                        keyframe=True,
                        duration=packet.duration,
                    )
                    self._stats.packets += 1
                    self._stats.bytes += len(packet.data)
                    self._stats.last_capture_us = packet.capture_us
        except EndOfSource:
            self._stats.ended = True
        except Exception as exc:
            # Reported through stats; the supervisor's health check moves the stream to Error.
            logger.exception("audio capture from %s failed", self.source.description)
            self._stats.error = f"{type(exc).__name__}: {exc}"

    def _note_block(self, block: AudioBlock) -> None:
        """Remember where ``block``'s samples start on the monotonic clock."""
        frames = len(block.pcm)
        monotonic_us = block.monotonic_us
        if monotonic_us is None:
            monotonic_us = self._arrival_clock.stamp(frames, time.monotonic_ns() // 1000)
        self._blocks.append((self._samples, monotonic_us))
        self._samples += frames

    def _monotonic_us(self, pts: int) -> int:
        """The monotonic stamp of the packet at ``pts``: its first sample's block's stamp plus
        the samples before it in that block (the encoder counts input samples from 0, like
        :attr:`_samples`, and pts are those counts in 1/48000 s)."""
        sample = pts // self._ticks_per_sample
        blocks = self._blocks
        while len(blocks) > 1 and blocks[1][0] <= sample:
            blocks.popleft()
        first, monotonic_us = blocks[0]
        return monotonic_us + (sample - first) * 1_000_000 // self._rate

    def pause(self) -> None:
        """Encode nothing until :meth:`resume` (the stream's Paused state).  The packets'
        timestamps go on from where they stopped (they count encoded samples), and each
        packet's capture stamp stays that of its own samples, so the pause is a gap in
        capture time, not in the RTP clock, as a paused recording expects."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def stats(self) -> AudioStats:
        stats = msgspec.structs.replace(self._stats)
        stats.overflows = int(getattr(self.source, "overflows", 0))
        stats.reanchors = int(getattr(self.source, "reanchors", 0))
        return stats

    def stop(self) -> AudioStats:
        """Stop the thread and the source (idempotent); the ring stays with its owner.

        Once this returns nothing more is written, so the figures it returns count every
        packet in the ring."""
        if not self._stop.is_set():
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
                self._thread = None
            self.source.close()
            self._encoder.close()
        return self.stats()
