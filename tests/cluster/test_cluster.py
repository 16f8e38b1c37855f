"""Against a real multi-node Ray cluster on this machine (a head and two worker nodes, `ray start`, token
auth): `facegen generate --address`, `facegen submit | status | logs | stop` through the Jobs API, a
driver killed and resumed, a worker node killed mid-job. Drivers run in subprocesses, as a user's do,
so the session's embedded Ray never meets this cluster. The cluster is shared by the module; the test
that kills a worker node comes last.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facegen.cluster import jobs_api
from facegen.jobs.cli import main
from tests.cluster.outputs import assert_same_dataset
from tests.cluster.raycluster import LocalRayCluster, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
WORKERS = ["127.0.0.6", "127.0.0.7"]


@pytest.fixture(scope="module")
def cluster():
    # Node failures are detected within ~5 s instead of ~30 s (1 s health checks, 5 misses).
    config = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
    with LocalRayCluster(head_ip="127.0.0.5", head_cpus=0, system_config=config) as c:
        c.add_workers(WORKERS, num_cpus=2)
        yield c
        assert c.leftovers()  # alive until here; stop() then asserts that nothing is left


@pytest.fixture
def authenticated(cluster, monkeypatch):
    """This process finds the cluster's token where Ray's tools look for it."""
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    return cluster


def driver(cluster, *args: str, log: Path) -> subprocess.Popen:
    """`facegen …` in its own process, a client of the cluster like any user's driver."""
    env = {**cluster.env, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as handle:
        return subprocess.Popen([sys.executable, "-m", "facegen.jobs", *args], env=env, stdout=handle,
                                stderr=subprocess.STDOUT)


def wait_for(path: Path, proc: subprocess.Popen | None = None, timeout_s: float = 240, why=lambda: "") -> None:
    deadline = time.time() + timeout_s
    while not path.exists():
        assert proc is None or proc.poll() is None, f"driver exited early with {proc.returncode}"
        assert time.time() < deadline, f"{path} did not appear in {timeout_s}s {why()}"
        time.sleep(0.05)


def test_refusals_are_one_clear_line(cluster, authenticated, capsys):
    url = cluster.dashboard_url
    assert main(["status", "raysubmit_nope", "--address", url, "--token", "not-the-token"]) == 2
    assert "refused the request" in capsys.readouterr().err
    assert main(["status", "raysubmit_nope", "--address", url]) == 2  # the token from RAY_AUTH_TOKEN_PATH
    assert "does not exist" in capsys.readouterr().err
    assert main(["logs", "x", "--address", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert "no Ray dashboard answers" in err and err.count("error:") == 1


def test_submit_then_stop(cluster, authenticated, tiny_job, tmp_path, capsys):
    url, out = cluster.dashboard_url, tmp_path / "big"
    assert main(["submit", tiny_job, "--out", str(out), "--set", "identities=100000", "--set", "run.num_workers=2",
                 "--address", url, "--job-id", "facegen-stop-test"]) == 0
    assert capsys.readouterr().out.strip() == "facegen-stop-test"
    # Stop a driver that runs (Ray leaves a driver stopped within milliseconds of its start orphaned).
    wait_for(out / "job.sha256", why=lambda: str(jobs_api.status(url, "facegen-stop-test")))
    assert main(["stop", "facegen-stop-test", "--address", url]) == 0
    assert "stop requested" in capsys.readouterr().out
    assert jobs_api.wait(url, "facegen-stop-test", timeout_s=120) == "STOPPED"
    assert main(["status", "facegen-stop-test", "--address", url]) == 0
    assert capsys.readouterr().out.startswith("facegen-stop-test: STOPPED")
    deadline = time.time() + 60  # the driver is gone, and with it every actor it started
    while [a for a in actor_states(cluster) if a[0] == "GeneratorWorker" and a[1] != "DEAD"] or drivers(cluster):
        assert time.time() < deadline, f"{actor_states(cluster)} {drivers(cluster)}"
        time.sleep(0.5)


def drivers(cluster) -> list[int]:
    """`facegen generate` processes of this cluster still running."""
    found = []
    for pid in cluster.leftovers():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"generate" in command and any(part.endswith(b"facegen") for part in command):
            found.append(pid)
    return found


def actor_states(cluster) -> list:
    actors = cluster.api("/api/v0/actors?limit=1000")["data"]["result"]["result"]
    return [(a["class_name"], a["state"], a.get("pid")) for a in actors]


def generator_actors(cluster) -> int:
    actors = cluster.api("/api/v0/actors?limit=1000")["data"]["result"]["result"]
    return sum(a["class_name"] == "GeneratorWorker" for a in actors)


def test_driver_killed_then_resumed(cluster, tiny_job, reference, tmp_path):
    out, before = tmp_path / "dataset", generator_actors(cluster)
    proc = driver(cluster, "generate", tiny_job, "--out", str(out), "--executor", "ray", "--address",
                  cluster.address, "--set", "run.num_workers=2", log=tmp_path / "first.log")
    wait_for(out / "done" / "000001.json", proc, why=lambda: f"{actor_states(cluster)} {cluster.alive_nodes()}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists(), "killed too late to test anything"
    resumed = driver(cluster, "generate", tiny_job, "--out", str(out), "--executor", "ray", "--address",
                     cluster.address, "--resume", log=tmp_path / "resume.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert_same_dataset(out, reference)
    assert generator_actors(cluster) >= before + 3  # both drivers ran on the cluster (2 + at least 1 actor)


def test_submitted_job_survives_a_lost_worker_node(cluster, authenticated, tiny_job, reference, tmp_path, capsys):
    """Runs last: it kills one of the module's two worker nodes (every process of it, SIGKILL)."""
    assert sorted(cluster.alive_nodes()) == ["127.0.0.5", *WORKERS]
    url, out = cluster.dashboard_url, tmp_path / "dataset"
    assert main(["submit", tiny_job, "--out", str(out), "--address", url, "--set", "run.num_workers=2"]) == 0
    job_id = capsys.readouterr().out.strip()
    wait_for(out / "done" / "000001.json", why=lambda: f"{jobs_api.status(url, job_id)} {actor_states(cluster)}")
    cluster.kill_node(cluster.nodes[-1])  # 127.0.0.7 and its generator actor, mid-job
    assert jobs_api.wait(url, job_id, timeout_s=300) == "SUCCEEDED", jobs_api.logs(url, job_id)[-3000:]
    deadline = time.time() + 60  # the head declares the node dead (health checks) and forgets it
    while "127.0.0.7" in cluster.alive_nodes():
        assert time.time() < deadline, "the killed node is still alive"
        time.sleep(1)
    assert main(["status", job_id, "--address", url]) == 0
    assert capsys.readouterr().out.startswith(f"{job_id}: SUCCEEDED")
    assert main(["logs", job_id, "--address", url]) == 0
    logs = capsys.readouterr().out
    assert re.search(r"shard \d+: worker lost \(\w+\); retrying \(1/3\)", logs), logs[-3000:]
    assert "wrote 24 samples of 12 identities in 12 shards" in logs
    assert_same_dataset(out, reference)
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
