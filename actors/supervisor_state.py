"""What a restarted supervisor needs to take its streams back: a record per stream in Ray's KV.

The supervisor is a named, detached actor that Ray restarts after a crash (``StreamManager``);
its streams' stage actors are detached too, so they keep streaming while it is gone (viewers
see nothing of its death).  Ray re-runs only its constructor, so what it knew is lost, except
what it wrote here: for each stream, a :class:`StreamRecord` in Ray's internal KV store (held
by the GCS, which outlives every worker), under the supervisor's own name, since several
supervisors (one per ``StreamManager``) share the namespace.

A record is written when a stream begins to start (``complete=False``: only its id) and again
once it is Active (everything needed to rebuild it); it is deleted when the stream is stopped.
On restart (:func:`records`), a complete record's stream is adopted: its stage actors are found
by name (``kz-<session>-<role>``), its shards by their name prefix.  A stream whose start was
cut short by the crash has an incomplete record: its actors are killed and its segments
removed, so the crash leaves no orphan behind.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass

import ray
from ray.experimental import internal_kv

from actors.placement import NAMESPACE
from actors.stream_group import remove_stream_group
from shared.models import ScreenConfig, StreamConfig, StreamSession
from shared.pool.shm import list_segments, unlink_segment
from shared.roq.tls import TlsIdentity

logger = logging.getLogger(__name__)

__all__ = ["StreamRecord", "delete", "kill_stream_actors", "records", "save"]


@dataclass(frozen=True)
class StreamRecord:
    session_id: str
    complete: bool = False
    session: StreamSession | None = None
    config: StreamConfig | None = None
    node_id: str = ""
    segments: tuple[str, ...] = ()
    identity: TlsIdentity | None = None
    screen: ScreenConfig | None = None


def _key(supervisor: str, session_id: str) -> bytes:
    return f"kizuna/{supervisor}/streams/{session_id}".encode()


def save(supervisor: str, record: StreamRecord) -> None:
    internal_kv._internal_kv_put(
        _key(supervisor, record.session_id), pickle.dumps(record), overwrite=True
    )


def delete(supervisor: str, session_id: str) -> None:
    internal_kv._internal_kv_del(_key(supervisor, session_id))


def records(supervisor: str) -> list[StreamRecord]:
    """Every stream record the supervisor named ``supervisor`` left."""
    found = []
    for key in internal_kv._internal_kv_list(f"kizuna/{supervisor}/streams/".encode()):
        value = internal_kv._internal_kv_get(key)
        if value is not None:
            found.append(pickle.loads(value))
    return found


def stream_actor_names(session_id: str) -> list[str]:
    prefix = f"kz-{session_id}-"
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix) and a.get("namespace", NAMESPACE) == NAMESPACE
    ]


def kill_stream_actors(session_id: str) -> list[str]:
    """Kill every actor of the stream and remove its segments: what a start cut short by a
    crash, or an adoption that failed, left behind.  The names of the actors killed."""
    killed = []
    for name in stream_actor_names(session_id):
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            killed.append(name)
        except ValueError:  # gone meanwhile
            continue
    remove_stream_group(session_id)
    for segment in list_segments(f"kz_{session_id}_"):
        unlink_segment(segment)
    return killed
