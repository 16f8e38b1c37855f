"""Before any training work: validate the job on the driver, then create the run directory.

`prepare` opens the dataset, resolves the preset for the number of workers and checks a `--resume`
source against the dataset, so that bad input fails once, with one message, before workers start
(a worker that fails on bad input would only be restarted). It then creates `NNNNN-<desc>/` under
`output.dir`. `run_local` trains in this process (the single-worker local executor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from facegen.engine.storage import Storage
from facegen.engine.training.context import local_context
from facegen.engine.training.loop import open_spec_data, train
from facegen.engine.training.presets import Hyperparams
from facegen.engine.training.rundir import describe, next_run_name
from facegen.engine.training.spec import TrainSpec, resolve_hyperparams
from facegen.engine.training.state import find_start
from facegen.models.devices import resolve_device


@dataclass(frozen=True)
class Prepared:
    run_uri: str
    run_name: str
    resolution: int
    c_dim: int
    num_items: int
    hyperparams: Hyperparams


def prepare(spec: TrainSpec, num_workers: int | None = None, create: bool = True) -> Prepared:
    """Validate the dataset, preset and resume source; create the run directory (unless `create=False`)."""
    data = open_spec_data(spec)
    workers = num_workers or spec.run.num_workers
    hp = resolve_hyperparams(spec, data.resolution, workers)
    if spec.resume is not None:
        find_start(hp, data.resolution, data.c_dim, spec.seed, None, spec.resume, spec.output.storage_options)
    outdir = Storage(spec.output.dir, spec.output.storage_options)
    name = next_run_name(outdir, describe(data.name, spec, workers))
    run = outdir.child(name)
    if create:
        outdir.check_writable()
        run.makedirs()
    return Prepared(run.uri, name, data.resolution, data.c_dim, len(data), hp)


def run_local(spec: TrainSpec, prepared: Prepared, device: str | None = None) -> dict[str, Any]:
    """Train in this process (rank 0 of 1); checkpoints go to `RUN/checkpoints/`."""
    run = Storage(prepared.run_uri, spec.output.storage_options)
    target = resolve_device(device or spec.run.device, local_rank=0)
    ctx = local_context(run, target, spec.schedule.keep_checkpoints)
    return train(spec, ctx, prepared.run_uri)
