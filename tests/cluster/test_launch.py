"""Launch configs (Ray cluster launcher, KubeRay) and the root Dockerfile agree with the code they run:
they parse, run the real `facegen` entrypoint and the Ray version pyproject allows."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from engine.spec import build_spec
from jobs.cli import build_parser

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "cluster" / "launch"
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = f"facegen:{PYPROJECT['project']['version']}"


def docker_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M).group(1)


def requirement(name: str, extra: str | None = None) -> Requirement:
    listed = PYPROJECT["project"]["optional-dependencies"][extra] if extra else PYPROJECT["project"]["dependencies"]
    return next(r for r in map(Requirement, listed) if r.name == name)


def load(name: str) -> list[dict]:
    return list(yaml.safe_load_all((LAUNCH / name).read_text()))


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_dockerfile_pins_what_pyproject_allows():
    ray_version = docker_arg("RAY_VERSION")
    assert Version(ray_version) in requirement("ray").specifier
    assert Version(docker_arg("TORCH_VERSION")) in requirement("torch").specifier
    assert f"faiss-gpu=={docker_arg('FAISS_GPU_VERSION')}" == str(requirement("faiss-gpu", "gpu"))
    assert DOCKERFILE.startswith("#") and re.search(r"^FROM nvidia/cuda:\S+-cudnn-runtime-", DOCKERFILE, re.M)
    # Every other runtime dependency of pyproject is installed too (faiss-gpu stands in for faiss-cpu).
    for dependency in map(Requirement, PYPROJECT["project"]["dependencies"]):
        if dependency.name not in ("faiss-cpu", "torch", "ray"):
            assert f'"{dependency.name}{dependency.specifier}"' in DOCKERFILE, dependency
    assert "pip install --no-deps ." in DOCKERFILE


def test_entrypoint_is_the_facegen_command(tmp_path):
    assert PYPROJECT["project"]["scripts"]["facegen"] == "jobs.cli:main"
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/facegen-entrypoint"]' in DOCKERFILE
    assert "COPY cluster/launch/docker-entrypoint.sh /usr/local/bin/facegen-entrypoint" in DOCKERFILE
    script = str(LAUNCH / "docker-entrypoint.sh")
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}

    def entry(*args: str) -> str:
        done = subprocess.run(["sh", script, *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert entry("generate", "--help").startswith("usage: facegen generate")  # a facegen sub-command
    assert entry("--help").startswith("usage: facegen")
    assert entry("echo", "ray start --head") == "ray start --head\n"  # a command of the image runs as is


@pytest.mark.parametrize("name, provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_cluster_launcher_configs(name, provider):
    (config,) = load(name)
    assert config["provider"]["type"] == provider
    assert config["docker"]["image"] == IMAGE and "--entrypoint=" in config["docker"]["run_options"]
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}  # no generator actor on the head
    assert max(t.get("max_workers", 0) for t in nodes.values()) <= config["max_workers"]
    head, workers = " ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head --port=6379" in head
    assert "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379" in workers
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]  # the image's user is `ray`
    assert "useradd --create-home --uid 1000 --shell /bin/bash ray" in DOCKERFILE


def test_kuberay_raycluster():
    (cluster,) = load("kuberay-raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    check_cluster_spec(cluster["spec"])


def test_kuberay_rayjob_runs_the_real_cli_on_a_valid_spec():
    config_map, job = load("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    check_cluster_spec(job["spec"]["rayClusterSpec"])
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[0] == "facegen"
    args = build_parser().parse_args(command[1:])
    assert args.command == "generate" and args.executor == "ray" and args.resume
    # The spec it reads is the ConfigMap, mounted where the entrypoint looks, and it validates.
    head = containers(job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])[0]
    mount = next(m for m in head["volumeMounts"] if m["name"] == "job")
    assert Path(args.job) == Path(mount["mountPath"]) / "job.yaml"
    volumes = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "job")["configMap"]["name"] == config_map["metadata"]["name"]
    spec = build_spec(yaml.safe_load(config_map["data"]["job.yaml"]))
    assert spec.run.executor == "ray" and spec.output.uri.startswith("s3://")


def check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == docker_arg("RAY_VERSION")
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    pods = [head["template"]] + [group["template"] for group in spec["workerGroupSpecs"]]
    for pod in pods:
        for container in containers(pod):
            assert container["image"] == IMAGE
            assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
            assert any(e["name"] == "RAY_AUTH_TOKEN" and "secretKeyRef" in e["valueFrom"] for e in container["env"])
    for group in spec["workerGroupSpecs"]:
        limits = containers(group["template"])[0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1  # one generator actor per pod
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
