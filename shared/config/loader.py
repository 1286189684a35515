"""A server's configuration file, from its text to the models the supervisor takes.

``load_server_config(text, path)`` parses the TOML (``tomllib``), validates it against the
tables of ``shared.config.schema`` (``msgspec.convert``), checks what spans streams (unique
names; streams sharing a listen port share its address, its certificate and its one sender
process), and returns a :class:`ServerConfig` whose streams carry
ready ``StreamConfig`` values.  Anything wrong raises one ``ConfigError`` of the form::

    server.toml:14: streams[1] (lobby).quality.framerate: Expected `int` <= 240, got 500

the line found by ``shared.config.locate`` (the offending key's, else its table's).  The
loader does no I/O: the caller reads the file, and relative paths in it are joined to the
file's folder here, not looked up.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

import msgspec

from shared.config.locate import KeyLines, KeyPath, format_path, parse_validation_path
from shared.config.schema import PATTERN_MEANINGS, ServerFile, StreamEntry, parse_address
from shared.errors import ConfigError
from shared.models import (
    AudioConfig,
    MotionTriggerConfig,
    RecordingConfig,
    StreamAccess,
    StreamConfig,
    ViewerLimits,
    parse_source,
)

__all__ = ["ServerConfig", "StreamSpec", "load_server_config"]


class StreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One stream of the file, ready to start."""

    name: str
    config: StreamConfig
    listen_host: str
    port: int
    senders: int
    priority: int
    #: The WHEP endpoint's (host, port), when browsers are served too.
    http: tuple[str, int] | None = None
    #: Where the stream's table begins in the file, for errors found when it starts.
    line: int = 0
    #: Other streams of the file listen on the same port: one process serves them all and
    #: gives each viewer the stream its URL names (``actors.port_listeners``).
    shared_port: bool = False


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    streams: tuple[StreamSpec, ...]
    secret_file: str | None = None
    address: str | None = None
    max_streams: int = 16
    cpu_admission_percent: float | None = None
    gpu_sessions_per_gpu: int = 3


def _located(path: str, lines: KeyLines, raw: Any, where: KeyPath, message: str) -> ConfigError:
    line = lines.line_of(where)
    position = f"{path}:{line}" if line is not None else path
    label = format_path(where)
    # Name the stream as well as its index: "streams[1] (lobby)" reads better in a long file.
    if len(where) >= 2 and where[0] == "streams" and isinstance(where[1], int):
        try:
            name = raw["streams"][where[1]]["name"]
        except (KeyError, IndexError, TypeError):
            name = None
        if isinstance(name, str):
            rest = format_path(where[2:])
            label = f"streams[{where[1]}] ({name})" + (f".{rest}" if rest else "")
    return ConfigError(f"{position}: {label}: {message}" if label else f"{position}: {message}")


def _validation_error(
    path: str, lines: KeyLines, raw: Any, exc: msgspec.ValidationError
) -> ConfigError:
    """msgspec's ``<message> - at `$.a[0].b``` as a located ConfigError."""
    message, _, location = str(exc).rpartition(" - at ")
    if not message:
        message, location = str(exc), "$"
    where = parse_validation_path(location.strip("`"))
    # An unknown or missing key is reported at its table; point at the key itself when the
    # file has it (an unknown one), and name it either way.
    if message.startswith("Object contains unknown field"):
        key = message.split("`")[1]
        where = (*where, key)
        message = f"unknown key {key!r} (misspelt, or not a setting of this table)"
    elif message.startswith("Expected `str` matching regex"):
        pattern = message.removeprefix("Expected `str` matching regex ")
        meaning = next((m for p, m in PATTERN_MEANINGS.items() if repr(p) == pattern), None)
        found, value = _value_at(raw, where)
        message = f"{meaning or message}" + (f", got {value!r}" if found else "")
    elif ", got" not in message and message.startswith("Expected"):
        # msgspec names the bound a value broke, not the value: the reader wants both.
        found, value = _value_at(raw, where)
        if found:
            message += f", got {value!r}"
    elif message.startswith("Object missing required field"):
        key = message.split("`")[1]
        message = f"missing required key {key!r}"
    return _located(path, lines, raw, where, message)


def _value_at(raw: Any, where: KeyPath) -> tuple[bool, Any]:
    value = raw
    for part in where:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, value


def _resolve(base: PurePath, value: str | None) -> str | None:
    if value is None:
        return None
    candidate = PurePath(value)
    return str(candidate if candidate.is_absolute() else base / candidate)


def _stream_config(entry: StreamEntry, base: PurePath) -> StreamConfig:
    """The entry as the supervisor's model (plain model Structs, not the file's subclasses)."""
    quality = entry.quality.quality()
    record = None
    if entry.record is not None:
        fields = msgspec.structs.asdict(entry.record)
        trigger = entry.record.trigger
        fields["trigger"] = (
            MotionTriggerConfig(**msgspec.structs.asdict(trigger)) if trigger else None
        )
        fields["output_path"] = _resolve(base, entry.record.output_path)
        record = RecordingConfig(**fields)
    access = msgspec.structs.asdict(entry.access)
    access["viewer_recordings_dir"] = _resolve(base, entry.access.viewer_recordings_dir)
    return StreamConfig(
        name=entry.name,
        source=entry.source,
        quality=quality,
        rungs=tuple(entry.rungs),
        keyframe_interval_s=entry.keyframe_interval_s,
        pool_slots=entry.pool_slots,
        listen_host=parse_address(entry.listen)[0],
        tls_cert_path=_resolve(base, entry.tls_cert),
        tls_key_path=_resolve(base, entry.tls_key),
        record=record,
        audio=AudioConfig(**msgspec.structs.asdict(entry.audio)) if entry.audio else None,
        capture=entry.capture.capture_config(quality) if entry.capture else None,
        viewers=ViewerLimits(**msgspec.structs.asdict(entry.viewers)),
        access=StreamAccess(**access),
        shed_under_pressure=entry.shed_under_pressure,
        content_aware_targets=entry.content_aware_targets,
        max_restarts=entry.max_restarts,
        restart_window_s=entry.restart_window_s,
        priority=entry.priority,
    )


def _check_sharing(
    path: str,
    lines: KeyLines,
    raw: Any,
    where: KeyPath,
    entry: StreamEntry,
    first_name: str,
    first: StreamEntry,
) -> None:
    """``entry`` listens on ``first``'s port: allowed when they can share it.  One process
    owns a shared port and presents one certificate on it, so both name the same address,
    the same certificate, and one sender process each (the default)."""
    problem: tuple[str, str] | None = None
    if parse_address(entry.listen)[0] != parse_address(first.listen)[0]:
        problem = (
            "listen",
            f"{entry.listen} takes stream {first_name!r}'s port on another host "
            f"({first.listen}); streams sharing a port give the same address",
        )
    elif (entry.tls_cert, entry.tls_key) != (first.tls_cert, first.tls_key):
        problem = (
            "tls_cert",
            f"shares a port with stream {first_name!r} but not its certificate; a shared "
            "port presents one certificate, so give them the same tls_cert and tls_key",
        )
    elif entry.senders != 1 or first.senders != 1:
        problem = (
            "senders",
            f"shares a port with stream {first_name!r}: one process serves a shared port, "
            "so leave senders at 1",
        )
    if problem is not None:
        key, message = problem
        raise _located(path, lines, raw, (*where, key), message)


def load_server_config(text: str, path: str = "server.toml") -> ServerConfig:
    """Parse and validate a configuration file's ``text``; ``path`` names it in errors and
    is the folder relative paths in it are taken from."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line N, column M)".
        line = str(exc).rpartition("(at line ")[2].split(",")[0]
        prefix = f"{path}:{line}" if line.isdigit() else path
        raise ConfigError(f"{prefix}: not valid TOML: {exc}") from None
    lines = KeyLines(text)
    try:
        parsed = msgspec.convert(raw, ServerFile)
    except msgspec.ValidationError as exc:
        raise _validation_error(path, lines, raw, exc) from None
    base = PurePath(path).parent
    specs: list[StreamSpec] = []
    names: dict[str, int] = {}
    #: port -> the first stream listening there, and its entry.
    ports: dict[int, tuple[str, StreamEntry]] = {}
    shared: set[int] = set()
    for index, entry in enumerate(parsed.streams):
        where: KeyPath = ("streams", index)
        if entry.name in names:
            raise _located(
                path,
                lines,
                raw,
                (*where, "name"),
                f"a second stream named {entry.name!r} (the first is streams[{names[entry.name]}])",
            )
        names[entry.name] = index
        checks: list[tuple[str, Callable[[str], object], str | None]] = [
            ("source", parse_source, entry.source),
            ("listen", parse_address, entry.listen),
            ("http", parse_address, entry.http),
        ]
        for key, check, value in checks:
            try:
                if value is not None:
                    check(value)
            except ConfigError as exc:
                raise _located(path, lines, raw, (*where, key), str(exc)) from None
        host, port = parse_address(entry.listen)
        if port != 0:
            first = ports.setdefault(port, (entry.name, entry))
            if first[1] is not entry:
                _check_sharing(path, lines, raw, where, entry, *first)
                shared.add(port)
        try:
            config = _stream_config(entry, base)
        except ConfigError as exc:
            raise _located(path, lines, raw, where, str(exc)) from None
        specs.append(
            StreamSpec(
                name=entry.name,
                config=config,
                listen_host=host,
                port=port,
                senders=entry.senders,
                priority=entry.priority,
                http=parse_address(entry.http) if entry.http else None,
                line=lines.line_of(where) or 0,
            )
        )
    specs = [
        msgspec.structs.replace(spec, shared_port=True) if spec.port in shared else spec
        for spec in specs
    ]
    return ServerConfig(
        path=path,
        streams=tuple(specs),
        secret_file=_resolve(base, parsed.server.secret_file),
        address=parsed.server.address,
        max_streams=parsed.server.max_streams,
        cpu_admission_percent=parsed.server.cpu_admission_percent,
        gpu_sessions_per_gpu=parsed.server.gpu_sessions_per_gpu,
    )
