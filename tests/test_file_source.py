"""File sources: clips generated with PyAV, played in real time, looped, video and audio in
sync through Opus; and every way a file can be bad, reported before anything streams."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import numpy as np
import pytest

from actors.stages.capture import CaptureActor
from shared.capture.audio import AudioBlock
from shared.capture.file import FilePlayback
from shared.capture.source import EndOfSource
from shared.capture.stamp import planes, read_stamp
from shared.errors import CaptureError, PermissionError
from shared.media.opus import OpusDecoder
from shared.models import AudioConfig, FileSource, Resolution, StreamQuality
from shared.pool.frame_pool import FramePool, FramePoolReader, FrameRead
from shared.pool.packet_ring import PacketRing, PacketRingReader
from shared.pool.shm import list_segments, segment_name
from tests import media_fixtures
from tests.media_fixtures import (
    CLIP_FPS,
    CLIP_TONE_HZ,
    FakeEncoder,
    fresh_session_id,
    make_clip,
    run_as_nobody,
)

public_tmp = media_fixtures.public_tmp  # a fixture, shared

QVGA = Resolution(320, 240)
INTERVAL_US = 1_000_000 // CLIP_FPS


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", seconds=0.5)


def _frame_number(pixels: np.ndarray) -> int:
    stamp = read_stamp(planes(pixels, 320, 240)[0])
    assert stamp is not None
    return stamp.frame_number


def test_probe_reports_what_the_file_holds(clip: Path) -> None:
    playback = FilePlayback.open(str(clip))
    assert (playback.width, playback.height, playback.framerate) == (320, 240, CLIP_FPS)
    assert playback.has_video and playback.has_audio
    assert playback.period_us == 500_000 and playback.video_format == "yuv420p"


def test_video_plays_in_real_time_and_loops_with_rising_stamps(clip: Path) -> None:
    source = FilePlayback.open(str(clip), loop=True).video_source(QVGA)
    out = np.empty(320 * 240 * 3 // 2, np.uint8)
    shown: list[tuple[int, int]] = []  # (clip frame number, capture_us)
    early = []
    while len(shown) < 13:
        capture_us = source.grab(timeout=0.1)
        if capture_us is None:
            continue
        early.append(capture_us - time.time_ns() // 1000)  # > 0: handed over before due
        source.fill(out, frame_number=len(shown), capture_us=capture_us)
        shown.append((_frame_number(out), capture_us))
    source.close()
    numbers = [n for n, _ in shown]
    assert numbers == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2]
    stamps = [t for _, t in shown]
    # Stamps come from media time: exactly one frame interval apart, across the loop seams.
    assert set(np.diff(stamps).tolist()) == {INTERVAL_US}
    # Real time: no frame is handed over before it is due.
    assert max(early) <= 1_000
    assert source.passes == 2


def test_a_wall_clock_step_neither_stalls_playback_nor_moves_its_stamps(
    clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pacing runs on the monotonic clock: NTP stepping the wall clock back 10 s mid-file
    does not make the next frame wait 10 s, and stamps keep their one-interval spacing."""
    source = FilePlayback.open(str(clip), loop=True).video_source(QVGA)
    stamps: list[int] = []

    def grab_until(count: int, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while len(stamps) < count:
            assert time.monotonic() < deadline, f"playback stalled after {len(stamps)} frames"
            capture_us = source.grab(timeout=0.1)
            if capture_us is not None:
                stamps.append(capture_us)

    grab_until(2, deadline_s=5.0)
    real_time_ns = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() - 10_000_000_000)
    grab_until(8, deadline_s=5.0)  # 6 frames at 10 fps: well under 5 s, far under 10 s
    source.close()
    assert set(np.diff(stamps).tolist()) == {INTERVAL_US}


def test_without_loop_the_file_ends(clip: Path) -> None:
    source = FilePlayback.open(str(clip)).video_source(QVGA)
    grabbed = 0
    with pytest.raises(EndOfSource):
        while True:
            grabbed += source.grab(timeout=0.1) is not None
    assert grabbed == 5
    source.close()


def test_audio_is_resampled_stamped_on_media_time_and_trimmed_at_the_loop(clip: Path) -> None:
    playback = FilePlayback.open(str(clip), loop=True)
    audio = playback.audio_source(AudioConfig(sample_rate=16_000, channels=1))
    blocks: list[AudioBlock] = []
    while sum(len(b.pcm) for b in blocks) < 16_000:  # a second: two passes
        block = audio.read(0.1)
        if block is not None:
            blocks.append(block)
    audio.close()
    assert all(b.pcm.ndim == 2 and b.pcm.shape[1] == 1 for b in blocks)
    # Each block starts where the previous one ended (within the resampler's 1 ms of delay) ...
    for previous, block in itertools.pairwise(blocks):
        expected = previous.capture_us + len(previous.pcm) * 1_000_000 // 16_000
        assert abs(block.capture_us - expected) <= 2_000, (previous.capture_us, block.capture_us)
    # ... and a pass is the container's half second of audio: the AAC padding past it (21 ms
    # here, 341 samples) is cut, only the resampler's delay (a dozen samples) carries over.
    first = blocks[0].capture_us
    second_pass = next(i for i, b in enumerate(blocks) if b.capture_us - first >= 500_000 - 2_000)
    assert abs(sum(len(b.pcm) for b in blocks[:second_pass]) - 8_000) <= 32
    pcm = np.concatenate([b.pcm[:, 0] for b in blocks]).astype(float)
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    assert np.argmax(spectrum) * 16_000 / len(pcm) == pytest.approx(CLIP_TONE_HZ, abs=2)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d, clip: d / "missing.mp4", r"missing\.mp4 does not exist"),
        (lambda d, clip: d, "is a folder"),
        (lambda d, clip: _write(d / "noise.mp4", bytes(range(256)) * 64), "cannot read"),
        (lambda d, clip: _write(d / "empty.mp4", b""), "cannot read"),
        # The first 60% of an MP4 whose index (moov) is written at the end.
        (
            lambda d, clip: _write(
                d / "cut.mp4", clip.read_bytes()[: len(clip.read_bytes()) * 6 // 10]
            ),
            "cannot read|truncated",
        ),
    ],
)
def test_bad_files_fail_clearly_before_streaming(
    tmp_path: Path, clip: Path, make: object, message: str
) -> None:
    path = make(tmp_path, clip)  # type: ignore[operator]
    with pytest.raises(CaptureError, match=message):
        FilePlayback.open(str(path))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_an_unreadable_file_is_a_permission_error(public_tmp: Path, clip: Path) -> None:
    locked = public_tmp / "locked.mp4"
    locked.write_bytes(clip.read_bytes())
    locked.chmod(0o000)
    with pytest.raises(PermissionError, match=r"cannot read .*locked\.mp4: permission denied"):
        run_as_nobody(FilePlayback.open, str(locked))


def test_a_file_with_picture_and_sound_stays_in_sync_through_opus(tmp_path: Path) -> None:
    """A flash and a beep at the same media time come out with the same capture time.

    The clip goes dark and silent until 0.6 s, then white with a 1 kHz beep.  Video goes
    through the capture actor into the frame pool; audio through resampling, Opus encoding
    and the audio ring, then Opus decoding.  The first white frame and the first loud sample
    must be stamped within 40 ms of each other (the issue's A/V sync bound).
    """
    flash = make_clip(tmp_path / "flash.mp4", seconds=1.2, flash_at=0.6)
    session = fresh_session_id()
    pool, ring_name = segment_name(session, "frames"), segment_name(session, "audio")
    quality = StreamQuality(resolution=QVGA, framerate=30, bitrate=300_000)
    actor = CaptureActor(
        session,
        FileSource(path=str(flash)),
        quality,
        pool,
        8,
        audio=AudioConfig(channels=2),
        audio_ring_name=ring_name,
    )

    async def main() -> tuple[list[tuple[int, float]], list[tuple[int, int, bytes]]]:
        await actor.open()
        # Read as a sender does: the ring, attached before capture starts, so from packet 1.
        ring = PacketRing.attach(ring_name)
        reader = PacketRingReader(ring)
        # Every frame, by sequence (not only the newest), so the first white one is seen.
        frame_pool = FramePool.attach(pool)
        frame_reader = FramePoolReader(frame_pool)
        pooled: list[FrameRead] = []

        def read_frames() -> None:
            for sequence in range(frame_reader.last_sequence + 1, frame_pool.latest_sequence() + 1):
                frame = frame_reader.read(sequence)
                if frame is not None:
                    pooled.append(frame)

        await actor.start(FakeEncoder())
        packets = []
        deadline = time.monotonic() + 60  # a hang guard; the clip lasts 1.2 s
        while not (await actor.stats()).ended:
            assert time.monotonic() < deadline, "the clip never ended"
            read_frames()
            packets += [(p.pts, p.capture_us, p.data) for p in reader.read_available().packets]
            await asyncio.sleep(0.005)
        stats = await actor.stop()
        # Stopping joined the capture and audio threads: every frame and packet is in now.
        read_frames()
        packets += [(p.pts, p.capture_us, p.data) for p in reader.read_available().packets]
        assert stats.audio is not None and stats.audio.packets == len(packets)
        assert reader.stats.packets_missed == 0
        assert stats.audio.error is None and stats.error is None
        assert [f.sequence for f in pooled] == list(range(1, stats.frames_captured + 1))
        frames = [(f.capture_us, float(planes(f.pixels, 320, 240)[0].mean())) for f in pooled]
        frame_pool.close()
        ring.close()
        return frames, packets

    frames, packets = asyncio.run(main())
    assert not list_segments(f"kz_{session}_")
    # Every Opus packet is 20 ms at the 48 kHz RTP clock, pts without gaps.
    assert [pts for pts, _, _ in packets] == [960 * i for i in range(len(packets))]
    flash_us = next(t for t, luma in frames if luma > 128)
    decoder = OpusDecoder(channels=2)
    pre_skip_us = 312 * 1_000_000 // 48_000  # libopus look-ahead: decoded output lags by this
    beep_us = None
    for _, capture_us, data in packets:
        pcm = decoder.decode(data)[:, 0].astype(int)
        loud = np.flatnonzero(np.abs(pcm) > 3_000)
        if loud.size:
            beep_us = capture_us + int(loud[0]) * 1_000_000 // 48_000 - pre_skip_us
            break
    assert beep_us is not None
    assert abs(beep_us - flash_us) <= 40_000, (beep_us - flash_us) / 1000
