"""train-fr on Ray Train: 2 CPU workers (gloo) train a tiny iResNet from shards that `facegen generate`
(a real process) is still writing (the first step happens while the job is paused with 8 of its 12
shards written); a worker is killed and the group restarts from the checkpoint; the loss falls; the
saved backbone.pth loads as an insightface state dict and embeds like the trainer's model."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from facegen.cluster.train_fr import run_ray_fr_training
from facegen.engine.dataset.reader import iter_shard
from facegen.engine.frtrain.launch import prepare
from facegen.engine.frtrain.spec import build_fr_spec
from facegen.engine.storage import Storage
from facegen.models.importers.insightface import load_insightface_pth
from facegen.models.loading import load_embedder
from tests.engine.tiny import write_tiny_job
from tests.frdata.test_follow import start_generate

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def markers(data: Path) -> int:
    return len(os.listdir(data / "done")) if (data / "done").exists() else 0


def test_two_ray_workers_train_while_generate_writes_then_restart_after_a_kill(ray_session, tmp_path):
    data = tmp_path / "data"
    # 12 identities x 4 samples, one identity per shard: 12 shards, written about a second apart
    job = write_tiny_job(tmp_path, str(data), identities=12, samples_per_identity=4,
                         **{"output.samples_per_shard": 4})
    spec = build_fr_spec({
        "seed": 1,
        "data": {"uri": str(data), "image_size": 32, "follow": True, "poll_seconds": 0.2, "follow_timeout": 300,
                 "loader_workers": 1, "open_shards": 2, "shuffle_buffer": 0, "flip": False},
        "output": {"dir": str(tmp_path / "runs")},
        "model": {"depth": 18, "embedding_dim": 16, "base_width": 8},
        "head": {"margin": "cosface", "scale": 16, "m": 0.2, "sample_rate": 0.5},
        "optim": {"batch_size": 16, "steps": 18, "lr": 0.05, "weight_decay": 0},
        "schedule": {"log_steps": 1, "checkpoint_steps": 6},
        "run": {"executor": "ray", "num_workers": 2, "device": "cpu", "max_failures": 1},
    })
    prepared = prepare(spec)  # the dataset does not exist yet: nothing to check, workers will wait
    assert prepared.num_classes is None
    run_dir = Path(prepared.run_uri)

    def kill_rank1_once(ctx, step):
        if ctx.rank == 1 and step == 8 and ctx.latest_checkpoint is None:
            time.sleep(5)  # let Ray Train's controller register the checkpoint of step 6 first
            os._exit(1)

    outcome = {}
    trainer = threading.Thread(target=lambda: outcome.update(run_ray_fr_training(spec, prepared, kill_rank1_once)))
    trainer.start()
    deadline = time.time() + 240
    while not (run_dir / "log.txt").exists() or "Following" not in (run_dir / "log.txt").read_text():
        assert trainer.is_alive() and time.time() < deadline, "the trainer never started following"
        time.sleep(0.2)
    proc = start_generate(job)  # generation starts only once the training workers are waiting for it
    try:
        # Pause the job with 8 of its 12 shards written: each worker holds at least 2 of those 8 (6 of 12
        # each), enough for its 8 samples of the first step, which must then happen while the job is paused.
        while markers(data) < 8:
            assert proc.poll() is None and time.time() < deadline + 300, "generate ended or stalled"
            time.sleep(0.05)
        proc.send_signal(signal.SIGSTOP)
        paused_at = markers(data)
        while not (run_dir / "stats.jsonl").exists() or not (run_dir / "stats.jsonl").read_text().strip():
            assert trainer.is_alive() and time.time() < deadline + 900, "no training step on the partial dataset"
            time.sleep(0.2)
        assert not (data / "report.json").exists() and markers(data) == paused_at < 12
        proc.send_signal(signal.SIGCONT)
        trainer.join(timeout=900)
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    assert not trainer.is_alive() and outcome["step"] == 18

    log = (run_dir / "log.txt").read_text()
    assert "Dataset " in log and "12 identities" in log
    assert log.count("Restarted from checkpoint checkpoint-000000006 at step 6") == 1
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    # trained on shards while the job was still writing them
    assert stats[0]["step"] == 1 and stats[0]["read_while_generating"] == 1 and stats[0]["shards_complete"] < 12
    losses = [e["loss"] for e in stats]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses

    # The backbone is a plain insightface state dict, and facegen's embedder reproduces the trainer's model.
    backbone = run_dir / "backbone.pth"
    assert load_insightface_pth(backbone).config.embedding_dim == 16
    result = json.loads((run_dir / "result.json").read_text())
    probe = result["probe"]
    samples = {s.key: s.vis for s in iter_shard(Storage(str(data)), probe["shard"])}
    images = torch.from_numpy(np.stack([samples[k] for k in probe["keys"]])).permute(0, 3, 1, 2)
    embedder = load_embedder(backbone)
    got = embedder.embed(images)
    assert torch.allclose(got, torch.tensor(probe["embeddings"]), atol=1e-4)
    assert (run_dir / "checkpoints" / "checkpoint-000000018" / "state.pt").exists()
