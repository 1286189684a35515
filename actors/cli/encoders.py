"""``kizuna-stream encoders``: which H.264 encoders and decoders work on this machine, and why not.

Every hardware candidate the FFmpeg build offers is opened and fed a real frame (see
:mod:`shared.media.hwaccel`), so the report says what a stream asking for hardware acceleration would
really get here.  ``--json`` prints the EncoderCapabilities struct as one JSON line.
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from actors.cli.common import EXIT_ERROR, EXIT_OK, print_json, report_error
from shared.errors import KizunaError
from shared.media.codec import get_encoder_capabilities
from shared.media.hwaccel import EncoderCapabilities


def register(commands: Any) -> None:
    encoders = commands.add_parser(
        "encoders", help="probe the H.264 encoders and decoders that work on this machine"
    )
    encoders.add_argument("--json", action="store_true", help="print one JSON line")
    encoders.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        capabilities = get_encoder_capabilities()
    except KizunaError as exc:
        report_error(args, exc)
        return EXIT_ERROR
    if args.json:
        print_json(msgspec.to_builtins(capabilities))
    else:
        _print_report(capabilities)
    # libx264 is the fallback of every stream: without it nothing can encode here.
    software = capabilities.candidate("libx264")
    usable = capabilities.hardware_available or (software is not None and software.available)
    return EXIT_OK if usable else EXIT_ERROR


def _print_report(capabilities: EncoderCapabilities) -> None:
    print(f"H.264 encoders ({capabilities.ffmpeg}):")
    width = max(len(c.name) for c in capabilities.encoders)
    for candidate in capabilities.encoders:
        kind = "hardware" if candidate.hardware else "software"
        state = "works" if candidate.available else "no"
        line = f"  {candidate.name:<{width}}  {kind}  {state:<5}"
        print(f"{line}  {candidate.reason}".rstrip())
    hardware = "" if capabilities.hardware_available else " (no hardware encoder works here)"
    print(f"chosen for hardware acceleration: {capabilities.chosen}{hardware}")
    print("H.264 decoders:")
    width = max(len(d.name) for d in capabilities.decoders)
    for decoder in capabilities.decoders:
        kind = "hardware" if decoder.hardware else "software"
        state = "works" if decoder.available else "no"
        print(f"  {decoder.name:<{width}}  {kind}  {state:<5}  {decoder.reason}".rstrip())
    print(f"chosen for hardware decoding: {capabilities.chosen_decoder}")
