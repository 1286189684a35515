"""The deploy files agree with the code: they parse, name the Ray version installed, run
command lines the real CLI parser accepts, expose the ports those command lines listen on,
give /dev/shm room, ask for GPUs where encoders go, and set the advertised-address variable
the senders read."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from actors.cli.main import build_parser
from shared.control.shard_nodes import SHARD_RESOURCE
from shared.roq.url import ADVERTISE_ENV
from tests.test_pipeline import REPO

DEPLOY = REPO / "deploy"


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def serve_args(argv: list[str]) -> Any:
    assert argv[0] == "kizuna-stream", argv
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    return args


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def raycluster() -> tuple[dict[str, Any], dict[str, Any]]:
    cluster, service = load_all(DEPLOY / "kuberay" / "raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
    return cluster, service


def pods(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = cluster["spec"]
    found = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec["workerGroupSpecs"]:
        found[group["groupName"]] = group["template"]["spec"]
    return found


def test_the_kuberay_cluster_runs_the_installed_ray_and_one_image(
    raycluster: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    cluster, _ = raycluster
    assert cluster["spec"]["rayVersion"] == ray.__version__
    images = {c["image"] for pod in pods(cluster).values() for c in pod["containers"]}
    assert images == {"kizuna-stream:latest"}


def test_the_serve_container_listens_where_the_service_and_its_ports_point(
    raycluster: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    cluster, service = raycluster
    head = pods(cluster)["head"]
    [serve] = [c for c in head["containers"] if c["name"] == "serve"]
    args = serve_args(serve["command"])
    assert args.address == "127.0.0.1:6379"  # the head's GCS, in the same pod
    viewers, whep = port_of(args.listen), port_of(args.http)
    declared = {(p["containerPort"], p["protocol"]) for p in serve["ports"]}
    assert declared == {(viewers, "UDP"), (whep, "TCP")}
    exposed = {(p["port"], p["targetPort"], p["protocol"]) for p in service["spec"]["ports"]}
    assert exposed == {(viewers, viewers, "UDP"), (whep, whep, "TCP")}
    labels = cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # The secret file serve reads is the mounted Secret.
    mounts = {m["name"]: m["mountPath"] for m in serve["volumeMounts"]}
    assert Path(args.secret_file).parent == Path(mounts["token-secret"])


def test_every_ray_container_has_shared_memory_and_advertises_its_address(
    raycluster: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    cluster, _ = raycluster
    for name, pod in pods(cluster).items():
        assert pod["hostNetwork"] is True, name  # a shard's UDP port is the node's
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["dshm"]["emptyDir"]["medium"] == "Memory", name
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/dev/shm"] == "dshm", (name, container["name"])
            env = {e["name"]: e for e in container.get("env", [])}
            source = env[ADVERTISE_ENV]["valueFrom"]["fieldRef"]["fieldPath"]
            assert source == "status.hostIP", (name, container["name"])


def test_encoder_nodes_offer_ray_a_gpu_that_kubernetes_schedules() -> None:
    cluster, _ = load_all(DEPLOY / "kuberay" / "raycluster.yaml")
    [group] = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "encoders"]
    assert group["rayStartParams"]["num-gpus"] == "1"
    [container] = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "video" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")  # NVENC


def test_only_the_shard_workers_are_marked_as_shard_nodes() -> None:
    cluster, _ = load_all(DEPLOY / "kuberay" / "raycluster.yaml")
    marked = {}
    for group in cluster["spec"]["workerGroupSpecs"]:
        # KubeRay passes the value to `ray start --resources`: a JSON object, quoted.
        raw = group["rayStartParams"].get("resources")
        marked[group["groupName"]] = json.loads(json.loads(raw)) if raw else {}
    assert "resources" not in cluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert marked["shards"][SHARD_RESOURCE] >= 1
    assert SHARD_RESOURCE not in marked["encoders"]
    [config] = load_all(DEPLOY / "ray" / "cluster.yaml")
    types = config["available_node_types"]
    assert {name for name, t in types.items() if SHARD_RESOURCE in t["resources"]} == {"shards"}


def test_the_launcher_config_has_its_node_types_and_starts_ray_advertising_addresses() -> None:
    [config] = load_all(DEPLOY / "ray" / "cluster.yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert any("pip install" in c and "kizuna-stream" in c for c in config["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert f"export {ADVERTISE_ENV}=" in start and "ray start" in start
        assert start.index(ADVERTISE_ENV) < start.index("ray start")  # inherited by workers
    # The serve command its header tells operators to run parses.
    header = (DEPLOY / "ray" / "cluster.yaml").read_text()
    line = next(ln for ln in header.splitlines() if "'kizuna-stream serve" in ln)
    serve_args(shlex.split(line.strip().lstrip("#").strip().strip("'")))


def test_the_dockerfile_installs_the_project_and_its_default_command_parses() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert instructions[0].startswith("FROM python:3.11")
    assert "RUN pip install --no-cache-dir ." in instructions
    copied = {ln.split()[1] for ln in instructions if ln.startswith("COPY")}
    assert {"actors", "shared", "pyproject.toml"} <= copied
    [cmd] = [ln for ln in instructions if ln.startswith("CMD ")]
    args = serve_args(json.loads(cmd.removeprefix("CMD ")))
    exposed = {p for ln in instructions if ln.startswith("EXPOSE") for p in ln.split()[1:]}
    assert {f"{port_of(args.listen)}/udp", f"{port_of(args.http)}/tcp"} <= exposed
