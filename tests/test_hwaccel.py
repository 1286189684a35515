"""Hardware acceleration: the real probe, and the real fallback to libx264.

This machine has no GPU, so every hardware encoder fails to open here, for a reason the probe
must report.  The one fake in these tests is :class:`FailsMidStream`: a real libx264 session
that presents itself as a hardware encoder and raises FFmpeg's error on a chosen frame, because
a hardware encoder that dies mid-stream cannot be had on demand.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import av
import pytest

from actors.stages.encoder import encoder_actor_options
from shared.capture.testpattern import TestPattern
from shared.media.codec import (
    EncoderConfig,
    EncoderSession,
    H264Decoder,
    H264Encoder,
    get_encoder_capabilities,
    open_session,
)
from shared.media.hwaccel import (
    HARDWARE_ENCODERS,
    SOFTWARE_ENCODER,
    EncoderCandidate,
    EncoderCapabilities,
    HardwareAccelerator,
    needs_gpu,
)
from shared.rtp.h264 import NAL_IDR, NAL_SPS, nal_type, split_annexb

REPO = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT, FPS = 320, 240, 30
REASON_PREFIXES = ("open failed: ", "encode failed: ", "not in this FFmpeg build", "no answer")


def config(codec: str = SOFTWARE_ENCODER, **overrides: Any) -> EncoderConfig:
    settings: dict[str, Any] = {
        "width": WIDTH,
        "height": HEIGHT,
        "framerate": FPS,
        "bitrate": 400_000,
        "keyframe_interval": 60,
        "codec": codec,
        "threads": 1,
    }
    return EncoderConfig(**(settings | overrides))


def broken_hardware() -> list[EncoderCandidate]:
    """Hardware encoders in this FFmpeg build that fail here."""
    return [
        c
        for c in get_encoder_capabilities().encoders
        if c.hardware and not c.available and c.reason != "not in this FFmpeg build"
    ]


def test_probe_reports_every_candidate_and_why_each_failed() -> None:
    capabilities = get_encoder_capabilities()
    names = [c.name for c in capabilities.encoders]
    assert names == [*HARDWARE_ENCODERS, SOFTWARE_ENCODER]
    software = capabilities.candidate(SOFTWARE_ENCODER)
    assert software is not None and software.available and not software.hardware
    for candidate in capabilities.encoders:
        if candidate.available:
            assert candidate.reason == ""
        else:
            # Which step failed, and FFmpeg's own words for why.
            assert candidate.reason.startswith(REASON_PREFIXES), candidate
            if candidate.reason.startswith("open failed: "):
                assert len(candidate.reason) > len("open failed: ") + 3
    working = [c.name for c in capabilities.encoders if c.available and c.hardware]
    assert capabilities.chosen == (working[0] if working else SOFTWARE_ENCODER)
    assert capabilities.best_encoder(hardware=False) == SOFTWARE_ENCODER
    assert capabilities.ffmpeg.startswith("FFmpeg ")


def test_probe_reports_decoders_with_software_always_available() -> None:
    capabilities = get_encoder_capabilities()
    software = [d for d in capabilities.decoders if not d.hardware]
    assert [d.name for d in software] == ["h264"] and software[0].available
    for decoder in capabilities.decoders:
        assert decoder.available or decoder.reason
    hardware = [d.name for d in capabilities.decoders if d.hardware and d.available]
    assert capabilities.chosen_decoder == (hardware[0] if hardware else "h264")


def test_a_hung_driver_is_reported_after_the_time_limit() -> None:
    release = threading.Event()

    def hangs(name: str, width: int, height: int) -> Any:
        release.wait(10)
        raise RuntimeError("released")

    try:
        candidate = HardwareAccelerator(hangs, timeout_s=0.2).probe_encoder("libx264")
    finally:
        release.set()
    assert not candidate.available
    assert candidate.reason.startswith("no answer within 0.2 s")


def test_auto_chooses_the_probed_encoder_and_falls_back_to_libx264_here() -> None:
    encoder = H264Encoder(config("auto"))
    capabilities = get_encoder_capabilities()
    assert encoder.codec_name == capabilities.chosen
    assert encoder.hardware == capabilities.hardware_available
    assert encoder.hardware_fallbacks == 0  # "auto" never tries what the probe saw fail
    if not capabilities.hardware_available:
        assert not encoder.enable_hardware_acceleration()
        assert encoder.codec_name == SOFTWARE_ENCODER


def test_a_hardware_encoder_that_fails_to_open_falls_back_for_real() -> None:
    broken = broken_hardware()
    if not broken:
        pytest.skip("every hardware encoder of this FFmpeg build works here")
    name = broken[0].name
    encoder = H264Encoder(config(name))  # really tries to open it, and it really fails
    assert encoder.codec_name == SOFTWARE_ENCODER and not encoder.hardware
    assert encoder.hardware_fallbacks == 1
    assert encoder.fallback_reason is not None
    assert encoder.fallback_reason.startswith(f"{name} did not open")
    decoder = H264Decoder()
    pattern = TestPattern(WIDTH, HEIGHT, FPS)
    for index in range(5):
        for unit in encoder.encode(pattern.render(index, 0), pts=index * 3000, capture_us=0):
            decoder.decode(unit.data)
    assert decoder.frames_decoded == 5 and decoder.decode_errors == 0


def test_without_fallback_a_broken_hardware_encoder_is_an_encoding_error() -> None:
    broken = broken_hardware()
    if not broken:
        pytest.skip("every hardware encoder of this FFmpeg build works here")
    from shared.errors import EncodingError

    with pytest.raises(EncodingError, match=f"cannot open {broken[0].name}"):
        H264Encoder(config(broken[0].name, fallback=False))


class FailsMidStream:
    """The only fake: a real libx264 session that says it is ``name`` (hardware) and raises
    FFmpeg's error from frame ``fail_at`` on, as a GPU encoder does when its device is lost."""

    def __init__(self, real: EncoderSession, name: str, fail_at: int) -> None:
        self._real = real
        self.name = name
        self.hardware = True
        self._fail_at = fail_at
        self._frames = 0

    def encode(self, frame: av.VideoFrame | None, *, keyframe: bool = False) -> list[Any]:
        if frame is not None:
            if self._frames >= self._fail_at:
                raise av.error.ExternalError(errno.EIO, "device lost (injected)")
            self._frames += 1
        return self._real.encode(frame, keyframe=keyframe)

    def set_bitrate(self, bitrate: int) -> None:
        self._real.set_bitrate(bitrate)

    def close(self) -> None:
        self._real.close()


class FailingHardwareOpener:
    """Opens ``FailsMidStream`` for any hardware name and real sessions for libx264."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.opened: list[str] = []

    def __call__(self, config: EncoderConfig, name: str, bitrate: int, peak: int) -> Any:
        self.opened.append(name)
        real = open_session(config, SOFTWARE_ENCODER, bitrate, peak)
        if name == SOFTWARE_ENCODER:
            return real
        return FailsMidStream(real, name, self.fail_at)


def test_a_runtime_failure_switches_to_software_with_a_keyframe_and_no_lost_frame() -> None:
    opener = FailingHardwareOpener(fail_at=12)
    encoder = H264Encoder(config("h264_nvenc"), opener=opener)
    assert encoder.hardware and encoder.codec_name == "h264_nvenc"
    decoder = H264Decoder()
    pattern = TestPattern(WIDTH, HEIGHT, FPS)
    keyframes, decoded = [], 0
    for index in range(30):
        units = encoder.encode(pattern.render(index, 0), pts=index * 3000, capture_us=index)
        assert len(units) == 1  # one access unit per frame, the failing one included
        unit = units[0]
        assert unit.pts == index * 3000
        if unit.keyframe:
            keyframes.append(index)
            assert {NAL_SPS, NAL_IDR} <= {nal_type(n) for n in split_annexb(unit.data)}
        decoded += len(decoder.decode(unit.data))
    assert keyframes == [0, 12]  # the viewer gets an IDR at the switch and goes on
    assert decoded == 30 and decoder.decode_errors == 0
    assert opener.opened == ["h264_nvenc", SOFTWARE_ENCODER]
    assert encoder.codec_name == SOFTWARE_ENCODER and not encoder.hardware
    assert encoder.hardware_fallbacks == 1
    assert encoder.fallback_reason is not None
    assert "h264_nvenc failed mid-stream at pts=36000" in encoder.fallback_reason
    assert "device lost (injected)" in encoder.fallback_reason


def test_encoder_actor_asks_for_its_gpu_share_only_when_the_encoder_needs_one() -> None:
    def capabilities(chosen: str) -> EncoderCapabilities:
        return EncoderCapabilities(encoders=(), chosen=chosen)

    assert needs_gpu("h264_nvenc") and not needs_gpu("h264_qsv") and not needs_gpu("libx264")
    assert encoder_actor_options(capabilities("h264_nvenc"), gpu_share=0.5) == {"num_gpus": 0.5}
    assert encoder_actor_options(capabilities("h264_nvenc"), gpu_share=0) == {}
    assert encoder_actor_options(capabilities("libx264"), gpu_share=1) == {}
    assert encoder_actor_options("h264_amf", gpu_share=1) == {"num_gpus": 1}
    assert encoder_actor_options(True, gpu_share=1 / 3) == {"num_gpus": 1 / 3}
    assert encoder_actor_options(False, gpu_share=1) == {}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "actors.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_encoders_command_prints_the_probe_report() -> None:
    result = run_cli("encoders", "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert [e["name"] for e in report["encoders"]] == [*HARDWARE_ENCODERS, SOFTWARE_ENCODER]
    for encoder in report["encoders"]:
        assert encoder["available"] or encoder["reason"]
    assert report["chosen"] == get_encoder_capabilities().chosen
    text = run_cli("encoders")
    assert text.returncode == 0, text.stderr
    for name in (*HARDWARE_ENCODERS, SOFTWARE_ENCODER):
        assert name in text.stdout
    assert "chosen for hardware acceleration:" in text.stdout
