"""Separability through the anchors' exact search (engine/index/anchors.py): selection and expansion
decide as a dense float64 computation does, with many pairs within float32 noise of the threshold,
whatever the shard size, backend or batching."""

import numpy as np
import pytest

from facegen.engine.index import anchors as anchors_module
from facegen.engine.index.anchors import AnchorIndex, AnchorShards, max_other_above
from facegen.engine.phases import Proposals, Selection

DIM, TAU = 64, 0.75  # a threshold float32 holds exactly, so float64 and float32 comparisons agree on it


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def at_cosine(v: np.ndarray, cos: np.ndarray, rng) -> np.ndarray:
    """Unit float32 rows at cosine `cos` (float64) from the unit rows `v`."""
    u = rng.standard_normal(v.shape)
    u -= (u * v).sum(axis=1, keepdims=True) * v
    u = unit(u)
    return (cos[:, None] * v + np.sqrt(1 - cos[:, None] ** 2) * u).astype(np.float32)


def near_threshold_anchors(n: int, offsets: np.ndarray, rng) -> np.ndarray:
    """Anchors where each one after the first few sits at TAU + offset from a random earlier one."""
    anchors = unit(rng.standard_normal((n, DIM))).astype(np.float32)
    for i in range(8, n):
        j = rng.integers(0, i)
        anchors[i] = at_cosine(anchors[j : j + 1].astype(np.float64), np.array([TAU + offsets[i]]), rng)[0]
    return anchors


def proposals(anchors: np.ndarray, rng) -> Proposals:
    n = len(anchors)
    verdict = np.where(rng.random(n) < 0.1, "privacy", "ok").astype(object)
    return Proposals(slot=np.arange(n, dtype=np.int64), condition=np.zeros((n, 0), np.float32), anchor=anchors,
                     real_sim=np.zeros(n, np.float32), real_identity=np.full(n, "", object), verdict=verdict)


def dense_float64_selection(p: Proposals, wanted: int) -> list[int]:
    """The rule itself: in slot order, accept an 'ok' slot whose exact similarity to every accepted anchor
    is at most TAU."""
    exact = p.anchor.astype(np.float64) @ p.anchor.astype(np.float64).T
    accepted: list[int] = []
    for i in range(len(p.slot)):
        if len(accepted) == wanted:
            break
        if p.verdict[i] == "ok" and not (exact[i, accepted] > TAU).any():
            accepted.append(i)
    return accepted


def dense_float32_selection(p: Proposals, wanted: int) -> list[int]:
    """The selection before the anchor index: float32 matrix products against a growing dense matrix."""
    accepted, matrix = [], np.zeros((0, DIM), np.float32)
    for i in range(len(p.slot)):
        if len(accepted) == wanted:
            break
        if p.verdict[i] == "ok" and not (matrix @ p.anchor[i] > TAU).any():
            accepted.append(i)
            matrix = np.concatenate([matrix, p.anchor[i : i + 1]])
    return accepted


def select(p: Proposals, wanted: int, pieces: int = 1) -> Selection:
    selection = Selection(wanted=wanted, threshold=TAU)
    for part in np.array_split(np.arange(len(p.slot)), pieces):
        selection.offer(Proposals(p.slot[part], p.condition[part], p.anchor[part], p.real_sim[part],
                                  p.real_identity[part], p.verdict[part]))
    return selection


def accepted_slots(selection: Selection) -> list[int]:
    return [int(s) for rows in selection.rows for s in rows.slot]


@pytest.mark.parametrize("shard_rows", [7, 100, None], ids=["7-row-shards", "100-row-shards", "one-shard"])
def test_selection_equals_the_dense_path_with_many_near_threshold_pairs(shard_rows, monkeypatch):
    monkeypatch.setattr(anchors_module, "SHARD_ROWS", shard_rows or anchors_module.SHARD_ROWS)
    rng = np.random.default_rng(0)
    n = 1500
    # Pairs 2e-6 .. 1e-3 from the threshold: float32 decides them as float64 does.
    offsets = rng.choice([-1, 1], n) * 10 ** rng.uniform(np.log10(2e-6), -3, n)
    p = proposals(near_threshold_anchors(n, offsets, rng), rng)
    want = dense_float64_selection(p, 1200)
    assert want == dense_float32_selection(p, 1200)  # today's dense path
    assert accepted_slots(select(p, 1200)) == want
    assert accepted_slots(select(p, 1200, pieces=7)) == want  # any chunking of the offers
    decided = p.verdict == "ok"
    exact = p.anchor.astype(np.float64) @ p.anchor.astype(np.float64).T
    hard = (np.abs(exact[np.ix_(want, np.arange(n))] - TAU) < 1e-4).sum()
    assert hard > 300 and 100 < len(want) < decided.sum() - 100  # the case is about near-threshold pairs


@pytest.mark.parametrize("shard_rows", [5, 64, None], ids=["5-row-shards", "64-row-shards", "one-shard"])
def test_pairs_within_float32_noise_are_decided_as_float64_whatever_the_sharding(shard_rows, monkeypatch):
    monkeypatch.setattr(anchors_module, "SHARD_ROWS", shard_rows or anchors_module.SHARD_ROWS)
    rng = np.random.default_rng(1)
    n = 800
    # |offset| < 2e-7 (and exact ties): float32 summation order alone would decide these.
    offsets = rng.choice([-1, 0, 1], n) * rng.uniform(0, 2e-7, n)
    p = proposals(near_threshold_anchors(n, offsets, rng), rng)
    want = dense_float64_selection(p, 700)
    assert accepted_slots(select(p, 700)) == want
    assert accepted_slots(select(p, 700, pieces=5)) == want


@pytest.mark.parametrize("backend", ["faiss", "numpy", "torch"])
def test_max_other_above_equals_dense_float64_excluding_the_own_row(backend):
    rng = np.random.default_rng(2)
    anchors = unit(rng.standard_normal((300, DIM))).astype(np.float32)
    targets = rng.integers(0, 300, 2000)
    offsets = rng.choice([-1, 0, 1], 2000) * 10 ** rng.uniform(-9, -3, 2000)
    queries = at_cosine(anchors[targets].astype(np.float64), TAU + offsets, rng)
    queries[:200] = anchors[targets[:200]]  # a candidate equal to its own identity's anchor ...
    own = np.where(np.arange(2000) < 200, targets, rng.integers(0, 300, 2000))  # ... which is left out
    queries[200:230] = anchors[targets[200:230]]
    own[200:230] = -1  # and not left out: similarity 1
    for shard_rows in (13, 300):
        index = AnchorShards(anchors, backend=backend, shard_rows=shard_rows)
        best, close = max_other_above(index.search, index.vectors, queries, TAU, exclude=own)
        exact = queries.astype(np.float64) @ anchors.astype(np.float64).T
        exact[np.arange(2000)[own >= 0], own[own >= 0]] = -np.inf
        assert np.array_equal(close, exact.max(axis=1) > TAU)
        assert np.array_equal(best > TAU, close)
        np.testing.assert_allclose(best, exact.max(axis=1), rtol=0, atol=2e-6)
    assert (np.abs(exact.max(axis=1) - TAU) < 1e-6).sum() > 200


def test_a_growing_anchor_index_answers_as_one_built_at_once():
    rng = np.random.default_rng(3)
    anchors = unit(rng.standard_normal((230, DIM))).astype(np.float32)
    growing = AnchorIndex(DIM, shard_rows=50)
    for part in np.array_split(anchors, 9):
        growing.add(part)
    whole = AnchorShards(anchors, shard_rows=230)
    queries = unit(rng.standard_normal((40, DIM))).astype(np.float32)
    assert growing.count == 230 and len(growing.sealed) == 4
    got, want = growing.search(queries, 5), whole.search(queries, 5)
    assert np.array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)
    rows = rng.integers(0, 230, 60)
    assert np.array_equal(growing.vectors(rows), anchors[rows])
