"""One writer per output on Ray: `kill -9` of a driver's process group leaves its generator actors
running for seconds, able to finish and publish a shard. A resume started at once must not race them:
it waits until the dead driver's lease expires (the actors stop publishing before that), takes the
lease over and completes the dataset with the local executor's bytes. Overlapped writing in the
threaded actors gives those bytes too, and its stage times come back to the driver."""

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facegen.cluster.executor import run_ray
from facegen.engine.lease import LEASE_FILE, read_lease
from facegen.engine.spec import build_spec, load_spec_file
from facegen.engine.storage import Storage
from facegen.jobs.cli import main
from tests.cluster.outputs import assert_same_dataset
from tests.cluster.raycluster import MARK, alive, marked_pids

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_overlapped_and_inline_actors_write_the_local_bytes(ray_session, tiny_job, reference, tmp_path):
    for overlap in ("true", "false"):
        out = tmp_path / overlap
        spec = build_spec(load_spec_file(tiny_job), [f"output.uri={out}", "run.executor=ray", "run.num_workers=2",
                                                     f"run.overlap={overlap}"])
        executor = run_ray(spec, progress=False)["executor"]
        assert_same_dataset(out, reference)
        stages = executor["stages"]
        assert executor["overlap"] is (overlap == "true")
        assert stages["shards"] == executor["shards_run"] == 12 and stages["compute_s"] > 0 and stages["write_s"] > 0
        assert not (out / LEASE_FILE).exists()


@pytest.mark.slow
def test_resume_right_after_kill9_of_a_ray_driver_waits_for_its_lease(tiny_job, reference, tmp_path, capsys):
    mark, out = secrets.token_hex(6), tmp_path / "ray"
    env = {**os.environ, "PYTHONPATH": str(ROOT), MARK: mark, "FACEGEN_PROGRESS_SECONDS": "3600"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "facegen.jobs", "generate", tiny_job, "--out", str(out),
                             "--executor", "ray", "--set", "run.num_workers=1", "--set", "run.lease_ttl=12"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (out / "done").exists() or not list((out / "done").iterdir()):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        lease = read_lease(Storage(str(out)))
        assert lease is not None and lease.pid == proc.pid and lease.left() > 0
        assert main(["generate", tiny_job, "--out", str(out), "--resume", "--executor", "local"]) == 0
        err = capsys.readouterr().err
        assert "its process is gone; waiting for its lease to expire" in err
        assert time.time() >= lease.expires
        assert_same_dataset(out, reference)
    finally:
        for pid in marked_pids(mark):  # whatever of the killed driver's embedded Ray is left
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
