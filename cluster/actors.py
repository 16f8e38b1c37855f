"""Generator actors and the pool that keeps them alive.

A `GeneratorWorker` holds one loaded `Bundle` (generator, embedder, and a replica of the privacy index
or a `RemoteIndex` over index-shard actors) and runs the engine's own units: `engine.phases.propose`
for a block of identity slots and `engine.job.prepare_shard` + `publish_shard` for one shard (tar, manifest, marker are
written by the engine). `GeneratorPool` owns the actors, replaces one that died (node lost, process
killed) and says which failures are infrastructure (retry) and which are the job's own (stop).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray import exceptions as rex

from facegen.engine.job import load_bundle, prepare_shard, publish_shard
from facegen.engine.lease import LeaseGuard
from facegen.engine.phases import Identities, Proposals, propose
from facegen.engine.pipeline import OverlapLocks
from facegen.engine.spec import JobSpec
from facegen.engine.storage import Storage
from facegen.models.errors import UserError

log = logging.getLogger("facegen")

# Failures of the infrastructure, never of the job: the work is redone elsewhere.
LOST = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError,
        rex.OwnerDiedError, rex.ActorUnavailableError)



def is_lost(err: BaseException) -> bool:
    """True for a dead actor/worker/node, also when a generator saw it in an index-shard actor."""
    if isinstance(err, LOST):
        return True
    return isinstance(err, rex.RayTaskError) and isinstance(getattr(err, "cause", None), LOST)


def user_error_of(err: BaseException) -> UserError | None:
    """The job's own UserError inside a Ray error (so the CLI prints one clean line and exits 2)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, UserError) else None


class GeneratorWorker:
    """One generator actor: the engine's propose / run_shard on a bundle loaded once.

    With `run.overlap` the actor runs two tasks at a time (`max_concurrency=2`, see `WorkerPlan`):
    one computes a shard while the other encodes and writes the previous one (`OverlapLocks`), as
    `engine.pipeline` does in the local executor. Every shard is published only while `guard` (the
    driver's lease on the output) holds: an actor that outlives its driver stops publishing before
    the lease can be taken over by another run."""

    def __init__(self, spec: JobSpec, out: Storage, index: Any | None, num_threads: int,
                 guard: LeaseGuard | None = None):
        # Any count gives the same bytes (the 1x1 heads are GEMMs, `models.ops.conv1x1`); plan_workers
        # gives one thread per CPU slot.
        torch.set_num_threads(num_threads)
        self.threads, self.guard, self.overlap = num_threads, guard, spec.run.overlap
        self.locks = OverlapLocks()
        self.out, self.error = out, None
        self._identities_ref, self._identities = None, None
        try:
            bundle = load_bundle(spec, out)
            # A RemoteIndex replaces the local replica; load_bundle already checked compatibility
            # against the same index.json, without loading a single vector.
            self.bundle = bundle if index is None else dataclasses.replace(bundle, index=index)
        except UserError as err:  # reported by ready(), so the driver can stop before any work
            self.error = err

    def ready(self) -> dict:
        if self.error is not None:
            raise self.error
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "pid": os.getpid(), "device": str(self.bundle.device),
                "threads": torch.get_num_threads()}

    def propose(self, slots) -> Proposals:
        with self.locks.compute:
            torch.set_num_threads(self.threads)  # per thread: a threaded actor runs tasks on its own threads
            return propose(self.bundle, slots)

    def run_shard(self, identities_box: list, shard_id: int) -> dict:
        """`identities_box` is [ObjectRef]: boxed so Ray does not fetch the table for every shard."""
        ref = identities_box[0]
        if ref != self._identities_ref:
            self._identities, self._identities_ref = ray.get(ref), ref
        identities: Identities = self._identities
        guard = self.guard.check if self.guard else None
        locks, clock = self.locks, time.perf_counter
        with locks.compute:
            torch.set_num_threads(self.threads)
            start = clock()
            prepared = prepare_shard(self.bundle, identities, shard_id)
            computed = clock()
            if not self.overlap:
                marker = publish_shard(self.bundle.spec.output, self.out, prepared, guard, self.threads)
                locks.add(shards=1, compute_s=computed - start, write_s=clock() - computed)
                return marker
        with locks.write:  # waiting here is the device's idle time: the writer is behind
            writing = clock()
            torch.set_num_threads(self.threads)
            marker = publish_shard(self.bundle.spec.output, self.out, prepared, guard, self.threads)
        locks.add(shards=1, compute_s=computed - start, wait_s=writing - computed, write_s=clock() - writing)
        return marker

    def stage_times(self) -> dict:
        return self.locks.times.as_dict()


RemoteGeneratorWorker = ray.remote(GeneratorWorker)


@dataclass
class WorkerPlan:
    """How many generator actors, with which resources."""

    num_workers: int
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    threads: int = 1

    overlap: bool = True

    def options(self) -> dict:
        # Two tasks at a time when overlapping: one computes while the other writes (GeneratorWorker).
        return {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus, "scheduling_strategy": "SPREAD",
                "max_concurrency": 2 if self.overlap else 1}


def plan_workers(spec: JobSpec, resources: dict[str, float]) -> WorkerPlan:
    """One actor per GPU (`num_gpus=1`); on CPU-only clusters (or run.device=cpu) one per CPU slot,
    running one intra-op thread: independent actors scale better than threads within one (measured in
    docs/benchmarks.md, Scaling), and the output does not depend on the thread count.

    `run.num_workers` caps the count (GPU) or sets it (CPU, sharing the CPUs evenly).
    """
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    wanted = spec.run.num_workers
    if gpus and spec.run.device != "cpu":
        # The CPUs beside each GPU encode PNGs (the shard encoder pool uses the actor's torch threads).
        return WorkerPlan(min(gpus, wanted or gpus), num_gpus=1.0, num_cpus=1.0 if cpus >= gpus * 2 else 0.0,
                          threads=max(1, int(cpus) // gpus), overlap=spec.run.overlap)
    if spec.run.device == "cuda":
        raise UserError("run.device: cuda requested but the Ray cluster has no GPU")
    if cpus < 1:
        raise UserError(f"the Ray cluster has {cpus:g} CPUs: no generator actor can be placed")
    count = wanted or int(cpus)
    share = cpus / count
    # Whole CPUs when there are enough (Ray then never packs more threads than cores onto a node);
    # a fraction when run.num_workers asks for more actors than CPUs.
    num_cpus = float(int(share)) if share >= 1 else round(share, 4)
    return WorkerPlan(count, num_cpus=num_cpus, threads=max(1, int(share)), overlap=spec.run.overlap)


@dataclass
class Slot:
    """One place in the pool. `generation` counts replacements, so a death is handled once; a
    replacement is `starting` (its pending `ready()`) until it has loaded its bundle."""

    actor: Any
    generation: int = 0
    in_flight: int = 0
    info: dict = field(default_factory=dict)
    starting: Any = None
    failed_starts: int = 0  # replacements in a row that died before serving


class GeneratorPool:
    """The generator actors of a job. A dead actor is replaced at once, but work only goes to actors
    that serve: a replacement that cannot be placed (the cluster shrank) never holds work hostage."""

    def __init__(self, factory: Callable[[], Any], size: int, capacity: int = 2, max_failed_starts: int = 3,
                 on_event: Callable[[str, dict], None] | None = None):
        self.factory, self.size, self.capacity = factory, size, capacity
        self.max_failed_starts = max_failed_starts
        self.slots: list[Slot] = []
        self.on_event = on_event or (lambda kind, data: None)
        self.replaced = 0
        self.nodes: set[str] = set()

    def start(self) -> GeneratorPool:
        """Create the actors (once) and block until every one loaded its bundle; a UserError in any of
        them stops the job here. Lazy, so a resume with nothing left to do starts no actor."""
        if self.slots:
            return self
        self.slots = [Slot(self.factory()) for _ in range(self.size)]
        try:
            infos = ray.get([s.actor.ready.remote() for s in self.slots])
        except Exception as err:
            raise_user_error(err)
            raise
        for i, info in enumerate(infos):
            self._serving(i, info)
        return self

    # -- choosing an actor -------------------------------------------------------------------
    def pick(self, full_ok: bool = False) -> int | None:
        """The least busy serving actor (lowest index on ties) with room for a task (any, if
        `full_ok`); None if there is none."""
        self.refresh()
        fits = [i for i, s in enumerate(self.slots)
                if s.starting is None and (full_ok or s.in_flight < self.capacity)]
        return min(fits, key=lambda i: (self.slots[i].in_flight, i), default=None)

    def submitted(self, index: int) -> tuple[int, int]:
        """Count one more task on actor `index`; returns (index, generation) to hand back to `release`."""
        self.slots[index].in_flight += 1
        return index, self.slots[index].generation

    def release(self, index: int, generation: int) -> None:
        """A task of actor `index` ended; a replaced actor's tasks no longer count."""
        slot = self.slots[index]
        if slot.generation == generation:
            slot.in_flight = max(0, slot.in_flight - 1)

    # -- replacing ----------------------------------------------------------------------------
    def lost(self, index: int, generation: int, err: BaseException) -> None:
        """An actor died: replace it unless a previous failure already did."""
        if self.slots[index].generation == generation:
            self._replace(index, err, failed_starts=0)

    def starting_refs(self) -> list:
        return [s.starting for s in self.slots if s.starting is not None]

    def refresh(self, block: bool = False) -> None:
        """Take in replacements that finished loading; one that died loading is replaced again
        (at most `max_failed_starts` times in a row). `block`: wait until at least one finished."""
        refs = self.starting_refs()
        if not refs:
            return
        if block:
            log.info("waiting for a generator actor to be placed and loaded")
        done, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
        for i, slot in enumerate(self.slots):
            if slot.starting is None or slot.starting not in done:
                continue
            try:
                info = ray.get(slot.starting)
            except Exception as err:
                if not is_lost(err):
                    raise_user_error(err)
                    raise
                if slot.failed_starts + 1 > self.max_failed_starts:
                    raise RuntimeError(f"generator actor {i} died {slot.failed_starts + 1} times while "
                                       f"loading; last error: {err}") from err
                self._replace(i, err, failed_starts=slot.failed_starts + 1)
                continue
            self._serving(i, info)

    def wait_serving(self) -> None:
        """Block until some actor serves (after every one was lost)."""
        while all(s.starting is not None for s in self.slots):
            self.refresh(block=True)

    def _serving(self, index: int, info: dict) -> None:
        slot = self.slots[index]
        slot.starting, slot.info, slot.failed_starts = None, info, 0
        self.nodes.add(info["node_id"])
        self.on_event("actor_ready", {"slot": index, "generation": slot.generation, **info})

    def _replace(self, index: int, err: BaseException, failed_starts: int) -> None:
        old = self.slots[index]
        self.on_event("actor_lost", {"slot": index, "generation": old.generation,
                                     "error": f"{type(err).__name__}: {err}"[:500]})
        with contextlib.suppress(Exception):  # already gone with its node
            ray.kill(old.actor, no_restart=True)
        actor = self.factory()
        self.slots[index] = Slot(actor, generation=old.generation + 1, starting=actor.ready.remote(),
                                 failed_starts=failed_starts)
        self.replaced += 1

    def stage_times(self) -> dict:
        """The serving actors' stage times, summed (`engine.pipeline.StageTimes`; a replaced actor's
        are lost with it)."""
        from facegen.engine.pipeline import StageTimes

        total = StageTimes()
        serving = [s.actor for s in self.slots if s.starting is None]
        with contextlib.suppress(Exception):
            for times in ray.get([actor.stage_times.remote() for actor in serving], timeout=60):
                total.add(times)
        return total.as_dict()

    def shutdown(self) -> None:
        for slot in self.slots:
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=True)


def raise_user_error(err: BaseException) -> None:
    """Re-raise a UserError hidden inside a Ray error as itself (one clean CLI line, exit 2)."""
    cause = user_error_of(err)
    if cause is not None:
        raise UserError(str(cause)) from None
    if isinstance(err, rex.RayActorError):
        # An actor that died while loading surfaces its constructor's exception in the message.
        creation = getattr(err, "error_msg", "") or str(err)
        if "UserError" in creation:
            raise UserError(creation.rsplit("UserError:", 1)[-1].strip().splitlines()[0]) from None
