"""How the supervisor places a stream's actors: all on one node, named for the dashboard.

Frame pools and packet rings are POSIX shared memory, which exists per node, so every actor of
one stream runs on one node: the capture and the encoder in the stream's STRICT_PACK placement
group (``actors.stream_group``), the others pinned to the group's node by a hard node-affinity
constraint.  Sender shards the balancer places on other nodes read a relay's copy there
(``actors.shard_placement``).
Actors reserve little or no CPU in Ray's accounting: they are I/O-paced (capture at the frame
rate, senders at the network's pace) and a reservation of a whole CPU each would cap a 2-core
machine at two actors.  The encoder, the one CPU-heavy stage, reserves a fraction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from actors.handles import Handle

NAMESPACE = "kizuna"
#: A StreamManager's supervisor is named this plus a random suffix (``kizuna-stream viewers``
#: looks a running server's up by it).
SUPERVISOR_PREFIX = "kizuna-supervisor-"

#: CPU reservation per actor kind, as Ray accounts it (not a limit on real use).
CPU_RESERVATION: dict[str, float] = {
    "capture": 0.05,
    "encoder": 0.25,
    "sender": 0.05,
    "recorder": 0.05,
    "quality": 0.0,
    "webrtc": 0.05,
    "relay_origin": 0.05,
    "relay": 0.05,
}


A = TypeVar("A")
H = TypeVar("H", bound=Handle[Any])
P = ParamSpec("P")


def spawn(
    actor_class: Callable[P, A],
    handle: type[H],
    *,
    name: str,
    node_id: str,
    options: dict[str, Any] | None = None,
    max_restarts: int = 0,
    bundle: tuple[PlacementGroup, int] | None = None,
) -> Callable[P, H]:
    """A starter for ``actor_class`` on ``node_id``: call it with the actor's own constructor
    arguments (checked by mypy against ``actor_class.__init__``) to start the actor and get
    the typed ``handle`` on it.  The actor is detached: it outlives a crash of the supervisor
    that started it, whose restarted self takes it back by name (``actors.supervisor_state``);
    the supervisor kills it when its stream stops.
    ``max_restarts``: how often Ray restarts its process after a crash (-1: always; the
    supervisor's crash-loop policy, ``actors.recovery``, is what bounds it then).
    ``bundle``: start it in this bundle of a placement group (on the group's node, which
    ``node_id`` must name) instead of by node affinity.

    ``spawn(SenderActor, SenderHandle, name=..., node_id=...)(session_id, viewer_id, ...)``
    reads like Ray's own ``ray.remote(cls).options(...).remote(...)``.
    """
    if actor_class is not handle.actor_class:
        raise TypeError(f"{handle.__name__} wraps {handle.actor_class.__name__}, not {actor_class}")

    strategy: Any = (
        NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        if bundle is None
        else PlacementGroupSchedulingStrategy(
            placement_group=bundle[0], placement_group_bundle_index=bundle[1]
        )
    )

    def start(*args: P.args, **kwargs: P.kwargs) -> H:
        actor = (
            ray.remote(handle.actor_class)
            .options(
                name=name,
                namespace=NAMESPACE,
                num_cpus=CPU_RESERVATION[handle.kind],
                max_restarts=max_restarts,
                lifetime="detached",
                scheduling_strategy=strategy,
                **(options or {}),
            )
            .remote(*args, **kwargs)
        )
        return handle(actor)

    return start
