"""Ranking swap units on a generator with planted identity channels, and swapping the top-n."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facegen.engine.anonymise.faces import face_ws
from facegen.engine.anonymise.metric import Metric
from facegen.engine.anonymise.rank import (
    RankJob,
    Scorer,
    from_grid,
    rank,
    ranks_bytes,
    read_ranks,
    select,
    to_grid,
    top_units,
)
from facegen.engine.anonymise.swap import Swapper, layer_units, random_units
from facegen.engine.anonymise.tradeoff import curve, default_ns, plot_png
from facegen.engine.seeding import Stream
from facegen.models.errors import UserError
from tests.engine.planted import PLANTED, planted_pair

METRIC = Metric(lowpass_size=4)  # the planted details have zero mean over every 4x4 block of the 16² images
JOB = RankJob(spaces=("wplus",), widths=(1, 8), pairs=8, batch_size=64, pairs_per_task=2, metric=METRIC)
PLANTED_NS = [0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16]  # n over the identity-carrying units


@pytest.fixture(scope="module")
def planted():
    torch.set_num_threads(2)
    space, embedder = planted_pair()
    return space, embedder, rank(space, embedder, JOB)


def _swap_pairs(space):
    slots = np.arange(8)
    source = space.encode("wplus", face_ws(space, 1, Stream.SWAP_SOURCE, slots))
    target = space.encode("wplus", face_ws(space, 1, Stream.SWAP_TARGET, slots))
    return source, target


def _top(rows, n):
    return list(zip(rows.column("layer").to_pylist()[:n], rows.column("start").to_pylist()[:n]))


def test_ranking_puts_the_planted_identity_channels_first(planted):
    space, _, table = planted
    best = select(table, "wplus", 1)
    last_row = space.num_ws - 1
    top = _top(best, len(PLANTED))
    assert top[0] == (last_row, PLANTED[0])  # the strongest
    assert set(top) == {(last_row, c) for c in PLANTED}
    assert best.column("rank").to_pylist() == list(range(best.num_rows))
    # Each width ranks its own units: groups of 8 channels, four per W+ row.
    groups = select(table, "wplus", 8)
    assert groups.num_rows == 4 * space.num_ws
    assert (groups.column("layer")[0].as_py(), groups.column("start")[0].as_py()) == (last_row, 0)


def test_scores_are_identity_over_appearance_and_tasks_split_freely(planted):
    space, embedder, table = planted
    rows = select(table, "wplus", 1)
    ids, looks = rows.column("identity_change").to_numpy(), rows.column("appearance_change").to_numpy()
    ratio = ids / (looks + METRIC.epsilon)
    np.testing.assert_allclose(rows.column("ratio").to_numpy(), ratio)
    np.testing.assert_allclose(rows.column("score").to_numpy(), ratio)
    # A task's numbers do not depend on how its images are batched (beyond a rare one-grey-level
    # rounding flip of a pixel, which moves a mean by ~1e-5), and the table holds the plain mean
    # over pairs, per unit (rows are stored in unit order).
    job = RankJob(spaces=("wplus",), widths=(8,), pairs=3, batch_size=64, pairs_per_task=2, metric=METRIC)
    scorer = Scorer(space, embedder, job)
    parts = [scorer.run(t) for t in job.tasks()]
    other = Scorer(space, embedder, RankJob(**{**job.__dict__, "batch_size": 5})).run(job.tasks()[0])
    np.testing.assert_allclose(parts[0][0], other[0], atol=2e-5)
    np.testing.assert_allclose(parts[0][1], other[1], atol=1e-4)
    small = rank(space, embedder, job, run_tasks=lambda tasks: [scorer.run(t) for t in tasks]).to_pandas()
    for column, index in (("identity_change", 0), ("appearance_change", 1)):
        expected = np.concatenate([p[index] for p in parts]).astype(np.float64).mean(axis=0)
        np.testing.assert_array_equal(small[column].to_numpy(), expected)
    assert small[["layer", "start"]].to_numpy().tolist() == space.layout("wplus").units(8)[:, :2].tolist()


def test_top_n_swaps_move_identity_monotonically_and_keep_appearance(planted):
    space, embedder, table = planted
    swapper = Swapper(space, embedder, METRIC, batch_size=64)
    points = curve(swapper, table, "wplus", 1, PLANTED_NS, *_swap_pairs(space), seed=0, random_draws=2)
    similarity = [p["top_similarity"] for p in points]
    assert similarity[0] == pytest.approx(1.0, abs=1e-6)
    # Every further unit moves identity further from the source, while the picture changes less
    # than with random units of the same count (their identity change comes with low-pass changes).
    assert all(a > b for a, b in zip(similarity, similarity[1:])), similarity
    for p in points[1:]:
        assert p["top_appearance"] < p["random_appearance"], p
        assert p["top_similarity"] < p["random_similarity"], p


def test_an_appearance_cap_keeps_every_top_n_swap_below_random_appearance(planted):
    space, embedder, _ = planted
    metric = Metric(lowpass_size=4, appearance_cap=0.5)
    table = rank(space, embedder, RankJob(**{**JOB.__dict__, "widths": (1,), "metric": metric}))
    rows = select(table, "wplus", 1)
    ratio, looks = rows.column("ratio").to_numpy(), rows.column("appearance_change").to_numpy()
    # Units above the median appearance change come after every unit within it, in ratio order.
    over = looks > np.median(looks)
    assert 0 < over.sum() < len(over)
    np.testing.assert_allclose(rows.column("score").to_numpy(), np.where(over, ratio - 1 - ratio.max(), ratio))
    inside = int((~over).sum())
    assert not over[:inside].any() and over[inside:].all()
    assert (np.diff(ratio[:inside]) <= 0).all() and (np.diff(ratio[inside:]) <= 0).all()
    last_row = space.num_ws - 1
    top = _top(rows, len(PLANTED))
    assert top[0] == (last_row, PLANTED[0]) and set(top) == {(last_row, c) for c in PLANTED}
    swapper = Swapper(space, embedder, metric, batch_size=64)
    ns = PLANTED_NS + [24, 32]
    points = curve(swapper, table, "wplus", 1, ns, *_swap_pairs(space), seed=0, random_draws=2)
    for p in points[1:]:
        assert p["top_appearance"] < p["random_appearance"], p
    # Over the planted units identity moves each time; past them there is no identity left to move.
    similarity = [p["top_similarity"] for p in points[:len(PLANTED_NS)]]
    assert all(a > b for a, b in zip(similarity, similarity[1:])), similarity
    png = plot_png(points)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_rank_table_round_trips_through_parquet_and_styleid_arrays(planted):
    space, _, table = planted
    again = read_ranks(ranks_bytes(table))
    assert again.equals(table)
    grid = to_grid(table, space, "wplus", 1)
    assert grid.shape == (space.num_ws, space.w_dim)
    imported = from_grid(grid, space, "wplus", 1)
    np.testing.assert_array_equal(top_units(imported, "wplus", 1, 10), top_units(table, "wplus", 1, 10))
    # Integer arrays are rank positions (0 first).
    positions = np.argsort(np.argsort(-grid.ravel(), kind="stable"), kind="stable").reshape(grid.shape)
    np.testing.assert_array_equal(top_units(from_grid(positions, space, "wplus", 1), "wplus", 1, 10),
                                  top_units(table, "wplus", 1, 10))
    groups = to_grid(table, space, "wplus", 8)
    assert groups.shape == (space.num_ws, 4)  # like StyleID's group_256_rank.npy, [18, 2] at w_dim 512
    with pytest.raises(UserError, match="needs"):
        from_grid(grid[:, :3], space, "wplus", 1)
    with pytest.raises(UserError, match="no ranks for space 'style'"):
        select(table, "style", 1)
    with pytest.raises(UserError, match="must be in"):
        top_units(table, "wplus", 1, 10_000)


def test_style_space_ranking_and_swaps_run_on_both_layouts(planted):
    space, embedder, _ = planted
    job = RankJob(spaces=("style",), widths=(0,), pairs=2, batch_size=64, metric=METRIC)
    table = rank(space, embedder, job)
    rows = select(table, "style", 0)
    assert rows.num_rows == space.layout("style").num_layers
    # The last toRGB carries the planted details: as a whole layer it ranks above the 4x4 ones.
    names = rows.column("layer_name").to_pylist()
    assert names.index("b16.torgb") < names.index("b4.conv1")
    # StyleSpace anonymisation: the top-2 layers of the target replace the source's.
    swapper = Swapper(space, embedder, METRIC)
    ws = face_ws(space, 2, Stream.SWAP_SOURCE, np.arange(3))
    source, target = space.encode("style", ws), space.encode("style", ws.roll(1, dims=0))
    mask = space.layout("style").mask(top_units(table, "style", 0, 2))
    swapped = swapper.swap("style", source, target, mask)
    assert (swapped.source_similarity < 1 - 1e-4).all() and (swapped.appearance_change > 0).all()
    nothing = swapper.swap("style", source, target, torch.zeros_like(mask))
    np.testing.assert_allclose(nothing.source_similarity, 1.0, atol=1e-6)
    layers = layer_units(space.layout("wplus"), [space.num_ws - 1])
    assert layers.tolist() == [[space.num_ws - 1, 0, space.w_dim]]
    with pytest.raises(UserError, match="has layers"):
        layer_units(space.layout("wplus"), [99])
    picks = random_units(space.layout("wplus").units(1), 5, seed=3, draw=0)
    assert len(picks) == 5 and np.array_equal(picks, random_units(space.layout("wplus").units(1), 5, 3, 0))
    assert not np.array_equal(picks, random_units(space.layout("wplus").units(1), 5, 3, 1))
    assert default_ns(100) == [0, 1, 2, 4, 8, 16, 32, 64, 100]


def test_bad_rank_jobs_are_refused():
    for bad in ({"spaces": ("z",)}, {"widths": (-1,)}, {"pairs": 0}, {"truncation_psi": 0.0},
                {"metric": Metric(appearance_cap=0.0)}, {"metric": Metric(appearance_cap=1.5)}):
        with pytest.raises(UserError):
            RankJob(**bad)
