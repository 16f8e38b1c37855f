"""train-fr hosted by Ray Train: a `TorchTrainer` runs `engine.frtrain.loop.train_fr` on every worker.

Same hosting as the GAN training (cluster/train.py): one worker per GPU (NCCL) or per CPU slot
(gloo); checkpoints are reported with `ray.train.report` and persisted under `RUN/checkpoints/`
(local path or any fsspec URI); after a worker failure Ray Train restarts the whole group, up to
`run.max_failures` times, and each worker restores the latest checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import ray
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from facegen.cluster.train import StepHook, _storage, _user_error
from facegen.engine.frtrain.checkpoint import CHECKPOINT_DIR
from facegen.engine.frtrain.launch import PreparedFR
from facegen.engine.frtrain.loop import train_fr
from facegen.engine.frtrain.spec import FRTrainSpec
from facegen.engine.storage import Storage
from facegen.engine.training.context import TrainContext
from facegen.models.errors import UserError


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


def _use_gpu(spec: FRTrainSpec) -> bool:
    if spec.run.device == "cpu":
        return False
    gpus = ray.cluster_resources().get("GPU", 0)
    if spec.run.device == "cuda" and gpus < spec.run.num_workers:
        raise UserError(f"run.device: cuda for {spec.run.num_workers} workers, but the Ray cluster has {gpus:g} GPUs")
    return gpus >= spec.run.num_workers


def make_fr_trainer(spec: FRTrainSpec, prepared: PreparedFR, step_hook: StepHook | None = None) -> TorchTrainer:
    use_gpu = _use_gpu(spec)
    storage_path, filesystem = _storage(Storage(prepared.run_uri, spec.output.storage_options))
    resources = {"CPU": spec.run.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        _worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "run_uri": prepared.run_uri, "use_gpu": use_gpu,
                           "step_hook": step_hook},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.run.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=CHECKPOINT_DIR, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=spec.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.schedule.keep_checkpoints)),
    )


def run_ray_fr_training(spec: FRTrainSpec, prepared: PreparedFR, step_hook: StepHook | None = None) -> dict[str, Any]:
    """Train on Ray (connecting to `run.address`, or an embedded local Ray); returns a summary."""
    if not ray.is_initialized():
        ray.init(address=spec.run.address, include_dashboard=False, configure_logging=False)
    trainer = make_fr_trainer(spec, prepared, step_hook)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise _user_error(err) or err from None
    metrics = dict(result.metrics or {})
    return {"run_dir": prepared.run_uri, "step": metrics.get("step"),
            "checkpoint": result.checkpoint.path if result.checkpoint is not None else None, "metrics": metrics}
