"""Stopping a Ray run: SIGTERM (what `facegen stop` and schedulers send; Ray's driver turns it into
sys.exit) ends `facegen generate` with one line and exit 130, leaves no Ray process behind, and the
resume writes the local executor's bytes."""

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facegen.jobs.cli import main
from tests.cluster.outputs import assert_same_dataset
from tests.cluster.raycluster import MARK, alive, marked_pids

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sigterm_stops_a_ray_run_cleanly_and_resume_gives_the_local_bytes(tiny_job, reference, tmp_path):
    mark, out = secrets.token_hex(6), tmp_path / "ray"
    env = {**os.environ, "PYTHONPATH": str(ROOT), MARK: mark, "FACEGEN_PROGRESS_SECONDS": "3600"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "facegen.jobs", "generate", tiny_job, "--out", str(out),
                             "--executor", "ray", "--set", "run.num_workers=1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "identities.parquet").exists():  # the shards are next
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    stop = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(stop) == 1 and re.fullmatch(r"facegen: interrupted after \d+ of 12 shards; rerun with --resume", stop[0])
    assert "Traceback" not in stderr and not (out / "report.json").exists()
    deadline = time.time() + 30  # the embedded Ray goes with its driver
    while left := [p for p in marked_pids(mark) if alive(p)]:
        assert time.time() < deadline, f"processes of the embedded Ray survived: {left}"
        time.sleep(0.5)
    assert main(["generate", tiny_job, "--out", str(out), "--resume", "--executor", "local"]) == 0
    assert_same_dataset(out, reference)
