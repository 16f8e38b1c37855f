"""Querying a privacy index: exact maximum cosine similarity to every enrolled real image.

`IndexShard` is the unit of distribution: a plain object naming one shard on storage (it pickles
as its URI and loads lazily where it lands, e.g. inside an index-shard actor) that answers
`max_similarity` with *global* row ids. `reduce_max` merges shard answers; `PrivacyIndex` is the
whole index in one process (shard by shard, then `reduce_max`).

Queries are float32 [N, dim], L2-normalised by the caller (numpy, or torch on any device). A query
row that is not finite gets similarity NaN and row -1: callers must treat NaN as a failed privacy
test (NaN compares False with everything, so `sim <= tau` rejects it, `sim > tau` does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from facegen.engine.index.backends import (
    FaissBackend,
    Fp16Backend,
    NumpyBackend,
    TorchBackend,
    merge_topk,
    resolve_backend,
)
from facegen.engine.index.protocol import checked_rows
from facegen.engine.index.store import (
    NORM_TOLERANCE,
    Float32Rows,
    IndexInfo,
    ShardInfo,
    flat_vectors,
    read_info,
    read_shard_labels,
    read_shard_vectors,
)
from facegen.engine.storage import Storage
from facegen.models.errors import UserError


def prepare_queries(queries: Any, dim: int, backend: str, device: str) -> tuple[Any, np.ndarray]:
    """Queries in the backend's type (numpy, or torch on the device) with non-finite rows zeroed,
    plus the numpy mask of finite rows. Checks run where the data is (small torch CPU ops are slow)."""
    if tuple(queries.shape[1:]) != (dim,) or len(queries.shape) != 2:
        raise UserError(f"privacy query: queries must be [N, {dim}], got {tuple(queries.shape)}")
    if backend == "torch":
        q = queries if isinstance(queries, torch.Tensor) else torch.from_numpy(np.asarray(queries))
        q = q.to(torch.device(device), torch.float32).contiguous()
        finite = torch.isfinite(q).all(dim=1)
        bad_norm = (torch.linalg.vector_norm(q, dim=1) - 1).abs() > NORM_TOLERANCE
        q = torch.where(finite[:, None], q, torch.zeros((), dtype=q.dtype, device=q.device))
        finite, bad_norm = finite.cpu().numpy(), bad_norm.cpu().numpy()
    else:
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().cpu().numpy()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        finite = np.isfinite(q).all(axis=1)
        bad_norm = np.abs(np.linalg.norm(q, axis=1) - 1) > NORM_TOLERANCE
        if not finite.all():
            q = np.where(finite[:, None], q, np.float32(0))
    if bad_norm[finite].any():
        raise ValueError("privacy query: queries must be L2-normalised (unit norm rows)")
    return q, finite


def reduce_max(results: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (sims [N], global rows [N]): the max similarity, ties to the smallest row.

    Pure and order-independent, so a cluster can reduce shard answers in any order or tree.
    A query that is NaN in any part stays NaN with row -1.
    """
    if not results:
        raise ValueError("reduce_max: no shard results to reduce")
    sims = np.stack([np.asarray(s, np.float32) for s, _ in results])
    rows = np.stack([np.asarray(r, np.int64) for _, r in results])
    nan = np.isnan(sims).any(axis=0)
    best = np.where(nan, -np.inf, np.nanmax(np.where(np.isnan(sims), -np.inf, sims), axis=0))
    candidates = np.where(sims == best[None], rows, np.iinfo(np.int64).max)
    best_rows = candidates.min(axis=0)
    best = best.astype(np.float32)
    best[nan], best_rows[nan] = np.nan, -1
    return best, best_rows


def reduce_topk(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists ([N, k] each) into the global top k, ties to the smallest row."""
    sims = np.concatenate([s for s, _ in results], axis=1)
    rows = np.concatenate([r for _, r in results], axis=1)
    return merge_topk(sims, rows, k)


class IndexShard:
    """One shard: exact search over its rows, answering in global row ids.

    Picklable by reference: a storage-backed shard pickles as (storage URI, shard entry) and loads
    its vectors lazily on first use in the receiving process.
    """

    def __init__(self, storage: Storage | None, shard: ShardInfo, dim: int, *, backend: str = "auto",
                 device: str = "cpu", row_dtype: str = "float32"):
        self.storage, self.shard, self.dim, self.row_dtype = storage, shard, dim, row_dtype
        self.device = str(device)
        self.backend = resolve_backend(backend, self.device)
        self._vectors: np.ndarray | None = None
        self._labels: tuple[np.ndarray, np.ndarray] | None = None
        self._engine = None
        self._clustered = None

    @classmethod
    def from_arrays(cls, vectors: np.ndarray, identities: Sequence[str], files: Sequence[str], *,
                    offset: int = 0, name: str = "memory", backend: str = "auto",
                    device: str = "cpu") -> IndexShard:
        """An in-memory shard (benchmarks, tests, embedded replicas); rows must be unit-norm."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        shard = cls(None, ShardInfo(name, offset, vectors.shape[0]), vectors.shape[1],
                    backend=backend, device=device)
        shard._vectors = vectors
        shard._labels = (np.asarray(identities, dtype=object), np.asarray(files, dtype=object))
        return shard

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_engine"] = state["_clustered"] = None
        if self.storage is not None:  # reload from storage where it lands
            state["_vectors"] = state["_labels"] = None
        return state

    @property
    def offset(self) -> int:
        return self.shard.offset

    @property
    def count(self) -> int:
        return self.shard.count

    def vectors(self) -> np.ndarray:
        """The shard's unit vectors, float32 [count, dim]. Cached unless the faiss backend holds them."""
        if self._vectors is not None:
            return self._vectors
        engine = self._engine
        if isinstance(engine, FaissBackend) and not engine.on_gpu:
            return flat_vectors(engine.index)
        if self.row_dtype == "float16":  # the exact float32 rows, not the float16 ones
            vectors = Float32Rows(self.storage, self.shard, self.dim).all()
        else:
            vectors = flat_vectors(read_shard_vectors(self.storage, self.shard, self.dim))
        if self.backend != "faiss":  # numpy/torch search these very arrays: keep them
            self._vectors = vectors
        return vectors

    def labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(identities, files) of the shard's rows, object arrays of str."""
        if self._labels is None:
            self._labels = read_shard_labels(self.storage, self.shard)
        return self._labels

    def load(self) -> IndexShard:
        """Load the shard and build its search engine now (actors call this at start-up)."""
        if self._engine is None:
            if self.backend == "faiss" and self.row_dtype == "float16" and self.storage is not None:
                if self.device.startswith("cuda"):
                    raise UserError("float16 index rows are searched by faiss on the CPU; on a GPU use "
                                    "backend 'torch' (it searches the exact float32 rows)")
                rows = Float32Rows(self.storage, self.shard, self.dim)
                self._engine = Fp16Backend(read_shard_vectors(self.storage, self.shard, self.dim), rows)
            elif self.backend == "faiss":
                self._engine = FaissBackend(self._faiss_index(), self.device)
            elif self.backend == "torch":
                self._engine = TorchBackend(self.vectors(), self.device)
            else:
                self._engine = NumpyBackend(self.vectors())
        return self

    def _faiss_index(self):
        if self._vectors is None:
            return read_shard_vectors(self.storage, self.shard, self.dim)
        import faiss

        index = faiss.IndexFlatIP(self.dim)
        index.add(self._vectors)
        return index

    def max_similarity(self, queries: Any) -> tuple[np.ndarray, np.ndarray]:
        """(max cosine float32 [N], global row int64 [N]) over this shard's rows."""
        q, finite = prepare_queries(queries, self.dim, self.backend, self.device)
        sims, rows = self.load()._engine.top1(q)
        sims, rows = sims.astype(np.float32), rows.astype(np.int64) + self.offset
        sims[~finite], rows[~finite] = np.nan, -1
        return sims, rows

    def max_similarity_above(self, queries: Any, tau: float, *, num_clusters: int | None = None
                             ) -> tuple[np.ndarray, np.ndarray, float]:
        """Exact-by-certificate decision `max similarity > tau` (engine/index/prune.py): returns
        (sims, global rows, fraction of this shard's comparisons done). Sims and rows equal
        `max_similarity`'s wherever sims > tau. Clusters are built on first use (CPU, k-means)."""
        if self._clustered is None:
            from facegen.engine.index.prune import ClusteredShard

            self._clustered = ClusteredShard.build(self.vectors(), offset=self.offset, num_clusters=num_clusters)
        q, finite = prepare_queries(queries, self.dim, "numpy", "cpu")
        sims, rows, searched = self._clustered.max_similarity_above(q, tau)
        sims[~finite], rows[~finite] = np.nan, -1
        return sims, rows, searched

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (sims [N, k], global rows [N, k]); missing columns are (-inf, -1).
        Among exact ties beyond the first place the order is by row id only within this shard's merge."""
        q, finite = prepare_queries(queries, self.dim, self.backend, self.device)
        sims, rows = self.load()._engine.topk(q, k)
        rows = np.where(rows >= 0, rows + self.offset, -1)
        sims, rows = sims.astype(np.float32), rows.astype(np.int64)
        sims[~finite], rows[~finite] = np.nan, -1
        return sims, rows


class PrivacyIndex:
    """A whole privacy index in this process (an `Index`): every shard searched here, answers max-reduced."""

    def __init__(self, storage: Storage, info: IndexInfo, *, backend: str = "auto", device: str = "cpu"):
        self.storage, self.info = storage, info
        self.backend = resolve_backend(backend, str(device))
        self.device = str(device)
        self._shards = [IndexShard(storage, s, info.dim, backend=self.backend, device=self.device,
                                   row_dtype=info.row_dtype) for s in info.shards]
        self._offsets = np.asarray([s.offset for s in info.shards], np.int64)
        self._labels: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def open(cls, uri_or_storage: str | Storage, storage_options: dict | None = None,
             backend: str = "auto", device: str = "cpu") -> PrivacyIndex:
        resolve_backend(backend, str(device))  # a bad backend fails before any storage access
        storage = (uri_or_storage if isinstance(uri_or_storage, Storage)
                   else Storage(str(uri_or_storage), storage_options))
        return cls(storage, read_info(storage), backend=backend, device=device)

    def __repr__(self) -> str:
        return (f"PrivacyIndex({self.storage.uri!r}, count={self.count}, dim={self.dim}, "
                f"backend={self.backend})")

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def count(self) -> int:
        return self.info.count

    @property
    def fingerprint(self) -> str | None:
        return self.info.embedder_fingerprint

    @property
    def num_shards(self) -> int:
        return self.info.num_shards

    def shard(self, i: int) -> IndexShard:
        return self._shards[i]

    def max_similarity(self, queries: Any) -> tuple[np.ndarray, np.ndarray]:
        """Exact (max cosine float32 [N], global row int64 [N]) over every enrolled vector."""
        return reduce_max([shard.max_similarity(queries) for shard in self._shards])

    def max_similarity_above(self, queries: Any, tau: float, *, num_clusters: int | None = None
                             ) -> tuple[np.ndarray, np.ndarray, float]:
        """The privacy decision by certificate pruning: (sims, rows, fraction of comparisons done).
        `sims > tau` equals brute force's decision, and where it holds sims/rows equal `max_similarity`."""
        parts = [s.max_similarity_above(queries, tau, num_clusters=num_clusters) for s in self._shards]
        sims, rows = reduce_max([(p[0], p[1]) for p in parts])
        searched = sum(p[2] * s.count for p, s in zip(parts, self._shards)) / self.count
        return sims, rows, searched

    def search(self, queries: Any, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k (sims [N, k], rows [N, k]), best first."""
        if not 1 <= k <= self.count:
            raise UserError(f"privacy query: top k={k} must be between 1 and the index size {self.count}")
        return reduce_topk([shard.search(queries, k) for shard in self._shards], k)

    # -- labels -------------------------------------------------------------------------------
    def labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(identities, files) of every row, object arrays of str in global row order."""
        if self._labels is None:
            parts = [shard.labels() for shard in self._shards]
            self._labels = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return self._labels

    def _lookup(self, rows: Any, column: int) -> np.ndarray:
        rows = checked_rows(rows, self.count)
        values = self.labels()[column]
        out = np.full(rows.shape, "", dtype=object)  # row -1 (non-finite query) -> ""
        out[rows >= 0] = values[rows[rows >= 0]]
        return out

    def identity_of(self, rows: Any) -> np.ndarray:
        return self._lookup(rows, 0)

    def file_of(self, rows: Any) -> np.ndarray:
        return self._lookup(rows, 1)

    def embeddings(self) -> np.ndarray:
        """Every enrolled unit vector, float32 [count, dim] (calibration; needs count*dim*4 bytes)."""
        return np.concatenate([shard.vectors() for shard in self._shards])

    # -- compatibility ---------------------------------------------------------------------------
    def check_compatible(self, embedder: Any) -> None:
        """Refuse an embedder whose embeddings cannot be compared with this index's, naming what differs."""
        from facegen.engine.index.compat import check_embedder

        check_embedder(self.info, embedder, self.storage.url("index.json"))
