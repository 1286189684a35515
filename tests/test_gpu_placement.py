"""GPU-aware stream placement (shared.control.scheduler) and the stream's placement group
bundles (actors.stream_group): pure, no Ray."""

from __future__ import annotations

import pytest

from actors.placement import CPU_RESERVATION
from actors.stream_group import bundles
from shared.control.scheduler import NodeInfo, StreamScheduler
from shared.errors import ConfigError, ResourceError
from shared.models import QualityPreset, StreamQuality

SOFTWARE = StreamQuality.from_preset(QualityPreset.LOW)
HARDWARE = StreamQuality.from_preset(QualityPreset.LOW, hardware_acceleration=True)
NODES = [
    NodeInfo(node_id="cpu", cpus=8),
    NodeInfo(node_id="gpu", cpus=2, gpus=1),
]


def test_a_hardware_stream_lands_on_a_gpu_node_with_a_share_of_its_gpu() -> None:
    scheduler = StreamScheduler(gpu_sessions_per_gpu=3)
    # The CPU node has more room and is preferred, but it has no GPU.
    assert scheduler.place("hw", HARDWARE, NODES, prefer="cpu") == "gpu"
    assert scheduler.gpu_share("hw") == pytest.approx(1 / 3)
    assert scheduler.gpu_sessions_used("gpu") == 1
    # A software stream takes no session and no GPU share.
    assert scheduler.place("sw", SOFTWARE, NODES, prefer="cpu") == "cpu"
    assert scheduler.gpu_share("sw") == 0.0
    assert scheduler.gpu_sessions_used("gpu") == 1


def test_admission_refuses_a_hardware_stream_when_every_session_is_taken() -> None:
    scheduler = StreamScheduler(gpu_sessions_per_gpu=2)
    scheduler.place("a", HARDWARE, NODES)
    scheduler.place("b", HARDWARE, NODES)
    with pytest.raises(ResourceError, match=r"every GPU encoder session is taken \(gpu: 2 of 2"):
        scheduler.place("c", HARDWARE, NODES)
    # The refused stream holds nothing; a released session is free again.
    assert scheduler.node_of("c") is None
    scheduler.release("a")
    assert scheduler.place("c", HARDWARE, NODES) == "gpu"


def test_sessions_scale_with_the_gpus_of_a_node() -> None:
    scheduler = StreamScheduler(gpu_sessions_per_gpu=1)
    nodes = [
        NodeInfo(node_id="two", cpus=8, gpus=2),
        NodeInfo(node_id="dead", cpus=8, gpus=4, alive=False),
    ]
    scheduler.place("a", HARDWARE, nodes)
    scheduler.place("b", HARDWARE, nodes)
    with pytest.raises(ResourceError, match="two: 2 of 2"):
        scheduler.place("c", HARDWARE, nodes)


def test_without_any_gpu_a_hardware_stream_encodes_in_software_anywhere() -> None:
    scheduler = StreamScheduler()
    assert scheduler.place("hw", HARDWARE, [NodeInfo(node_id="laptop", cpus=2)]) == "laptop"
    assert scheduler.gpu_share("hw") == 0.0


def test_the_sessions_setting_is_checked() -> None:
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="at least 1"):
            StreamScheduler(gpu_sessions_per_gpu=bad)  # type: ignore[arg-type]


def test_the_group_holds_capture_and_encoder_with_the_encoders_gpu_share() -> None:
    capture = {"CPU": CPU_RESERVATION["capture"]}
    encoder = {"CPU": CPU_RESERVATION["encoder"]}
    assert bundles(video=True, encoder_gpus=0) == [capture, encoder]
    assert bundles(video=True, encoder_gpus=0.25) == [capture, encoder | {"GPU": 0.25}]
    assert bundles(video=False, encoder_gpus=0.25) == [capture]  # audio only: no encoder


def test_a_stream_ray_placed_elsewhere_is_counted_there() -> None:
    scheduler = StreamScheduler()
    assert scheduler.place("s", HARDWARE, NODES) == "gpu"
    scheduler.relocate("s", "cpu")
    assert (scheduler.node_of("s"), scheduler.load("gpu")) == ("cpu", 0)
    assert scheduler.load("cpu") > 0 and scheduler.gpu_sessions_used("cpu") == 1


def test_a_restored_hardware_stream_keeps_its_gpu_session() -> None:
    # A restarted supervisor counts the streams it takes back, sessions included.
    scheduler = StreamScheduler(gpu_sessions_per_gpu=1)
    scheduler.restore("old", HARDWARE, "gpu", gpu=True)
    assert scheduler.gpu_share("old") == 1.0
    with pytest.raises(ResourceError, match="gpu: 1 of 1"):
        scheduler.place("new", HARDWARE, NODES)
