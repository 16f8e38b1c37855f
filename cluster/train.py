"""GAN training hosted by Ray Train: a `TorchTrainer` runs `engine.training.loop.train` on every worker.

- One worker per GPU (NCCL) or per CPU slot (gloo); the global batch is split across them.
- Checkpoints are the loop's snapshot folders, reported with `ray.train.report` and persisted by Ray
  Train to `RUN/checkpoints/checkpoint-<nimg>/` on the run directory's storage (local path or any
  fsspec URI, through a pyarrow filesystem wrapper), the newest `keep_checkpoints` kept.
- After a worker failure (exception, killed process, lost node) Ray Train restarts the whole worker
  group, up to `run.max_failures` times; each worker restores the latest checkpoint from
  `ray.train.get_checkpoint()` and the kimg count continues from it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import ray
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from facegen.cluster.ray_start import init_ray
from facegen.engine.storage import Storage
from facegen.engine.training.context import TrainContext
from facegen.engine.training.launch import Prepared
from facegen.engine.training.loop import train
from facegen.engine.training.snapshot import CHECKPOINT_DIR
from facegen.engine.training.spec import TrainSpec
from facegen.models.errors import UserError

StepHook = Callable[[TrainContext, int], None]


def host_worker(spec_type: type, loop: Callable[[Any, TrainContext, str], Any], config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: rebuild the spec, pick the device, wire reporting to Ray Train and
    run `loop(spec, ctx, run_uri)`, restoring Ray Train's latest checkpoint when there is one."""
    import ray.train
    import ray.train.torch

    spec = spec_type.model_validate(config["spec"])
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
        loop(spec, ctx, config["run_uri"])
        return
    with checkpoint.as_directory() as folder:
        ctx.latest_checkpoint = folder
        loop(spec, ctx, config["run_uri"])


def _storage(run: Storage) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train: local paths as is, other fsspec URIs wrapped."""
    if run.is_local:
        return run.path(), None
    import pyarrow.fs

    return run.path(), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(run.fs))


def _use_gpu(spec: Any) -> bool:
    """GPU workers when the spec asks for them (or `auto` finds one per worker); needs Ray initialised."""
    if spec.run.device == "cpu":
        return False
    gpus = ray.cluster_resources().get("GPU", 0)
    if spec.run.device == "cuda" and gpus < spec.run.num_workers:
        raise UserError(f"run.device: cuda for {spec.run.num_workers} workers, but the Ray cluster has "
                        f"{gpus:g} GPUs")
    return gpus >= spec.run.num_workers


def make_torch_trainer(worker: Callable[[dict[str, Any]], None], spec: Any, run_uri: str, checkpoint_dir: str,
                       step_hook: StepHook | None = None) -> TorchTrainer:
    """A TorchTrainer running `worker` on every rank, configured from the parts every training spec has
    (run: workers, device, CPUs, failures; output: storage options; schedule: checkpoints kept)."""
    use_gpu = _use_gpu(spec)
    storage_path, filesystem = _storage(Storage(run_uri, spec.output.storage_options))
    resources = {"CPU": spec.run.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "run_uri": run_uri, "use_gpu": use_gpu,
                           "step_hook": step_hook},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=spec.run.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=checkpoint_dir, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=spec.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.schedule.keep_checkpoints)),
    )


def fit_on_ray(spec: Any, make: Callable[[], TorchTrainer]) -> Any:
    """Connect to `run.address` (or start an embedded Ray), build the trainer there and fit it; a
    worker's UserError comes back as itself."""
    if not ray.is_initialized():
        init_ray(address=spec.run.address, include_dashboard=False, configure_logging=False)
    trainer = make()
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise _user_error(err) or err from None


def make_trainer(spec: TrainSpec, prepared: Prepared, step_hook: StepHook | None = None) -> TorchTrainer:
    return make_torch_trainer(functools.partial(host_worker, TrainSpec, train), spec, prepared.run_uri, CHECKPOINT_DIR,
                              step_hook)


def run_ray_training(spec: TrainSpec, prepared: Prepared, step_hook: StepHook | None = None) -> dict[str, Any]:
    """Train on Ray (connecting to `run.address`, or an embedded local Ray); returns a summary."""
    result = fit_on_ray(spec, lambda: make_trainer(spec, prepared, step_hook))
    metrics = dict(result.metrics or {})
    return {"run_dir": prepared.run_uri, "kimg": metrics.get("kimg"), "ticks": metrics.get("tick"),
            "checkpoint": result.checkpoint.path if result.checkpoint is not None else None, "metrics": metrics}


def _user_error(err: Exception) -> UserError | None:
    """A bad-input error raised inside a worker, surfaced as itself (not as a Ray failure)."""
    for failure in getattr(err, "worker_failures", {}).values():
        cause = failure
        while cause is not None:
            if isinstance(cause, UserError):
                return UserError(str(cause).splitlines()[-1] if "\n" in str(cause) else str(cause))
            cause = getattr(cause, "cause", None) or cause.__cause__
    return None
