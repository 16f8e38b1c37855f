"""Separability against every accepted identity through the privacy index's exact search machinery.

Accepted identities' anchors (unit float32 rows, row = identity label) live in `IndexShard`s, the
privacy index's own unit of search (faiss on the CPU, faiss-gpu or torch on a GPU), in this process
(`AnchorIndex`) or in index-shard actors (`cluster.remote_index.RemoteAnchors`); no [candidates x
identities] matrix is ever materialised, so 10^6+ identities fit.

**Decisions do not depend on how the search is done.** Backends, shard boundaries and batch shapes
change the float32 summation order of a dot product, which moves a similarity by up to ~d·2^-24
(`float32_window`). So a float32 maximum within that window of the threshold is never decided on
its own: every row whose float32 similarity lies within the window below the threshold is
re-scored in float64 (exact products of float32 inputs, `exact_sims`) and the decision is
`max float64 similarity > threshold`. Outside the window the float32 answer is on the right side by
construction. Hence selection and expansion decide exactly as a dense float64 computation would,
whatever the sharding (local, replicated or sharded across actors) — and a reduced-precision
embedder's margin δ widens the same window (engine/precision.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from facegen.engine.index.search import IndexShard, reduce_topk

SHARD_ROWS = 1 << 18  # anchors per shard: 512 MiB of 512-d rows
# Anchors are searched by blocked torch products (the privacy index's `torch` backend) on the CPU and
# on GPUs: on a CPU it reads the anchor table in place (faiss would hold a second copy in every
# generator actor). Exactness does not depend on the choice (float64 near the threshold);
# `facegen bench separability --backend faiss|torch` compares their speed on a machine.
BACKEND = "torch"
FIRST_K = 8  # neighbours fetched for a query near the threshold before a wider search

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
Vectors = Callable[[np.ndarray], np.ndarray]


def float32_window(dim: int) -> float:
    """A bound on |float32 dot - exact dot| of two unit rows of `dim` (2·d·2^-24: recursive
    summation's error bound, which blocked and pairwise sums stay within), at least 1e-6."""
    return max(1e-6, 2.0 * dim * 2.0**-24)


def exact_sims(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of float32 rows in float64: the products are exact and the sum's error
    (~1e-16) is far below anything float32 resolves; one summation order, wherever it runs."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64)).sum(axis=1)


def compared(threshold: float) -> float:
    """The threshold a float32 array is compared with: NumPy casts the Python float to float32."""
    return float(np.float32(threshold))


def settle_above(exact: np.ndarray, threshold: float) -> np.ndarray:
    """float32 values v of float64 similarities with (v > threshold) == (exact > threshold), as float32
    comparisons see the threshold: exact rounded, kept off the threshold on its own side."""
    t = np.float32(compared(threshold))
    values = np.asarray(exact, np.float64).astype(np.float32)
    above = np.asarray(exact, np.float64) > float(t)
    return np.where(above & (values <= t), np.nextafter(t, np.float32(np.inf)), values).astype(np.float32)


def settle_at_least(exact: np.ndarray, threshold: float) -> np.ndarray:
    """float32 values v with (v >= threshold) == (exact >= threshold), as float32 comparisons see it."""
    t = np.float32(compared(threshold))
    values = np.asarray(exact, np.float64).astype(np.float32)
    below = np.asarray(exact, np.float64) < float(t)
    return np.where(below & (values >= t), np.nextafter(t, np.float32(-np.inf)), values).astype(np.float32)


def near(sims: np.ndarray, threshold: float, extra: float | np.ndarray = 0.0, *, dim: int) -> np.ndarray:
    """Where a float32 similarity is too close to the threshold to be decided in float32 (plus `extra`,
    a reduced-precision margin)."""
    return np.abs(np.asarray(sims, np.float64) - compared(threshold)) <= float32_window(dim) + extra


def max_other_above(search: Search, vectors: Vectors, queries: np.ndarray, threshold: float, *,
                    exclude: np.ndarray | None = None, best: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(max similarity float32 [N], too close bool [N]) of each query to the indexed rows, leaving out
    row `exclude[i]` for query i (its own identity; -1 or None: none).

    `search(queries, k)` is an exact top-k ((sims, rows) [N, k], rows -1 past the end) and
    `vectors(rows)` returns indexed rows; `best` is the float32 maximum when the caller already
    searched. Too close = the maximum exceeds `threshold`, decided in float64 for every query whose
    float32 maximum lies within `float32_window` of it (and that maximum `settle_above`d, so the
    returned similarity is on the side of the threshold its decision is)."""
    queries = np.ascontiguousarray(queries, np.float32)
    n = len(queries)
    exclude = np.full(n, -1, np.int64) if exclude is None else np.asarray(exclude, np.int64)
    if n == 0:
        return np.zeros(0, np.float32), np.zeros(0, bool)
    window = float32_window(queries.shape[1])
    best = best_other(*search(queries, 2), exclude) if best is None else np.array(best, np.float32)
    close = np.flatnonzero(near(best, threshold, dim=queries.shape[1]))
    if len(close):
        floor = compared(threshold) - window
        exact = _exact_max_near(search, vectors, queries[close], exclude[close], floor)
        # (no row at or above the floor: the float32 maximum is below the threshold and stays)
        best[close] = settle_above(np.where(np.isfinite(exact), exact, best[close]), threshold)
    return best, best > threshold


def best_other(sims: np.ndarray, rows: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """The largest similarity per query whose row is neither `exclude` nor -1 (-inf when none)."""
    usable = (rows >= 0) & (rows != np.asarray(exclude, np.int64)[:, None])
    return np.where(usable, sims, -np.inf).astype(np.float32).max(axis=1)


def _exact_max_near(search: Search, vectors: Vectors, queries: np.ndarray, exclude: np.ndarray,
                    floor: float) -> np.ndarray:
    """float64 maximum over every row (not excluded) whose float32 similarity is >= `floor`: top-k
    with k doubling until the k-th similarity falls below the floor (or every row was seen)."""
    best = np.full(len(queries), -np.inf)
    todo = np.arange(len(queries))
    k = FIRST_K
    while len(todo):
        sims, rows = search(queries[todo], k)
        usable = (rows >= 0) & (rows != exclude[todo, None]) & (sims.astype(np.float64) >= floor)
        q, col = np.nonzero(usable)
        if len(q):
            scores = exact_sims(queries[todo[q]], vectors(rows[q, col]))
            np.maximum.at(best, todo[q], scores)
        exhausted = rows[:, -1] < 0
        # the k-th row is still inside the window: rows past it may be too
        more = ~exhausted & (sims[:, -1].astype(np.float64) >= floor)
        todo, k = todo[more], 2 * k
    return best


class AnchorIndex:
    """Anchors of accepted identities (row = label) in `IndexShard`s of SHARD_ROWS rows; grows by
    `add` (selection accepts identities block by block). The open (last) shard is searched as a plain
    array until it is full, then sealed into the backend's index."""

    def __init__(self, dim: int, *, backend: str = BACKEND, device: str = "cpu", shard_rows: int | None = None):
        self.dim, self.backend, self.device, self.shard_rows = dim, backend, str(device), shard_rows or SHARD_ROWS
        self.sealed: list[IndexShard] = []
        # The open shard's buffer is allocated whole: pages are only resident as rows arrive.
        self._open = np.empty((self.shard_rows, dim), np.float32)
        self._fill = 0
        self._open_shard: IndexShard | None = None

    def __getstate__(self) -> dict:
        raise TypeError("AnchorIndex lives in one process; ship the anchors (or RemoteAnchors) instead")

    @property
    def count(self) -> int:
        return len(self.sealed) * self.shard_rows + self._fill

    def add(self, anchors: np.ndarray) -> None:
        """Append rows (labels count on from `count`)."""
        anchors = np.asarray(anchors, np.float32)
        while len(anchors):
            take = min(len(anchors), self.shard_rows - self._fill)
            self._open[self._fill : self._fill + take] = anchors[:take]
            self._fill += take
            anchors = anchors[take:]
            if self._fill == self.shard_rows:  # full: sealed into the backend's index
                self.sealed.append(self._shard(self._open, len(self.sealed) * self.shard_rows, self.backend))
                self._open, self._fill = np.empty((self.shard_rows, self.dim), np.float32), 0
        self._open_shard = None

    def _shard(self, rows: np.ndarray, offset: int, backend: str) -> IndexShard:
        labels = np.zeros(len(rows), dtype=object)  # unused: a label is the row itself
        return IndexShard.from_arrays(rows, labels, labels, offset=offset, backend=backend, device=self.device)

    def shards(self) -> list[IndexShard]:
        shards = list(self.sealed)
        if self._fill:
            if self._open_shard is None:  # a view searched in place (on a GPU: copied once per growth)
                self._open_shard = self._shard(self._open[: self._fill], len(self.sealed) * self.shard_rows, "torch")
            shards.append(self._open_shard)
        return shards

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over every anchor (ties to the smallest label), rows -1 past the end."""
        shards = self.shards()
        if not shards:
            n = len(queries)
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        return reduce_topk([s.search(queries, k) for s in shards], k)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        shard_of = rows // self.shard_rows
        for i in np.unique(shard_of):
            where = shard_of == i
            source = self._open[: self._fill] if i == len(self.sealed) else self.sealed[i].vectors()
            out[where] = source[rows[where] - i * self.shard_rows]
        return out


def anchor_shards(anchors: np.ndarray, shard_rows: int | None = None, **options: Any) -> list[IndexShard]:
    """`IndexShard`s over consecutive rows of `anchors` (views; offset = first label)."""
    shard_rows = shard_rows or SHARD_ROWS
    shards = []
    for start in range(0, len(anchors), shard_rows):
        rows = anchors[start : start + shard_rows]
        labels = np.zeros(len(rows), dtype=object)  # unused: a label is the row itself
        shards.append(IndexShard.from_arrays(rows, labels, labels, offset=start, **options))
    return shards


class AnchorShards:
    """A fixed anchor table (an `Identities`' anchors, row = label) in `IndexShard`s of SHARD_ROWS
    rows each: expansion's separability search in one process. The shards are views of the table
    (torch on the CPU searches them in place; faiss or a GPU hold a copy), built on first search."""

    def __init__(self, anchors: np.ndarray, *, backend: str = BACKEND, device: str = "cpu",
                 shard_rows: int | None = None):
        if backend != "faiss" and not anchors.flags.writeable:
            anchors = anchors.copy()  # torch refuses to wrap a read-only array (Ray's object store)
        self.anchors = anchors
        self.shards = anchor_shards(anchors, shard_rows, backend=backend, device=str(device))

    def __getstate__(self) -> dict:
        raise TypeError("AnchorShards live in one process; ship the anchors (or RemoteAnchors) instead")

    @property
    def count(self) -> int:
        return len(self.anchors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return reduce_topk([s.search(queries, k) for s in self.shards], k)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.anchors[np.asarray(rows, np.int64)], np.float32)
