"""The Ray executor writes the local executor's bytes, also when generator actors die mid-job."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray import exceptions as rex

from facegen.cluster.actors import WorkerPlan, is_lost, plan_workers
from facegen.cluster.executor import choose_placement, run_ray
from facegen.engine.spec import build_spec, load_spec_file
from facegen.jobs.cli import main
from facegen.models.errors import UserError
from tests.cluster.outputs import assert_same_dataset
from tests.cluster.raycluster import MARK, alive, marked_pids

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def spec_for(job: str, out: Path, *overrides: str):
    """The tiny job on the Ray executor with two generator actors (one per CPU of the test Ray)."""
    return build_spec(load_spec_file(job), [f"output.uri={out}", "run.executor=ray", "run.num_workers=2",
                                            *overrides])


class Killer:
    """Kills generator actors for real (SIGKILL of the actor's process), as an OOM killer or a crash would:
    one right after start-up (during the proposals), one while it is running a shard."""

    def __init__(self):
        self.pids: dict[int, int] = {}
        self.killed: list[tuple[str, int]] = []

    def __call__(self, kind: str, data: dict) -> None:
        if kind == "actor_ready":
            self.pids[data["slot"]] = data["pid"]
            if data["slot"] == 0 and data["generation"] == 0:
                self.kill("select", data["pid"])
        elif kind == "shard_done" and len(self.killed) == 1:
            # The actor that finished a shard is already running the next one it had queued.
            self.kill("expand", data["pid"])

    def kill(self, phase: str, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.killed.append((phase, pid))


@pytest.mark.slow
def test_sharded_index_and_killed_generators_give_the_local_bytes(ray_session, tiny_job, reference, tmp_path):
    killer = Killer()
    spec = spec_for(tiny_job, tmp_path / "ray", "run.index_placement=sharded", "run.index_actors=2")
    report = run_ray(spec, progress=False, on_event=killer)
    assert [phase for phase, _ in killer.killed] == ["select", "expand"]
    executor = report.pop("executor")
    timing = report.pop("timing")  # wall-clock: differs from the reference's; its keys are checked here
    assert set(timing["seconds"]) == {"start", "model_load", "selection", "shards", "finalise"}
    assert sum(timing["seconds"].values()) <= timing["total_seconds"] <= executor["seconds"] + 0.001
    assert timing["samples"] == 24 and timing["samples_per_s"] == 24 / timing["total_seconds"]
    assert timing["seconds"]["model_load"] > 0 and timing["seconds"]["shards"] > 0
    reference_report = json.loads((reference / "report.json").read_text())
    reference_report.pop("timing")
    assert executor["index_placement"] == "sharded" and executor["index_actors"] == 2
    assert executor["actors_replaced"] == 2
    assert executor["proposal_retries"] >= 1 and executor["shard_retries"] >= 1
    assert executor["shards_run"] == 12 and executor["samples"] == 24
    assert_same_dataset(tmp_path / "ray", reference)
    assert report == reference_report
    # A resume with nothing left to do starts no actor at all (replicated or sharded).
    resumed = run_ray(spec_for(tiny_job, tmp_path / "ray"), resume=True, progress=False)
    again = resumed["executor"]
    assert (again["workers"], again["shards_run"], again["index_actors"]) == (0, 0, 0)
    assert resumed["timing"]["samples"] == 0 and resumed["timing"]["seconds"]["model_load"] == 0


@pytest.mark.slow
def test_generate_starts_an_embedded_ray_and_leaves_nothing_running(tiny_job, reference, tmp_path):
    """`facegen generate` with the Ray executor and no address, in its own process, as a user runs it."""
    mark = secrets.token_hex(6)
    env = {**os.environ, "PYTHONPATH": str(ROOT), MARK: mark}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "facegen.jobs", "generate", tiny_job, "--out", str(tmp_path / "ray"),
                          "--executor", "ray"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote 24 samples of 12 identities in 12 shards" in run.stdout
    assert_same_dataset(tmp_path / "ray", reference)
    deadline = time.time() + 30  # Ray stops the embedded cluster at the driver's exit
    while left := [p for p in marked_pids(mark) if alive(p)]:
        assert time.time() < deadline, f"processes of the embedded Ray survived: {left}"
        time.sleep(0.5)


def test_ray_is_the_default_executor():
    from facegen.engine.spec import RunSpec

    assert (RunSpec().executor, RunSpec().address) == ("ray", None)


def test_user_error_in_an_actor_is_one_clean_line(ray_session, tiny_job, tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["generate", tiny_job, "--out", str(out), "--executor", "ray",
                 "--generator", "/nonexistent/G.safetensors"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "/nonexistent/G.safetensors" in err
    assert "Traceback" not in err
    assert not out.exists()  # refused before job.yaml: the output location is left as it was


@pytest.mark.parametrize(
    "resources, overrides, expected",
    [
        ({"CPU": 2.0}, [], WorkerPlan(2, num_cpus=1.0, threads=1)),  # one single-threaded actor per CPU
        ({"CPU": 64.0}, [], WorkerPlan(64, num_cpus=1.0, threads=1)),
        ({"CPU": 3.0}, [], WorkerPlan(3, num_cpus=1.0, threads=1)),
        ({"CPU": 8.0}, ["run.num_workers=2"], WorkerPlan(2, num_cpus=4.0, threads=4)),
        ({"CPU": 2.0}, ["run.num_workers=1"], WorkerPlan(1, num_cpus=2.0, threads=2)),
        ({"CPU": 2.0}, ["run.num_workers=4"], WorkerPlan(4, num_cpus=0.5, threads=1)),
        ({"CPU": 64.0, "GPU": 8.0}, [], WorkerPlan(8, num_gpus=1.0, num_cpus=1.0, threads=8)),
        ({"CPU": 8.0, "GPU": 8.0}, ["run.num_workers=3"], WorkerPlan(3, num_gpus=1.0, num_cpus=0.0, threads=1)),
        ({"CPU": 4.0, "GPU": 2.0}, ["run.device=cpu"], WorkerPlan(4, num_cpus=1.0, threads=1)),
    ],
)
def test_worker_plan(tiny_job, resources, overrides, expected):
    spec = build_spec(load_spec_file(tiny_job), ["run.executor=ray", *overrides])
    assert plan_workers(spec, resources) == expected


def test_worker_plan_refusals(tiny_job):
    with pytest.raises(UserError, match="cuda requested but the Ray cluster has no GPU"):
        plan_workers(build_spec(load_spec_file(tiny_job), ["run.device=cuda"]), {"CPU": 4.0})
    with pytest.raises(UserError, match="0 CPUs"):
        plan_workers(build_spec(load_spec_file(tiny_job)), {"CPU": 0.0})


GiB = 1 << 30


@pytest.mark.parametrize(
    "requested, vector_bytes, workers, memory, expected",
    [
        ("auto", 100 * 2**20, 8, [64 * GiB], "replicated"),  # 8 x 100 MiB on a 64 GiB node
        ("auto", 3 * GiB, 8, [64 * GiB], "sharded"),  # 8 replicas would take 24 of 64 GiB
        ("auto", 3 * GiB, 2, [64 * GiB, 64 * GiB], "replicated"),  # one replica per node
        ("auto", 5 * GiB, 1, [512 * GiB], "sharded"),  # past the per-replica cap
        ("sharded", 1, 1, [64 * GiB], "sharded"),
        ("replicated", 5 * GiB, 8, [64 * GiB], "replicated"),
    ],
)
def test_index_placement_rule(requested, vector_bytes, workers, memory, expected):
    assert choose_placement(requested, vector_bytes, workers, memory) == expected


def test_unknown_placement_is_refused():
    with pytest.raises(UserError, match="index placement: must be one of auto, replicated, sharded"):
        choose_placement("everywhere", 1, 1, [GiB])


def test_lost_workers_are_told_from_job_errors():
    died = rex.ActorDiedError()
    assert is_lost(died) and is_lost(rex.NodeDiedError("n")) and is_lost(rex.WorkerCrashedError())
    assert is_lost(rex.RayTaskError("propose", "tb", died))  # an index-shard actor died under a generator
    assert not is_lost(rex.RayTaskError("propose", "tb", ValueError("bug")))
    assert not is_lost(UserError("bad spec"))
