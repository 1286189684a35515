"""Which node a stream's next shard runs on (shared.control.shard_nodes): pure, no Ray."""

from __future__ import annotations

import pytest

from actors.shard_placement import cluster_nodes
from shared.control.shard_nodes import SHARD_RESOURCE, ShardNode, choose_shard_node
from shared.errors import ConfigError, ResourceError


def node(node_id: str, cpus: float = 4, **kwargs: object) -> ShardNode:
    return ShardNode(node_id=node_id, cpus=cpus, **kwargs)  # type: ignore[arg-type]


def test_a_one_node_cluster_keeps_every_shard_on_the_streams_node() -> None:
    # Even past its capacity: over capacity beats refusing a viewer.
    assert choose_shard_node([node("head", cpus=2, shards=9)], stream_node="head") == "head"


def test_marked_shard_nodes_take_the_shards_and_spread_them() -> None:
    nodes = [
        node("head", carries_stream=True),
        node("a", shard_slots=4),
        node("b", shard_slots=4),
    ]
    # Equal load: "a" by id.  Then "b", now the less loaded: shards alternate.
    assert choose_shard_node(nodes, stream_node="head") == "a"
    nodes[1] = node("a", shard_slots=4, shards=1, carries_stream=True)
    assert choose_shard_node(nodes, stream_node="head") == "b"
    nodes[2] = node("b", shard_slots=4, shards=1, carries_stream=True)
    assert choose_shard_node(nodes, stream_node="head") == "a"


def test_load_is_relative_to_capacity() -> None:
    nodes = [node("a", shard_slots=8, shards=3), node("b", shard_slots=2, shards=1)]
    # a: 4/8 after adding, b: 2/2.
    assert choose_shard_node(nodes, stream_node="x") == "a"
    # Unmarked nodes: one shard per core.
    nodes = [node("head", cpus=2, shards=1, carries_stream=True), node("big", cpus=16, shards=3)]
    assert choose_shard_node(nodes, stream_node="head") == "big"


def test_equal_load_prefers_a_node_that_already_carries_the_stream() -> None:
    nodes = [node("a", shard_slots=4, shards=1), node("b", shard_slots=4, shards=1)]
    nodes[1] = node("b", shard_slots=4, shards=1, carries_stream=True)
    assert choose_shard_node(nodes, stream_node="head") == "b"  # no new relay
    # Unmarked: the stream's own node wins a tie (it carries the stream: no relay at all).
    nodes = [node("a", cpus=4), node("head", cpus=4, carries_stream=True)]
    assert choose_shard_node(nodes, stream_node="head") == "head"


def test_a_full_node_is_skipped_while_another_has_room() -> None:
    nodes = [node("a", shard_slots=2, shards=2, carries_stream=True), node("b", shard_slots=1)]
    assert choose_shard_node(nodes, stream_node="head") == "b"


def test_dead_shard_nodes_leave_the_other_nodes_to_serve() -> None:
    nodes = [node("head", cpus=2, carries_stream=True), node("a", shard_slots=4, alive=False)]
    assert choose_shard_node(nodes, stream_node="head") == "head"
    with pytest.raises(ResourceError, match="no live node"):
        choose_shard_node([node("head", alive=False)], stream_node="head")


def test_bad_input_is_refused() -> None:
    with pytest.raises(ConfigError, match="twice"):
        choose_shard_node([node("a"), node("a")], stream_node="a")
    with pytest.raises(ConfigError, match="negative"):
        node("a", shards=-1)
    with pytest.raises(ConfigError, match="impossible"):
        node("a", cpus=float("nan"))


def test_ray_node_table_is_read_with_the_shard_resource() -> None:
    raw = [
        {"NodeID": "h", "Alive": True, "Resources": {"CPU": 2.0}},
        {"NodeID": "w", "Alive": True, "Resources": {"CPU": 4.0, SHARD_RESOURCE: 6.0}},
        {"NodeID": "d", "Alive": False, "Resources": {}},
    ]
    nodes = cluster_nodes({"w": 2}, {"h"}, raw)
    assert nodes == [
        ShardNode(node_id="h", cpus=2.0, carries_stream=True),
        ShardNode(node_id="w", cpus=4.0, shard_slots=6.0, shards=2),
        ShardNode(node_id="d", alive=False, cpus=0.0),
    ]
    assert choose_shard_node(nodes, stream_node="h") == "w"
