"""Shared fixtures: one local Ray cluster for the whole session, tool checks, leak checks.

A test that needs a system tool (ffprobe, ...) skips where it is missing, except in CI
(CI=true), where a missing tool is a failure: CI must run every test.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from typing import NamedTuple

import psutil
import pytest

from shared.pool.shm import list_segments


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (bash deploy/quickstart.sh test installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """The session's Ray cluster; yields its GCS address so subprocesses can join it."""
    import ray

    # address="local": always a fresh cluster of our own, never one a stray `ray start` left
    # running on this machine (ray.init() alone would join it).
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace="kizuna",
        log_to_driver=False,
        # Ray exports custom metrics every 10 s by default; the metrics test waits for two
        # exports, so a 2 s period saves it most of its time.
        _system_config={"metrics_report_interval_ms": 2000},
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def stream_actors(session_id: str | None = None) -> list[str]:
    import ray

    prefix = f"kz-{session_id}-" if session_id else "kz-"
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    ]


def stream_groups(session_id: str | None = None) -> list[str]:
    """The stream placement groups (``actors.stream_group``) not yet removed."""
    from ray.util import placement_group_table

    prefix = f"kz-{session_id}-" if session_id else "kz-"
    return [
        group["name"]
        for group in placement_group_table().values()
        if group["name"].startswith(prefix) and group["state"] != "REMOVED"
    ]


def doorbells(prefix: str = "kz_") -> list[str]:
    """The segment doorbells (abstract UNIX sockets, ``shared.pool.doorbell``) bound on this
    host whose segment name starts with ``prefix``."""
    with open("/proc/net/unix") as table:
        names = [line.split()[-1] for line in table.read().splitlines()[1:] if line.split()]
    return sorted(n for n in names if n.startswith(f"@kizuna/{prefix}"))


class ShmSnapshot(NamedTuple):
    """The segments and doorbells present at some moment (another program's live streams
    included), so a test that cannot name its stream checks only what appeared since."""

    segments: frozenset[str]
    doorbells: frozenset[str]


def shm_snapshot() -> ShmSnapshot:
    return ShmSnapshot(frozenset(list_segments()), frozenset(doorbells()))


def _someone_elses(segment: str) -> bool:
    """Whether ``segment`` was made by a live process outside this test session (another
    program's stream on this machine): this session's Ray workers are its descendants."""
    try:
        with open(f"/dev/shm/{segment}", "rb") as file:
            header = file.read(24)
    except OSError:
        return False
    if len(header) < 24:
        return False
    pid = int.from_bytes(header[16:24], "little")
    try:
        creator = psutil.Process(pid)
        if creator.status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.Error:
        return False  # dead: a leak, whoever made it
    ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    return pid not in ours


def wait_for_no_leaks(
    session_id: str | None = None, timeout: float = 15.0, *, since: ShmSnapshot | None = None
) -> None:
    """Fail unless every actor, shared-memory segment and doorbell of the stream(s) is gone.

    Without a session id every stream's count, except what ``since`` already held and what a
    live process outside this test session made (another program's stream)."""
    prefix = f"kz_{session_id}_" if session_id else "kz_"
    old = since or ShmSnapshot(frozenset(), frozenset())
    deadline = time.monotonic() + timeout
    while True:
        actors = stream_actors(session_id) + stream_groups(session_id)
        segments = [name for name in list_segments(prefix) if name not in old.segments]
        bells = [name for name in doorbells(prefix) if name not in old.doorbells]
        if session_id is None:
            theirs = {name for name in segments if _someone_elses(name)}
            segments = [name for name in segments if name not in theirs]
            bells = [name for name in bells if name.removeprefix("@kizuna/") not in theirs]
        if not actors and not segments and not bells:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"leaked after stop: actors {actors}, shared memory {segments}, doorbells {bells}"
            )
        time.sleep(0.2)
