"""The local executor: every unit of a job (`engine.job`) in this process, in order; shard k+1 is
computed while shard k is encoded and written (`engine.pipeline`, unless `run.overlap` is off)."""

from __future__ import annotations

from facegen.engine.job import open_job, pending_shards, prepare_shard, publish_shard, select_identities
from facegen.engine.phases import propose
from facegen.engine.pipeline import ShardPipeline
from facegen.engine.progress import progress_bar
from facegen.engine.report import PhaseTimer
from facegen.engine.spec import JobSpec
from facegen.engine.summary import finalize


def run_local(spec: JobSpec, resume: bool = False, progress: bool = True) -> dict:
    """The whole job in this process; returns the report (`engine.summary.finalize`, with where the time
    went) plus an `executor` section with the stage times (compute, write, wait for the writer)."""
    timer = PhaseTimer()  # in-process there is no start-up to speak of: `start` stays ~0
    with timer.phase("model_load"):  # open_job checks the output, loads and checks the models and index
        job = open_job(spec, resume)
    with job.lease:
        spec, out, bundle = job.spec, job.out, job.bundle
        guard = job.lease.guard()
        proposer = lambda blocks: (propose(bundle, block) for block in blocks)  # noqa: E731
        with timer.phase("selection"):
            identities, selection = select_identities(spec, out, proposer, progress)
        todo = pending_shards(spec, out, len(identities))
        ran = [0, 0]  # samples and candidates this run computed

        def written(marker: dict) -> None:
            ran[0] += int(marker.get("num_samples", 0))
            ran[1] += int(marker.get("stats", {}).get("attempts", 0))
            bar.update(1)

        with timer.phase("shards"), progress_bar(len(todo), "shards", "shard", progress) as bar:
            pipeline = ShardPipeline(lambda shard_id: prepare_shard(bundle, identities, shard_id),
                                     lambda prepared: publish_shard(spec.output, out, prepared, guard.check),
                                     overlap=spec.run.overlap, on_written=written)
            stages = pipeline.run(todo)
        report = finalize(spec, out, identities, selection, bundle.index, timer, tuple(ran))
    report["executor"] = {"kind": "local", "overlap": spec.run.overlap, "stages": stages.as_dict()}
    return report
