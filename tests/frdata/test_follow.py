"""`follow=True` reads a dataset while `facegen generate` (a real process) is still writing it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from facegen.engine.frdata import FRDataset, fr_loader
from tests.engine.tiny import write_tiny_job

ROOT = Path(__file__).resolve().parents[2]


def start_generate(job: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "facegen.jobs", "generate", job], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_follow_sees_every_shard_of_a_running_job(tmp_path):
    out = tmp_path / "out"
    job = write_tiny_job(tmp_path, str(out), identities=8, samples_per_identity=2, **{"output.samples_per_shard": 2})
    # The follower starts before the job exists: it waits for job.yaml and identities.parquet.
    # No shuffle buffer and one shard at a time: a reader's first batch comes with its first shard, and
    # each of the 2 readers owns 4 of the 8 shards, so one of the first 5 written.
    ds = FRDataset(str(out), image_size=16, follow=True, poll_seconds=0.1, follow_timeout=180, with_keys=True,
                   shuffle_buffer=0, open_shards=1)
    proc = start_generate(job)
    keys, finished_at_arrival = [], []
    try:
        for _, _, batch_keys in fr_loader(ds, batch_size=2, num_workers=2):
            finished_at_arrival.append((out / "report.json").exists())
            keys += list(batch_keys)
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    finally:
        proc.kill()
    shards = sorted(os.listdir(out / "done"))
    assert len(shards) == 8  # 8 identities x 2 samples, 2 samples per shard
    assert sorted(keys) == sorted(pq.read_table(out / "manifest")["key"].to_pylist())
    assert len(keys) == len(set(keys)) == 16
    # The first batch arrived while the job was still writing (at least 3 of its 8 shards to go).
    assert finished_at_arrival[0] is False, finished_at_arrival
    assert ds.num_classes == 8


def test_follow_gives_up_after_its_timeout(tmp_path):
    from facegen.models.errors import UserError

    ds = FRDataset(str(tmp_path), follow=True, poll_seconds=0.05, follow_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(UserError, match="gave up waiting for job.yaml"):
        list(ds)
    assert time.monotonic() - started < 5
