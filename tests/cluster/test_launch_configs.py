"""Cluster launch configs and the Docker image agree with the package: same Ray, real entrypoint."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "cluster" / "launch"


PYPROJECT = (ROOT / "pyproject.toml").read_text()  # (tomllib is not in Python 3.10)


def pinned_ray_version() -> str:
    pins = re.findall(r'^\s*"ray\[[^\]]*\]==([\d.]+)"', PYPROJECT, re.M)
    assert len(pins) == 1, "Ray must be pinned exactly, once, in pyproject.toml"
    return pins[0]


def load(name: str) -> dict:
    return yaml.safe_load((LAUNCH / name).read_text())


def test_the_entrypoint_is_the_packaged_cli():
    assert re.search(r'^facegen = "jobs\.cli:main"$', PYPROJECT, re.M)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \[.*"facegen"\]$', dockerfile, re.M)


def test_dockerfile_pins_the_same_ray_and_faiss_gpu():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={pinned_ray_version()}" in dockerfile
    assert "ARG FAISS_GPU_VERSION=1.15.1" in dockerfile
    assert re.search(r"^FROM nvidia/cuda:\S+", dockerfile, re.M)
    torch_pin = re.search(r"ARG TORCH_VERSION=([\d.]+)", dockerfile).group(1)
    assert tuple(int(x) for x in torch_pin.split(".")[:2]) >= (2, 3)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cluster_launcher_configs(name):
    config = load(name)
    assert config["provider"]["type"] == name.removesuffix(".yaml")
    assert "facegen" in config["docker"]["image"]
    assert pinned_ray_version() in (LAUNCH / name).read_text()
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])


def test_kuberay_cluster_and_job():
    cluster, job = load("kuberay-raycluster.yaml"), load("kuberay-rayjob.yaml")
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    assert cluster["spec"]["rayVersion"] == job["spec"]["rayClusterSpec"]["rayVersion"] == pinned_ray_version()
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["facegen", "generate"] and "--executor" in entry
    # The entrypoint parses with the real CLI.
    from jobs.cli import build_parser

    args = build_parser().parse_args(entry[1:])
    assert args.command == "generate" and args.executor == "ray"
    images = [c["image"] for spec in (cluster["spec"], job["spec"]["rayClusterSpec"])
              for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"]]
    assert len(images) == 4 and all("facegen" in image for image in images)
    workers = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == 1
