"""Where each key of a TOML document is: its line, for error messages.

``tomllib`` parses TOML 1.0 but keeps no positions, and ``tomlkit`` (which round-trips a
document) does not expose line numbers either.  A TOML document's structure is visible line by
line, though (TOML 1.0: a key/value pair, ``[table]`` and ``[[array-of-tables]]`` headers each
start a line), so this module scans the text once, after ``tomllib`` has accepted it, and
records the line of every header and every key, as the full path a validator reports
(``("streams", 0, "quality", "framerate")``).  Keys inside an inline table or a multi-line
array are found through their nearest recorded ancestor: :meth:`KeyLines.line_of` falls back
to the longest recorded prefix of the path.

Only the structure needed for that is understood: bare, quoted and dotted keys, both header
kinds, and multi-line strings and arrays (skipped, so their contents are never taken for keys).
"""

from __future__ import annotations

import re

__all__ = ["KeyLines", "KeyPath", "format_path", "parse_validation_path"]

KeyPath = tuple[str | int, ...]

_KEY = r"(?:[A-Za-z0-9_-]+|\"(?:[^\"\\]|\\.)*\"|'[^']*')"
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_ARRAY_HEADER = re.compile(rf"^\s*\[\[\s*({_DOTTED})\s*\]\]")
_HEADER = re.compile(rf"^\s*\[\s*({_DOTTED})\s*\]")
_KEY_VALUE = re.compile(rf"^\s*({_DOTTED})\s*=\s*(.*)$")
_ONE_KEY = re.compile(_KEY)
#: msgspec's location of a validation error: ``$.streams[0].quality`` (``$[...]`` for
#: a dict's keys, which the schema has none of).
_PATH_PART = re.compile(r"\.([A-Za-z0-9_-]+)|\[(\d+)\]")


def _split_key(dotted: str) -> list[str]:
    keys = []
    for match in _ONE_KEY.finditer(dotted):
        key = match.group(0)
        if key[0] in "\"'":
            key = key[1:-1]
        keys.append(key)
    return keys


def _bracket_depth(value: str) -> int:
    """How many ``[`` / ``{`` the value leaves open, strings and comments not counted."""
    depth = 0
    quote: str | None = None
    i = 0
    while i < len(value):
        char = value[i]
        if quote is not None:
            if char == "\\" and quote == '"':
                i += 1
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#":
            break
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        i += 1
    return depth


class KeyLines:
    """The 1-based line of every table header and key in a TOML document."""

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        #: Arrays of tables seen so far and their element count.
        self._arrays: dict[KeyPath, int] = {}
        table: KeyPath = ()
        multiline: str | None = None  # the closing quotes of a multi-line string we are in
        depth = 0  # open brackets of a multi-line array or inline table
        for number, line in enumerate(text.splitlines(), start=1):
            if multiline is not None:
                if line.count(multiline) % 2 == 1:
                    multiline = None
                continue
            if depth > 0:
                depth += _bracket_depth(line)
                continue
            if match := _ARRAY_HEADER.match(line):
                keys = _split_key(match.group(1))
                path = (*self._resolve(keys[:-1]), keys[-1])
                index = self._arrays.get(path, 0)
                self._arrays[path] = index + 1
                table = (*path, index)
                self._lines.setdefault(path, number)
                self._lines[table] = number
                continue
            if match := _HEADER.match(line):
                table = self._resolve(_split_key(match.group(1)))
                self._lines[table] = number
                continue
            if match := _KEY_VALUE.match(line):
                path = (*table, *_split_key(match.group(1)))
                self._lines[path] = number
                value = match.group(2)
                for quotes in ('"""', "'''"):
                    if value.count(quotes) % 2 == 1:
                        multiline = quotes
                if multiline is None:
                    depth = max(0, _bracket_depth(value))

    def _resolve(self, keys: list[str]) -> KeyPath:
        """A header's keys as a full path: a key naming an array of tables means its last
        element (TOML 1.0, "Array of Tables": a sub-table header belongs to the most recent
        element)."""
        path: KeyPath = ()
        for key in keys:
            path = (*path, key)
            count = self._arrays.get(path)
            if count:
                path = (*path, count - 1)
        return path

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path``, else of its nearest recorded ancestor; None for the root."""
        for end in range(len(path), 0, -1):
            line = self._lines.get(path[:end])
            if line is not None:
                return line
        return None


def parse_validation_path(location: str) -> KeyPath:
    """``$.streams[0].quality`` (msgspec's notation) as ``("streams", 0, "quality")``."""
    parts: list[str | int] = []
    for match in _PATH_PART.finditer(location.removeprefix("$")):
        name, index = match.groups()
        parts.append(int(index) if index is not None else name)
    return tuple(parts)


def format_path(path: KeyPath) -> str:
    """``("streams", 0, "quality")`` as ``streams[0].quality``, as a reader of the file
    would point at it."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text
