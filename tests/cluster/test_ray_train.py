"""Ray Train hosting: 2 CPU workers (gloo), a worker process killed mid-run, automatic restart from the
last checkpoint with the kimg count continuing; checkpoint storage through a pyarrow filesystem."""

import json
import os
import re
from pathlib import Path

import pytest

from cluster.train import _storage, run_ray_training
from engine.storage import Storage
from engine.training.launch import prepare
from engine.training.snapshot import load_snapshot
from engine.training.spec import build_train_spec
from tests.engine.training_tiny import make_dataset, tiny_tree

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_two_workers_restart_from_the_checkpoint_after_a_worker_is_killed(ray_session, tmp_path):
    data = make_dataset(tmp_path / "data")
    # 6 steps of 4 images (2 per worker); ticks (and checkpoints) after steps 1, 3, 5, 6
    tree = tiny_tree(data, tmp_path / "out", config={"kimg": 0.024},
                     run={"executor": "ray", "num_workers": 2, "max_failures": 1})
    spec = build_train_spec(tree)
    prepared = prepare(spec)

    def kill_rank1_once(ctx, batch_idx):
        if ctx.rank == 1 and batch_idx == 4 and ctx.latest_checkpoint is None:
            os._exit(1)  # the worker process dies: no exception, no cleanup

    summary = run_ray_training(spec, prepared, step_hook=kill_rank1_once)
    run_dir = Path(prepared.run_uri)
    assert summary["kimg"] == 0.024
    assert summary["checkpoint"].endswith("checkpoints/checkpoint-000000000024")

    log = (run_dir / "log.txt").read_text().splitlines()
    restarts = [line for line in log if line.startswith("Restarted from checkpoint")]
    assert len(restarts) == 1
    restored_kimg = float(re.search(r"at kimg ([0-9.]+)", restarts[0]).group(1))
    assert restored_kimg in (0.004, 0.012)  # the last checkpoint Ray Train had registered, never 0
    # every tick exactly once: the ticks redone after the restart replaced the lost ones
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [e["Progress/kimg"]["mean"] for e in stats] == [0.004, 0.012, 0.02, 0.024]
    assert [e["Progress/tick"]["mean"] for e in stats] == [0, 1, 2, 3]
    assert all(e["Progress/replica_spread"]["mean"] == 0 for e in stats)  # DDP kept the replicas equal
    assert sum(line.startswith("Dataset ") for line in log) == 1  # the restart did not start over

    final = load_snapshot(run_dir / "checkpoints" / "checkpoint-000000000024")
    assert final.state["cur_nimg"] == 24 and final.state["batch_idx"] == 6 and final.state["world_size"] == 2
    assert len(final.state["ranks"]) == 2
    options = json.loads((run_dir / "training_options.json").read_text())
    assert (options["num_gpus"], options["batch_gpu"], options["batch_size"]) == (2, 2, 4)


def test_checkpoint_storage_goes_through_the_run_directory_filesystem(s3_bucket):
    uri, options = s3_bucket
    run = Storage(f"{uri}/runs/00000-x", options)
    path, filesystem = _storage(run)
    assert path == f"{uri.removeprefix('s3://')}/runs/00000-x" and filesystem is not None
    with filesystem.open_output_stream(f"{path}/checkpoints/probe.txt") as f:
        f.write(b"written by pyarrow")
    assert run.read_text("checkpoints/probe.txt") == "written by pyarrow"
    local = Storage("/tmp/some/run")
    assert _storage(local) == ("/tmp/some/run", None)
