"""Rank tasks spread over Ray actors give the local table, value for value."""

import pytest

from facegen.cluster.disentangle import run_on_ray
from facegen.engine.anonymise.metric import Metric
from facegen.engine.anonymise.rank import RankJob, rank
from tests.engine.planted import planted_pair

pytestmark = pytest.mark.ray


@pytest.mark.slow
def test_ray_actors_rank_exactly_like_the_local_loop(ray_session):
    space, embedder = planted_pair()
    job = RankJob(spaces=("wplus", "style"), widths=(0,), pairs=4, batch_size=32, pairs_per_task=2,
                  metric=Metric(lowpass_size=4))
    local = rank(space, embedder, job)
    seen = []
    distributed = rank(space, embedder, job, run_on_ray(space.generator, embedder, job, actors=2,
                                                        progress=lambda done, total: seen.append((done, total))))
    assert distributed.equals(local)
    assert seen[0] == (0, 4) and seen[-1] == (len(job.tasks()), len(job.tasks())) == (4, 4)
