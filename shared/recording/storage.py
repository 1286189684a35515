"""StorageManager: where recordings go, how segments are named, and a quota per folder.

A recording's first file is the path the user asked for; when limits rotate it (or a crashed
recorder is restarted) later segments are numbered beside it: ``talk.mp4``, ``talk-001.mp4``,
``talk-002.mp4``.  The quota counts every recording in the folder (by extension) and deletes the
oldest first, never a file that is still being written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from shared.errors import ConfigError, RecordingError

__all__ = ["RECORDING_SUFFIXES", "StorageManager", "segment_path"]

RECORDING_SUFFIXES = frozenset({".mp4", ".mov", ".avi", ".webm"})


def segment_path(first: Path, index: int) -> Path:
    """The path of segment ``index`` of a recording whose first file is ``first``."""
    if index < 0:
        raise ConfigError(f"segment index {index} must be >= 0")
    if index == 0:
        return first
    return first.with_name(f"{first.stem}-{index:03d}{first.suffix}")


class StorageManager:
    def __init__(self, folder: Path, *, quota_bytes: int | None = None) -> None:
        if quota_bytes is not None and quota_bytes <= 0:
            raise ConfigError(f"storage quota {quota_bytes} bytes must be positive")
        self.folder = folder
        self.quota_bytes = quota_bytes

    def check_writable(self) -> None:
        if not self.folder.is_dir():
            raise RecordingError(f"cannot record into {self.folder}: the folder does not exist")
        if not os.access(self.folder, os.W_OK):
            raise RecordingError(f"cannot record into {self.folder}: the folder is not writable")

    def recordings(self) -> list[Path]:
        """Recordings in the folder, oldest first (by modification time, then name)."""
        found = []
        for entry in self.folder.iterdir():
            if entry.suffix.lower() in RECORDING_SUFFIXES and entry.is_file():
                found.append((entry.stat().st_mtime, entry.name, entry))
        return [path for _, _, path in sorted(found)]

    def used_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.recordings())

    def enforce_quota(self, *, keep: Iterable[Path] = ()) -> list[Path]:
        """Delete the oldest recordings until the folder is within its quota."""
        if self.quota_bytes is None:
            return []
        protected = {path.resolve() for path in keep}
        recordings = self.recordings()
        used = sum(path.stat().st_size for path in recordings)
        deleted = []
        for path in recordings:
            if used <= self.quota_bytes:
                break
            if path.resolve() in protected:
                continue
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            used -= size
            deleted.append(path)
        return deleted
