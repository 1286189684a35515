"""Audio next to video: Opus over RTP (RFC 7587) on flows 2/3, decoded, and lined up by SR."""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
import pytest

from shared.errors import ProtocolError
from shared.rtp.opus import OpusDecoder, OpusPayloadFormat, check_opus_packet, opus_frame_count
from shared.rtp.sender import AUDIO_TRACK, VIDEO_TRACK
from shared.viewer.client import DecodedAudio, DecodedFrame, Viewer
from tests.test_roq_loopback import FPS, Broadcast, until

SAMPLES = 960  # 20 ms at 48 kHz


def opus_encoder() -> av.AudioCodecContext:
    encoder = av.CodecContext.create("libopus", "w")
    encoder.sample_rate = 48_000
    encoder.layout = "stereo"
    encoder.format = "s16"
    encoder.bit_rate = 64_000
    encoder.time_base = fractions.Fraction(1, 48_000)
    encoder.open()
    return encoder


def tone(index: int) -> av.AudioFrame:
    t = (np.arange(SAMPLES) + index * SAMPLES) / 48_000
    samples = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
    frame = av.AudioFrame.from_ndarray(
        np.stack([samples, samples]).T.reshape(1, -1), format="s16", layout="stereo"
    )
    frame.sample_rate = 48_000
    frame.pts = index * SAMPLES
    return frame


def send_video(broadcast: Broadcast, index: int, capture_us: int) -> None:
    """``Broadcast.send_one``, but with the capture time the caller gives."""
    pixels = broadcast.pattern.render(index, capture_us)
    for unit in broadcast.encoder.encode(pixels, pts=index * 3000, capture_us=capture_us):
        broadcast.sender.send(
            0,
            unit.data,
            pts=unit.pts,
            capture_us=unit.capture_us,
            keyframe=unit.keyframe,
            now=time.monotonic(),
            wall_now=time.time(),
        )


def test_opus_packet_rules() -> None:
    encoder = opus_encoder()
    packets = [bytes(p) for i in range(5) for p in encoder.encode(tone(i))]
    for packet in packets:
        check_opus_packet(packet)
        assert opus_frame_count(packet) >= 1
    decoder = OpusDecoder()
    decoded = [f for p in packets for f in decoder.decode(p)]
    assert decoded and decoded[0].sample_rate == 48_000 and decoder.decode_errors == 0
    for bad in (
        b"",
        b"\x01\x00",  # code 1: two equal frames need an even length
        b"\x02\xff",
        b"\x03",
        b"\x03\x00",
        b"\x03\x41\x05",  # padding longer than the packet
        b"\x03\x83\x05",  # VBR frame lengths missing
        b"\x03\xff",
    ):
        with pytest.raises(ProtocolError):
            check_opus_packet(bad)
    assert OpusPayloadFormat().assemble([packets[0]]) == ([packets[0]], True)
    with pytest.raises(ProtocolError):
        OpusPayloadFormat().assemble([packets[0], packets[1]])


def test_audio_and_video_arrive_decode_and_line_up() -> None:
    async def main() -> tuple[list[DecodedFrame], list[DecodedAudio], Viewer]:
        broadcast = Broadcast(tracks=(VIDEO_TRACK, AUDIO_TRACK))
        url = await broadcast.start()
        viewer = await Viewer.connect(url, reconnect=False)
        pictures: list[DecodedFrame] = []
        sounds: list[DecodedAudio] = []

        async def consume() -> None:
            async for item in viewer.media():
                (pictures if isinstance(item, DecodedFrame) else sounds).append(item)  # type: ignore[arg-type]

        task = asyncio.create_task(consume())
        await until(lambda: len(broadcast.sender.peers) == 1, "the server to see the viewer")
        encoder = opus_encoder()
        started, started_us = time.monotonic(), time.time_ns() // 1000
        audio_index = 0
        for index in range(90):  # 3 s of video, with 20 ms audio packets in between
            # Captured on the schedule the pts follow, as a real source is, so a send made late
            # by a busy machine does not skew the SR's RTP-to-capture mapping (RFC 3550 §6.4.1).
            send_video(broadcast, index, started_us + index * 1_000_000 // FPS)
            while audio_index * 0.02 <= (index + 1) / FPS:
                for packet in encoder.encode(tone(audio_index)):
                    broadcast.sender.send(
                        1,
                        bytes(packet),
                        pts=audio_index * SAMPLES,
                        capture_us=started_us + audio_index * 20_000,
                        keyframe=True,
                        now=time.monotonic(),
                        wall_now=time.time(),
                    )
                audio_index += 1
            await asyncio.sleep(max(0.0, started + (index + 1) / FPS - time.monotonic()))
        await until(
            lambda: len(pictures) == 90 and len(sounds) >= 140, "the last pictures and sound"
        )
        await broadcast.server.close()
        await asyncio.wait_for(task, 5)
        await viewer.close()
        return pictures, sounds, viewer

    pictures, sounds, viewer = asyncio.run(main())
    report = viewer.report()
    assert len(pictures) == 90 and report.decode_errors == 0
    assert report.audio_frames_decoded >= 140 and report.audio_decode_errors == 0
    assert all(s.frame.sample_rate == 48_000 for s in sounds)
    # The SR maps RTP time to the capture clock: it agrees with the picture's own stamp (to
    # the RTP clock's resolution and the SR's rounding: well under a millisecond).
    mapped = [p for p in pictures if p.capture_us is not None and p.stamp is not None]
    assert len(mapped) > 30
    assert max(abs(p.capture_us - p.stamp.capture_us) for p in mapped) < 1_000  # type: ignore[operator,union-attr]
    assert report.av_offset_ms is not None and abs(report.av_offset_ms) < 100
