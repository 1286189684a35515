"""The tables of a server's configuration file, as msgspec Structs.

Each Struct here is what one TOML table may hold.  Every one refuses keys it does not know
(``forbid_unknown_fields``: a misspelt key is an error, not a silently ignored setting), puts
its bounds on the field as ``msgspec.Meta`` (so msgspec reports a bad value at its own key),
and checks what spans several fields in ``__post_init__`` by building the model it stands for
(a ``ConfigError`` there is reported at the table).  Tables that are a model of
``shared.models`` as it is (audio, recording, access, viewer limits) subclass that model and
only add the refusal of unknown keys.

A file (see ``deploy/server.example.toml``)::

    [server]
    secret_file = "token.secret"     # the token signing secret (token streams)

    [[streams]]
    name = "lobby"
    source = "camera:0"
    listen = "0.0.0.0:4433"
    priority = 10
    rungs = ["low"]
    [streams.quality]
    preset = "medium"
    framerate = 25
    [streams.capture]
    resolution = "1920x1080"
    pixel_format = "nv12"
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from shared.errors import ConfigError
from shared.models import (
    MAX_FRAMERATE,
    AccessMode,
    AudioConfig,
    CaptureConfig,
    MotionTriggerConfig,
    PixelFormat,
    QualityPreset,
    RecordingConfig,
    Resolution,
    StreamAccess,
    StreamQuality,
    ViewerLimits,
)

__all__ = [
    "PATTERN_MEANINGS",
    "AccessEntry",
    "AudioEntry",
    "CaptureEntry",
    "QualityEntry",
    "RecordingEntry",
    "ServerEntry",
    "ServerFile",
    "StreamEntry",
    "ViewerLimitsEntry",
    "parse_address",
    "parse_resolution",
]

_RESOLUTION_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"
_ADDRESS_PATTERN = r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]\s]+):[0-9]{1,5}$"
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

#: ``WIDTHxHEIGHT``, as the CLI's ``--size`` spells a resolution.
ResolutionText = Annotated[str, msgspec.Meta(pattern=_RESOLUTION_PATTERN)]
Framerate = Annotated[int, msgspec.Meta(ge=1, le=MAX_FRAMERATE)]
#: ``HOST:PORT`` (``[::1]:4433`` for IPv6).
Address = Annotated[str, msgspec.Meta(pattern=_ADDRESS_PATTERN)]
Name = Annotated[str, msgspec.Meta(pattern=_NAME_PATTERN)]

#: What each pattern means, for an error message a person reads (msgspec quotes the regex).
PATTERN_MEANINGS: dict[str, str] = {
    _RESOLUTION_PATTERN: "expected WIDTHxHEIGHT, e.g. 1280x720",
    _ADDRESS_PATTERN: "expected HOST:PORT, e.g. 127.0.0.1:4433",
    _NAME_PATTERN: "expected up to 64 letters, digits, _ . or -, starting with a letter or digit",
}

_ADDRESS = re.compile(r"^\[?(?P<host>.*?)\]?:(?P<port>\d+)$")


def parse_resolution(text: str) -> Resolution:
    width, height = (int(part) for part in text.split("x"))
    return Resolution(width, height)


def parse_address(text: str) -> tuple[str, int]:
    match = _ADDRESS.match(text)
    if match is None or not 0 <= int(match["port"]) <= 65535:
        raise ConfigError(f"address {text!r}: expected HOST:PORT with a port up to 65535")
    return match["host"], int(match["port"])


class _Table(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class QualityEntry(_Table, frozen=True, kw_only=True):
    """``[streams.quality]``: a preset, and what to change of it (``custom`` needs all three)."""

    preset: QualityPreset = QualityPreset.MEDIUM
    resolution: ResolutionText | None = None
    framerate: Framerate | None = None
    #: Bits per second.
    bitrate: Annotated[int, msgspec.Meta(ge=50_000, le=100_000_000)] | None = None
    hardware_acceleration: bool = False

    def __post_init__(self) -> None:
        self.quality()

    def quality(self) -> StreamQuality:
        if self.preset is QualityPreset.CUSTOM:
            missing = [
                key for key in ("resolution", "framerate", "bitrate") if getattr(self, key) is None
            ]
            if missing:
                raise ConfigError(f"preset custom needs {', '.join(missing)} as well")
            assert self.resolution and self.framerate and self.bitrate
            return StreamQuality(
                resolution=parse_resolution(self.resolution),
                framerate=self.framerate,
                bitrate=self.bitrate,
                hardware_acceleration=self.hardware_acceleration,
            )
        base = StreamQuality.from_preset(
            self.preset, hardware_acceleration=self.hardware_acceleration
        )
        if self.resolution is None and self.framerate is None and self.bitrate is None:
            return base
        return StreamQuality(
            resolution=parse_resolution(self.resolution) if self.resolution else base.resolution,
            framerate=self.framerate or base.framerate,
            bitrate=self.bitrate or base.bitrate,
            hardware_acceleration=self.hardware_acceleration,
        )


class CaptureEntry(_Table, frozen=True, kw_only=True):
    """``[streams.capture]``: what to ask the device for (the design's CaptureConfig); the
    resolution and frame rate default to the stream's quality."""

    resolution: ResolutionText | None = None
    framerate: Framerate | None = None
    pixel_format: PixelFormat = PixelFormat.YUV420P
    #: Buffers the driver keeps queued (V4L2 ``VIDIOC_REQBUFS``).
    buffer_count: Annotated[int, msgspec.Meta(ge=2, le=32)] = 4
    auto_exposure: bool = True
    auto_focus: bool = True
    #: Sources to switch to when the device is lost, in order (``camera:1``, ``file:...``).
    fallback_devices: tuple[str, ...] = ()

    def capture_config(self, quality: StreamQuality) -> CaptureConfig:
        return CaptureConfig(
            resolution=parse_resolution(self.resolution) if self.resolution else quality.resolution,
            framerate=self.framerate or quality.framerate,
            pixel_format=self.pixel_format,
            buffer_count=self.buffer_count,
            auto_exposure=self.auto_exposure,
            auto_focus=self.auto_focus,
            fallback_devices=self.fallback_devices,
        )


class AudioEntry(AudioConfig, frozen=True, forbid_unknown_fields=True):
    """``[streams.audio]``: AudioConfig."""


class MotionTriggerEntry(MotionTriggerConfig, frozen=True, forbid_unknown_fields=True):
    """``[streams.record.trigger]``: MotionTriggerConfig."""


class RecordingEntry(RecordingConfig, frozen=True, forbid_unknown_fields=True):
    """``[streams.record]``: RecordingConfig; a relative ``output_path`` is taken from the
    configuration file's folder."""

    trigger: MotionTriggerEntry | None = None


class AccessEntry(StreamAccess, frozen=True, forbid_unknown_fields=True):
    """``[streams.access]``: StreamAccess (``mode = "token"`` or ``"open"``); a server's
    streams need a token unless the file says otherwise, as ``serve`` does."""

    mode: AccessMode = AccessMode.TOKEN


class ViewerLimitsEntry(ViewerLimits, frozen=True, forbid_unknown_fields=True):
    """``[streams.viewers]``: ViewerLimits."""


class StreamEntry(_Table, frozen=True, kw_only=True):
    """One ``[[streams]]`` table."""

    #: Unique in the file; the stream's name in logs, ``status`` and ``streams``.
    name: Name
    #: As ``serve --source`` spells it: test, camera:N, camera:/dev/videoN, screen[...], file:PATH.
    source: str = "test"
    #: The UDP address its viewers connect to.  Several streams may give the same one (one
    #: process then serves them all there, with one certificate, by the stream each URL names).
    listen: Address = "127.0.0.1:4433"
    #: Sender processes sharing that port (SO_REUSEPORT); 1 on a port streams share.
    senders: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    #: Higher is more important: under resource pressure lower priorities give way first.
    priority: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    #: Also serve browsers (WHEP and a player page) on this HTTP address.
    http: Address | None = None
    quality: QualityEntry = msgspec.field(default_factory=QualityEntry)
    rungs: list[QualityPreset] = msgspec.field(default_factory=list)
    keyframe_interval_s: Annotated[float, msgspec.Meta(ge=0.1, le=60)] = 2.0
    pool_slots: Annotated[int, msgspec.Meta(ge=2, le=64)] = 4
    capture: CaptureEntry | None = None
    audio: AudioEntry | None = None
    record: RecordingEntry | None = None
    access: AccessEntry = msgspec.field(default_factory=AccessEntry)
    viewers: ViewerLimitsEntry = msgspec.field(default_factory=ViewerLimitsEntry)
    #: PEM certificate and key (both or neither; neither: a self-signed pair at start).
    tls_cert: str | None = None
    tls_key: str | None = None
    shed_under_pressure: bool = True
    content_aware_targets: bool = True
    #: A crashed stage is restarted up to this many times within the window; then Error.
    max_restarts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    restart_window_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0

    def __post_init__(self) -> None:
        # The source and the addresses are checked by the loader, which reports them at
        # their own keys; here what spans keys.
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("give both tls_cert and tls_key, or neither")
        if QualityPreset.CUSTOM in self.rungs:
            raise ConfigError("rungs are presets (low, medium, high, ultra), not custom")


class ServerEntry(_Table, frozen=True, kw_only=True):
    """``[server]``: what all streams share."""

    #: The file holding the token signing secret; relative to the configuration file.
    secret_file: str | None = None
    #: The Ray cluster to join (default: RAY_ADDRESS, else a local one is started).
    address: str | None = None
    max_streams: Annotated[int, msgspec.Meta(ge=1, le=256)] = 16
    #: Refuse new streams while the node's CPU (averaged over the monitor's window) is at or
    #: above this percentage; unset: the encoding budget alone decides.
    cpu_admission_percent: Annotated[float, msgspec.Meta(gt=0, le=100)] | None = None
    #: Hardware encoder sessions one GPU takes (NVENC allows a few per consumer card).
    gpu_sessions_per_gpu: Annotated[int, msgspec.Meta(ge=1, le=64)] = 3


class ServerFile(_Table, frozen=True, kw_only=True):
    streams: Annotated[list[StreamEntry], msgspec.Meta(min_length=1)]
    server: ServerEntry = msgspec.field(default_factory=ServerEntry)
