"""Video4Linux2 cameras: found through sysfs, described through the V4L2 ioctls.

Cameras are listed from ``/sys/class/video4linux`` (each ``videoN`` entry has a ``name``), and
each node's capabilities are read with four ioctls, exactly as ``v4l2-ctl --list-formats-ext``
does: VIDIOC_QUERYCAP (is it a capture device?), then VIDIOC_ENUM_FMT, VIDIOC_ENUM_FRAMESIZES
and VIDIOC_ENUM_FRAMEINTERVALS, each called with index 0, 1, 2, ... until the driver answers
EINVAL.  VIDIOC_QUERYCTRL tells whether auto exposure and auto focus exist.

The kernel structs are packed and unpacked with :mod:`struct` from the layouts in
``linux/videodev2.h`` (x86-64 and aarch64 lay them out alike: only 32-bit fields, no
padding).  Parsing is pure (``parse_*`` take the bytes the kernel filled in); the ioctl
function is injectable, so tests replay a device's answers without hardware.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import grp
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Final, NamedTuple

from shared.capture.source import CameraInfo, CameraMode, CaptureCapabilities
from shared.errors import CaptureError, PermissionError
from shared.models import CameraDevice

__all__ = [
    "VIDIOC_ENUM_FMT",
    "VIDIOC_ENUM_FRAMEINTERVALS",
    "VIDIOC_ENUM_FRAMESIZES",
    "VIDIOC_QUERYCAP",
    "VIDIOC_QUERYCTRL",
    "Capability",
    "FormatDesc",
    "FrameIntervals",
    "FrameSizes",
    "Ioctl",
    "fourcc",
    "fourcc_code",
    "list_cameras",
    "parse_capability",
    "parse_fmtdesc",
    "parse_frmival",
    "parse_frmsize",
    "parse_queryctrl",
    "permission_hint",
    "query_capabilities",
]

# struct layouts (little-endian, as every Linux target this runs on).
_CAPABILITY: Final = struct.Struct("<16s32s32sIII3I")  # v4l2_capability, 104 bytes
_FMTDESC: Final = struct.Struct("<III32sII3I")  # v4l2_fmtdesc, 64 bytes
_FRMSIZE: Final = struct.Struct("<III6I2I")  # v4l2_frmsizeenum, 44 bytes
_FRMIVAL: Final = struct.Struct("<IIIII6I2I")  # v4l2_frmivalenum, 52 bytes
_QUERYCTRL: Final = struct.Struct("<II32siiiiI2I")  # v4l2_queryctrl, 68 bytes


def _ioc(direction: int, number: int, size: int) -> int:
    """The _IOC macro of asm-generic/ioctl.h for type 'V'."""
    return (direction << 30) | (size << 16) | (ord("V") << 8) | number


_READ, _READ_WRITE = 2, 3
VIDIOC_QUERYCAP: Final = _ioc(_READ, 0, _CAPABILITY.size)
VIDIOC_ENUM_FMT: Final = _ioc(_READ_WRITE, 2, _FMTDESC.size)
VIDIOC_QUERYCTRL: Final = _ioc(_READ_WRITE, 36, _QUERYCTRL.size)
VIDIOC_ENUM_FRAMESIZES: Final = _ioc(_READ_WRITE, 74, _FRMSIZE.size)
VIDIOC_ENUM_FRAMEINTERVALS: Final = _ioc(_READ_WRITE, 75, _FRMIVAL.size)

BUF_TYPE_VIDEO_CAPTURE: Final = 1
BUF_TYPE_VIDEO_CAPTURE_MPLANE: Final = 9
CAP_VIDEO_CAPTURE: Final = 0x00000001
CAP_VIDEO_CAPTURE_MPLANE: Final = 0x00001000
CAP_DEVICE_CAPS: Final = 0x80000000
FMT_FLAG_COMPRESSED: Final = 0x0001
FRMSIZE_TYPE_DISCRETE: Final = 1
FRMIVAL_TYPE_DISCRETE: Final = 1
CTRL_FLAG_DISABLED: Final = 0x0001
CID_EXPOSURE_AUTO: Final = 0x009A0901
CID_FOCUS_AUTO: Final = 0x009A090C

#: Sizes offered for drivers that describe a continuous or stepwise range.
_COMMON_SIZES: Final = (
    (320, 240),
    (640, 360),
    (640, 480),
    (800, 600),
    (1280, 720),
    (1920, 1080),
    (2560, 1440),
    (3840, 2160),
)
#: Guard against drivers that never answer EINVAL.
_MAX_ENTRIES: Final = 512

#: ``ioctl(fd, request, buffer)``: fills ``buffer`` in place, raises OSError on failure.
Ioctl = Callable[[int, int, bytearray], None]


def _system_ioctl(fd: int, request: int, buffer: bytearray) -> None:
    fcntl.ioctl(fd, request, buffer, True)


def fourcc(code: int) -> str:
    """``0x56595559`` -> ``"YUYV"``."""
    return code.to_bytes(4, "little").decode("ascii", "replace").rstrip("\x00 ")


def fourcc_code(name: str) -> int:
    """``"YUYV"`` -> ``0x56595559``."""
    return int.from_bytes(name.ljust(4).encode("ascii")[:4], "little")


def _text(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "replace")


# --- parsing (pure) ------------------------------------------------------------------------------


class Capability(NamedTuple):
    driver: str
    card: str
    bus_info: str
    version: int
    capabilities: int
    device_caps: int

    @property
    def node_caps(self) -> int:
        """What this node can do (device_caps when the driver fills it in)."""
        return self.device_caps if self.capabilities & CAP_DEVICE_CAPS else self.capabilities

    @property
    def is_capture(self) -> bool:
        return bool(self.node_caps & (CAP_VIDEO_CAPTURE | CAP_VIDEO_CAPTURE_MPLANE))


class FormatDesc(NamedTuple):
    description: str
    pixel_format: str
    compressed: bool


class FrameSizes(NamedTuple):
    """One VIDIOC_ENUM_FRAMESIZES answer: a discrete size, or a range expanded to sizes."""

    discrete: bool
    sizes: list[tuple[int, int]]


class FrameIntervals(NamedTuple):
    """One VIDIOC_ENUM_FRAMEINTERVALS answer as frame rates (the discrete one, or the range's
    fastest and slowest)."""

    discrete: bool
    framerates: list[float]


def parse_capability(data: bytes | bytearray) -> Capability:
    driver, card, bus, version, caps, device_caps, *_ = _CAPABILITY.unpack(data)
    return Capability(_text(driver), _text(card), _text(bus), version, caps, device_caps)


def parse_fmtdesc(data: bytes | bytearray) -> FormatDesc:
    _index, _type, flags, description, pixel_format, *_ = _FMTDESC.unpack(data)
    return FormatDesc(_text(description), fourcc(pixel_format), bool(flags & FMT_FLAG_COMPRESSED))


def parse_frmsize(data: bytes | bytearray) -> FrameSizes:
    _index, _fmt, kind, *union = _FRMSIZE.unpack(data)
    if kind == FRMSIZE_TYPE_DISCRETE:
        return FrameSizes(True, [(union[0], union[1])])
    # Stepwise or continuous (step 1): the common sizes the range allows, and its maximum.
    min_w, max_w, step_w, min_h, max_h, step_h = union[:6]
    step_w, step_h = max(step_w, 1), max(step_h, 1)
    sizes = [
        (w, h)
        for w, h in _COMMON_SIZES
        if min_w <= w <= max_w
        and min_h <= h <= max_h
        and (w - min_w) % step_w == 0
        and (h - min_h) % step_h == 0
    ]
    if (max_w, max_h) not in sizes and max_w > 0 and max_h > 0:
        sizes.append((max_w, max_h))
    return FrameSizes(False, sizes)


def _rate(numerator: int, denominator: int) -> float:
    # An interval of numerator/denominator seconds is denominator/numerator frames a second.
    return round(denominator / numerator, 3) if numerator else 0.0


def parse_frmival(data: bytes | bytearray) -> FrameIntervals:
    _index, _fmt, _w, _h, kind, *union = _FRMIVAL.unpack(data)
    if kind == FRMIVAL_TYPE_DISCRETE:
        return FrameIntervals(True, [_rate(union[0], union[1])])
    # Stepwise/continuous: min interval is the fastest rate, max interval the slowest.
    fastest, slowest = _rate(union[0], union[1]), _rate(union[2], union[3])
    return FrameIntervals(False, sorted({fastest, slowest}, reverse=True))


def parse_queryctrl(data: bytes | bytearray) -> tuple[int, str, bool]:
    """(control id, name, enabled) of a VIDIOC_QUERYCTRL answer."""
    control_id, _type, name, *_, flags, _r0, _r1 = _QUERYCTRL.unpack(data)
    return control_id, _text(name), not flags & CTRL_FLAG_DISABLED


# --- querying a device -----------------------------------------------------------------------------


def permission_hint(path: str) -> str:
    """What to do about a device node this user may not open."""
    try:
        group = grp.getgrgid(os.stat(path).st_gid).gr_name
    except (OSError, KeyError):
        group = "video"
    return (
        f"no permission to open {path}: add your user to the '{group}' group "
        f"(sudo usermod -aG {group} $USER, then log in again) or run with access to the device"
    )


def _enumerate(ioctl: Ioctl, fd: int, request: int, build: Callable[[int], bytes]) -> list[bytes]:
    """Answers for index 0, 1, ... until the driver says EINVAL (the end of the list)."""
    answers: list[bytes] = []
    for index in range(_MAX_ENTRIES):
        buffer = bytearray(build(index))
        try:
            ioctl(fd, request, buffer)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOTTY):
                break
            raise
        answers.append(bytes(buffer))
    return answers


def _size_request(code: int) -> Callable[[int], bytes]:
    return lambda index: _FRMSIZE.pack(index, code, 0, *([0] * 8))


def _interval_request(code: int, width: int, height: int) -> Callable[[int], bytes]:
    return lambda index: _FRMIVAL.pack(index, code, width, height, 0, *([0] * 8))


def _modes(ioctl: Ioctl, fd: int, buf_type: int) -> list[CameraMode]:
    modes: list[CameraMode] = []
    formats = _enumerate(
        ioctl, fd, VIDIOC_ENUM_FMT, lambda i: _FMTDESC.pack(i, buf_type, 0, b"", 0, 0, 0, 0, 0)
    )
    for raw_format in formats:
        desc = parse_fmtdesc(raw_format)
        code = fourcc_code(desc.pixel_format)
        sizes: list[tuple[int, int]] = []
        for raw_size in _enumerate(ioctl, fd, VIDIOC_ENUM_FRAMESIZES, _size_request(code)):
            parsed = parse_frmsize(raw_size)
            sizes.extend(parsed.sizes)
            if not parsed.discrete:  # a range is described once, at index 0
                break
        for width, height in sizes:
            rates: set[float] = set()
            for raw_interval in _enumerate(
                ioctl, fd, VIDIOC_ENUM_FRAMEINTERVALS, _interval_request(code, width, height)
            ):
                intervals = parse_frmival(raw_interval)
                rates.update(intervals.framerates)
                if not intervals.discrete:
                    break
            modes.append(
                CameraMode(
                    pixel_format=desc.pixel_format,
                    width=width,
                    height=height,
                    framerates=sorted((r for r in rates if r > 0), reverse=True),
                    compressed=desc.compressed,
                )
            )
    return modes


def _controls(ioctl: Ioctl, fd: int) -> list[str]:
    present = []
    for control_id, label in ((CID_EXPOSURE_AUTO, "auto_exposure"), (CID_FOCUS_AUTO, "auto_focus")):
        buffer = bytearray(_QUERYCTRL.pack(control_id, 0, b"", 0, 0, 0, 0, 0, 0, 0))
        try:
            ioctl(fd, VIDIOC_QUERYCTRL, buffer)
        except OSError:
            continue  # EINVAL: the device has no such control
        if parse_queryctrl(buffer)[2]:
            present.append(label)
    return present


def query_capabilities(
    path: str | Path,
    *,
    device: CameraDevice | None = None,
    ioctl: Ioctl = _system_ioctl,
) -> CaptureCapabilities:
    """Capabilities of the V4L2 node ``path``.

    Raises CaptureError when the node is missing or is not a video capture device, and
    PermissionError (with what to do) when this user may not open it.
    """
    path = str(path)
    device = device or CameraDevice(path=path, name=path)
    try:
        # O_NONBLOCK: a node another program is streaming from still answers the queries.
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CaptureError(f"camera {path} does not exist") from None
    except builtins.PermissionError:
        raise PermissionError(permission_hint(path)) from None
    except OSError as exc:
        raise CaptureError(f"camera {path} cannot be opened: {exc.strerror}") from None
    try:
        buffer = bytearray(_CAPABILITY.size)
        try:
            ioctl(fd, VIDIOC_QUERYCAP, buffer)
        except OSError as exc:
            raise CaptureError(f"{path} is not a V4L2 device ({exc.strerror})") from None
        capability = parse_capability(buffer)
        if not capability.is_capture:
            raise CaptureError(
                f"{path} ({capability.card}) is not a video capture node "
                "(a camera's metadata or output node?)"
            )
        caps = capability.node_caps
        buf_type = (
            BUF_TYPE_VIDEO_CAPTURE if caps & CAP_VIDEO_CAPTURE else BUF_TYPE_VIDEO_CAPTURE_MPLANE
        )
        return CaptureCapabilities(
            device=device,
            driver=capability.driver,
            card=capability.card,
            bus_info=capability.bus_info,
            modes=_modes(ioctl, fd, buf_type),
            controls=_controls(ioctl, fd),
        )
    finally:
        os.close(fd)


_NODE: Final = re.compile(r"^video(\d+)$")


def list_cameras(
    sysfs_root: Path = Path("/sys/class/video4linux"),
    dev_root: Path = Path("/dev"),
    *,
    ioctl: Ioctl = _system_ioctl,
) -> list[CameraInfo]:
    """Every V4L2 video capture node, in number order, with its modes.

    Nodes that are not capture devices (a UVC camera's second, metadata node; encoders) are
    left out.  A node this user may not open is listed with the reason and a hint instead of
    its modes.  No sysfs folder (no V4L2 at all, or a container without it) is an empty list.
    """
    if not sysfs_root.is_dir():
        return []
    entries = sorted(
        (int(match[1]), entry)
        for entry in sysfs_root.iterdir()
        if (match := _NODE.match(entry.name)) is not None
    )
    cameras: list[CameraInfo] = []
    for number, entry in entries:
        try:
            name = (entry / "name").read_text().strip()
        except OSError:
            name = entry.name
        path = dev_root / entry.name
        device = CameraDevice(index=number, path=str(path), name=name)
        try:
            capabilities = query_capabilities(path, device=device, ioctl=ioctl)
        except PermissionError as exc:
            cameras.append(CameraInfo(device=device, error=str(exc)))
            continue
        except CaptureError as exc:
            if not path.exists():
                # sysfs knows it but /dev lacks it (a container without the device passed in).
                cameras.append(CameraInfo(device=device, error=str(exc)))
            continue
        cameras.append(CameraInfo(device=device, capabilities=capabilities))
    return cameras
