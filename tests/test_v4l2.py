"""V4L2 camera discovery without a camera: kernel answers replayed from bytes, a sysfs tree
built in a temporary folder, and permission denied for real under an unprivileged user."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared.capture.source import CameraMode
from shared.capture.v4l2 import (
    VIDIOC_ENUM_FMT,
    VIDIOC_ENUM_FRAMEINTERVALS,
    VIDIOC_ENUM_FRAMESIZES,
    VIDIOC_QUERYCAP,
    VIDIOC_QUERYCTRL,
    fourcc,
    fourcc_code,
    list_cameras,
    parse_capability,
    parse_fmtdesc,
    parse_frmival,
    parse_frmsize,
    parse_queryctrl,
    query_capabilities,
)
from shared.errors import CaptureError
from tests import media_fixtures
from tests.media_fixtures import run_as_nobody

public_tmp = media_fixtures.public_tmp  # a fixture, shared

# --- the kernel's structs, written out from linux/videodev2.h -------------------------------------

CAP_VIDEO_CAPTURE = 0x1
CAP_META_CAPTURE = 0x00800000
CAP_STREAMING = 0x04000000
CAP_DEVICE_CAPS = 0x80000000


def capability(driver: str, card: str, bus: str, device_caps: int) -> bytes:
    # struct v4l2_capability: __u8 driver[16], card[32], bus_info[32]; __u32 version,
    # capabilities, device_caps, reserved[3].  104 bytes.
    return (
        driver.encode().ljust(16, b"\0")
        + card.encode().ljust(32, b"\0")
        + bus.encode().ljust(32, b"\0")
        + struct.pack(
            "<III", 0x060100, device_caps | CAP_VIDEO_CAPTURE | CAP_DEVICE_CAPS, device_caps
        )
        + bytes(12)
    )


def fmtdesc(index: int, description: str, code: str, compressed: bool) -> bytes:
    # struct v4l2_fmtdesc: __u32 index, type, flags; __u8 description[32]; __u32 pixelformat,
    # mbus_code, reserved[3].  64 bytes.
    return (
        struct.pack("<III", index, 1, 1 if compressed else 0)
        + description.encode().ljust(32, b"\0")
        + struct.pack("<II", fourcc_code(code), 0)
        + bytes(12)
    )


def frmsize_discrete(index: int, code: str, width: int, height: int) -> bytes:
    # struct v4l2_frmsizeenum: __u32 index, pixel_format, type; union { discrete {width,
    # height}; stepwise {min_width, max_width, step_width, min_height, max_height,
    # step_height} }; __u32 reserved[2].  44 bytes.
    return (
        struct.pack("<III", index, fourcc_code(code), 1)
        + struct.pack("<6I", width, height, 0, 0, 0, 0)
        + bytes(8)
    )


def frmsize_stepwise(code: str, limits: tuple[int, int, int, int, int, int]) -> bytes:
    return struct.pack("<III", 0, fourcc_code(code), 3) + struct.pack("<6I", *limits) + bytes(8)


def frmival_discrete(
    index: int, code: str, size: tuple[int, int], interval: tuple[int, int]
) -> bytes:
    # struct v4l2_frmivalenum: __u32 index, pixel_format, width, height, type; union {
    # discrete {numerator, denominator}; stepwise {min, max, step} (3 fractions) };
    # __u32 reserved[2].  52 bytes.
    return (
        struct.pack("<IIIII", index, fourcc_code(code), *size, 1)
        + struct.pack("<6I", *interval, 0, 0, 0, 0)
        + bytes(8)
    )


def frmival_continuous(code: str, size: tuple[int, int], fastest: int, slowest: int) -> bytes:
    return (
        struct.pack("<IIIII", 0, fourcc_code(code), *size, 2)
        + struct.pack("<6I", 1, fastest, 1, slowest, 1, 1)
        + bytes(8)
    )


def queryctrl(control_id: int, name: str, disabled: bool = False) -> bytes:
    # struct v4l2_queryctrl: __u32 id, type; __u8 name[32]; __s32 minimum, maximum, step,
    # default_value; __u32 flags, reserved[2].  68 bytes.
    return (
        struct.pack("<II", control_id, 3)
        + name.encode().ljust(32, b"\0")
        + struct.pack("<iiiiI", 0, 3, 1, 3, 1 if disabled else 0)
        + bytes(8)
    )


def test_ioctl_numbers_match_videodev2_h() -> None:
    # As the kernel headers compute them (_IOR/_IOWR('V', nr, struct ...)).
    assert VIDIOC_QUERYCAP == 0x80685600
    assert VIDIOC_ENUM_FMT == 0xC0405602
    assert VIDIOC_QUERYCTRL == 0xC0445624
    assert VIDIOC_ENUM_FRAMESIZES == 0xC02C564A
    assert VIDIOC_ENUM_FRAMEINTERVALS == 0xC034564B


def test_fourcc_round_trip() -> None:
    assert fourcc(0x56595559) == "YUYV" and fourcc_code("YUYV") == 0x56595559
    assert fourcc(fourcc_code("MJPG")) == "MJPG"


def test_parsing_each_answer_from_bytes() -> None:
    cap = parse_capability(
        capability(
            "uvcvideo",
            "HD Webcam: HD Webcam",
            "usb-0000:00:14.0-5",
            CAP_VIDEO_CAPTURE | CAP_STREAMING,
        )
    )
    assert (cap.driver, cap.card, cap.bus_info) == (
        "uvcvideo",
        "HD Webcam: HD Webcam",
        "usb-0000:00:14.0-5",
    )
    assert cap.is_capture
    meta = parse_capability(
        capability("uvcvideo", "HD Webcam", "usb-1", CAP_META_CAPTURE | CAP_STREAMING)
    )
    assert not meta.is_capture  # the UVC metadata node
    desc = parse_fmtdesc(fmtdesc(1, "Motion-JPEG", "MJPG", True))
    assert (desc.description, desc.pixel_format, desc.compressed) == ("Motion-JPEG", "MJPG", True)
    sizes = parse_frmsize(frmsize_discrete(0, "YUYV", 640, 480))
    assert sizes.discrete and sizes.sizes == [(640, 480)]
    # A stepwise range: the common sizes it allows (on its step grid) and its maximum.
    stepwise = parse_frmsize(frmsize_stepwise("YU12", (160, 1920, 16, 120, 1080, 8)))
    assert not stepwise.discrete
    assert stepwise.sizes == [
        (320, 240),
        (640, 360),
        (640, 480),
        (800, 600),
        (1280, 720),
        (1920, 1080),
    ]
    # Off the step grid (heights 120 + 64k), and beyond the range: left out.
    coarse = parse_frmsize(frmsize_stepwise("YU12", (320, 1280, 320, 120, 1000, 64)))
    assert coarse.sizes == [(1280, 1000)]  # only its maximum
    rate = parse_frmival(frmival_discrete(0, "YUYV", (640, 480), (1, 30)))
    assert rate.discrete and rate.framerates == [30.0]
    ntsc = parse_frmival(frmival_discrete(0, "YUYV", (640, 480), (1001, 30000)))
    assert ntsc.framerates == [29.97]
    continuous = parse_frmival(frmival_continuous("YU12", (640, 480), 60, 1))
    assert not continuous.discrete and continuous.framerates == [60.0, 1.0]
    assert parse_queryctrl(queryctrl(0x009A0901, "Auto Exposure")) == (
        0x009A0901,
        "Auto Exposure",
        True,
    )
    assert parse_queryctrl(queryctrl(0x009A090C, "Focus, Auto", disabled=True))[2] is False


# --- a replayed device -----------------------------------------------------------------------------


@dataclass
class FakeCamera:
    """Answers the V4L2 ioctls as a UVC webcam would, from the structs above."""

    card: str
    caps: int = CAP_VIDEO_CAPTURE | CAP_STREAMING
    formats: list[tuple[str, str, bool]] = field(default_factory=list)
    sizes: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    rates: dict[tuple[str, int, int], list[int]] = field(default_factory=dict)
    controls: dict[int, str] = field(default_factory=dict)
    calls: list[int] = field(default_factory=list)

    def answer(self, request: int, buffer: bytearray) -> None:
        self.calls.append(request)
        index = struct.unpack_from("<I", buffer)[0]
        if request == VIDIOC_QUERYCAP:
            buffer[:] = capability("uvcvideo", self.card, "usb-0000:00:14.0-5", self.caps)
        elif request == VIDIOC_ENUM_FMT:
            if index >= len(self.formats):
                raise OSError(errno.EINVAL, "Invalid argument")
            buffer[:] = fmtdesc(index, *self.formats[index])
        elif request == VIDIOC_ENUM_FRAMESIZES:
            code = fourcc(struct.unpack_from("<I", buffer, 4)[0])
            sizes = self.sizes.get(code, [])
            if index >= len(sizes):
                raise OSError(errno.EINVAL, "Invalid argument")
            buffer[:] = frmsize_discrete(index, code, *sizes[index])
        elif request == VIDIOC_ENUM_FRAMEINTERVALS:
            code_value, width, height = struct.unpack_from("<III", buffer, 4)
            rates = self.rates.get((fourcc(code_value), width, height), [])
            if index >= len(rates):
                raise OSError(errno.EINVAL, "Invalid argument")
            buffer[:] = frmival_discrete(
                index, fourcc(code_value), (width, height), (1, rates[index])
            )
        elif request == VIDIOC_QUERYCTRL:
            if index not in self.controls:  # the id sits where the index would
                raise OSError(errno.EINVAL, "Invalid argument")
            buffer[:] = queryctrl(index, self.controls[index])
        else:
            raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")


def webcam() -> FakeCamera:
    return FakeCamera(
        card="HD Webcam: HD Webcam",
        formats=[("YUYV 4:2:2", "YUYV", False), ("Motion-JPEG", "MJPG", True)],
        sizes={"YUYV": [(640, 480), (1280, 720)], "MJPG": [(1280, 720), (1920, 1080)]},
        rates={
            ("YUYV", 640, 480): [30, 15],
            ("YUYV", 1280, 720): [10],
            ("MJPG", 1280, 720): [30, 60],
            ("MJPG", 1920, 1080): [30],
        },
        controls={0x009A0901: "Auto Exposure", 0x009A090C: "Focus, Automatic Continuous"},
    )


class Devices:
    """An ioctl that routes to the fake behind each open file (by its path)."""

    def __init__(self) -> None:
        self.by_path: dict[str, FakeCamera] = {}

    def ioctl(self, fd: int, request: int, buffer: bytearray) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        device = self.by_path.get(path)
        if device is None:
            raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")
        device.answer(request, buffer)


def test_query_capabilities_lists_every_mode_and_control(tmp_path: Path) -> None:
    node = tmp_path / "video0"
    node.touch()
    devices = Devices()
    devices.by_path[str(node)] = webcam()
    caps = query_capabilities(node, ioctl=devices.ioctl)
    assert (caps.driver, caps.card) == ("uvcvideo", "HD Webcam: HD Webcam")
    assert caps.modes == [
        CameraMode(pixel_format="YUYV", width=640, height=480, framerates=[30.0, 15.0]),
        CameraMode(pixel_format="YUYV", width=1280, height=720, framerates=[10.0]),
        CameraMode(
            pixel_format="MJPG", width=1280, height=720, framerates=[60.0, 30.0], compressed=True
        ),
        CameraMode(
            pixel_format="MJPG", width=1920, height=1080, framerates=[30.0], compressed=True
        ),
    ]
    assert caps.controls == ["auto_exposure", "auto_focus"]


def test_query_capabilities_errors_name_the_node(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"camera .*video7 does not exist"):
        query_capabilities(tmp_path / "video7")
    plain = tmp_path / "video3"
    plain.touch()
    with pytest.raises(CaptureError, match=r"video3 is not a V4L2 device"):
        query_capabilities(plain)  # the real ioctl on a plain file: ENOTTY
    devices = Devices()
    devices.by_path[str(plain)] = FakeCamera(card="HD Webcam", caps=CAP_META_CAPTURE)
    with pytest.raises(CaptureError, match="not a video capture node"):
        query_capabilities(plain, ioctl=devices.ioctl)


@pytest.fixture
def sysfs(tmp_path: Path) -> Iterator[tuple[Path, Path, Devices]]:
    """/sys/class/video4linux and /dev as a laptop with a webcam would have them."""
    sys_root = tmp_path / "sys" / "class" / "video4linux"
    dev_root = tmp_path / "dev"
    dev_root.mkdir(parents=True)
    devices = Devices()
    nodes = {
        "video0": ("Integrated Camera: Integrated C", webcam()),
        "video1": (
            "Integrated Camera: Integrated C",
            FakeCamera(card="Integrated Camera", caps=CAP_META_CAPTURE),
        ),
        "video10": (
            "USB Capture: USB Capture",
            FakeCamera(
                card="USB Capture: USB Capture",
                formats=[("NV12", "NV12", False)],
                sizes={"NV12": [(1920, 1080)]},
                rates={("NV12", 1920, 1080): [60]},
            ),
        ),
    }
    for name, (label, fake) in nodes.items():
        (sys_root / name).mkdir(parents=True)
        (sys_root / name / "name").write_text(label + "\n")
        (dev_root / name).touch()
        devices.by_path[str(dev_root / name)] = fake
    # Listed by sysfs, but its node is missing from /dev (a container without it passed in).
    (sys_root / "video2").mkdir()
    (sys_root / "video2" / "name").write_text("Loopback video device 0\n")
    # Not a video node at all.
    (sys_root / "v4l-subdev0").mkdir()
    yield sys_root, dev_root, devices


def test_list_cameras_reads_the_sysfs_tree(sysfs: tuple[Path, Path, Devices]) -> None:
    sys_root, dev_root, devices = sysfs
    cameras = list_cameras(sys_root, dev_root, ioctl=devices.ioctl)
    # video1 is the webcam's metadata node: left out.  video10 sorts after video2.
    assert [c.device.index for c in cameras] == [0, 2, 10]
    webcam_info, loopback, capture_card = cameras
    assert webcam_info.device.path == str(dev_root / "video0")
    assert webcam_info.device.name == "Integrated Camera: Integrated C"
    assert webcam_info.capabilities is not None and len(webcam_info.capabilities.modes) == 4
    assert loopback.capabilities is None and loopback.error is not None
    assert "video2 does not exist" in loopback.error
    assert capture_card.capabilities is not None
    assert capture_card.capabilities.modes[0].framerates == [60.0]


def test_no_video4linux_folder_is_no_cameras(tmp_path: Path) -> None:
    assert list_cameras(tmp_path / "absent", tmp_path) == []


def test_a_node_the_user_may_not_open_is_listed_with_a_hint(public_tmp: Path) -> None:
    """As an unprivileged user (root opens anything), the node's PermissionError says what to do."""
    sys_root = public_tmp / "video4linux"
    (sys_root / "video0").mkdir(parents=True)
    (sys_root / "video0" / "name").write_text("HD Webcam\n")
    node = public_tmp / "video0"
    node.touch()
    node.chmod(0o000)  # no one but root may open it
    cameras = run_as_nobody(list_cameras, sys_root, public_tmp)
    assert len(cameras) == 1
    (camera,) = cameras
    assert camera.capabilities is None and camera.error is not None
    assert "no permission to open" in camera.error and "usermod -aG" in camera.error
