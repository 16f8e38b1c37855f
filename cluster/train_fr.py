"""train-fr hosted by Ray Train: a `TorchTrainer` runs `engine.frtrain.loop.train_fr` on every worker.

Same hosting as the GAN training (cluster/train.py): one worker per GPU (NCCL) or per CPU slot
(gloo); checkpoints are reported with `ray.train.report` and persisted under `RUN/checkpoints/`
(local path or any fsspec URI); after a worker failure Ray Train restarts the whole group, up to
`run.max_failures` times, and each worker restores the latest checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from ray.train import Checkpoint
from ray.train.torch import TorchTrainer

from facegen.cluster.train import StepHook, fit_on_ray, make_torch_trainer
from facegen.engine.frtrain.checkpoint import CHECKPOINT_DIR
from facegen.engine.frtrain.launch import PreparedFR
from facegen.engine.frtrain.loop import train_fr
from facegen.engine.frtrain.spec import FRTrainSpec
from facegen.engine.training.context import TrainContext


def _worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    spec = FRTrainSpec.model_validate(config["spec"])
    context = ray.train.get_context()
    use_gpu = config["use_gpu"]
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if not use_gpu:
        torch.set_num_threads(max(1, int(spec.run.cpus_per_worker)))

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir),
                             checkpoint_dir_name=os.path.basename(checkpoint_dir))

    ctx = TrainContext(rank=context.get_world_rank(), world_size=context.get_world_size(), device=device,
                       report=report, step_hook=config.get("step_hook"))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        train_fr(spec, ctx, config["run_uri"])
        return
    with checkpoint.as_directory() as folder:
        ctx.latest_checkpoint = folder
        train_fr(spec, ctx, config["run_uri"])


def make_fr_trainer(spec: FRTrainSpec, prepared: PreparedFR, step_hook: StepHook | None = None) -> TorchTrainer:
    return make_torch_trainer(_worker, spec, prepared.run_uri, CHECKPOINT_DIR, step_hook)


def run_ray_fr_training(spec: FRTrainSpec, prepared: PreparedFR, step_hook: StepHook | None = None) -> dict[str, Any]:
    """Train on Ray (connecting to `run.address`, or an embedded local Ray); returns a summary."""
    result = fit_on_ray(spec, lambda: make_fr_trainer(spec, prepared, step_hook))
    metrics = dict(result.metrics or {})
    return {"run_dir": prepared.run_uri, "step": metrics.get("step"),
            "checkpoint": result.checkpoint.path if result.checkpoint is not None else None, "metrics": metrics}
