"""Named POSIX shared-memory segments whose lifetime this project owns.

Why not let :mod:`multiprocessing` manage lifetime
--------------------------------------------------
Python 3.11 and 3.12 register every :class:`~multiprocessing.shared_memory.SharedMemory` with
the ``resource_tracker`` process, on create *and* on attach.  When a process that merely attached
exits (one with its own tracker, such as a Ray worker; spawn children share their parent's),
its tracker believes the segment leaked: it prints a "leaked shared_memory objects"
warning and unlinks the name, so a reader going away destroys the writer's segment for everyone
who attaches later.  Python 3.13 added ``track=False``; on 3.11/3.12 we unregister right after
create/attach.  (A process killed between those two calls leaves one registration behind; the
window is a few microseconds and the worst outcome is the name being unlinked early, which the
mapped processes do not notice.)

With tracking off, lifetime is explicit:

* the creator unlinks its segment (``Segment.unlink`` / ``unlink_segment``);
* :func:`sweep_stale_segments` removes what crashed runs left behind.  Each segment starts
  with a 64-byte header naming its creator by pid *and* process start time, so a recycled pid
  does not keep a dead run's segment alive;
* creating a name that already exists reclaims it if its creator is dead, and refuses if alive.

Pids mean something only inside one pid namespace: containers sharing /dev/shm (``--ipc=host``)
would judge each other's segments by the wrong process table, so each must sweep only its own.

Unlinking goes through ``_posixshmem.shm_unlink`` directly: ``SharedMemory.unlink`` on 3.11/3.12
would send the tracker a second "unregister" that makes it print a KeyError traceback.

Common header (little-endian, 64 bytes, one cache line)::

    0  magic        8s   b"KZSHMSEG", written last so a half-built segment has none
    8  version      u32  LAYOUT_VERSION
    12 kind         u32  SegmentKind
    16 creator pid  i64
    24 start time   f64  psutil create_time() of the creator
    32 closed       u32  1 once the creator has closed its handle
    40 data size    i64  bytes after the header (Segment.buf)
"""

from __future__ import annotations

import _posixshmem  # type: ignore[import-not-found]
import enum
import errno
import functools
import os
import struct
import sys
import time
from collections.abc import Callable
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, Self

import psutil

from shared.errors import ConfigError, ResourceError
from shared.pool.doorbell import Doorbell, DoorbellListener

__all__ = [
    "HEADER_BYTES",
    "LAYOUT_VERSION",
    "MAGIC",
    "Segment",
    "SegmentKind",
    "attach_segment",
    "create_segment",
    "list_segments",
    "segment_name",
    "sweep_stale_segments",
    "unlink_segment",
]

MAGIC: Final = b"KZSHMSEG"
LAYOUT_VERSION: Final = 1
HEADER_BYTES: Final = 64
#: macOS limits names to 31 bytes including the leading slash that shm_open wants.
MAX_NAME_LENGTH: Final = 30
#: A segment without magic younger than this may be mid-creation, not corrupt.
CREATION_GRACE_S: Final = 5.0
#: psutil derives start times from the boot time in /proc/stat, which moves when the wall clock
#: is stepped; a pid recycled within a second of the dead creator's start is not a real risk.
_START_TIME_TOLERANCE_S: Final = 1.0
_HEADER: Final = struct.Struct("<8sIIqdIIq16x")
_CLOSED_FLAG_OFFSET: Final = 32
_NAME_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SHM_DIR: Final = Path("/dev/shm")


class SegmentKind(enum.IntEnum):
    """What layout follows the common header."""

    FRAME_POOL = 1
    PACKET_RING = 2


def _validate_name(name: str) -> None:
    if not name or len(name) > MAX_NAME_LENGTH or not _NAME_CHARS.issuperset(name):
        raise ConfigError(
            f"shared memory name {name!r} is invalid: it must be 1 to {MAX_NAME_LENGTH} "
            "characters from [A-Za-z0-9_-]"
        )


def segment_name(session_id: str, role: str) -> str:
    """The segment name for one role (``"frames"``, ``"packets"``) of one session.

    Deterministic, so any process that knows the session can attach without being told.
    """
    name = f"kz_{session_id}_{role}"
    _validate_name(name)
    return name


def _open_untracked(name: str, *, create: bool, size: int = 0) -> SharedMemory:
    if sys.version_info >= (3, 13):
        return SharedMemory(name, create=create, size=size, track=False)
    shm = SharedMemory(name, create=create, size=size)
    resource_tracker.unregister(f"/{name}", "shared_memory")
    return shm


def _shm_unlink(name: str) -> bool:
    try:
        _posixshmem.shm_unlink(f"/{name}")
    except FileNotFoundError:
        return False
    return True


@functools.cache
def _start_time(pid: int) -> float:
    """Start time of a live process; cached per pid, so a fork (a new pid) is looked up anew."""
    return float(psutil.Process(pid).create_time())


def _creator_alive(pid: int, start_time: float) -> bool:
    if pid <= 0:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped
            return False
        return abs(float(process.create_time()) - start_time) < _START_TIME_TOLERANCE_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's live process: not ours to judge
        return True


class Segment:
    """One mapping of a named segment.  Build with :func:`create_segment` or
    :func:`attach_segment`."""

    def __init__(self, shm: SharedMemory, name: str, kind: SegmentKind, *, owner: bool) -> None:
        self.name: Final = name
        self.kind: Final = kind
        #: True for the handle that created the segment (and is expected to unlink it).
        self.owner: Final = owner
        self._shm: SharedMemory | None = shm
        mapping = shm.buf
        assert mapping is not None
        self._mapping: memoryview | None = mapping
        self._buf: memoryview | None = None
        self._unlinked = False

    def _bind_data(self, data_size: int) -> None:
        assert self._mapping is not None
        self._buf = self._mapping[HEADER_BYTES : HEADER_BYTES + data_size]

    @property
    def buf(self) -> memoryview:
        """Writable bytes after the common header (the kind-specific layout)."""
        if self._buf is None:
            raise ResourceError(f"shared memory segment {self.name} is closed")
        return self._buf

    def _header(self) -> tuple[Any, ...]:
        if self._mapping is None:
            raise ResourceError(f"shared memory segment {self.name} is closed")
        return _HEADER.unpack_from(self._mapping)

    @property
    def creator_pid(self) -> int:
        return int(self._header()[3])

    @property
    def creator_closed(self) -> bool:
        """Whether the creator has closed its handle (the writer is gone)."""
        return bool(self._header()[5])

    @property
    def closed(self) -> bool:
        """Whether this handle is closed."""
        return self._shm is None

    def close(self) -> None:
        """Unmap this handle (idempotent).  The creator also raises the closed flag first.

        Raises ResourceError if views into ``buf`` are still alive; drop them and call again.
        """
        if self._shm is None or self._mapping is None:
            return
        if self.owner:
            struct.pack_into("<I", self._mapping, _CLOSED_FLAG_OFFSET, 1)
        try:
            if self._buf is not None:
                self._buf.release()
            self._mapping.release()
        except BufferError as exc:
            raise ResourceError(
                f"cannot close shared memory segment {self.name}: views into it are still alive"
            ) from exc
        self._buf = self._mapping = None
        self._shm.close()
        self._shm = None

    def unlink(self) -> None:
        """Remove the name (idempotent; already gone is fine).  Mapped handles keep working."""
        if not self._unlinked:
            _shm_unlink(self.name)
            self._unlinked = True


def _check_free_space(name: str, total: int) -> None:
    if not _SHM_DIR.is_dir():
        return
    stats = os.statvfs(_SHM_DIR)
    free = stats.f_bavail * stats.f_frsize
    if total > free:
        raise ResourceError(
            f"not enough shared memory for segment {name}: it needs {total} bytes and "
            f"{_SHM_DIR} has {free} free (raise the container's --shm-size, or use fewer or "
            "smaller slots)"
        )


def _reserve_pages(name: str, total: int) -> None:
    # tmpfs allocates lazily: without this, running out of /dev/shm shows up later as SIGBUS
    # on a page fault in the middle of a frame copy instead of as an error here.
    if not _SHM_DIR.is_dir():
        return
    fd = os.open(_SHM_DIR / name, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, total)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise ResourceError(
                f"not enough shared memory for segment {name} ({total} bytes): {exc.strerror}"
            ) from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    finally:
        os.close(fd)


def create_segment(
    name: str,
    size: int,
    kind: SegmentKind,
    *,
    init: Callable[[memoryview], None] | None = None,
) -> Segment:
    """Create segment ``name`` with ``size`` usable bytes after the common header.

    ``init`` fills the kind-specific layout before the magic is written, so an attaching
    process never sees a half-initialised segment.  An existing segment with the same name is
    reclaimed if its creator is dead; if alive, ResourceError.
    """
    _validate_name(name)
    if size <= 0:
        raise ConfigError(f"segment {name}: size must be positive, not {size}")
    total = HEADER_BYTES + size
    _check_free_space(name, total)
    for _ in range(3):
        try:
            shm = _open_untracked(name, create=True, size=total)
            break
        except FileExistsError:
            _reclaim(name)
        except (OSError, ValueError, OverflowError) as exc:
            _shm_unlink(name)
            raise ResourceError(f"cannot create shared memory segment {name}: {exc}") from exc
    else:
        raise ResourceError(f"segment {name} keeps reappearing while being reclaimed")
    segment = Segment(shm, name, kind, owner=True)
    try:
        _reserve_pages(name, total)
        segment._bind_data(size)
        pid = os.getpid()
        assert segment._mapping is not None
        header = (bytes(8), LAYOUT_VERSION, kind, pid, _start_time(pid), 0, 0, size)
        _HEADER.pack_into(segment._mapping, 0, *header)  # magic stays zero until init is done
        if init is not None:
            init(segment.buf)
        segment._mapping[: len(MAGIC)] = MAGIC
    except BaseException:
        segment.close()
        segment.unlink()
        raise
    return segment


def attach_segment(name: str, kind: SegmentKind) -> Segment:
    """Map an existing segment, checking magic, layout version and kind."""
    _validate_name(name)
    try:
        shm = _open_untracked(name, create=False)
    except FileNotFoundError:
        raise ResourceError(f"shared memory segment {name} does not exist") from None
    except ValueError:  # zero-length file: its creator has not sized it yet
        raise ResourceError(f"shared memory segment {name} is not initialised yet") from None
    segment = Segment(shm, name, kind, owner=False)
    problem = None
    if shm.size < HEADER_BYTES:
        problem = "is too short to hold a header"
    else:
        magic, version, found_kind, _, _, _, _, data_size = segment._header()
        if magic != MAGIC:
            problem = "has no kizuna header (not initialised yet, or not ours)"
        elif version != LAYOUT_VERSION:
            problem = f"has layout version {version}, this build reads {LAYOUT_VERSION}"
        elif found_kind != kind:
            found = {k.value: k.name for k in SegmentKind}.get(found_kind, f"kind {found_kind}")
            problem = f"holds a {found.lower()}, not a {kind.name.lower()}"
        elif HEADER_BYTES + data_size > shm.size:
            problem = "is shorter than its header says"
        else:
            segment._bind_data(data_size)
    if problem is not None:
        segment.close()
        raise ResourceError(f"shared memory segment {name} {problem}")
    return segment


def unlink_segment(name: str) -> bool:
    """Remove segment ``name``; False if it was already gone."""
    _validate_name(name)
    return _shm_unlink(name)


class _Verdict(enum.Enum):
    GONE = "gone"
    ALIVE = "alive"  # creator running, or another user's segment we cannot read
    YOUNG = "young"  # no magic yet, but maybe mid-creation
    STALE = "stale"  # creator dead, or no magic for longer than the creation grace


def _inspect(name: str, now: float) -> tuple[_Verdict, int]:
    """Judge one existing segment by its header: (verdict, creator pid or 0)."""
    # Read through a plain descriptor, not a mapping: this works for a zero-length segment
    # (created, not yet sized) and involves no resource tracker.
    try:
        fd = _posixshmem.shm_open(f"/{name}", os.O_RDONLY, 0)
    except FileNotFoundError:
        return _Verdict.GONE, 0
    except PermissionError:  # another user's segment
        return _Verdict.ALIVE, 0
    try:
        stat = os.fstat(fd)
        raw = os.pread(fd, HEADER_BYTES, 0)
    finally:
        os.close(fd)
    if len(raw) < HEADER_BYTES or raw[: len(MAGIC)] != MAGIC:
        young = now - max(stat.st_mtime, stat.st_ctime) < CREATION_GRACE_S
        return (_Verdict.YOUNG if young else _Verdict.STALE), 0
    _, _, _, pid, start_time, _, _, _ = _HEADER.unpack_from(raw)
    return (_Verdict.ALIVE if _creator_alive(pid, start_time) else _Verdict.STALE), pid


def _reclaim(name: str) -> None:
    verdict, pid = _inspect(name, time.time())
    if verdict is _Verdict.ALIVE:
        raise ResourceError(
            f"segment {name} is in use by {f'pid {pid}' if pid else 'another user'}"
        )
    if verdict is _Verdict.YOUNG:
        raise ResourceError(f"segment {name} is being created by another process")
    if verdict is _Verdict.STALE:
        _shm_unlink(name)


def list_segments(prefix: str = "kz_") -> list[str]:
    """Names of the segments starting with ``prefix`` ([] where /dev/shm does not exist)."""
    if not _SHM_DIR.is_dir():
        return []
    return sorted(entry for entry in os.listdir(_SHM_DIR) if entry.startswith(prefix))


def sweep_stale_segments(prefix: str = "kz_", *, now: float | None = None) -> list[str]:
    """Unlink segments left by crashed runs: creator dead, or header missing for longer than
    the creation grace.  Returns the names removed.

    Run it at startup, before creating segments: a segment whose dead creator is being
    replaced at the same instant could be judged on the old header and removed.
    """
    when = time.time() if now is None else now
    removed = []
    for name in list_segments(prefix):
        verdict, _ = _inspect(name, when)
        if verdict is _Verdict.STALE and _shm_unlink(name):
            removed.append(name)
    return removed


class SegmentHandle:
    """The lifetime every structure laid over a segment shares (frame pool, packet ring).

    The creating handle is the writer and owns the segment's doorbell, which it rings after
    every commit; readers ``listen()`` to it.  ``close`` unmaps (marking the segment closed and
    hanging up the doorbell when the writer closes), ``unlink`` removes the name, and leaving a
    ``with`` block does both for the writer and closes a reader.
    """

    #: What the structure is called in error messages.
    kind_name: ClassVar[str] = "segment"

    def __init__(self, segment: Segment) -> None:
        self._segment: Final = segment
        #: The writer's wake-up for readers (:mod:`shared.pool.doorbell`); None on readers.
        self._doorbell: Doorbell | None = None
        if segment.owner:
            try:
                self._doorbell = Doorbell(segment.name)
            except BaseException:
                segment.close()
                segment.unlink()
                raise

    @property
    def name(self) -> str:
        return self._segment.name

    @property
    def is_writer(self) -> bool:
        return self._segment.owner

    @property
    def writer_closed(self) -> bool:
        """Whether the writer has closed it (nothing more will be written)."""
        return self._live_segment().creator_closed

    @property
    def readers(self) -> int:
        """Readers listening to this segment's doorbell (writer only; 0 on a reader).

        A reader that went away is noticed at the writer's next commit."""
        return self._doorbell.readers if self._doorbell is not None else 0

    @property
    def doorbell(self) -> Doorbell | None:
        """The writer's doorbell (None on a reader handle), for its counters."""
        return self._doorbell

    def listen(self) -> DoorbellListener:
        """A wake-up for each commit the writer makes from now on (a reader's call)."""
        self._live_segment()
        return DoorbellListener(self.name)

    def _ring(self, sequence: int) -> None:
        """After a commit: wake every reader (never blocks; see :mod:`shared.pool.doorbell`)."""
        if self._doorbell is not None:
            self._doorbell.ring(sequence)

    def _live_segment(self) -> Segment:
        if self._segment.closed:
            raise ResourceError(f"{self.kind_name} {self.name} is closed")
        return self._segment

    def _release_views(self) -> None:
        """Drop every view into the mapping; a mapping with live views cannot be unmapped."""

    def close(self) -> None:
        """Unmap this handle (idempotent)."""
        if self._doorbell is not None:
            self._doorbell.close()  # readers see end-of-file: nothing more will be written
        if not self._segment.closed:
            self._release_views()
            self._segment.close()

    def unlink(self) -> None:
        """Remove the name (idempotent).  Normally done by the writer."""
        self._segment.unlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._segment.owner:
                self.unlink()
        finally:
            self.close()
