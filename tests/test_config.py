"""The server configuration file (``shared.config``): the example loads, and each bad file is
refused with one error naming the file, the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import load_server_config
from shared.config.locate import KeyLines
from shared.errors import ConfigError
from shared.models import AccessMode, PixelFormat, QualityPreset, Resolution

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "server.example.toml"

GOOD = """\
[[streams]]
name = "a"
listen = "127.0.0.1:5000"
"""


def test_the_example_loads_with_every_setting() -> None:
    config = load_server_config(EXAMPLE.read_text(), str(EXAMPLE))
    assert [s.name for s in config.streams] == ["lobby", "desk"]
    assert config.max_streams == 8
    assert config.cpu_admission_percent == 90
    assert config.gpu_sessions_per_gpu == 5
    assert config.secret_file == str(EXAMPLE.parent / "token.secret")
    lobby, desk = config.streams
    assert (lobby.listen_host, lobby.port, lobby.senders, lobby.priority) == (
        "127.0.0.1",
        4433,
        1,
        10,
    )
    assert lobby.config.priority == 10
    assert lobby.config.quality.resolution == Resolution(640, 360)
    assert (lobby.config.quality.framerate, lobby.config.quality.bitrate) == (25, 800_000)
    assert lobby.config.rungs == (QualityPreset.LOW,)
    assert lobby.config.capture is not None
    assert lobby.config.capture.resolution == Resolution(1280, 720)
    assert lobby.config.capture.pixel_format is PixelFormat.YUV420P
    assert lobby.config.capture.buffer_count == 4
    assert lobby.config.access.mode is AccessMode.TOKEN
    assert lobby.config.viewers.max_viewers_per_shard == 100
    assert desk.config.quality.quality_preset is QualityPreset.LOW
    assert desk.config.access.mode is AccessMode.OPEN
    assert desk.config.record is not None
    assert desk.config.record.output_path == str(EXAMPLE.parent / "recordings" / "desk.mp4")
    assert desk.config.record.max_duration_s == 600
    assert desk.config.capture is None
    # desk shares lobby's address: one process serves both there.
    assert (desk.listen_host, desk.port) == ("127.0.0.1", 4433)
    assert lobby.shared_port and desk.shared_port
    # Each stream remembers where its table begins, for errors found when it starts.
    text = EXAMPLE.read_text().splitlines()
    assert text[lobby.line - 1].strip() == "[[streams]]"
    assert text[desk.line - 1].strip() == "[[streams]]"
    assert desk.line > lobby.line


def test_defaults_for_a_minimal_stream() -> None:
    (stream,) = load_server_config(GOOD).streams
    assert stream.config.access.mode is AccessMode.TOKEN  # as serve's default
    assert stream.config.shed_under_pressure
    assert stream.config.quality.quality_preset is QualityPreset.MEDIUM
    assert stream.senders == 1
    assert stream.config.content_aware_targets
    assert (stream.config.max_restarts, stream.config.restart_window_s) == (3, 30.0)


def test_streams_may_share_a_listen_address() -> None:
    config = load_server_config(
        GOOD
        + '\n[[streams]]\nname = "b"\nlisten = "127.0.0.1:5000"\n'
        + '\n[[streams]]\nname = "c"\nlisten = "127.0.0.1:5001"\n'
    )
    a, b, c = config.streams
    assert (a.port, b.port, c.port) == (5000, 5000, 5001)
    # Only the streams that share a port are served by its one process.
    assert (a.shared_port, b.shared_port, c.shared_port) == (True, True, False)


def test_recovery_settings_reach_the_stream() -> None:
    text = GOOD + (
        "max_restarts = 5\nrestart_window_s = 60.0\n"
        "[streams.capture]\nfallback_devices = ['test']\n"
    )
    (stream,) = load_server_config(text).streams
    assert (stream.config.max_restarts, stream.config.restart_window_s) == (5, 60.0)
    assert stream.config.capture is not None
    assert stream.config.capture.fallback_devices == ("test",)


#: (id, file text, line, where, what the message says).
BAD: list[tuple[str, str, int | None, str, str]] = [
    ("not TOML", 'x = 1\n[[streams]]\nname = "a\n', 3, "", "not valid TOML"),
    ("no streams", "[server]\nmax_streams = 2\n", None, "", "missing required key 'streams'"),
    ("empty streams", "streams = []\n", 1, "streams", "length >= 1"),
    ("unknown table", GOOD + "[servr]\nmax_streams = 2\n", 4, "servr", "unknown key 'servr'"),
    (
        "misspelt key",
        GOOD + "[streams.quality]\npreset = 'low'\nfps = 30\n",
        6,
        "streams[0] (a).quality.fps",
        "unknown key 'fps'",
    ),
    (
        "frame rate too high",
        GOOD + "[streams.quality]\nframerate = 500\n",
        5,
        "streams[0] (a).quality.framerate",
        "Expected `int` <= 240, got 500",
    ),
    (
        "a string for a number",
        GOOD + 'senders = "two"\n',
        4,
        "streams[0] (a).senders",
        "Expected `int`, got `str`",
    ),
    (
        "malformed resolution",
        GOOD + '[streams.quality]\nresolution = "1280*720"\n',
        5,
        "streams[0] (a).quality.resolution",
        "expected WIDTHxHEIGHT, e.g. 1280x720, got '1280*720'",
    ),
    (
        "odd resolution",
        GOOD + '[streams.quality]\nresolution = "641x360"\n',
        4,
        "streams[0] (a).quality",
        "width and height must be even",
    ),
    (
        "custom preset without its values",
        GOOD + '[streams.quality]\npreset = "custom"\nframerate = 30\n',
        4,
        "streams[0] (a).quality",
        "preset custom needs resolution, bitrate as well",
    ),
    (
        "unknown preset in the rungs",
        GOOD + 'rungs = ["low", "tiny"]\n',
        4,
        "streams[0] (a).rungs[1]",
        "Invalid enum value 'tiny'",
    ),
    (
        "unknown source",
        GOOD + 'source = "webcam"\n',
        4,
        "streams[0] (a).source",
        "unknown source 'webcam'",
    ),
    (
        "listen without a port",
        '[[streams]]\nname = "a"\nlisten = "localhost"\n',
        3,
        "streams[0] (a).listen",
        "expected HOST:PORT, e.g. 127.0.0.1:4433, got 'localhost'",
    ),
    (
        "port out of range",
        '[[streams]]\nname = "a"\nlisten = "127.0.0.1:70000"\n',
        3,
        "streams[0] (a).listen",
        "a port up to 65535",
    ),
    (
        "a stream without a name",
        '[[streams]]\nsource = "test"\n',
        1,
        "streams[0]",
        "missing required key 'name'",
    ),
    (
        "two streams of one name",
        GOOD + '\n[[streams]]\nname = "a"\nlisten = "127.0.0.1:5001"\n',
        6,
        "streams[1] (a).name",
        "a second stream named 'a' (the first is streams[0])",
    ),
    (
        "a stream on another's port from another host",
        GOOD + '\n[[streams]]\nname = "b"\nlisten = "0.0.0.0:5000"\n',
        7,
        "streams[1] (b).listen",
        "0.0.0.0:5000 takes stream 'a''s port on another host (127.0.0.1:5000)",
    ),
    (
        "two streams on one port with different certificates",
        GOOD
        + '\n[[streams]]\nname = "b"\nlisten = "127.0.0.1:5000"\n'
        + 'tls_cert = "b.pem"\ntls_key = "b.key"\n',
        8,
        "streams[1] (b).tls_cert",
        "shares a port with stream 'a' but not its certificate",
    ),
    (
        "several senders on a shared port",
        GOOD + '\n[[streams]]\nname = "b"\nlisten = "127.0.0.1:5000"\nsenders = 4\n',
        8,
        "streams[1] (b).senders",
        "one process serves a shared port, so leave senders at 1",
    ),
    (
        "audio sample rate Opus cannot take",
        GOOD + "[streams.audio]\nsample_rate = 44100\n",
        4,
        "streams[0] (a).audio",
        "Opus takes 8, 12, 16, 24 or 48 kHz",
    ),
    (
        "pixel format nobody offers",
        GOOD + '[streams.capture]\npixel_format = "yuv444p"\n',
        5,
        "streams[0] (a).capture.pixel_format",
        "Invalid enum value 'yuv444p'",
    ),
    (
        "too few capture buffers",
        GOOD + "[streams.capture]\nbuffer_count = 1\n",
        5,
        "streams[0] (a).capture.buffer_count",
        "Expected `int` >= 2",
    ),
    (
        "recording without a format",
        GOOD + '[streams.record]\noutput_path = "out"\n',
        4,
        "streams[0] (a).record",
        "cannot tell the recording format from 'out'",
    ),
    (
        "access mode misspelt",
        GOOD + '[streams.access]\nmode = "tokens"\n',
        5,
        "streams[0] (a).access.mode",
        "Invalid enum value 'tokens'",
    ),
    (
        "a certificate without its key",
        GOOD + 'tls_cert = "c.pem"\n',
        1,
        "streams[0] (a)",
        "give both tls_cert and tls_key",
    ),
    (
        "a key of the second stream, in an inline table",
        GOOD
        + '\n[[streams]]\nname = "b"\nlisten = "127.0.0.1:5001"\n'
        + "quality = { preset = 'low', framerate = 0 }\n",
        8,
        "streams[1] (b).quality.framerate",
        "Expected `int` >= 1, got 0",
    ),
    (
        "server settings",
        "[server]\nmax_streams = 0\n" + GOOD,
        2,
        "server.max_streams",
        "Expected `int` >= 1",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "where", "what"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_a_bad_file_is_refused_at_its_line(
    text: str, line: int | None, where: str, what: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_server_config(text, "conf/server.toml")
    message = str(caught.value)
    position = "conf/server.toml" if line is None else f"conf/server.toml:{line}"
    expected_head = f"{position}: {where}: " if where else f"{position}: "
    assert message.startswith(expected_head), message
    assert what in message, message


def test_key_lines_skip_multiline_strings_and_arrays() -> None:
    text = (
        "[[streams]]\n"
        'name = """\n'
        "listen = not a key\n"
        '"""\n'
        "rungs = [\n"
        '  "low",\n'
        "  { fake = 1 },\n"
        "]\n"
        "[streams.quality]\n"
        "framerate = 3\n"
        "[[streams]]\n"
        "'quoted key'.inner = 2\n"
    )
    lines = KeyLines(text)
    assert lines.line_of(("streams", 0, "name")) == 2
    assert lines.line_of(("streams", 0, "listen")) == 1  # not a key: its table's line
    assert lines.line_of(("streams", 0, "rungs", 1, "fake")) == 5
    assert lines.line_of(("streams", 0, "quality", "framerate")) == 10
    assert lines.line_of(("streams", 1)) == 11
    assert lines.line_of(("streams", 1, "quoted key", "inner")) == 12
    assert lines.line_of(()) is None
