"""Rank tasks on Ray actors: each actor loads the generator and embedder once and runs whole tasks.

A task's numbers depend only on the task (engine/anonymise/rank.py), not on the thread count
(the 1x1 heads are GEMMs, `models.ops.conv1x1`), so the table equals the local one. Results come
back in task order whatever actor finished first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import ray
import torch

from facegen.engine.anonymise.rank import RankJob, RunTasks, Scorer, Task
from facegen.models.embedder import FaceEmbedder
from facegen.models.generator import Generator
from facegen.models.rendering import open_latent_spaces


class RankWorker:
    def __init__(self, generator: Generator, embedder: FaceEmbedder, job: RankJob, num_threads: int) -> None:
        torch.set_num_threads(num_threads)
        self.scorer = Scorer(open_latent_spaces(generator), embedder, job)

    def run(self, task: Task) -> tuple[np.ndarray, np.ndarray]:
        return self.scorer.run(task)


def run_on_ray(generator: Generator, embedder: FaceEmbedder, job: RankJob, actors: int, *,
               num_cpus: float = 1.0, num_threads: int = 1,
               progress: Callable[[int, int], None] | None = None) -> RunTasks:
    """A `RunTasks` for `engine.anonymise.rank.rank` that spreads tasks over `actors` Ray actors."""

    def run(tasks: Sequence[Task]) -> list[tuple[np.ndarray, np.ndarray]]:
        remote = ray.remote(RankWorker).options(num_cpus=num_cpus)
        generator_ref, embedder_ref = ray.put(generator), ray.put(embedder)
        workers = [remote.remote(generator_ref, embedder_ref, job, num_threads)
                   for _ in range(max(1, min(actors, len(tasks))))]
        try:
            refs = [workers[i % len(workers)].run.remote(task) for i, task in enumerate(tasks)]
            pending, done = list(refs), 0
            if progress:
                progress(0, len(refs))
            while pending:  # progress as tasks finish; results are collected in task order below
                ready, pending = ray.wait(pending, num_returns=1)
                done += len(ready)
                if progress:
                    progress(done, len(refs))
            return ray.get(refs)
        finally:
            for worker in workers:
                ray.kill(worker)

    return run
