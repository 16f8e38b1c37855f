"""A privacy index held by index-shard actors: fan-out, exact max-reduce.

When the enrolled set is too large to replicate into every generator actor, its shards live in
`IndexShardActor`s (one or more `engine.index.IndexShard`s each, loaded once where the actor lands)
and `RemoteIndex` implements the engine's `Index` protocol by asking every actor and merging with
the engine's own `reduce_max`. Since `reduce_max` is exact and order-independent (max similarity,
ties to the smallest row, NaN propagates), the answer equals a single in-process index's bit for bit.

Index-shard actors are stateless functions of storage, so Ray restarts them and retries their
queries on its own (`max_restarts`, `max_task_retries`); generator actors are retried by the executor.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

from facegen.engine.index.anchors import anchor_shards
from facegen.engine.index.protocol import checked_rows
from facegen.engine.index.search import IndexShard, PrivacyIndex, prepare_queries, reduce_max, reduce_topk


@ray.remote
class IndexShardActor:
    """Holds consecutive shards of a privacy index (rows [start, stop)) and answers queries on them."""

    def __init__(self, shards: Sequence[IndexShard]):
        self.shards = [shard.load() for shard in shards]  # storage-backed shards load here, lazily pickled
        self.start = self.shards[0].offset
        self.stop = self.shards[-1].offset + self.shards[-1].count

    def ready(self) -> dict:
        context = ray.get_runtime_context()
        return {"rows": [self.start, self.stop], "node_id": context.get_node_id(), "pid": os.getpid()}

    def max_similarity(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return reduce_max([shard.max_similarity(queries) for shard in self.shards])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over this actor's rows, global row ids (the anchors' separability search)."""
        return reduce_topk([shard.search(queries, k) for shard in self.shards], k)

    def labels_of(self, rows: np.ndarray, column: int) -> np.ndarray:
        """Identity (column 0) or file (column 1) of global rows inside this actor's range."""
        out = np.empty(len(rows), dtype=object)
        for shard in self.shards:
            mine = (rows >= shard.offset) & (rows < shard.offset + shard.count)
            if mine.any():
                out[mine] = shard.labels()[column][rows[mine] - shard.offset]
        return out


def group_shards(counts: Sequence[int], num_groups: int) -> list[range]:
    """Split shards (in order) into at most `num_groups` consecutive groups of similar row counts."""
    num_groups = max(1, min(num_groups, len(counts)))
    bounds = np.cumsum(counts)
    targets = bounds[-1] * np.arange(1, num_groups) / num_groups
    cuts = sorted(set(int(np.searchsorted(bounds, t, side="left")) + 1 for t in targets))
    edges = [0] + [c for c in cuts if 0 < c < len(counts)] + [len(counts)]
    return [range(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def start_shard_actors(shards: Sequence[IndexShard], dim: int, num_actors: int, *, max_restarts: int = 3,
                       options: dict | None = None) -> tuple[list[Any], list[int]]:
    """`IndexShardActor`s holding consecutive groups of `shards` (at most `num_actors`), started and
    ready; returns them with the first global row of each."""
    groups = group_shards([shard.count for shard in shards], num_actors)
    actors = []
    for group in groups:
        mine = [shards[i] for i in group]
        vector_bytes = sum(s.count for s in mine) * dim * 4
        actor = IndexShardActor.options(
            num_cpus=0, memory=max(vector_bytes, 1), scheduling_strategy="SPREAD",
            max_restarts=max_restarts, max_task_retries=max_restarts, **(options or {}),
        ).remote(mine)
        actors.append(actor)
    ray.get([a.ready.remote() for a in actors])
    return actors, [shards[g.start].offset for g in groups]


def checked_queries(queries: Any, dim: int) -> np.ndarray:
    """Float32 numpy queries, checked here as an in-process index would check them: a bad batch fails
    once, in the caller, instead of once in every actor (whose other answers would be left unread)."""
    if isinstance(queries, torch.Tensor):
        queries = queries.detach().cpu().numpy()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    prepare_queries(queries, dim, "numpy", "cpu")
    return queries


class RemoteAnchors:
    """Accepted identities' anchors held by index-shard actors: the separability search of expansion
    (`search(queries, k)`, exact top-k in global rows = identity labels) when the anchors are too many to
    replicate into every generator actor (engine/index/anchors.py decides with it). Picklable: ships to
    generator actors with the identities table (`Identities.anchor_search`)."""

    remote = True  # `Identities` keeps it when pickled (a local index is rebuilt where it lands)

    def __init__(self, actors: Sequence[Any], count: int, dim: int):
        self.actors, self.count, self.dim = list(actors), count, dim

    @classmethod
    def start(cls, anchors: np.ndarray, num_actors: int, *, shard_rows: int | None = None, max_restarts: int = 3,
              options: dict | None = None) -> RemoteAnchors:
        """In-memory shards of `anchors` (pickled with their rows) placed into at most `num_actors` actors."""
        shards = anchor_shards(anchors, shard_rows)  # faiss there: it copies the rows Ray hands over read-only
        actors, _ = start_shard_actors(shards, anchors.shape[1], num_actors, max_restarts=max_restarts,
                                       options=options)
        return cls(actors, len(anchors), anchors.shape[1])

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over every anchor: every actor answers, `reduce_topk` merges (ties to the smallest row)."""
        ref = ray.put(checked_queries(queries, self.dim))
        return reduce_topk(ray.get([a.search.remote(ref, k) for a in self.actors]), k)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


class RemoteIndex:
    """The engine's `Index` over index-shard actors (picklable: ships to generator actors).

    Metadata (dim, count, embedder fingerprint, compatibility checks) comes from the index's own
    `index.json` via a lazily loaded `PrivacyIndex`; no vector is loaded where this object lives.
    """

    def __init__(self, local: PrivacyIndex, actors: Sequence[Any], row_starts: Sequence[int]):
        self.local = local
        self.actors = list(actors)
        self.row_starts = np.asarray(row_starts, np.int64)

    @classmethod
    def start(cls, index: PrivacyIndex, num_actors: int, *, max_restarts: int = 3,
              options: dict | None = None) -> RemoteIndex:
        """Place the index's shards into at most `num_actors` actors (consecutive groups) and wait for them."""
        shards = [index.shard(i) for i in range(index.num_shards)]
        actors, row_starts = start_shard_actors(shards, index.dim, num_actors, max_restarts=max_restarts,
                                                options=options)
        return cls(index, actors, row_starts)

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    # -- the Index protocol ------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.local.dim

    @property
    def count(self) -> int:
        return self.local.count

    @property
    def fingerprint(self) -> str | None:
        return self.local.fingerprint

    @property
    def num_actors(self) -> int:
        return len(self.actors)

    def check_compatible(self, embedder: Any) -> None:
        self.local.check_compatible(embedder)

    def max_similarity(self, queries: Any) -> tuple[np.ndarray, np.ndarray]:
        """Exact (max cosine float32 [N], global row int64 [N]): every actor answers, `reduce_max` merges."""
        ref = ray.put(checked_queries(queries, self.dim))
        return reduce_max(ray.get([a.max_similarity.remote(ref) for a in self.actors]))

    def identity_of(self, rows: Any) -> np.ndarray:
        return self._lookup(rows, 0)

    def file_of(self, rows: Any) -> np.ndarray:
        return self._lookup(rows, 1)

    def _lookup(self, rows: Any, column: int) -> np.ndarray:
        rows = checked_rows(rows, self.count)
        out = np.full(rows.shape, "", dtype=object)  # row -1 (non-finite query) -> ""
        flat, valid = rows.reshape(-1), rows.reshape(-1) >= 0
        owner = np.searchsorted(self.row_starts, flat, side="right") - 1
        asked = {i: np.flatnonzero(valid & (owner == i)) for i in np.unique(owner[valid])}
        answers = ray.get([self.actors[i].labels_of.remote(flat[where], column) for i, where in asked.items()])
        values = out.reshape(-1)
        for where, answer in zip(asked.values(), answers):
            values[where] = answer
        return values.reshape(rows.shape)
