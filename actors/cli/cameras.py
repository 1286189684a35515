"""``kizuna-stream cameras``: the cameras on this machine and the modes each offers.

No cameras is an empty list (``[]`` with ``--json``), not an error.  A camera this user may not
open is listed with the reason and what to do about it.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import msgspec

from actors.cli.common import EXIT_ERROR, EXIT_OK, print_json, report_error
from shared.capture.engine import CaptureEngine
from shared.capture.source import CameraInfo, CameraMode
from shared.errors import KizunaError


def register(commands: Any) -> None:
    cameras = commands.add_parser("cameras", help="list cameras and their modes")
    cameras.add_argument("--json", action="store_true", help="print one JSON list for scripts")
    cameras.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        found = CaptureEngine().list_cameras()
    except KizunaError as exc:
        report_error(args, exc)
        return EXIT_ERROR
    if args.json:
        print_json(msgspec.to_builtins(found))
    else:
        print(format_cameras(found))
    return EXIT_OK


def _rates(mode: CameraMode) -> str:
    return ", ".join(f"{rate:g}" for rate in mode.framerates) + " fps" if mode.framerates else ""


def format_cameras(cameras: list[CameraInfo]) -> str:
    """The human listing: each camera, then its modes grouped by pixel format."""
    if not cameras:
        return "no cameras found"
    lines = []
    for camera in cameras:
        device = camera.device
        where = device.path or f"camera {device.index}"
        caps = camera.capabilities
        detail = f" ({caps.driver}, {caps.bus_info})" if caps and caps.driver else ""
        lines.append(f"{where}  {device.name}{detail}")
        if camera.error:
            lines.append(f"  {camera.error}")
            continue
        if caps is None or not caps.modes:
            lines.append("  no modes reported")
            continue
        for fourcc, group in itertools.groupby(caps.modes, key=lambda m: m.pixel_format):
            modes = list(group)
            compressed = " (compressed)" if any(m.compressed for m in modes) else ""
            lines.append(f"  {fourcc}{compressed}")
            lines += [f"    {m.width}x{m.height}  {_rates(m)}".rstrip() for m in modes]
        if caps.controls:
            lines.append(f"  controls: {', '.join(caps.controls)}")
    return "\n".join(lines)
