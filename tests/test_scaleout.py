"""Scale-out on a real multi-node Ray cluster on this machine (a head and two worker raylets,
started by ``tests/scaleout_scenarios.py`` in a child process, since this session's process
belongs to the session's one-node cluster)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from tests.scaleout_scenarios import FRAMES
from tests.test_pipeline import REPO

#: Frames between keyframes at the scenarios' 30 fps and the default 2 s keyframe interval:
#: a subscriber starts at the newest keyframe, up to this many packets before it subscribed.
GOP = 60


@pytest.fixture(scope="module")
def findings() -> dict[str, dict[str, object]]:
    """Every scenario, on one three-node cluster (the node loss last)."""
    scenarios = ["balanced_shards", "gpu_encoder", "node_loss"]
    result = subprocess.run(
        [sys.executable, "-m", "tests.scaleout_scenarios", *scenarios],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    found: dict[str, dict[str, object]] = json.loads(result.stdout.strip().splitlines()[-1])
    return found


def test_the_balancer_places_shards_on_both_shard_nodes_by_load(
    findings: dict[str, dict[str, object]],
) -> None:
    found = findings["balanced_shards"]
    assert found["nodes"] == 3
    # Four viewers through add_viewer, one seat per shard: four shards, two on each worker
    # (the shard nodes; the head is none), whichever node the stream itself runs on.
    nodes = found["shard_nodes"]
    assert isinstance(nodes, list)
    assert Counter(nodes) == {"edge0": 2, "edge1": 2}, nodes
    frames = found["frames"]
    assert isinstance(frames, list) and all(n >= FRAMES for n in frames), frames
    assert found["decode_errors"] == [0, 0, 0, 0]
    assert found["shards_sampled"] is True
    assert found["status_shard_nodes"] == sorted(nodes)  # `status` shows where each runs
    # The first ticket had no other shard to name; each later one names the other node's.
    assert found["alternates"] == [0, 1, 1, 1]
    # Each node other than the stream's own got one relay, which received the stream once.
    forwarded = found["forwarded"]
    assert isinstance(forwarded, dict)
    assert sorted(forwarded) == sorted({"edge0", "edge1"} - {found["stream_node"]})
    ring_packets = found["ring_packets"]
    assert isinstance(ring_packets, int)
    for node, count in forwarded.items():
        assert 0 < count <= ring_packets + GOP, (node, count, ring_packets)
    # The supervisor was killed (SIGKILL) with shards and relays on both workers, and came
    # back as a new process: it took the shards back where they run (not all on the stream's
    # node), and the relays with them.  Two more viewers started a shard on each worker,
    # reading the relay already there: no second relay, no second origin (which, had the
    # restarted supervisor not known the first, would have failed on its name).
    assert found["supervisor_restarted"] is True
    assert found["status_shard_nodes_after_restart"] == sorted(nodes)
    assert found["later_shard_nodes"] == ["edge0", "edge1"]
    assert found["same_relays_after_restart"] is True
    assert found["relays_after_restart"] == 1 + len(forwarded)  # the origin, one per node
    # Every viewer decodes on: the four the shards served throughout, never cut, and the two
    # new ones.
    after = found["frames_after_restart"]
    assert isinstance(after, list) and len(after) == 6 and all(n >= FRAMES for n in after), after
    assert found["reconnects_after_restart"] == [0] * 6
    assert found["decode_errors_after_restart"] == [0] * 6
    # The viewers gone, the idle shards retired down to the first ticket's, and a node's
    # relay went with its last shard: only the retained shard's node (if it is not the
    # stream's own) still has one.
    assert found["shards_after_retiring"] == 1
    assert found["relays_after_retiring"] == sorted({nodes[0]} - {found["stream_node"]})
    # A relay that crashed (on a node that kept no shard) left its rings; they were swept on
    # its node when its last shard retired.
    assert found["crashed_relay_rings"] != []
    assert found["crashed_rings_after_retiring"] == []
    # Stopping the stream (by the restarted supervisor) stopped its relays, every other actor
    # and its placement group, and removed every segment, remote copies too.
    assert found["relays_left"] == []
    assert found["actors_left"] == []
    assert found["group_left"] is False
    assert found["segments_left"] == []


def test_a_hardware_stream_lands_on_the_gpu_node_sharing_its_gpu(
    findings: dict[str, dict[str, object]],
) -> None:
    found = findings["gpu_encoder"]
    streams = found["streams"]
    assert isinstance(streams, list) and len(streams) == 2
    for stream in streams:
        # Capture and encoder together, on the one node declaring a GPU.
        assert stream["capture_node"] == stream["encoder_node"] == "edge1", stream
        # Two sessions per GPU: each encoder holds half of it, in its group's encoder bundle.
        assert stream["encoder_gpu"] == 0.5
        assert stream["group_strategy"] == "STRICT_PACK"
        assert stream["group_bundles"] == [{"CPU": 0.05}, {"CPU": 0.25, "GPU": 0.5}]
        # No NVENC on this machine: the encoder fell back to software, as it should.
        assert stream["codec"] == "libx264"
    refused = found["refused"]
    assert isinstance(refused, str) and "every GPU encoder session is taken" in refused
    assert found["groups_left"] == []


def test_losing_a_node_moves_its_viewer_to_a_surviving_node(
    findings: dict[str, dict[str, object]],
) -> None:
    found = findings["node_loss"]
    assert found["frames_before"] == FRAMES
    # The viewer's node is gone: it idles out, tries its URL's endpoint, then the alternate
    # (the surviving node's shard), once, and decodes on from there.
    assert found["reconnects"] == 1
    assert found["frames_after"] == FRAMES
    assert found["decode_errors"] == 0
    assert found["origin_nodes"] == ["e1"]  # the lost node's relay subscription is gone
    # Its ring can outlive it only because test nodes share /dev/shm (whether it does depends
    # on how fast the removed raylet's workers die): whatever is left, the crash sweep takes.
    assert found["lost_segments"] == found["swept"]
    assert found["lost_segments_after_sweep"] == []
    assert found["segments_left"] == []
