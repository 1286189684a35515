"""H.264 RTP payload format (RFC 6184): real x264 output survives packetize -> depacketize."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ConfigError, ProtocolError
from shared.rtp.h264 import (
    NAL_AUD,
    NAL_FU_A,
    NAL_IDR,
    NAL_PPS,
    NAL_SEI,
    NAL_SPS,
    NAL_STAP_A,
    H264Depacketizer,
    H264Packetizer,
    H264PayloadFormat,
    ParameterSets,
    is_keyframe,
    nal_type,
    split_annexb,
    to_annexb,
)

SETTINGS = settings(max_examples=200, derandomize=True, deadline=None)
MTUS = [300, 1100, 1400]


def encode_access_units(count: int = 5, seed: int = 7) -> list[bytes]:
    """Annex B access units from libx264 encoding seeded noise (640x360)."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 640, 360, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.framerate = Fraction(30)
    encoder.options = {
        "tune": "zerolatency",
        "preset": "ultrafast",
        "x264-params": "repeat-headers=1:annexb=1",
    }
    rng = np.random.default_rng(seed)
    units: list[bytes] = []
    for index in range(count):
        noise = rng.integers(0, 256, (360 * 3 // 2, 640), dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(noise, format="yuv420p")
        frame.pts = index
        units += [bytes(packet) for packet in encoder.encode(frame)]
    units += [bytes(packet) for packet in encoder.encode(None)]
    return units


def decode_access_units(units: list[bytes]) -> list[av.VideoFrame]:
    decoder = av.CodecContext.create("h264", "r")
    frames: list[av.VideoFrame] = []
    for unit in [*units, b""]:
        for packet in decoder.parse(unit):
            frames += decoder.decode(packet)
    frames += decoder.decode(None)
    return frames


@pytest.fixture(scope="module")
def access_units() -> list[bytes]:
    return encode_access_units()


def depacketize(payloads: list[bytes]) -> list[bytes]:
    depacketizer = H264Depacketizer()
    nal_units = [nal for payload in payloads for nal in depacketizer.push(payload)]
    assert not depacketizer.in_fragment
    return nal_units


@pytest.mark.parametrize("mtu", MTUS)
def test_real_encoder_output_round_trips_and_decodes(access_units: list[bytes], mtu: int) -> None:
    assert len(access_units) == 5
    packetizer = H264Packetizer(mtu=mtu)
    rebuilt: list[bytes] = []
    for unit in access_units:
        nal_units = split_annexb(unit)
        payloads = packetizer.packetize(nal_units)
        assert all(len(payload) <= mtu for payload in payloads)
        received = depacketize(payloads)
        assert received == nal_units  # byte-exact, NAL by NAL
        rebuilt.append(to_annexb(received))
    frames = decode_access_units(rebuilt)
    assert len(frames) == len(access_units)
    assert (frames[0].width, frames[0].height) == (640, 360)


@pytest.mark.parametrize("mtu", MTUS)
def test_parameter_sets_share_a_stap_a(access_units: list[bytes], mtu: int) -> None:
    nal_units = split_annexb(access_units[0])
    assert [nal_type(nal) for nal in nal_units[:2]] == [NAL_SPS, NAL_PPS]
    assert is_keyframe(nal_units) and not is_keyframe(split_annexb(access_units[1]))
    first = H264Packetizer(mtu=mtu).packetize(nal_units)[0]
    assert nal_type(first) == NAL_STAP_A
    assert H264Depacketizer().push(first)[:2] == nal_units[:2]
    assert first[0] & 0x60 == max(nal[0] & 0x60 for nal in H264Depacketizer().push(first))


def test_fu_a_fragments() -> None:
    nal = bytes([0x65]) + bytes(range(256)) * 20  # IDR slice, NRI=3, 5121 bytes
    payloads = H264Packetizer(mtu=1100).packetize([nal])
    assert len(payloads) == 5
    sizes = [len(p) for p in payloads]
    assert max(sizes) <= 1100 and max(sizes) - min(sizes) < len(payloads)  # evenly cut, no runt
    assert len(set(sizes[:-1])) == 1 and sizes[-1] <= sizes[0]  # one size, the last no larger
    for index, payload in enumerate(payloads):
        assert payload[0] == (0x65 & 0xE0) | NAL_FU_A  # F and NRI copied, type 28
        assert payload[1] & 0x80 == (0x80 if index == 0 else 0)  # S
        assert payload[1] & 0x40 == (0x40 if index == len(payloads) - 1 else 0)  # E
        assert payload[1] & 0x20 == 0 and payload[1] & 0x1F == NAL_IDR  # R, type
    assert b"".join(p[2:] for p in payloads) == nal[1:]
    assert depacketize(payloads) == [nal]
    for length in (1100, 2200, 5119, 5125, 9001):  # cuts that leave a shorter last fragment
        unit = bytes([0x41]) + bytes(range(256)) * (length // 256) + bytes(length % 256)
        cut = H264Packetizer(mtu=1100).packetize([unit])
        sizes = [len(p) for p in cut]
        assert max(sizes) <= 1100 and len(set(sizes[:-1])) <= 1
        assert sizes[0] - len(cut) < sizes[-1] <= sizes[0]
        assert depacketize(cut) == [unit]


def test_single_nal_and_aggregation_boundaries() -> None:
    sps, pps, sei = b"\x67" + bytes(20), b"\x68" + bytes(3), b"\x06" + bytes(30)
    # Exactly fits: 1 + (2 + 21) + (2 + 4) = 30.
    assert H264Packetizer(mtu=30).packetize([sps, pps]) == [
        b"\x78\x00\x15" + sps + b"\x00\x04" + pps
    ]
    assert H264Packetizer(mtu=29).packetize([sps, pps]) == [sps, pps]
    assert H264Packetizer(mtu=1100).packetize([sei]) == [sei]
    # STAP-A NRI is the maximum of its units (§5.7): 0x06 has NRI 0, 0x68 NRI 3.
    assert H264Packetizer().packetize([sei, pps])[0][0] == 0x60 | NAL_STAP_A
    assert H264Packetizer().packetize([]) == []


def test_packetizer_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        H264Packetizer(mtu=2)
    for bad in (b"", b"\x00abc", b"\x78abc", b"\x7cabc"):
        with pytest.raises(ConfigError):
            H264Packetizer().packetize([bad])


nal_units_strategy = st.lists(
    st.tuples(st.integers(0, 7), st.integers(1, 23), st.binary(max_size=3000)).map(
        lambda t: bytes([t[0] << 5 | t[1]]) + t[2]
    ),
    max_size=8,
)


@SETTINGS
@given(nal_units_strategy, st.integers(3, 1500))
def test_packetize_round_trip(nal_units: list[bytes], mtu: int) -> None:
    payloads = H264Packetizer(mtu=mtu).packetize(nal_units)
    assert all(len(payload) <= mtu for payload in payloads)
    assert depacketize(payloads) == nal_units


# -- depacketizer errors -------------------------------------------------------------------

FU_START = bytes([0x7C, 0x85]) + b"ab"
FU_MIDDLE = bytes([0x7C, 0x05]) + b"cd"
FU_END = bytes([0x7C, 0x45]) + b"ef"


def test_fu_a_reassembly_and_reset() -> None:
    depacketizer = H264Depacketizer()
    assert depacketizer.push(FU_START) == [] and depacketizer.push(FU_MIDDLE) == []
    assert depacketizer.push(FU_END) == [b"\x65abcdef"]
    depacketizer.push(FU_START)
    depacketizer.reset()
    assert not depacketizer.in_fragment
    with pytest.raises(ProtocolError):
        depacketizer.push(FU_END)


@pytest.mark.parametrize(
    "payloads",
    [
        [b""],
        [FU_MIDDLE],  # no start fragment
        [FU_END],
        [bytes([0x7C, 0xC5]) + b"x"],  # S and E in one fragment
        [bytes([0x7C, 0x80]) + b"x"],  # FU-A of NAL type 0
        [bytes([0x7C, 0x85])],  # no fragment data
        [FU_START, FU_START],  # restart before the end
        [FU_START, b"\x41x"],  # single NAL unit interrupting a FU-A
        [FU_START, bytes([0x7C, 0x41]) + b"x"],  # fragment type changes
        [b"\x00x"],  # reserved types 0, 30, 31
        [b"\x1ex"],
        [b"\x1fx"],
        [b"\x19x"],  # STAP-B, MTAP16, MTAP24, FU-B: interleaved mode only
        [b"\x1ax"],
        [b"\x1bx"],
        [b"\x1dx"],
        [b"\x18"],  # empty STAP-A
        [b"\x18\x00\x05abc"],  # size beyond the payload
        [b"\x18\x00\x01\x41\x00"],  # dangling byte of a size field
        [b"\x18\x00\x00"],  # zero-length unit
        [b"\x18\x00\x02\x00x"],  # aggregated unit of reserved type
    ],
)
def test_depacketizer_errors_leave_a_clean_state(payloads: list[bytes]) -> None:
    depacketizer = H264Depacketizer()
    with pytest.raises(ProtocolError):
        for payload in payloads:
            depacketizer.push(payload)
    assert not depacketizer.in_fragment
    assert depacketizer.push(b"\x41xyz") == [b"\x41xyz"]


def test_fragment_size_bound() -> None:
    depacketizer = H264Depacketizer(max_nal_size=10)
    depacketizer.push(bytes([0x7C, 0x81]) + bytes(5))
    with pytest.raises(ProtocolError):
        depacketizer.push(bytes([0x7C, 0x01]) + bytes(5))
    assert not depacketizer.in_fragment


@SETTINGS
@given(st.lists(st.binary(max_size=40), max_size=20))
def test_depacketizer_garbage_raises_only_protocol_error(payloads: list[bytes]) -> None:
    depacketizer = H264Depacketizer()
    for payload in payloads:
        try:
            for nal in depacketizer.push(payload):
                assert nal and 1 <= nal_type(nal) <= 23
        except ProtocolError:
            assert not depacketizer.in_fragment


# -- Annex B -------------------------------------------------------------------------------


def test_split_annexb_start_codes_and_trailing_zeros() -> None:
    stream = b"\x00\x00\x00\x01\x09\xf0" + b"\x00\x00\x01\x67ab\x00\x00" + b"\x00\x00\x01\x68c"
    assert split_annexb(stream) == [b"\x09\xf0", b"\x67ab", b"\x68c"]
    assert [nal_type(n) for n in split_annexb(stream)] == [NAL_AUD, NAL_SPS, NAL_PPS]
    assert split_annexb(b"\x00\x00\x01\x00\x00\x01\x06x") == [b"\x06x"]
    assert split_annexb(b"") == [] and split_annexb(b"\x00\x00") == []
    with pytest.raises(ConfigError):
        split_annexb(b"\x65abc")
    with pytest.raises(ConfigError):
        split_annexb(b"\x01\x00\x00\x01\x65")
    with pytest.raises(ProtocolError):
        nal_type(b"")
    assert nal_type(b"\x06") == NAL_SEI


@SETTINGS
@given(st.lists(st.binary(min_size=1, max_size=50).map(lambda b: b.replace(b"\x00", b"\x03"))))
def test_annexb_round_trip(nal_units: list[bytes]) -> None:
    assert split_annexb(to_annexb(nal_units)) == nal_units


# -- interop with an independent implementation (aiortc's RFC 6184 code) ---------------------


@pytest.mark.parametrize("mtu", MTUS)
def test_interop_our_packets_depacketize_with_aiortc_and_decode(
    access_units: list[bytes], mtu: int
) -> None:
    """Our packetizer's payloads -> aiortc's depacketizer -> FFmpeg decodes every frame."""
    from aiortc.codecs.h264 import H264PayloadDescriptor

    packetizer = H264Packetizer(mtu=mtu)
    rebuilt = []
    for unit in access_units:
        payloads = packetizer.packetize(split_annexb(unit))
        # aiortc returns Annex B per payload (a start code before each whole NAL unit or first
        # FU-A fragment); concatenated in order they are the access unit again.
        rebuilt.append(b"".join(H264PayloadDescriptor.parse(p)[1] for p in payloads))
        assert split_annexb(rebuilt[-1]) == split_annexb(unit)
    frames = decode_access_units(rebuilt)
    assert len(frames) == len(access_units)
    reference = decode_access_units(access_units)
    for ours, theirs in zip(frames, reference, strict=True):
        assert np.array_equal(ours.to_ndarray(), theirs.to_ndarray())


def test_interop_aiortc_packets_depacketize_here_and_decode(access_units: list[bytes]) -> None:
    """aiortc's packetizer (its own STAP-A/FU-A choices) -> our depacketizer -> decodes."""
    from aiortc.codecs.h264 import H264Encoder

    rebuilt = []
    for unit in access_units:
        payloads = H264Encoder._packetize(split_annexb(unit))
        assert any(nal_type(p) == NAL_FU_A for p in payloads)  # big frames: fragmented
        rebuilt.append(to_annexb(depacketize(payloads)))
        assert split_annexb(rebuilt[-1]) == split_annexb(unit)
    frames = decode_access_units(rebuilt)
    reference = decode_access_units(access_units)
    assert len(frames) == len(reference) == len(access_units)
    for ours, theirs in zip(frames, reference, strict=True):
        assert np.array_equal(ours.to_ndarray(), theirs.to_ndarray())


def test_parameter_sets_go_in_front_of_every_idr() -> None:
    sps, pps, idr, p = b"\x67\x42", b"\x68\xce", b"\x65\x88", b"\x41\x9a"
    cache = ParameterSets()
    assert cache.complete([sps, pps, idr]) == [sps, pps, idr]
    assert cache.complete([p]) == [p]  # P-frames are left alone
    assert cache.complete([idr]) == [sps, pps, idr]  # an IDR without them gets them back
    assert cache.complete([b"\x09\x10", idr]) == [b"\x09\x10", sps, pps, idr]  # after an AUD
    assert ParameterSets().complete([idr]) == [idr]  # nothing known yet: nothing to add


def test_payload_format_for_the_jitter_buffer(access_units: list[bytes]) -> None:
    payload_format = H264PayloadFormat()
    payloads = H264Packetizer(mtu=300).packetize(split_annexb(access_units[0]))
    assert payload_format.starts_frame(payloads[0])  # STAP-A led by SPS
    assert not any(payload_format.starts_frame(p) for p in payloads[1:])
    units, keyframe = payload_format.assemble(payloads)
    assert keyframe and units == split_annexb(access_units[0])
    with pytest.raises(ProtocolError):
        payload_format.assemble(payloads[:-1])  # ends inside an FU-A
    middle = next(i for i, p in enumerate(payloads) if nal_type(p) == NAL_FU_A and not p[1] & 0x80)
    with pytest.raises(ProtocolError):
        payload_format.assemble(payloads[middle:])  # starts with an FU-A continuation
    units, keyframe = payload_format.assemble(payloads)  # and it recovers afterwards
    assert keyframe
