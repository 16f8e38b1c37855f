"""Ray Train hosting: 2 CPU workers (gloo) train on WebDataset shards written by `facegen generate`, a
worker process is killed mid-run, the group restarts from the last checkpoint with the kimg count
continuing, then `--resume` starts a new run from it; checkpoint storage through a pyarrow filesystem."""

import json
import os
import time
from pathlib import Path

import pytest
import torch

from facegen.cluster.train import _storage, run_ray_training
from facegen.engine.storage import Storage
from facegen.engine.training.launch import prepare
from facegen.engine.training.snapshot import load_snapshot
from facegen.engine.training.spec import build_train_spec
from facegen.jobs.cli import main
from facegen.models.checkpoint import save_native
from facegen.models.generator import Generator, GeneratorConfig
from facegen.models.iresnet import IResNet, IResNetConfig
from tests.engine.training_tiny import TINY_CONFIG, make_dataset, tiny_tree

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def generated_shards(tmp_path: Path) -> Path:
    """VIS+NIR+condition shards from the real `facegen generate` path, with tiny 16x16 models."""
    real = make_dataset(tmp_path / "real")  # the real identities the privacy filter compares against
    torch.manual_seed(0)
    cfg = TINY_CONFIG
    generator = save_native(Generator(GeneratorConfig(
        z_dim=cfg["z_dim"], c_dim=8, w_dim=cfg["w_dim"], img_resolution=16, channel_base=cfg["channel_base"],
        channel_max=cfg["channel_max"], mapping_layers=cfg["mapping_layers"], num_fp16_res=0)),
        tmp_path / "G.safetensors")
    embedder = save_native(IResNet(IResNetConfig(depth=18, embedding_dim=8, input_size=16, base_width=8)),
                           tmp_path / "embedder.safetensors")
    shards = tmp_path / "generated"
    rc = main(["generate", "--gen_model", str(generator), "--rec_model", str(embedder), "--training_ids",
               str(real / "identity_features.json"), "--outdir", str(shards), "--ids", "3", "--samples_per_id", "4",
               "--executor", "local", "--privacy-threshold", "0.9999", "--same-threshold", "0.01",
               "--diversity-threshold", "0.99999", "--max-attempts", "50"])
    assert rc == 0
    return shards


def test_two_workers_on_generated_shards_restart_after_a_kill_then_resume(ray_session, tmp_path):
    shards = generated_shards(tmp_path)
    # 7 steps of 4 images (2 per worker) from the 12 generated pairs; ticks (and checkpoints) after
    # steps 1, 3, 5, 7
    tree = tiny_tree(shards, tmp_path / "out", config={"kimg": 0.028},
                     run={"executor": "ray", "num_workers": 2, "max_failures": 1})
    spec = build_train_spec(tree)
    prepared = prepare(spec)
    assert (prepared.num_items, prepared.resolution, prepared.c_dim) == (12, 16, 8)

    def kill_rank1_once(ctx, batch_idx):
        if ctx.rank == 1 and batch_idx == 5 and ctx.latest_checkpoint is None:
            # Just past the checkpoint at 20 images. Wait for Ray Train's controller to poll the workers
            # (every 2 s) so it has registered that checkpoint, then the process dies: no exception, no
            # cleanup. (Without the wait the restart may use the checkpoint before it.)
            time.sleep(5)
            os._exit(1)

    summary = run_ray_training(spec, prepared, step_hook=kill_rank1_once)
    run_dir = Path(prepared.run_uri)
    assert summary["kimg"] == 0.028
    assert summary["checkpoint"].endswith("checkpoints/checkpoint-000000000028")

    log = (run_dir / "log.txt").read_text().splitlines()
    assert "Dataset generated: 12 items (12 pairs, mirror False), 16x16, c_dim 8" in "\n".join(log)
    restarts = [line for line in log if line.startswith("Restarted from checkpoint")]
    assert len(restarts) == 1
    expected = "Restarted from checkpoint checkpoint-000000000020 at kimg 0.020, continuing with tick 3"
    assert restarts[0].startswith(expected)
    # every tick exactly once, the kimg count continuing from the checkpoint
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [e["Progress/kimg"]["mean"] for e in stats] == [0.004, 0.012, 0.02, 0.028]
    assert [e["Progress/tick"]["mean"] for e in stats] == [0, 1, 2, 3]
    assert all(e["Progress/replica_spread"]["mean"] == 0 for e in stats)  # DDP kept the replicas equal
    assert sum(line.startswith("Dataset ") for line in log) == 1  # the restart did not start over

    final = load_snapshot(run_dir / "checkpoints" / "checkpoint-000000000028")
    assert final.state["cur_nimg"] == 28 and final.state["batch_idx"] == 7 and final.state["world_size"] == 2
    assert len(final.state["ranks"]) == 2
    options = json.loads((run_dir / "training_options.json").read_text())
    assert (options["num_gpus"], options["batch_gpu"], options["batch_size"]) == (2, 2, 4)
    assert options["spec"]["data"]["uri"] == str(shards)

    # --resume from the run directory: a new run whose kimg count and optimisers continue
    resumed_spec = build_train_spec(tree, ["config.kimg=0.036", f"resume={run_dir}"])
    resumed = prepare(resumed_spec)
    summary = run_ray_training(resumed_spec, resumed)
    assert summary["kimg"] == 0.036
    resumed_dir = Path(resumed.run_uri)
    assert resumed_dir.name.startswith("00001-generated-cond") and resumed_dir.name.endswith("-resumecustom")
    assert f"Resuming from snapshot {run_dir}/checkpoints/checkpoint-000000000028 at kimg 0.028" in (
        resumed_dir / "log.txt").read_text()
    stats = [json.loads(line) for line in (resumed_dir / "stats.jsonl").read_text().splitlines()]
    assert [e["Progress/kimg"]["mean"] for e in stats] == [0.036]  # the kimg count continued
    assert all(e["Progress/replica_spread"]["mean"] == 0 for e in stats)
    final = load_snapshot(resumed_dir / "checkpoints" / "checkpoint-000000000036")
    assert (final.state["cur_nimg"], final.state["batch_idx"], final.state["world_size"]) == (36, 9, 2)
    # G's Adam counted on from the first run's 7 Gmain + 2 Greg steps (steps 0 and 4): 9 Gmain + 3 Greg
    assert final.state["optimizers"]["G"]["state"][0]["step"].item() == 12


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
