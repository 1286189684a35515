"""A stream's capture and encoder, held together on one node by a STRICT_PACK placement group.

The two share the frame pool, node-local shared memory, so they must run on one node.  A
placement group reserves both actors' resources (the encoder's bundle with its share of a GPU
when it encodes in hardware) atomically on one node, before either starts: the stream either
gets a node that can hold both or none, instead of a capture started on a node whose encoder
then never schedules.  The scheduler's chosen node is the group's soft target; where Ray puts
the group is where the stream runs (its other actors follow it by node affinity).

The group is detached, like the stream's actors: it outlives a crash of the supervisor (whose
restarted self finds it by name, :func:`group_name`), and is removed when the stream stops
(:meth:`StreamGroup.remove`) or when a stream that cannot be taken back is cleaned up
(:func:`remove_stream_group`).  Ray restarts a crashed capture or encoder inside its bundle.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ray.util.placement_group import (
    PlacementGroup,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

from actors.placement import CPU_RESERVATION
from shared.errors import ResourceError

__all__ = ["CAPTURE_BUNDLE", "ENCODER_BUNDLE", "StreamGroup", "group_name", "remove_stream_group"]

logger = logging.getLogger(__name__)

CAPTURE_BUNDLE = 0
ENCODER_BUNDLE = 1
#: How long a group may wait for a node to hold it.  The scheduler only places a stream where
#: its budget fits, so a longer wait means the cluster's resources are taken by something else.
READY_TIMEOUT_S = 30.0


def group_name(session_id: str) -> str:
    return f"kz-{session_id}-pg"


def bundles(*, video: bool, encoder_gpus: float) -> list[dict[str, float]]:
    """The group's bundles: the capture's, then (for a video stream) the encoder's."""
    capture = {"CPU": CPU_RESERVATION["capture"]}
    if not video:
        return [capture]
    encoder = {"CPU": CPU_RESERVATION["encoder"]}
    if encoder_gpus > 0:
        encoder["GPU"] = encoder_gpus
    return [capture, encoder]


@dataclass
class StreamGroup:
    group: PlacementGroup
    #: Where Ray placed it: the stream's node.
    node_id: str

    @classmethod
    async def reserve(
        cls, session_id: str, node_id: str, *, video: bool, encoder_gpus: float = 0.0
    ) -> StreamGroup:
        """Reserve the stream's capture and encoder on one node, ``node_id`` if it can."""
        group = placement_group(
            bundles(video=video, encoder_gpus=encoder_gpus),
            strategy="STRICT_PACK",
            name=group_name(session_id),
            lifetime="detached",
            _soft_target_node_id=node_id,
        )
        try:
            await asyncio.wait_for(group.ready(), READY_TIMEOUT_S)
        except TimeoutError:
            remove_placement_group(group)
            wanted = bundles(video=video, encoder_gpus=encoder_gpus)
            raise ResourceError(
                f"no node could hold stream {session_id}'s capture and encoder together "
                f"({wanted}) within {READY_TIMEOUT_S:.0f} s"
            ) from None
        except BaseException:
            remove_placement_group(group)
            raise
        return cls(group, _group_node(group))

    @classmethod
    def find(cls, session_id: str) -> StreamGroup | None:
        """The running stream's group (a restarted supervisor takes it back); None if none."""
        try:
            group = get_placement_group(group_name(session_id))
        except ValueError:
            return None
        return cls(group, _group_node(group))

    @property
    def encoder_gpus(self) -> float:
        """The GPU share its encoder's bundle holds (0: none, or no encoder)."""
        bundles = self.group.bundle_specs
        return float(bundles[ENCODER_BUNDLE].get("GPU", 0)) if len(bundles) > 1 else 0.0

    def bundle(self, index: int) -> tuple[PlacementGroup, int]:
        """What ``spawn(bundle=...)`` takes to start an actor in bundle ``index``."""
        return self.group, index

    def remove(self) -> None:
        remove_placement_group(self.group)


def _group_node(group: PlacementGroup) -> str:
    nodes = placement_group_table(group)["bundles_to_node_id"]
    return str(nodes[CAPTURE_BUNDLE])


def remove_stream_group(session_id: str) -> bool:
    """Remove the stream's group if it has one (a stream cleaned up after a crash)."""
    try:
        group = get_placement_group(group_name(session_id))
    except ValueError:
        return False
    remove_placement_group(group)
    return True
