"""Launch configs (Ray cluster launcher, KubeRay) and the root Dockerfile agree with the code they run,
beyond tests/cluster/test_launch_configs.py: pins within pyproject, launchers overriding the facegen
entrypoint, token authentication wired on every node, the RayJob's spec and CLI."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from facegen.engine.spec import build_spec
from facegen.jobs.cli import build_parser

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
    assert Version(docker_arg("RAY_VERSION")) in requirement("ray").specifier
    assert Version(docker_arg("TORCH_VERSION")) in requirement("torch").specifier
    # faiss-gpu of the `gpu` extra replaces the faiss-cpu dependency (both are the `faiss` module).
    assert f"faiss-gpu=={docker_arg('FAISS_GPU_VERSION')}" == str(requirement("faiss-gpu", "gpu"))
    assert requirement("faiss-cpu") and "pip uninstall -y faiss-cpu" in DOCKERFILE
    extras = re.search(r'pip install "\.\[([a-z0-9,]+)\]"', DOCKERFILE).group(1).split(",")
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])
    assert re.search(r"^FROM nvidia/cuda:\S+-cudnn-runtime-", DOCKERFILE, re.M)


def test_entrypoint_is_the_facegen_command_and_launchers_override_it():
    assert PYPROJECT["project"]["scripts"]["facegen"] == "facegen.jobs.cli:run"
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "facegen"]' in DOCKERFILE
    for name in ("aws.yaml", "gcp.yaml"):
        assert "--entrypoint ''" in load(name)[0]["docker"]["run_options"]
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        (resource,) = load(name)
        spec = resource["spec"].get("rayClusterSpec", resource["spec"])
        for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            assert all(c["command"] == ["/bin/bash", "-lc", "--"] for c in containers(pod))


@pytest.mark.parametrize("name, provider", [("aws.yaml", "aws"), ("gcp.yaml", "gcp")])
def test_cluster_launcher_configs(name, provider):
    (config,) = load(name)
    assert config["provider"]["type"] == provider
    assert config["docker"]["image"] == IMAGE
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"] == {"CPU": 0}  # no generator actor on the head
    assert max(t.get("max_workers", 0) for t in nodes.values()) <= config["max_workers"]
    head, workers = " ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head --port=6379" in head
    assert "RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379" in workers
    assert "/root/.ray/auth_token" in config["file_mounts"]  # the image runs as root
    # Each node refuses an image whose Ray is not the pinned one.
    (check,) = config["setup_commands"]
    assert f"ray.__version__ == '{docker_arg('RAY_VERSION')}'" in check


def test_kuberay_raycluster():
    (cluster,) = load("kuberay-raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    check_cluster_spec(cluster["spec"])


def test_kuberay_rayjob_runs_the_real_cli_on_a_valid_spec():
    (job,) = load("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    check_cluster_spec(job["spec"]["rayClusterSpec"])
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[0] == "facegen"
    args = build_parser().parse_args(command[1:])
    assert args.command == "generate" and args.executor == "ray" and args.resume
    # The spec it reads is the ConfigMap the header tells to create, mounted where the entrypoint looks.
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    mount = next(m for m in containers(head)[0]["volumeMounts"] if m["name"] == "job")
    assert Path(args.job) == Path(mount["mountPath"]) / "job.yaml"
    config_map = next(v for v in head["spec"]["volumes"] if v["name"] == "job")["configMap"]["name"]
    example = re.search(rf"kubectl create configmap {config_map} --from-file=job\.yaml=(\S+)",
                        (LAUNCH / "kuberay-rayjob.yaml").read_text()).group(1)
    assert build_spec(yaml.safe_load((ROOT / example).read_text())).identities > 0


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
