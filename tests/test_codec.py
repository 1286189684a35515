"""H264Encoder / H264Decoder over real libx264 and FFmpeg's decoder."""

from __future__ import annotations

from typing import Any

import av
import numpy as np
import pytest

from shared.capture.stamp import Stamp, read_stamp
from shared.capture.testpattern import TestPattern
from shared.errors import ConfigError, EncodingError
from shared.media.codec import (
    MIN_BITRATE,
    EncoderConfig,
    EncoderConfigError,
    H264Decoder,
    H264Encoder,
    get_encoder_capabilities,
)
from shared.rtp.h264 import NAL_IDR, NAL_PPS, NAL_SPS, nal_type, split_annexb

WIDTH, HEIGHT, FPS = 320, 180, 30


def make_encoder(**overrides: object) -> H264Encoder:
    settings: dict[str, object] = {
        "width": WIDTH,
        "height": HEIGHT,
        "framerate": FPS,
        "bitrate": 300_000,
        "keyframe_interval": 30,
        # One thread: x264's output is then the same on every machine.
        "threads": 1,
    }
    settings.update(overrides)
    return H264Encoder(EncoderConfig(**settings))  # type: ignore[arg-type]


def frame_stamp(frame: av.VideoFrame) -> Stamp | None:
    plane = frame.planes[0]
    luma = np.frombuffer(memoryview(plane), dtype=np.uint8).reshape(-1, plane.line_size)
    return read_stamp(luma[: frame.height, : frame.width])


def luma_psnr(frame: av.VideoFrame, source: np.ndarray) -> float:
    width, height = frame.width, frame.height
    decoded = frame.to_ndarray()[:height].astype(np.float64)
    original = source[: width * height].reshape(height, width).astype(np.float64)
    mse = float(np.mean((decoded - original) ** 2))
    return float(10 * np.log10(255**2 / max(mse, 1e-9)))


def encode_frames(
    encoder: H264Encoder, count: int, *, keyframe_at: int | None = None
) -> list[tuple[int, bytes, bool]]:
    pattern = TestPattern(WIDTH, HEIGHT, FPS)
    out = []
    for index in range(count):
        if index == keyframe_at:
            encoder.request_keyframe()
        for frame in encoder.encode(
            pattern.render(index, 1_000 + index), pts=index * 3000, capture_us=1_000 + index
        ):
            out.append((index, frame.data, frame.keyframe))
    return out


def test_one_access_unit_per_frame_idr_first_with_parameter_sets() -> None:
    encoded = encode_frames(make_encoder(), 40)
    assert [index for index, _, _ in encoded] == list(range(40))  # zerolatency: no delay
    types = [nal_type(n) for n in split_annexb(encoded[0][1])]
    assert NAL_SPS in types and NAL_PPS in types and NAL_IDR in types
    keyframes = [index for index, _, keyframe in encoded if keyframe]
    assert keyframes == [0, 30]  # the periodic IDR every keyframe_interval frames
    for index, data, _ in encoded:
        if index == 30:  # every IDR carries its parameter sets, not only the first
            assert {NAL_SPS, NAL_PPS, NAL_IDR} <= {nal_type(n) for n in split_annexb(data)}


def test_keyframe_on_request_is_the_very_next_frame() -> None:
    encoded = encode_frames(make_encoder(), 20, keyframe_at=7)
    assert [index for index, _, keyframe in encoded if keyframe] == [0, 7]
    types = [nal_type(n) for n in split_annexb(encoded[7][1])]
    assert NAL_IDR in types and NAL_SPS in types


def test_a_forced_keyframe_argument_makes_an_idr_too() -> None:
    encoder = make_encoder()
    pattern = TestPattern(WIDTH, HEIGHT, FPS)
    flags = [
        frame.keyframe
        for index in range(10)
        for frame in encoder.encode(
            pattern.render(index, 0), pts=index * 3000, capture_us=0, keyframe=index == 4
        )
    ]
    assert [i for i, k in enumerate(flags) if k] == [0, 4]


def test_decoder_reads_back_every_stamp() -> None:
    decoder = H264Decoder()
    stamps = []
    for index, data, _ in encode_frames(make_encoder(), 30):
        for frame in decoder.decode(data, pts=index * 3000):
            stamp = frame_stamp(frame)
            assert stamp is not None
            stamps.append(stamp.frame_number)
    assert stamps == list(range(30))
    assert decoder.decode_errors == 0


def test_decoder_counts_garbage_instead_of_raising_and_recovers_at_a_keyframe() -> None:
    decoder = H264Decoder()
    # An IDR slice with no parameter sets before it: FFmpeg refuses it (an error, counted).
    assert decoder.decode(b"\x00\x00\x00\x01\x65" + bytes(range(256)) * 4) == []
    assert (decoder.decode_errors, decoder.frames_decoded) == (1, 0)
    assert decoder.decode(b"not h.264 at all" * 8) == []
    assert (decoder.decode_errors, decoder.frames_decoded) == (2, 0)
    # The same decoder then decodes a real stream from its first IDR, every picture intact.
    stamps = []
    for index, data, _ in encode_frames(make_encoder(), 10):
        for frame in decoder.decode(data, pts=index * 3000):
            stamp = frame_stamp(frame)
            assert stamp is not None
            stamps.append(stamp.frame_number)
    assert stamps == list(range(10))
    assert (decoder.decode_errors, decoder.frames_decoded) == (2, 10)


def test_bitrate_is_clamped_and_zero_refused() -> None:
    encoder = make_encoder()
    assert encoder.set_bitrate(1) == MIN_BITRATE
    assert encoder.set_bitrate(300_000) == 300_000
    with pytest.raises(ConfigError):
        encoder.set_bitrate(0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bitrate": 0}, "bitrate 0 must be positive"),
        ({"width": 321}, "321x180: 4:2:0 encoding needs positive, even dimensions"),
        ({"height": 181}, "even dimensions"),
        ({"height": 0}, "even"),
        ({"keyframe_interval": 0}, "keyframe"),
        ({"framerate": 0}, "frame rate 0"),
        ({"max_bitrate": 100_000}, "below the bitrate"),
        ({"codec": "no_such_codec"}, "encoder 'no_such_codec' is not available"),
    ],
)
def test_bad_config_is_an_encoding_error_with_the_reason(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(EncodingError, match=message):
        make_encoder(**overrides)


def test_bad_config_is_also_a_config_error() -> None:
    # Callers that catch ConfigError (or ValueError) for bad arguments still do.
    with pytest.raises(ConfigError):
        make_encoder(bitrate=0)
    assert issubclass(EncoderConfigError, ValueError)


def test_wrong_frame_size_is_an_encoding_error() -> None:
    with pytest.raises(EncodingError, match="does not match"):
        make_encoder().encode(np.zeros(100, np.uint8), pts=0, capture_us=0)
    wrong = av.VideoFrame(64, 64, "yuv420p")
    with pytest.raises(EncodingError, match="scale it first"):
        make_encoder().encode_frame(wrong, pts=0, capture_us=0)


def test_resolution_and_frame_rate_change_at_an_idr_with_continuous_timestamps() -> None:
    """A new size reopens the encoder at the next frame: an IDR with new parameter sets, pts
    running on, and a decoder that just carries on at the new size."""
    encoder = make_encoder()
    decoder = H264Decoder()
    small, large = TestPattern(WIDTH, HEIGHT, FPS), TestPattern(640, 360, 15)
    decoded: list[tuple[int, int, int, int | None]] = []
    keyframes: list[int] = []
    pts = 0
    for index in range(40):
        if index == 20:
            reopened = encoder.configure_encoder(
                EncoderConfig(
                    width=640,
                    height=360,
                    framerate=15,
                    bitrate=500_000,
                    keyframe_interval=15,
                    threads=1,
                )
            )
            assert reopened
        pattern, step = (small, 3000) if index < 20 else (large, 6000)
        for access_unit in encoder.encode(pattern.render(index, 0), pts=pts, capture_us=0):
            assert access_unit.pts == pts
            if access_unit.keyframe:
                keyframes.append(index)
            for frame in decoder.decode(access_unit.data, pts=access_unit.pts):
                stamp = frame_stamp(frame)
                number = stamp.frame_number if stamp is not None else None
                decoded.append((frame.width, frame.height, int(frame.pts or 0), number))
        pts += step
    assert keyframes == [0, 20, 35]  # the switch is an IDR; then every 15 frames at 15 fps
    assert [(w, h) for w, h, _, _ in decoded] == [(320, 180)] * 20 + [(640, 360)] * 20
    assert [n for _, _, _, n in decoded] == list(range(40))  # every picture, in order
    timestamps = [p for _, _, p, _ in decoded]
    assert timestamps == sorted(timestamps) and len(set(timestamps)) == 40
    assert decoder.decode_errors == 0
    assert encoder.reconfigurations == 1


def test_a_bitrate_change_within_the_ceiling_needs_no_new_session() -> None:
    encoder = make_encoder(bitrate=300_000, max_bitrate=600_000)
    config = encoder.config
    assert not encoder.configure_encoder(EncoderConfig(**{**_fields(config), "bitrate": 500_000}))
    assert encoder.reconfigurations == 0
    # Above the ceiling the encoder must reopen (libx264 cannot raise it in place).
    assert encoder.set_bitrate(900_000) == 900_000
    encode_frames(encoder, 2)
    assert encoder.reconfigurations == 1


def _fields(config: EncoderConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__struct_fields__}


def measure(sizes: list[int], frames: slice, fps: int) -> float:
    chunk = sizes[frames]
    return sum(chunk) * 8 / (len(chunk) / fps)


@pytest.mark.parametrize(
    ("width", "height", "fps", "bitrate"),
    [(640, 360, 30, 400_000), (854, 480, 15, 500_000), (426, 240, 30, 200_000)],
)
def test_bitrate_over_ten_seconds_of_the_test_pattern_is_within_15_percent(
    width: int, height: int, fps: int, bitrate: int
) -> None:
    encoder = H264Encoder(
        EncoderConfig(
            width=width,
            height=height,
            framerate=fps,
            bitrate=bitrate,
            keyframe_interval=2 * fps,
            threads=1,
        )
    )
    pattern = TestPattern(width, height, fps)
    sizes = [
        len(frame.data)
        for index in range(10 * fps)
        for frame in encoder.encode(
            pattern.render(index, 0), pts=index * 90_000 // fps, capture_us=0
        )
    ]
    assert len(sizes) == 10 * fps
    measured = measure(sizes, slice(None), fps)
    assert 0.85 * bitrate <= measured <= 1.15 * bitrate, (measured, encoder.encoder_bitrate)


@pytest.mark.parametrize(("before", "after"), [(600_000, 300_000), (300_000, 600_000)])
def test_a_live_bitrate_change_takes_effect_within_one_gop_without_a_glitch(
    before: int, after: int
) -> None:
    """Halving or doubling the target mid-stream: one GOP later the output follows it; no IDR
    is inserted, every frame decodes, and no frame's quality collapses on the way."""
    width, height, fps, gop = 640, 360, 30, 30
    encoder = H264Encoder(
        EncoderConfig(
            width=width,
            height=height,
            framerate=fps,
            bitrate=before,
            max_bitrate=600_000,
            keyframe_interval=gop,
            threads=1,
        )
    )
    decoder = H264Decoder()
    pattern = TestPattern(width, height, fps)
    sizes: list[int] = []
    keyframes: list[int] = []
    psnr: list[float] = []
    switch = 5 * fps
    for index in range(10 * fps):
        if index == switch:
            encoder.set_bitrate(after)
        source = pattern.render(index, 0)
        for access_unit in encoder.encode(source, pts=index * 3000, capture_us=0):
            sizes.append(len(access_unit.data))
            if access_unit.keyframe:
                keyframes.append(index)
            psnr += [luma_psnr(frame, source) for frame in decoder.decode(access_unit.data)]
    assert keyframes == list(range(0, 10 * fps, gop))  # the change added no IDR
    assert len(psnr) == 10 * fps and decoder.decode_errors == 0
    assert min(psnr) >= 28.0, min(psnr)
    old = measure(sizes, slice(fps, switch), fps)
    new = measure(sizes, slice(switch + gop, None), fps)
    assert 0.8 * before <= old <= 1.2 * before
    assert 0.8 * after <= new <= 1.2 * after, (old, new)


def test_decoder_asked_for_hardware_decodes_here_in_software_or_on_the_device() -> None:
    decoder = H264Decoder(hardware=True)
    frames = [
        frame
        for index, data, _ in encode_frames(make_encoder(), 10)
        for frame in decoder.decode(data, pts=index * 3000)
    ]
    assert len(frames) == 10 and decoder.decode_errors == 0
    # Where the probe found no hardware decode path (this machine), it decodes in software.
    assert decoder.hardware == (get_encoder_capabilities().chosen_decoder != "h264")


def test_decoder_with_a_hardware_path_that_cannot_open_falls_back_to_software() -> None:
    decoder = H264Decoder(hardware="h264+no_such_device")
    assert not decoder.hardware and decoder.hardware_fallbacks == 1
    assert decoder.fallback_reason and "h264+no_such_device" in decoder.fallback_reason
    frames = [f for _, data, _ in encode_frames(make_encoder(), 5) for f in decoder.decode(data)]
    assert len(frames) == 5
