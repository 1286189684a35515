"""H264Encoder / H264Decoder over real libx264 and FFmpeg's decoder."""

from __future__ import annotations

import numpy as np
import pytest

from shared.codec import MIN_BITRATE, EncoderConfig, H264Decoder, H264Encoder
from shared.errors import ConfigError, EncodingError
from shared.h264_rtp import NAL_IDR, NAL_PPS, NAL_SPS, nal_type, split_annexb
from shared.testpattern import TestPattern
from shared.viewer import read_frame_stamp

WIDTH, HEIGHT, FPS = 320, 180, 30


def make_encoder(**overrides: object) -> H264Encoder:
    settings: dict[str, object] = {
        "width": WIDTH,
        "height": HEIGHT,
        "framerate": FPS,
        "bitrate": 300_000,
        "keyframe_interval": 30,
    }
    settings.update(overrides)
    return H264Encoder(EncoderConfig(**settings))  # type: ignore[arg-type]


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


def test_keyframe_on_request_is_the_very_next_frame() -> None:
    encoded = encode_frames(make_encoder(), 20, keyframe_at=7)
    assert [index for index, _, keyframe in encoded if keyframe] == [0, 7]
    types = [nal_type(n) for n in split_annexb(encoded[7][1])]
    assert NAL_IDR in types and NAL_SPS in types


def test_decoder_reads_back_every_stamp() -> None:
    decoder = H264Decoder()
    stamps = []
    for index, data, _ in encode_frames(make_encoder(), 30):
        for frame in decoder.decode(data, pts=index * 3000):
            stamp = read_frame_stamp(frame)
            assert stamp is not None
            stamps.append(stamp.frame_number)
    assert stamps == list(range(30))
    assert decoder.decode_errors == 0


def test_decoder_counts_garbage_instead_of_raising() -> None:
    decoder = H264Decoder()
    assert decoder.decode(b"\x00\x00\x00\x01\x65" + bytes(range(256)) * 4) == []
    assert decoder.decode_errors >= 0  # FFmpeg may conceal rather than fail; it must not raise


def test_bitrate_is_clamped_and_zero_refused() -> None:
    encoder = make_encoder()
    assert encoder.set_bitrate(1) == MIN_BITRATE
    assert encoder.set_bitrate(400_000) == 400_000
    with pytest.raises(ConfigError):
        encoder.set_bitrate(0)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"bitrate": 0}, ConfigError, "bitrate"),
        ({"width": 321}, ConfigError, "even"),
        ({"height": 0}, ConfigError, "even"),
        ({"keyframe_interval": 0}, ConfigError, "keyframe"),
        ({"codec": "no_such_codec"}, EncodingError, "not available"),
    ],
)
def test_bad_config_says_why(
    overrides: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        make_encoder(**overrides)


def test_wrong_frame_size_is_an_encoding_error() -> None:
    with pytest.raises(EncodingError, match="does not match"):
        make_encoder().encode(np.zeros(100, np.uint8), pts=0, capture_us=0)
