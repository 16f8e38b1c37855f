"""The Ray executor: the engine's units on generator actors, scheduled by one driver.

Phases, in order (the units of `engine.job`, as `engine.local.run_local` runs them, only scheduled
differently):
1. `open_job` on the driver: models, index and thresholds checked, then the resolved spec and its
   hash are written before anything else; a compat job's index is enrolled once, in one task on a
   worker (`enrol_compat_index`).
2. Generator actors (one per GPU, or per CPU slot) load the bundle; the privacy index is either
   replicated into each of them or held by index-shard actors (`cluster.remote_index`), as
   `choose_placement` decides from `run.index_placement`.
3. Select: `engine.job.select_identities` on the driver, fed by `ProposeMany`, which keeps a bounded
   number of proposal blocks in flight across the actors and yields them in block order.
4. Expand: pending shards go to the actors (bounded in flight, `ray.wait`); a shard whose actor or
   node died is retried on a replacement actor, at most `run.max_retries` times.
5. `engine.summary.finalize` on the driver merges the markers into the report.

Every candidate is a pure function of (seed, slot, attempt) and a shard is written by the engine's
`prepare_shard` + `publish_shard`, so the output is byte-identical to the local executor's whatever
the actors' placement, count, failures or retries.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import ray

from facegen.cluster.actors import (
    GeneratorPool,
    RemoteGeneratorWorker,
    WorkerPlan,
    is_lost,
    plan_workers,
    raise_user_error,
)
from facegen.cluster.ray_start import init_ray
from facegen.cluster.remote_index import RemoteAnchors, RemoteIndex
from facegen.engine.dataset.manifest import remove_incomplete
from facegen.engine.identities import IDENTITIES_FILE
from facegen.engine.index.anchors import SHARD_ROWS
from facegen.engine.index.search import PrivacyIndex
from facegen.engine.job import (
    compat_index_pending,
    enrol_compat_index,
    open_job,
    open_job_index,
    pending_shards,
    select_identities,
)
from facegen.engine.phases import Identities, Proposals
from facegen.engine.progress import progress_bar
from facegen.engine.report import PhaseTimer
from facegen.engine.spec import IndexPlacement, JobSpec
from facegen.engine.storage import Storage
from facegen.engine.summary import finalize
from facegen.models.errors import UserError

log = logging.getLogger("facegen")

PLACEMENTS = get_args(IndexPlacement)
# `auto` replicates the index into every generator actor while all replicas on one node take at most
# this share of the node's memory and one replica at most REPLICATE_MAX_BYTES; otherwise it shards.
REPLICATE_MEMORY_SHARE = 0.25
REPLICATE_MAX_BYTES = 4 << 30
IN_FLIGHT_PER_ACTOR = 2  # one running, one queued: an actor never waits for the driver

EventHook = Callable[[str, dict], None]


def run_ray(spec: JobSpec, resume: bool = False, progress: bool = True, *, on_event: EventHook | None = None) -> dict:
    """Run a whole job on Ray; returns the report (`engine.summary.finalize`) plus an `executor` section.

    Everything about how to run comes from `spec.run`: `address` None starts an embedded local Ray (or
    joins the cluster of `RAY_ADDRESS`, as inside a submitted job; an already initialised Ray in this
    process is used as it is), `index_placement` and `index_actors` place the privacy index,
    `num_workers` and `max_retries` size the pool. `on_event(kind, data)` sees actor and shard events
    (tests, dashboards).
    """
    timer = PhaseTimer()
    job = open_job(spec, resume, load=False)
    with job.lease, ray_connection(job.spec.run.address):
        spec, out, guard = job.spec, job.out, job.lease.guard()
        plan = plan_workers(spec, ray.cluster_resources())
        index = open_driver_index(spec, out, plan)
        placement = choose_placement(spec.run.index_placement, index.count * index.dim * 4, plan.num_workers,
                                     worker_node_memory())
        remote: list[RemoteIndex] = []  # started with the first generator actor, if sharded

        def new_actor():
            if placement == "sharded" and not remote:
                count = spec.run.index_actors or index.num_shards
                remote.append(RemoteIndex.start(index, count, max_restarts=spec.run.max_retries))
            return RemoteGeneratorWorker.options(**plan.options()).remote(
                spec, out, remote[0] if remote else None, plan.threads, guard)

        pool = GeneratorPool(new_actor, plan.num_workers, capacity=IN_FLIGHT_PER_ACTOR,
                             max_failed_starts=spec.run.max_retries, on_event=on_event)
        proposer = ProposeMany(pool, spec.run.max_retries)
        timer.mark_start()  # the output and models checked on the driver, Ray up, the index opened
        anchors: list[RemoteAnchors] = []
        try:
            # The pool starts lazily (a resume with nothing to do starts no actor); started here, the
            # actors' model loading is timed apart from the work.
            if not out.exists(IDENTITIES_FILE):
                with timer.phase("model_load"):
                    pool.start()
            with timer.phase("selection"):
                identities, selection = select_identities(spec, out, proposer, progress)
            todo = pending_shards(spec, out, len(identities))
            if todo:
                with timer.phase("model_load"):
                    pool.start()
                anchors += place_anchors(spec, identities, plan)
            with timer.phase("shards"):
                shards = ShardScheduler(pool, spec.run.max_retries, on_event).run(identities, todo, progress)
            stages = pool.stage_times()
        finally:
            pool.shutdown()
            for r in remote + anchors:
                r.shutdown()
        # An actor lost while writing leaves its temp files (its shard was redone elsewhere); the
        # pool is gone, so no writer runs now and every unmarked file is such a leftover.
        remove_incomplete(out)
        report = finalize(spec, out, identities, selection, index, timer, (shards["samples"], shards["attempts"]))
    report["executor"] = {
        "kind": "ray", "workers": len(pool.slots), "gpus_per_worker": plan.num_gpus,
        "cpus_per_worker": plan.num_cpus, "nodes": len(pool.nodes), "index_placement": placement,
        "index_actors": remote[0].num_actors if remote else 0,
        "anchor_actors": len(anchors[0].actors) if anchors else 0, "actors_replaced": pool.replaced,
        "proposal_retries": proposer.retries, **shards, "seconds": round(time.monotonic() - timer.started, 3),
        "overlap": spec.run.overlap, "stages": stages,
    }
    log.info("ray executor: %s", report["executor"])
    return report


@contextlib.contextmanager
def ray_connection(address: str | None) -> Iterator[None]:
    """Use this process's Ray if initialised; else join `address`; else start an embedded local Ray.

    A cluster we joined is left at the end; an embedded Ray stays up for later jobs in this process
    (Ray stops it at exit), since starting one costs seconds.
    """
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address and address not in ("auto", current) and not address.startswith("ray://"):
            raise UserError(f"run.address {address}: this process is already connected to Ray at {current}")
        yield
        return
    options = dict(log_to_driver=True, configure_logging=False)
    if address:
        try:
            _init_keeping_sigterm(address=address, **options)
        except ConnectionError as err:
            raise UserError(f"run.address {address}: no Ray cluster answers there ({err})") from None
        try:
            yield
        finally:
            ray.shutdown()
        return
    _init_keeping_sigterm(include_dashboard=False, **options)
    yield


def _init_keeping_sigterm(**options) -> None:
    """ray.init, then the SIGTERM handler the caller had installed, if any: Ray's driver replaces it with
    sys.exit (and its native code with a stack dump), while the facegen CLI stops on SIGTERM as on Ctrl-C
    (one line, exit 130, `--resume`)."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    init_ray(**options)
    if callable(before):
        signal.signal(signal.SIGTERM, before)


def place_anchors(spec: JobSpec, identities: Identities, plan: WorkerPlan) -> list[RemoteAnchors]:
    """Where expansion searches the accepted anchors for separability, by the privacy index's rule
    (`choose_placement` of `run.index_placement`): replicated, each generator actor indexes its copy of
    the identities table (nothing to start); sharded, index-shard actors hold them (`RemoteAnchors`,
    `run.index_actors` of them, else one per 2^18 anchors) and travel with the table."""
    count, dim = identities.anchor.shape
    placement = choose_placement(spec.run.index_placement, count * dim * 4, plan.num_workers, worker_node_memory())
    if placement != "sharded" or count < 2:
        return []
    actors = spec.run.index_actors or -(-count // SHARD_ROWS)
    anchors = RemoteAnchors.start(identities.anchor, actors, shard_rows=min(SHARD_ROWS, -(-count // actors)),
                                  max_restarts=spec.run.max_retries)
    identities.anchor_search = anchors
    return [anchors]


def open_driver_index(spec: JobSpec, out: Storage, plan: WorkerPlan) -> PrivacyIndex:
    """The index's metadata on the driver (index.json only; vectors load where they are searched).

    A compat job's index is enrolled first, in one task on a worker (which has the embedder's file,
    like every generator actor), so that the actors find it rather than race to enrol it.
    """
    if compat_index_pending(spec, out):
        enrol = ray.remote(enrol_compat_index).options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)
        try:
            ray.get(enrol.remote(spec, out))
        except ray.exceptions.RayError as err:
            raise_user_error(err)
            raise
    return open_job_index(spec, out, "cpu")


def choose_placement(requested: str, vector_bytes: int, num_workers: int, node_memory: list[float]) -> str:
    """'replicated' or 'sharded'. An explicit choice wins; 'auto' replicates while one replica takes at
    most REPLICATE_MAX_BYTES and the replicas on one node (workers spread evenly over the nodes) at
    most REPLICATE_MEMORY_SHARE of the smallest node's memory (Ray's `memory` resource)."""
    if requested not in PLACEMENTS:
        raise UserError(f"index placement: must be one of {', '.join(PLACEMENTS)}, got {requested!r}")
    if requested != "auto":
        return requested
    per_node = -(-num_workers // max(1, len(node_memory)))
    smallest = min(node_memory, default=0.0) or float("inf")
    fits = vector_bytes <= REPLICATE_MAX_BYTES and vector_bytes * per_node <= REPLICATE_MEMORY_SHARE * smallest
    return "replicated" if fits else "sharded"


def worker_node_memory() -> list[float]:
    """Ray's `memory` resource of every live node that can host a generator actor."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    hosts = [n for n in nodes if n["Resources"].get("CPU", 0) or n["Resources"].get("GPU", 0)] or nodes
    return [float(n["Resources"].get("memory", 0)) for n in hosts]


@dataclass
class Work:
    """One unit of work (a proposal block or a shard id) and where it runs: the pending result,
    the pool slot and that slot's generation when submitted, and its failures so far."""

    item: Any
    ref: Any = None
    slot: int = -1
    generation: int = -1
    failures: int = 0

    def on_lost_actor(self, slot: int, generation: int) -> bool:
        return (self.slot, self.generation) == (slot, generation)


class ProposeMany:
    """`select_identities`' producer: blocks computed ahead on every actor, yielded in block order."""

    def __init__(self, pool: GeneratorPool, max_retries: int):
        self.pool, self.max_retries = pool, max_retries
        self.retries = 0

    def __call__(self, blocks: Iterator[np.ndarray]) -> Iterator[Proposals]:
        pool, blocks = self.pool.start(), iter(blocks)
        pending: deque[Work] = deque()
        try:
            self._refill(pending, blocks)
            while pending:
                work = pending[0]
                try:
                    result = ray.get(work.ref)
                except Exception as err:
                    self._failed(work, err, pending)
                    continue
                pending.popleft()
                pool.release(work.slot, work.generation)
                self._refill(pending, blocks)
                yield result
        finally:  # closed early (selection done): what is still queued runs out unread. Not ray.cancel:
            # cancelling a queued actor task leaves a hole in the actor's task sequence, and the actor
            # then stalls for 30 s and fails every queued task ("Timed out waiting for seq_no").
            for work in pending:
                pool.release(work.slot, work.generation)

    def _refill(self, pending: deque[Work], blocks: Iterator[np.ndarray]) -> None:
        while (i := self.pool.pick()) is not None:
            block = next(blocks, None)
            if block is None:
                return
            pending.append(Work(block))
            self._submit(pending[-1], i)

    def _submit(self, work: Work, i: int) -> None:
        work.ref = self.pool.slots[i].actor.propose.remote(work.item)
        work.slot, work.generation = self.pool.submitted(i)

    def _failed(self, work: Work, err: Exception, pending: deque[Work]) -> None:
        if not is_lost(err):
            raise_user_error(err)
            raise err
        dead, generation = work.slot, work.generation
        self.pool.lost(dead, generation, err)
        # Every block that was on the dead actor goes to a serving one now; `pending` keeps its order.
        for other in pending:
            if other.on_lost_actor(dead, generation):
                other.failures += 1
                self.retries += 1
                if other.failures > self.max_retries:
                    raise RuntimeError(f"proposal block at slot {int(other.item[0])} failed {other.failures} "
                                       f"times; last error: {err}") from err
                self.pool.wait_serving()
                self._submit(other, self.pool.pick(full_ok=True))


class ShardScheduler:
    """Phase 3 on the pool: bounded in-flight shards, retries after infrastructure failures."""

    def __init__(self, pool: GeneratorPool, max_retries: int, on_event: EventHook | None = None):
        self.pool, self.max_retries = pool, max_retries
        self.on_event = on_event or (lambda kind, data: None)

    def run(self, identities: Identities, todo: list[int], progress: bool) -> dict:
        totals = {"shards_run": 0, "shard_retries": 0, "samples": 0, "attempts": 0}
        if not todo:
            return totals
        pool = self.pool.start()
        box = [ray.put(identities)]
        queue = deque(Work(shard_id) for shard_id in todo)
        in_flight: dict[Any, Work] = {}  # by pending result
        with progress_bar(len(todo), "shards", "shard", progress) as bar:
            self._fill(queue, in_flight, box)
            while in_flight or queue:
                if not in_flight:  # every actor was lost: wait for a replacement to load
                    pool.wait_serving()
                    self._fill(queue, in_flight, box)
                    continue
                ready, _ = ray.wait(list(in_flight) + pool.starting_refs(), num_returns=1)
                if ready[0] in in_flight:
                    work = in_flight.pop(ready[0])
                    pool.release(work.slot, work.generation)
                    try:
                        marker = ray.get(ready[0])
                    except Exception as err:
                        self._retry(err, work, queue)
                        totals["shard_retries"] += 1
                    else:
                        self._done(marker, work, totals, bar)
                self._fill(queue, in_flight, box)  # also takes in replacements that finished loading
        return totals

    def _fill(self, queue: deque[Work], in_flight: dict[Any, Work], box: list) -> None:
        while queue and (i := self.pool.pick()) is not None:
            work = queue.popleft()
            work.ref = self.pool.slots[i].actor.run_shard.remote(box, work.item)
            work.slot, work.generation = self.pool.submitted(i)
            in_flight[work.ref] = work
            self.on_event("shard_submitted", {"shard": work.item, "slot": i,
                                              "pid": self.pool.slots[i].info.get("pid")})

    def _retry(self, err: Exception, work: Work, queue: deque[Work]) -> None:
        if not is_lost(err):
            raise_user_error(err)
            raise err
        shard_id = work.item
        work.failures += 1
        self.on_event("shard_retry", {"shard": shard_id, "failures": work.failures, "error": type(err).__name__})
        if work.failures > self.max_retries:
            raise RuntimeError(f"shard {shard_id} failed {work.failures} times (run.max_retries="
                               f"{self.max_retries}); last error: {err}") from err
        log.warning("shard %d: worker lost (%s); retrying (%d/%d)", shard_id, type(err).__name__,
                    work.failures, self.max_retries)
        self.pool.lost(work.slot, work.generation, err)
        queue.appendleft(work)

    def _done(self, marker: dict, work: Work, totals: dict, bar) -> None:
        shard_id, slot = work.item, work.slot
        if marker.get("shard_id") != shard_id:
            raise RuntimeError(f"shard {shard_id}: the worker returned the marker of shard {marker.get('shard_id')}")
        stats = marker.get("stats", {})
        totals["shards_run"] += 1
        totals["samples"] += int(marker.get("num_samples", 0))
        totals["attempts"] += int(stats.get("attempts", 0))
        elapsed = bar.elapsed
        bar.set_postfix(samples=totals["samples"], cand_per_s=f"{totals['attempts'] / max(elapsed, 1e-9):.1f}",
                        refresh=False)
        bar.update(1)
        self.on_event("shard_done", {"shard": shard_id, "slot": slot, "pid": self.pool.slots[slot].info.get("pid"),
                                     "samples": marker.get("num_samples")})
