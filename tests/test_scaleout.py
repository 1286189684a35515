"""Scale-out on a real multi-node Ray cluster on this machine (a head and two worker raylets,
started by ``tests/scaleout_scenarios.py`` in a child process, since this session's process
belongs to the session's one-node cluster)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.scaleout_scenarios import FRAMES
from tests.test_pipeline import REPO

#: Frames between keyframes at the scenarios' 30 fps and the default 2 s keyframe interval:
#: a subscriber starts at the newest keyframe, up to this many packets before it subscribed.
GOP = 60


def run_scenario(name: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "tests.scaleout_scenarios", name],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    findings: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return findings


def test_each_node_receives_the_stream_once_and_serves_its_viewers() -> None:
    findings = run_scenario("relay_to_two_nodes")
    assert findings["nodes"] == 3
    # Two nodes, two shards each, a real viewer on each shard: all decode, none broken.
    frames = findings["frames"]
    assert isinstance(frames, list) and len(frames) == 4
    assert all(n >= FRAMES for n in frames), frames
    assert findings["decode_errors"] == [0, 0, 0, 0]
    forwarded = findings["forwarded"]
    assert isinstance(forwarded, dict) and sorted(forwarded) == ["e0", "e1"]
    ring_packets = findings["ring_packets"]
    assert isinstance(ring_packets, int)
    for node, count in forwarded.items():
        # Once per node: a node's two shards share its copy.  Per shard it would be twice the
        # encoder's output; the subscriber's start at the newest keyframe adds at most a GOP.
        assert 0 < count <= ring_packets + GOP, (node, count, ring_packets)
    assert findings["segments_left"] == []
