"""Audio capture: timing and Opus in isolation, then for real: a 440 Hz tone played into a
PulseAudio null sink, captured from its monitor through sounddevice, Opus-encoded into the
audio ring, decoded again and found by FFT."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from actors.stages.capture import CaptureActor
from shared.capture.audio import (
    AudioClock,
    AudioPipeline,
    DeviceAudioSource,
    block_start_us,
    list_audio_inputs,
)
from shared.errors import CaptureError
from shared.media.opus import OPUS_CLOCK, OpusDecoder, OpusEncoder
from shared.models import AudioConfig, Resolution, StreamQuality, TestPatternSource
from shared.pool.packet_ring import PacketRing, PacketRingReader, RingPacket
from shared.pool.shm import list_segments, segment_name
from tests import media_fixtures
from tests.media_fixtures import (
    FakeEncoder,
    PulseServer,
    fresh_session_id,
    tone,
)

pulse = media_fixtures.pulse  # a fixture, shared

TONE_HZ = 440.0


def peak_hz(pcm: np.ndarray, rate: int) -> float:
    """The strongest frequency in the first channel."""
    signal = pcm[:, 0].astype(float)
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    spectrum[0] = 0
    return float(np.argmax(spectrum) * rate / len(signal))


def sine(rate: int, channels: int, seconds: float, hz: float = TONE_HZ) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = (np.sin(2 * np.pi * hz * t) * 12_000).astype(np.int16)
    return np.repeat(mono[:, None], channels, axis=1)


# --- timing -----------------------------------------------------------------------------------


def test_block_start_uses_the_adc_time_when_it_makes_sense() -> None:
    # The first sample reached the converter 15 ms before the callback ran.
    assert (
        block_start_us(
            now_us=10_000_000,
            current_time=500.015,
            adc_time=500.0,
            frames=960,
            sample_rate=48_000,
            latency_s=0.04,
        )
        == 9_985_000
    )
    # No ADC time (some host APIs): the block's length plus the stream latency.
    assert (
        block_start_us(
            now_us=10_000_000,
            current_time=500.0,
            adc_time=0.0,
            frames=960,
            sample_rate=48_000,
            latency_s=0.01,
        )
        == 9_970_000
    )
    # Nonsense (the ADC time in the future): the same fallback.
    assert (
        block_start_us(
            now_us=10_000_000,
            current_time=500.0,
            adc_time=501.0,
            frames=480,
            sample_rate=48_000,
            latency_s=0.0,
        )
        == 9_990_000
    )


def test_audio_clock_stamps_from_the_sample_count_and_re_anchors_on_a_jump() -> None:
    clock = AudioClock(48_000)
    assert clock.stamp(960, 1_000_000) == 1_000_000
    # Measurements jitter by a period; the stamps move by 1/32 of it, not by all of it.
    assert clock.stamp(960, 1_016_000) == 1_020_000 - 125
    assert clock.stamp(960, 1_040_000) == 1_040_000 - 125 + 4  # and back by 1/32 of 125
    assert clock.reanchors == 0
    # A device clock running 0.1% slow against the wall clock: the stamps follow it.
    clock = AudioClock(48_000)
    for block in range(500):  # 10 s
        stamp = clock.stamp(960, round(block * 20_020))
    assert abs(stamp - 499 * 20_020) < 1_000 and clock.reanchors == 0
    # 200 ms of samples lost (an overflow): the measurement wins at once.
    assert clock.stamp(960, stamp + 220_000) == stamp + 220_000
    assert clock.reanchors == 1


# --- Opus -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "channels"), [(48_000, 2), (16_000, 1), (24_000, 2)])
def test_opus_round_trip_keeps_the_tone_and_the_rtp_clock(rate: int, channels: int) -> None:
    encoder = OpusEncoder(sample_rate=rate, channels=channels, bitrate=48_000)
    pcm = sine(rate, channels, 1.0)
    packets = []
    block = rate // 100 * 3  # 30 ms blocks: not a multiple of the 20 ms frame
    for start in range(0, len(pcm), block):
        packets += encoder.encode(pcm[start : start + block], 5_000_000 + start * 1_000_000 // rate)
    assert len(packets) == 50
    # RFC 7587: timestamps count 48 kHz samples whatever the input rate; 960 per 20 ms.
    assert [p.pts for p in packets] == [960 * i for i in range(50)]
    assert {p.duration for p in packets} == {960}
    # Each packet carries the capture time of its first input sample.
    assert [p.capture_us for p in packets] == [5_000_000 + 20_000 * i for i in range(50)]
    decoder = OpusDecoder(channels=channels)
    decoded = np.concatenate([decoder.decode(p.data) for p in packets])
    assert decoded.shape == (48_000, channels)
    assert peak_hz(decoded[12_000:], OPUS_CLOCK) == pytest.approx(TONE_HZ, abs=2)


def test_opus_rejects_what_it_cannot_encode() -> None:
    from shared.errors import ConfigError

    with pytest.raises(ConfigError):
        OpusEncoder(sample_rate=44_100, channels=2, bitrate=64_000)
    encoder = OpusEncoder(sample_rate=48_000, channels=2, bitrate=64_000)
    with pytest.raises(ConfigError):
        encoder.encode(np.zeros((960, 1), np.int16), 0)


# --- PulseAudio -------------------------------------------------------------------------------


@pytest.fixture
def playing(pulse: PulseServer, tmp_path: Path) -> Iterator[PulseServer]:
    """A 440 Hz tone playing into the null sink for the length of the test."""
    pulse.play(tone(tmp_path / "tone.wav", hz=TONE_HZ, seconds=60))
    try:
        yield pulse
    finally:
        pulse.stop_players()


def read_ring(reader: PacketRingReader, count: int) -> list[RingPacket]:
    """Packets from the ring until there are at least ``count``.

    The ring has no wake-up (senders poll it on their own timer), so this polls too; the
    deadline only stops a broken test from hanging, and nothing asserts on time.
    """
    packets: list[RingPacket] = []
    deadline = time.monotonic() + 30
    while len(packets) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{len(packets)} audio packets in 30 s, waiting for {count}")
        time.sleep(0.01)
        packets += reader.read_available().packets
    return packets


async def read_ring_async(reader: PacketRingReader, count: int) -> list[RingPacket]:
    """:func:`read_ring` inside an event loop that runs the capture actor."""
    packets: list[RingPacket] = []
    deadline = time.monotonic() + 30
    while len(packets) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{len(packets)} audio packets in 30 s, waiting for {count}")
        await asyncio.sleep(0.01)
        packets += reader.read_available().packets
    return packets


def test_the_default_input_is_the_null_sinks_monitor(pulse: PulseServer) -> None:
    inputs = list_audio_inputs()
    assert inputs and any(i.default for i in inputs)


def test_a_tone_is_captured_encoded_into_the_ring_and_decoded(playing: PulseServer) -> None:
    session = fresh_session_id()
    ring = PacketRing.create(segment_name(session, "audio"), capacity_bytes=1 << 20)
    reader = PacketRingReader(ring)
    config = AudioConfig(sample_rate=48_000, channels=2, bitrate=64_000)
    pipeline = AudioPipeline(DeviceAudioSource(config), ring, bitrate=config.bitrate)
    started_us = time.time_ns() // 1000
    pipeline.start()
    try:
        packets = read_ring(reader, 100)  # 2 s
    finally:
        stats = pipeline.stop()
        ring.close()
        ring.unlink()
    assert len(packets) >= 100 and stats.error is None
    assert all(p.keyframe and p.duration == 960 for p in packets)
    pts = [p.pts for p in packets]
    assert pts == list(range(pts[0], pts[0] + 960 * len(pts), 960))
    # Stamped on the wall clock, one packet every 20 ms: the sample-count clock, steered by
    # 1/32 of a disagreement that is at most the re-anchor threshold (AudioClock); only a
    # re-anchor (after an overflow) may break that spacing, once each.
    stamps = np.array([p.capture_us for p in packets])
    assert stamps[0] >= started_us - 1_000_000
    off_step = np.abs(np.diff(stamps) - 20_000) > 100_000 // 32 + 100
    assert int(off_step.sum()) <= stats.reanchors
    decoder = OpusDecoder(channels=2)
    pcm = np.concatenate([decoder.decode(p.data) for p in packets[25:]])
    assert peak_hz(pcm, OPUS_CLOCK) == pytest.approx(TONE_HZ, abs=2)
    assert np.abs(pcm).max() > 2_000  # the tone, not silence
    assert stats.packets >= len(packets) and stats.sample_rate == 48_000


def test_a_paused_pipeline_encodes_nothing_and_resumes_where_its_clock_stopped(
    playing: PulseServer,
) -> None:
    """The stream's Paused state for audio: the device is still read (its blocks counted as
    let go), nothing reaches the ring, and after the resume the RTP clock goes on from the
    last packet while the capture stamps jump by the pause."""
    session = fresh_session_id()
    ring = PacketRing.create(segment_name(session, "audio"), capacity_bytes=1 << 20)
    reader = PacketRingReader(ring)
    config = AudioConfig(sample_rate=48_000, channels=2, bitrate=64_000)
    pipeline = AudioPipeline(DeviceAudioSource(config), ring, bitrate=config.bitrate)
    pipeline.start()
    try:
        before = read_ring(reader, 25)
        pipeline.pause()
        # Whatever the encoder had in hand when the pause came may still land; then nothing.
        deadline = time.monotonic() + 30
        while pipeline.stats().paused_blocks < 3:
            assert time.monotonic() < deadline, "no block read while paused"
            time.sleep(0.01)
        before += reader.read_available().packets
        paused = pipeline.stats()
        while pipeline.stats().paused_blocks < paused.paused_blocks + 25:  # about 0.5 s more
            assert time.monotonic() < deadline, "the device stopped being read while paused"
            time.sleep(0.01)
        assert reader.read_available().packets == []
        assert pipeline.stats().packets == paused.packets
        pipeline.resume()
        after = read_ring(reader, 10)
    finally:
        stats = pipeline.stop()
        ring.close()
        ring.unlink()
    assert stats.error is None and stats.paused_blocks >= 28
    assert after[0].pts == before[-1].pts + 960  # the RTP clock did not run during the pause
    assert after[0].capture_us - before[-1].capture_us > 400_000  # capture time did


def test_a_missing_audio_device_is_a_capture_error_naming_it(pulse: PulseServer) -> None:
    with pytest.raises(
        CaptureError, match="audio input 'no-such-microphone' does not exist"
    ) as caught:
        DeviceAudioSource(AudioConfig(device="no-such-microphone"))
    assert "inputs here:" in str(caught.value) and "pulse" in str(caught.value)
    with pytest.raises(CaptureError, match="audio input 97 does not exist"):
        DeviceAudioSource(AudioConfig(device=97))


def test_the_capture_actor_runs_audio_alone_and_with_video(playing: PulseServer) -> None:
    quality = StreamQuality(resolution=Resolution(320, 240), framerate=15, bitrate=300_000)

    async def run(video: bool) -> None:
        session = fresh_session_id()
        ring_name = segment_name(session, "audio")
        actor = CaptureActor(
            session,
            TestPatternSource(),
            quality,
            segment_name(session, "frames"),
            4,
            audio=AudioConfig(channels=1, sample_rate=24_000),
            audio_ring_name=ring_name,
            video=video,
        )
        await actor.open()
        # Read as a sender does: the ring, attached before capture starts, so from packet 1.
        ring = PacketRing.attach(ring_name)
        reader = PacketRingReader(ring)
        encoder = FakeEncoder()
        await actor.start(encoder if video else None)
        packets = await read_ring_async(reader, 50)
        # Paused, the actor lets the microphone's blocks go, video or not; resumed, it
        # encodes again.
        await actor.pause()
        deadline = time.monotonic() + 30
        while (paused := (await actor.stats()).audio) is None or paused.paused_blocks < 5:
            assert time.monotonic() < deadline, "audio still encoded while paused"
            await asyncio.sleep(0.01)
        await actor.resume()
        packets += await read_ring_async(reader, 10)
        stats = await actor.stop()
        packets += reader.read_available().packets  # stop joined the audio thread: all here
        ring.close()
        assert stats.audio is not None and stats.error is None
        assert [p.sequence for p in packets] == list(range(1, stats.audio.packets + 1))
        assert reader.stats.packets_missed == 0
        pcm = np.concatenate([OpusDecoder(channels=1).decode(p.data) for p in packets])
        assert peak_hz(pcm[4_800:], OPUS_CLOCK) == pytest.approx(TONE_HZ, abs=2)
        if video:
            assert stats.frames_captured > 0
        else:
            assert stats.frames_captured == 0 and stats.source is None
        assert not list_segments(f"kz_{session}_")

    asyncio.run(run(video=False))
    asyncio.run(run(video=True))


def test_a_missing_audio_device_fails_the_actor_open_and_leaves_nothing(pulse: PulseServer) -> None:
    session = fresh_session_id()
    quality = StreamQuality(resolution=Resolution(320, 240), framerate=15, bitrate=300_000)
    actor = CaptureActor(
        session,
        TestPatternSource(),
        quality,
        segment_name(session, "frames"),
        4,
        audio=AudioConfig(device="no-such-microphone"),
        audio_ring_name=segment_name(session, "audio"),
    )

    async def main() -> None:
        with pytest.raises(CaptureError, match="no-such-microphone"):
            await actor.open()

    asyncio.run(main())
    assert not list_segments(f"kz_{session}_")
