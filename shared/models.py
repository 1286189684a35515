"""The design's data models as msgspec Structs.

These are the values that cross process boundaries (Ray calls, ``--json`` output), so each is a
plain, immutable, typed record.  Enumerations are string-valued so the JSON reads well.

Names follow the design document; where its Rust reads oddly in Python (``Error(StreamError)``
inside an enum) the meaning is kept with a Pythonic shape (a state plus an optional error).
Times are wall-clock seconds since the epoch as ``float`` (``created_at``) or integer
microseconds (``capture_us``) where per-frame precision matters.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

import msgspec

from shared.errors import ConfigError

__all__ = [
    "AccessMode",
    "AudioConfig",
    "CameraDevice",
    "CameraSource",
    "CaptureConfig",
    "ConnectionQuality",
    "CustomQuality",
    "ErrorInfo",
    "FileSource",
    "MotionTriggerConfig",
    "PixelFormat",
    "QualityPreset",
    "RecordingConfig",
    "RecordingSession",
    "RecordingState",
    "Resolution",
    "ScreenConfig",
    "ScreenRegion",
    "ScreenSource",
    "SessionId",
    "StreamAccess",
    "StreamConfig",
    "StreamQuality",
    "StreamSession",
    "StreamSource",
    "StreamState",
    "StreamStats",
    "StreamType",
    "TestPatternSource",
    "VideoFormat",
    "ViewerId",
    "ViewerPermissions",
    "ViewerStatus",
    "ViewerTicket",
    "check_access_timeouts",
    "parse_source",
]

SessionId = str
ViewerId = str
PeerId = str

#: Largest frame edge accepted anywhere (H.264 level 6.2 tops out at 8192 pixels).
MAX_DIMENSION = 8192
MAX_FRAMERATE = 240


class StreamType(enum.StrEnum):
    CAMERA = "camera"
    SCREEN = "screen"
    AUDIO = "audio"
    COMBINED = "combined"


class StreamState(enum.StrEnum):
    STARTING = "starting"
    ACTIVE = "active"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    ERROR = "error"


class PixelFormat(enum.StrEnum):
    """Pixel layouts a frame pool slot can hold (names as FFmpeg spells them)."""

    YUV420P = "yuv420p"
    NV12 = "nv12"
    BGR24 = "bgr24"
    RGB24 = "rgb24"
    GRAY = "gray"


class ConnectionQuality(enum.StrEnum):
    EXCELLENT = "excellent"
    GOOD = "good"
    FAIR = "fair"
    POOR = "poor"
    DISCONNECTED = "disconnected"


class RecordingState(enum.StrEnum):
    RECORDING = "recording"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"


class VideoFormat(enum.StrEnum):
    MP4 = "mp4"
    WEBM = "webm"
    AVI = "avi"
    MOV = "mov"


class QualityPreset(enum.StrEnum):
    LOW = "low"  # 480p, 15 fps, 500 kbps
    MEDIUM = "medium"  # 720p, 30 fps, 1.5 Mbps
    HIGH = "high"  # 1080p, 30 fps, 3 Mbps
    ULTRA = "ultra"  # 1080p, 60 fps, 6 Mbps
    CUSTOM = "custom"


class Resolution(msgspec.Struct, frozen=True):
    width: int
    height: int

    def __post_init__(self) -> None:
        if not (0 < self.width <= MAX_DIMENSION and 0 < self.height <= MAX_DIMENSION):
            raise ConfigError(
                f"resolution {self.width}x{self.height} is impossible: "
                f"each edge must be between 1 and {MAX_DIMENSION} pixels"
            )

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


class CustomQuality(msgspec.Struct, frozen=True):
    resolution: Resolution
    framerate: int
    bitrate: int


class StreamQuality(msgspec.Struct, frozen=True, kw_only=True):
    """What a stream is encoded at.  ``bitrate`` is in bits per second."""

    resolution: Resolution
    framerate: int
    bitrate: int
    quality_preset: QualityPreset = QualityPreset.CUSTOM
    hardware_acceleration: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.framerate <= MAX_FRAMERATE:
            raise ConfigError(
                f"frame rate {self.framerate} is impossible: it must be between 1 and "
                f"{MAX_FRAMERATE} frames per second"
            )
        if self.bitrate <= 0:
            raise ConfigError(f"bitrate {self.bitrate} is impossible: it must be positive")
        # H.264 with 4:2:0 chroma subsampling needs even dimensions.
        if self.resolution.width % 2 or self.resolution.height % 2:
            raise ConfigError(
                f"resolution {self.resolution} is impossible for 4:2:0 video: "
                "width and height must be even"
            )

    @classmethod
    def from_preset(
        cls, preset: QualityPreset, *, hardware_acceleration: bool = False
    ) -> StreamQuality:
        """The design's preset table."""
        try:
            width, height, fps, bitrate = _PRESETS[preset]
        except KeyError:
            raise ConfigError(
                f"preset {preset!r} has no fixed values; build a StreamQuality directly"
            ) from None
        return cls(
            resolution=Resolution(width, height),
            framerate=fps,
            bitrate=bitrate,
            quality_preset=preset,
            hardware_acceleration=hardware_acceleration,
        )

    @classmethod
    def custom(cls, custom: CustomQuality) -> StreamQuality:
        return cls(
            resolution=custom.resolution,
            framerate=custom.framerate,
            bitrate=custom.bitrate,
            quality_preset=QualityPreset.CUSTOM,
        )


_PRESETS: dict[QualityPreset, tuple[int, int, int, int]] = {
    QualityPreset.LOW: (854, 480, 15, 500_000),
    QualityPreset.MEDIUM: (1280, 720, 30, 1_500_000),
    QualityPreset.HIGH: (1920, 1080, 30, 3_000_000),
    QualityPreset.ULTRA: (1920, 1080, 60, 6_000_000),
}


class StreamStats(msgspec.Struct, kw_only=True):
    bytes_sent: int = 0
    bytes_received: int = 0
    frames_encoded: int = 0
    frames_decoded: int = 0
    frames_dropped: int = 0
    current_bitrate: int = 0
    average_bitrate: int = 0
    latency_ms: int = 0
    jitter_ms: int = 0
    packet_loss_rate: float = 0.0
    last_updated: float = 0.0
    #: Frames per second the encoder achieved since its first frame (not in the design;
    #: what a broadcaster checks first when a stream stutters).
    encoder_fps: float = 0.0
    #: Times a hardware encoder failed mid-stream and libx264 took over.
    hardware_fallbacks: int = 0
    #: CPU-pressure steps in force (a lower frame rate, retired top rungs; 0: none) and why
    #: the last step was taken or undone (``shared.control.pressure``).
    pressure_level: int = 0
    pressure_reason: str = ""
    #: Stage actors restarted after a crash, per kind (capture, encoder, quality, shard),
    #: and why the last one was (``actors.recovery``).
    restarts: dict[str, int] = msgspec.field(default_factory=dict)
    last_restart: str = ""


# --- sources ---------------------------------------------------------------------------------


class CameraDevice(msgspec.Struct, frozen=True, kw_only=True):
    index: int | None = None
    path: str | None = None
    name: str = ""


class ScreenRegion(msgspec.Struct, frozen=True):
    x: int
    y: int
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.x < 0 or self.y < 0 or self.width <= 0 or self.height <= 0:
            raise ConfigError(
                f"screen region {self.width}x{self.height}+{self.x}+{self.y} is impossible: "
                "offsets must be >= 0 and sizes > 0"
            )


class TestPatternSource(msgspec.Struct, frozen=True, tag="test"):
    """The synthetic moving pattern with a machine-readable timestamp strip."""

    __test__ = False  # not a pytest class


class CameraSource(msgspec.Struct, frozen=True, tag="camera"):
    device: CameraDevice


class ScreenSource(msgspec.Struct, frozen=True, tag="screen"):
    monitor_index: int | None = None
    region: ScreenRegion | None = None


class FileSource(msgspec.Struct, frozen=True, tag="file"):
    path: str
    loop: bool = False


StreamSource = TestPatternSource | CameraSource | ScreenSource | FileSource

_SCREEN_SPEC = re.compile(
    r"^screen(?::(?P<monitor>\d+))?(?:@(?P<x>\d+),(?P<y>\d+),(?P<w>\d+)x(?P<h>\d+))?$"
)


def parse_source(spec: str) -> StreamSource:
    """Parse a source as the CLI spells it: ``test``, ``camera:N``, ``camera:/dev/videoN``,
    ``screen[:MONITOR][@X,Y,WxH]`` or ``file:PATH``."""
    if spec == "test":
        return TestPatternSource()
    if spec.startswith("camera:"):
        target = spec.removeprefix("camera:")
        if target.isdigit():
            return CameraSource(CameraDevice(index=int(target), name=f"camera {target}"))
        if target.startswith("/"):
            return CameraSource(CameraDevice(path=target, name=target))
        raise ConfigError(f"camera source {spec!r}: expected camera:N or camera:/dev/videoN")
    if spec.startswith("file:"):
        path = spec.removeprefix("file:")
        if not path:
            raise ConfigError("file source needs a path: file:PATH")
        return FileSource(path=str(Path(path)))
    if spec.startswith("screen"):
        match = _SCREEN_SPEC.match(spec)
        if match is None:
            raise ConfigError(f"screen source {spec!r}: expected screen[:MONITOR][@X,Y,WxH]")
        region = None
        if match["x"] is not None:
            region = ScreenRegion(
                int(match["x"]), int(match["y"]), int(match["w"]), int(match["h"])
            )
        monitor = int(match["monitor"]) if match["monitor"] is not None else None
        return ScreenSource(monitor_index=monitor, region=region)
    raise ConfigError(
        f"unknown source {spec!r}: expected test, camera:N, camera:/dev/videoN, "
        "screen[:MONITOR][@X,Y,WxH] or file:PATH"
    )


def source_stream_type(source: StreamSource) -> StreamType:
    if isinstance(source, ScreenSource):
        return StreamType.SCREEN
    return StreamType.CAMERA


# --- configuration -----------------------------------------------------------------------


class CaptureConfig(msgspec.Struct, frozen=True, kw_only=True):
    resolution: Resolution = Resolution(1280, 720)
    framerate: int = 30
    pixel_format: PixelFormat = PixelFormat.YUV420P
    buffer_count: int = 4
    auto_exposure: bool = True
    auto_focus: bool = True
    #: Sources to fall back to, in order, when the stream's device is lost mid-stream (spelled
    #: as on the command line: ``camera:/dev/video2``, ``test``); none left: the stream goes to
    #: Error with the reason (``actors.stages.capture``).
    fallback_devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for spec in self.fallback_devices:
            parse_source(spec)  # a ConfigError naming the bad one, before any actor starts


class ScreenConfig(msgspec.Struct, frozen=True, kw_only=True):
    region: ScreenRegion | None = None
    capture_cursor: bool = False
    capture_audio: bool = False
    monitor_index: int | None = None


class AudioConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Audio capture for a stream (StreamType Combined with video, or Audio alone)."""

    #: sounddevice device index or name; None picks the system default input.
    device: int | str | None = None
    sample_rate: int = 48_000
    channels: int = 2
    #: Opus target bitrate in bits per second.
    bitrate: int = 64_000

    def __post_init__(self) -> None:
        if self.sample_rate not in (8_000, 12_000, 16_000, 24_000, 48_000):
            raise ConfigError(
                f"sample rate {self.sample_rate} Hz: Opus takes 8, 12, 16, 24 or 48 kHz"
            )
        if self.channels not in (1, 2):
            raise ConfigError(f"{self.channels} channels: 1 or 2 are supported")
        if not 6_000 <= self.bitrate <= 510_000:
            raise ConfigError(f"audio bitrate {self.bitrate}: Opus takes 6 to 510 kbps")


class MotionTriggerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Record only while the picture moves, keeping ``pre_roll_s`` from before the motion."""

    #: Mean absolute luma change (0..255) between pictures ~0.2 s apart that counts as motion.
    threshold: float = 4.0
    pre_roll_s: float = 3.0
    #: Keep recording this long after the last motion.
    hold_s: float = 5.0


class RecordingConfig(msgspec.Struct, frozen=True, kw_only=True):
    output_path: str
    format: VideoFormat | None = None
    #: Rotate to a new numbered segment when a file reaches this size or duration.
    max_bytes: int | None = None
    max_duration_s: float | None = None
    #: Delete the oldest recordings in the output folder beyond this many bytes.
    quota_bytes: int | None = None
    #: Motion-triggered instead of continuous.
    trigger: MotionTriggerConfig | None = None

    def __post_init__(self) -> None:
        if self.format is None:
            suffix = self.output_path.rsplit(".", 1)[-1].lower() if "." in self.output_path else ""
            try:
                msgspec.structs.force_setattr(self, "format", VideoFormat(suffix))
            except ValueError:
                raise ConfigError(
                    f"cannot tell the recording format from {self.output_path!r}: "
                    "use a .mp4, .mov, .avi or .webm name, or give format="
                ) from None


class ViewerLimits(msgspec.Struct, frozen=True, kw_only=True):
    """How many viewers a stream takes and how its sender shards grow (the balancer's policy,
    ``shared.control.balancer``, which validates them)."""

    #: Most viewers the stream takes, across its shards.
    max_viewers: int = 1000
    #: Most viewers one shard (one sender process) takes.
    max_viewers_per_shard: int = 250
    #: Most shards the stream runs at once.
    max_shards: int = 4
    #: A shard busier than this (cores of CPU) takes no new viewer while another can.
    shard_busy_cpu: float = 0.6
    #: A shard without viewers for this long (seconds) is stopped, the first one excepted.
    idle_shard_retire_s: float = 30.0
    #: New viewers admitted per second, and the burst allowed above that rate.
    connect_rate_per_s: float = 50.0
    connect_burst: int = 100

    def __post_init__(self) -> None:
        # Checked when the config is made, by the code that will apply the limits.
        from shared.control.balancer import BalancerPolicy, ConnectionRateLimiter

        BalancerPolicy(
            max_shards=self.max_shards,
            max_viewers_per_shard=self.max_viewers_per_shard,
            max_viewers_per_stream=self.max_viewers,
            scale_up_cpu=self.shard_busy_cpu,
            retire_after_s=self.idle_shard_retire_s,
        )
        ConnectionRateLimiter(self.connect_rate_per_s, self.connect_burst)


class AccessMode(enum.StrEnum):
    #: Any viewer that reaches a shard's port watches (a trusted network, a test bench).
    OPEN = "open"
    #: A viewer watches with a valid token (``shared.auth.tokens``) or once an operator
    #: approved its request; until then it gets no media packet.
    TOKEN = "token"


class StreamAccess(msgspec.Struct, frozen=True, kw_only=True):
    """Who may watch a stream (issue: viewer access control; ``shared.auth``)."""

    mode: AccessMode = AccessMode.OPEN
    #: In token mode, a viewer without a token may ask to watch and waits for an operator.
    allow_requests: bool = True
    #: A connection that has not said hello within this long is closed.
    hello_timeout_s: float = 5.0
    #: A request nobody approves within this long lapses.
    approval_timeout_s: float = 60.0
    #: Where recordings that a viewer with ``can_record`` starts are written (None: this
    #: server records on no viewer's request, and says so).
    viewer_recordings_dir: str | None = None

    def __post_init__(self) -> None:
        check_access_timeouts(self.hello_timeout_s, self.approval_timeout_s)
        if self.viewer_recordings_dir is not None and not self.viewer_recordings_dir:
            raise ConfigError("viewer_recordings_dir must be a folder, or None")


def check_access_timeouts(hello_timeout_s: float, approval_timeout_s: float) -> None:
    """The bounds of the access timeouts (``StreamAccess``; ``shared.auth.admission``)."""
    if not 0 < hello_timeout_s <= 60:
        raise ConfigError(f"hello timeout {hello_timeout_s} s must be in (0, 60]")
    if not 0 < approval_timeout_s <= 3600:
        raise ConfigError(f"approval timeout {approval_timeout_s} s must be in (0, 3600]")


class StreamConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything needed to start one stream.

    ``source`` is spelled as on the command line (see :func:`parse_source`).
    """

    source: str = "test"
    #: What to encode at; defaults to the design's Medium preset (720p30, 1.5 Mbps).
    quality: StreamQuality = msgspec.field(
        default_factory=lambda: StreamQuality.from_preset(QualityPreset.MEDIUM)
    )
    #: Seconds between periodic IDR frames (a viewer joining waits at most this long).
    keyframe_interval_s: float = 2.0
    #: Frame pool slots between capture and encoder.
    pool_slots: int = 4
    #: Address the per-viewer QUIC senders listen on.
    listen_host: str = "127.0.0.1"
    #: PEM certificate and key for the senders; both None: a self-signed pair made at start.
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    #: Record the stream locally while it runs.
    record: RecordingConfig | None = None
    #: Capture audio too (None: video only).
    audio: AudioConfig | None = None
    #: Extra simulcast rungs below ``quality``, each encoded once (capped by the source).
    rungs: tuple[QualityPreset, ...] = ()
    name: str = ""
    #: Viewer limits and how the stream's sender shards grow.
    viewers: ViewerLimits = msgspec.field(default_factory=ViewerLimits)
    #: Who may watch: anyone who reaches the port, or token holders and approved requests.
    access: StreamAccess = msgspec.field(default_factory=StreamAccess)
    #: Shed encoder work when the node's CPU nears saturation (the top rung's frame rate
    #: halved, then top rungs retired) and restore it after (``shared.control.pressure``).
    #: ``serve`` turns it on; off by default, so a test bench or a benchmark that saturates
    #: its machine on purpose measures the stream it configured.
    shed_under_pressure: bool = False
    #: Let each rung's encoder target follow the picture's complexity (libx264's QP): a still
    #: picture needs fewer bits (``shared.control.rung_targets``).  Off by default, like
    #: shedding: the test pattern is easy content, and a benchmark measures the rates it set.
    content_aware_targets: bool = False
    #: A crashed stage actor is restarted up to ``max_restarts`` times within
    #: ``restart_window_s``; one more crash there is a crash loop and the stream goes to
    #: Error with the reason (``shared.control.restart_policy``).
    max_restarts: int = 3
    restart_window_s: float = 30.0
    #: What is asked of the capture device and where to fall back when it is lost (None:
    #: the stream's size and rate, no fallback).
    capture: CaptureConfig | None = None
    #: Higher is more important: under resource pressure lower priorities give way first.
    priority: int = 0

    def __post_init__(self) -> None:
        parse_source(self.source)  # raises ConfigError early, before any actor starts
        if not 0.1 <= self.keyframe_interval_s <= 60:
            raise ConfigError(
                f"keyframe interval {self.keyframe_interval_s}s must be between 0.1 and 60 s"
            )
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ConfigError("give both a TLS certificate and its key, or neither")
        if not 2 <= self.pool_slots <= 64:
            raise ConfigError(f"pool_slots {self.pool_slots} must be between 2 and 64")
        if self.max_restarts < 1 or self.restart_window_s <= 0:
            raise ConfigError(
                f"max_restarts {self.max_restarts} must be at least 1 and restart_window_s "
                f"{self.restart_window_s} positive"
            )


# --- sessions and viewers ---------------------------------------------------------------


class ErrorInfo(msgspec.Struct, frozen=True):
    """Why a stream or recording is in its Error state: the error class name and message."""

    kind: str
    message: str


class StreamSession(msgspec.Struct, kw_only=True):
    session_id: SessionId
    stream_type: StreamType
    source: StreamSource
    viewers: list[ViewerId]
    quality: StreamQuality
    state: StreamState
    stats: StreamStats
    created_at: float
    error: ErrorInfo | None = None
    recording: RecordingSession | None = None
    #: The stream's name (``StreamConfig.name``; the configuration file's ``name``).
    name: str = ""


class ViewerPermissions(msgspec.Struct, frozen=True, kw_only=True):
    can_view: bool = True
    can_record: bool = False
    can_control_quality: bool = False
    max_quality: QualityPreset = QualityPreset.ULTRA


class ViewerStatus(msgspec.Struct, kw_only=True):
    viewer_id: ViewerId
    peer_id: PeerId
    device_name: str
    connection_quality: ConnectionQuality
    permissions: ViewerPermissions
    connected_at: float
    bytes_sent: int
    current_quality: StreamQuality
    url: str = ""
    #: The sender shard serving it (its ticket's, or the one it reconnected to).
    shard: str = ""
    #: Where its connection stands in the viewer registry: pending (ticket issued, not yet
    #: connected), connected, reconnecting (its shard was lost), disconnected.
    state: str = ""


class ViewerTicket(msgspec.Struct, frozen=True, kw_only=True):
    """What a viewer needs to connect: the stream's URL with the pinned certificate."""

    viewer_id: ViewerId
    session_id: SessionId
    url: str
    #: In token mode, the viewer's token (a secret: give it to that viewer only; it is left
    #: out of this struct's repr so it never reaches a log).
    token: str | None = None

    def __repr__(self) -> str:
        token = "None" if self.token is None else "'<redacted>'"
        return (
            f"ViewerTicket(viewer_id={self.viewer_id!r}, session_id={self.session_id!r},"
            f" url={self.url!r}, token={token})"
        )


class RecordingSession(msgspec.Struct, kw_only=True):
    session_id: SessionId
    stream_session: SessionId
    output_path: str
    format: VideoFormat
    state: RecordingState
    file_size: int
    duration: float
    started_at: float
    frames_written: int = 0
    error: ErrorInfo | None = None
    #: Every file this recording has written so far, first to last.
    segments: list[str] = msgspec.field(default_factory=list)
    #: Segments deleted to stay within the folder's quota.
    deleted: list[str] = msgspec.field(default_factory=list)
