"""How the supervisor places a stream's actors: all on one node, named for the dashboard.

Frame pools and packet rings are POSIX shared memory, which exists per node, so every actor of
one stream is pinned to the node the scheduler chose for it (a hard node-affinity constraint).
Actors reserve little or no CPU in Ray's accounting: they are I/O-paced (capture at the frame
rate, senders at the network's pace) and a reservation of a whole CPU each would cap a 2-core
machine at two actors.  The encoder, the one CPU-heavy stage, reserves a fraction.
"""

from __future__ import annotations

from typing import Any, TypeVar

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.handles import Handle

NAMESPACE = "kizuna"

#: CPU reservation per actor kind, as Ray accounts it (not a limit on real use).
CPU_RESERVATION: dict[str, float] = {
    "capture": 0.05,
    "encoder": 0.25,
    "sender": 0.05,
    "recorder": 0.05,
    "quality": 0.0,
}


H = TypeVar("H", bound=Handle[Any])


def spawn(
    handle: type[H],
    *,
    name: str,
    node_id: str,
    args: tuple[Any, ...] = (),
    options: dict[str, Any] | None = None,
) -> H:
    """Start ``handle``'s actor class on ``node_id`` and return the typed handle on it; the
    actor dies with its owner (the supervisor)."""
    actor = (
        ray.remote(handle.actor_class)
        .options(
            name=name,
            namespace=NAMESPACE,
            num_cpus=CPU_RESERVATION[handle.kind],
            max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            **(options or {}),
        )
        .remote(*args)
    )
    return handle(actor)
