"""Before any training work: check the job on the driver, then create the run directory.

Bad input fails here once, with one message, before workers start (a worker that fails on bad input
would only be restarted). A dataset followed while it is generated may not exist yet: then only
what exists is checked, and the workers wait for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from facegen.engine.frdata import FRDataset
from facegen.engine.frtrain.checkpoint import latest_checkpoint, load_checkpoint
from facegen.engine.frtrain.loop import train_fr
from facegen.engine.frtrain.spec import FRTrainSpec
from facegen.engine.storage import Storage
from facegen.engine.training.context import local_context
from facegen.engine.training.rundir import next_run_name
from facegen.models.devices import resolve_device
from facegen.models.errors import UserError


@dataclass(frozen=True)
class PreparedFR:
    run_uri: str
    run_name: str
    num_classes: int | None  # None: a followed dataset whose identities are not chosen yet


def _describe(spec: FRTrainSpec) -> str:
    if spec.output.desc:
        return spec.output.desc
    name = spec.data.uri.rstrip("/").rsplit("/", 1)[-1] or "data"
    clean = "".join(c if c.isalnum() or c in "_.+-" else "_" for c in name)
    return f"{clean}-r{spec.model.depth}-{spec.head.margin}"


def prepare(spec: FRTrainSpec, create: bool = True) -> PreparedFR:
    d = spec.data
    num_classes = None
    source = Storage(d.uri, d.storage_options)
    # a VIS/NIR folder opens (and refuses `follow`) here; a followed job may not have its table yet
    if not d.follow or source.exists("identities.parquet") or source.exists("VIS"):
        ds = FRDataset(d.uri, storage_options=d.storage_options, mode=d.mode, follow=d.follow,
                       follow_timeout=d.follow_timeout)
        num_classes = ds.num_classes
        if not d.follow and ds.num_samples() < spec.run.num_workers:
            raise UserError(f"{d.uri}: {ds.num_samples()} samples cannot feed {spec.run.num_workers} workers")
    if spec.resume is not None:
        _, _, state = load_checkpoint(latest_checkpoint(spec.resume, spec.output.storage_options))
        if num_classes is not None and int(state["num_classes"]) != num_classes:
            raise UserError(f"resume: {spec.resume} was trained on {state['num_classes']} identities, "
                            f"{d.uri} has {num_classes}")
    outdir = Storage(spec.output.dir, spec.output.storage_options)
    name = next_run_name(outdir, _describe(spec))
    run = outdir.child(name)
    if create:
        outdir.check_writable()
        run.makedirs()
    return PreparedFR(run.uri, name, num_classes)


def run_local(spec: FRTrainSpec, prepared: PreparedFR) -> dict[str, Any]:
    """Train in this process (rank 0 of 1); checkpoints go to `RUN/checkpoints/`."""
    device = resolve_device(spec.run.device, local_rank=0)
    run = Storage(prepared.run_uri, spec.output.storage_options)
    return train_fr(spec, local_context(run, device, spec.schedule.keep_checkpoints), prepared.run_uri)
