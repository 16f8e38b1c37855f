"""The local executor: every unit of a job (`engine.job`) in this process, in order."""

from __future__ import annotations

from facegen.engine.job import open_job, pending_shards, run_shard, select_identities
from facegen.engine.phases import propose
from facegen.engine.progress import progress_bar
from facegen.engine.spec import JobSpec
from facegen.engine.summary import finalize


def run_local(spec: JobSpec, resume: bool = False, progress: bool = True) -> dict:
    """The whole job in this process; returns the report (`engine.summary.finalize`)."""
    spec, out, bundle = open_job(spec, resume)
    proposer = lambda blocks: (propose(bundle, block) for block in blocks)  # noqa: E731
    identities, selection = select_identities(spec, out, proposer, progress)
    todo = pending_shards(spec, out, len(identities))
    with progress_bar(len(todo), "shards", "shard", progress) as bar:
        for shard_id in todo:
            run_shard(bundle, identities, out, shard_id)
            bar.update(1)
    return finalize(spec, out, identities, selection, bundle.index)
