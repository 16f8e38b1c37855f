"""`facegen train-fr` in-process: loss falls, checkpoints, --resume continues at the checkpoint's step,
the backbone loads as an insightface state dict and reproduces the trainer's embeddings; bad input exits 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from facegen.engine.dataset.reader import iter_shard
from facegen.engine.storage import Storage
from facegen.jobs.cli import main
from facegen.models.loading import load_embedder
from tests.frdata.shards_tiny import write_dataset


def test_train_then_resume_then_embed(tmp_path, capsys):
    data = tmp_path / "data"
    write_dataset(data, num_shards=2, ids_per_shard=3, samples_per_id=4, size=16)  # 6 identities x 4
    job = tmp_path / "fr.yaml"
    job.write_text(yaml.safe_dump({
        "data": {"uri": str(data), "image_size": 16, "loader_workers": 0, "shuffle_buffer": 8, "flip": False},
        "output": {"dir": str(tmp_path / "runs")},
        "model": {"depth": 18, "embedding_dim": 8, "base_width": 8},
        "head": {"margin": "arcface", "scale": 16, "m": 0.2},
        "optim": {"batch_size": 12, "steps": 8, "lr": 0.05, "weight_decay": 0},
        "schedule": {"log_steps": 2, "checkpoint_steps": 4},
        "run": {"executor": "local", "device": "cpu"},
    }))
    assert main(["train-fr", str(job)]) == 0
    run = tmp_path / "runs" / "00000-data-r18-arcface"
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [e["step"] for e in stats] == [2, 4, 6, 8]
    assert stats[-1]["loss"] < stats[0]["loss"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-000000004", "checkpoint-000000008"]
    options = json.loads((run / "training_options.json").read_text())
    assert options["num_classes"] == 6 and options["total_steps"] == 8

    # the saved backbone embeds exactly like the model that was trained (probe written by the trainer)
    result = json.loads((run / "result.json").read_text())
    samples = {s.key: s.vis for s in iter_shard(Storage(str(data)), result["probe"]["shard"])}
    images = torch.from_numpy(np.stack([samples[k] for k in result["probe"]["keys"]])).permute(0, 3, 1, 2)
    got = load_embedder(run / "backbone.pth").embed(images)
    assert torch.allclose(got, torch.tensor(result["probe"]["embeddings"]), atol=1e-5)

    # --resume continues a finished run at its last checkpoint, for more steps
    assert main(["train-fr", str(job), "--resume", str(run), "--steps", "10"]) == 0
    resumed = tmp_path / "runs" / "00001-data-r18-arcface"
    log = (resumed / "log.txt").read_text()
    assert f"Resumed from {run} at step 8" in log
    assert [json.loads(line)["step"] for line in (resumed / "stats.jsonl").read_text().splitlines()] == [10]
    capsys.readouterr()


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent/facegen-data", "--outdir", "/tmp/x", "--executor", "local"], "no complete shards"),
    (["--data", "d", "--outdir", "o", "--set", "model.depth=19"], "model: depth 19 is not one of"),
    (["--data", "d", "--outdir", "o", "--set", "head.margin=sphere"], "head.margin"),
    (["--data", "d", "--outdir", "o", "--num-workers", "3", "--set", "optim.batch_size=128"], "multiple of"),
])
def test_bad_input_exits_2(args, message, capsys):
    assert main(["train-fr", *args]) == 2
    assert message in capsys.readouterr().err
