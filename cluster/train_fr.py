"""train-fr hosted by Ray Train: a `TorchTrainer` runs `engine.frtrain.loop.train_fr` on every worker.

Same hosting as the GAN training (cluster/train.py): one worker per GPU (NCCL) or per CPU slot
(gloo); checkpoints are reported with `ray.train.report` and persisted under `RUN/checkpoints/`
(local path or any fsspec URI); after a worker failure Ray Train restarts the whole group, up to
`run.max_failures` times, and each worker restores the latest checkpoint.
"""

from __future__ import annotations

import functools
from typing import Any

from ray.train.torch import TorchTrainer

from facegen.cluster.train import StepHook, fit_on_ray, host_worker, make_torch_trainer
from facegen.engine.frtrain.checkpoint import CHECKPOINT_DIR
from facegen.engine.frtrain.launch import PreparedFR
from facegen.engine.frtrain.loop import train_fr
from facegen.engine.frtrain.spec import FRTrainSpec


def make_fr_trainer(spec: FRTrainSpec, prepared: PreparedFR, step_hook: StepHook | None = None) -> TorchTrainer:
    worker = functools.partial(host_worker, FRTrainSpec, train_fr)
    return make_torch_trainer(worker, spec, prepared.run_uri, CHECKPOINT_DIR, step_hook)


def run_ray_fr_training(spec: FRTrainSpec, prepared: PreparedFR, step_hook: StepHook | None = None) -> dict[str, Any]:
    """Train on Ray (connecting to `run.address`, or an embedded local Ray); returns a summary."""
    result = fit_on_ray(spec, lambda: make_fr_trainer(spec, prepared, step_hook))
    metrics = dict(result.metrics or {})
    return {"run_dir": prepared.run_uri, "step": metrics.get("step"),
            "checkpoint": result.checkpoint.path if result.checkpoint is not None else None, "metrics": metrics}
