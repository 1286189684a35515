"""Awaiting a Ray actor call: a deadline, and the actor's own error instead of Ray's wrapper.

Ray raises an exception from a remote method as ``RayTaskError`` carrying the original as its
``cause`` (and as a dynamic subclass of both); callers here want the project's own error
(``CaptureError: camera /dev/video3 does not exist``), not a remote traceback, so :func:`call`
re-raises the cause.  Every control call has a deadline: an actor that hangs must not hang the
supervisor with it.  The per-frame notifications are fire-and-forget and never come here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import ray

__all__ = ["CALL_TIMEOUT_S", "call", "unwrap"]

T = TypeVar("T")

#: How long a control call to a stage actor may take (opening a camera is the slowest).
CALL_TIMEOUT_S = 10.0


def unwrap(exc: BaseException) -> BaseException:
    """The original error inside a Ray task error, so callers see ``CaptureError: ...``
    rather than a remote traceback."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


async def call(ref: Awaitable[T], timeout: float | None = CALL_TIMEOUT_S) -> T:
    """Await ``ref`` (a Ray ObjectRef) for at most ``timeout`` seconds (None: no deadline).

    TimeoutError past the deadline; the remote method's own exception if it raised one.
    """
    try:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that lands as
        # the inner await completes, and a cancelled caller would carry on.
        async with asyncio.timeout(timeout):
            return await ref
    except ray.exceptions.RayTaskError as exc:
        raise unwrap(exc) from None
