"""Exact nearest-neighbour search over one in-memory matrix of unit vectors, four ways.

Each backend answers `top1(queries) -> (sims [N], local rows [N])` and `topk(queries, k)` for one
shard. All are exact inner products in float32; they differ only in summation order (results agree
to ~1e-7). Ties on the maximum go to the smallest row (numpy/torch argmax and faiss's top-1 heap all
keep the first maximum; `reduce_max` keeps that rule across shards).

- `numpy`  brute force in blocks; the reference every other backend is tested against.
- `faiss`  IndexFlatIP.search (CPU BLAS), or the same index copied to a GPU when faiss has GPU support.
- `torch`  blocked matmul + max on any torch device (the fast path on a GPU without faiss-gpu).
"""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import torch

from facegen.models.errors import UserError

BACKENDS = ("auto", "faiss", "torch", "numpy")
# Largest similarity block (queries x rows) materialised at once: 2^25 float32 = 128 MiB.
BLOCK_ELEMENTS = 1 << 25


def faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_backend(backend: str, device: str) -> str:
    """'auto' -> faiss on CPU; on a GPU faiss-gpu when installed, else torch."""
    if backend not in BACKENDS:
        raise UserError(f"index backend: {backend!r} is not one of {BACKENDS}")
    on_gpu = str(device).startswith("cuda")
    if backend == "auto":
        return "faiss" if not on_gpu or faiss_has_gpu() else "torch"
    if backend == "faiss" and on_gpu and not faiss_has_gpu():
        raise UserError(f"index backend 'faiss' on {device}: this faiss has no GPU support "
                        "(pip install facegen[gpu]) — use backend 'torch' on GPUs")
    if backend == "numpy" and on_gpu:
        raise UserError("index backend 'numpy' runs on the CPU only; use device 'cpu'")
    return backend


def _pad_topk(sims: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad to k columns with (-inf, -1) when the shard has fewer than k rows."""
    missing = k - sims.shape[1]
    if missing <= 0:
        return sims, rows
    n = sims.shape[0]
    return (np.concatenate([sims, np.full((n, missing), -np.inf, np.float32)], axis=1),
            np.concatenate([rows, np.full((n, missing), -1, np.int64)], axis=1))


def merge_topk(sims: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k columns per query of [N, C] candidates, by (similarity desc, row asc); deterministic."""
    order = np.lexsort((rows, -sims), axis=-1)[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(rows, order, 1)


def _smallest_rows_on_ties(sims: np.ndarray, val: np.ndarray, idx: np.ndarray,
                           only: np.ndarray | None = None) -> None:
    """A block's top-k picks arbitrarily among rows equal to its k-th similarity, so two shardings could
    name different rows; for the queries with such a tie, choose by (similarity desc, row asc) — the
    order `merge_topk` keeps across blocks. `sims` holds the rows of the queries `only` selects (all
    when None); `val` and `idx` are corrected in place."""
    kk = idx.shape[1]
    if only is None:
        only = (sims >= val[:, -1:]).sum(1) > kk
        sims = sims[only]
    queries = np.flatnonzero(only)
    if not len(queries):
        return
    rows = np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
    order = np.lexsort((rows, -sims), axis=-1)[:, :kk]
    idx[queries] = order
    val[queries] = np.take_along_axis(sims, order, 1)


class NumpyBackend:
    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def _blocks(self, queries: np.ndarray):
        step = max(1, BLOCK_ELEMENTS // max(1, queries.shape[0]))
        for start in range(0, self.vectors.shape[0], step):
            yield start, queries @ self.vectors[start : start + step].T

    def top1(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        best = np.full(queries.shape[0], -np.inf, np.float32)
        rows = np.zeros(queries.shape[0], np.int64)
        for start, sims in self._blocks(queries):
            idx = sims.argmax(axis=1)
            val = sims[np.arange(len(idx)), idx]
            better = val > best  # strict: an equal later block keeps the earlier (smaller) row
            best[better], rows[better] = val[better], idx[better] + start
        return best, rows

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kept_sims = np.empty((queries.shape[0], 0), np.float32)
        kept_rows = np.empty((queries.shape[0], 0), np.int64)
        for start, sims in self._blocks(queries):
            kk = min(k, sims.shape[1])
            idx = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
            val = np.take_along_axis(sims, idx, 1)
            _smallest_rows_on_ties(sims, val, idx)
            cand_sims = np.concatenate([kept_sims, val], axis=1)
            cand_rows = np.concatenate([kept_rows, idx + start], axis=1)
            kept_sims, kept_rows = merge_topk(cand_sims, cand_rows, k)
        return _pad_topk(kept_sims, kept_rows, k)


class FaissBackend:
    def __init__(self, index: faiss.IndexFlat, device: str = "cpu"):
        self.index = index
        self.on_gpu = str(device).startswith("cuda")
        if self.on_gpu:
            gpu = torch.device(device).index or 0
            self._resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._resources, gpu, index)

    def top1(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # k=1 everywhere: GPU flat indexes have no range search, and k=1 is the max anyway.
        sims, rows = self.index.search(queries, 1)
        return sims[:, 0], rows[:, 0].astype(np.int64)

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = min(k, self.index.ntotal)
        sims, rows = self.index.search(queries, kk)
        return _pad_topk(sims, rows.astype(np.int64), k)


class TorchBackend:
    def __init__(self, vectors: np.ndarray, device: str = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            warnings.warn("torch.backends.cuda.matmul.allow_tf32 is on: privacy-index similarities "
                          "lose exactness (TF32 keeps 10 mantissa bits); turn it off", stacklevel=2)
        self.vectors = torch.from_numpy(vectors).to(self.device)

    def _blocks(self, queries: torch.Tensor):
        step = max(1, BLOCK_ELEMENTS // max(1, queries.shape[0]))
        for start in range(0, self.vectors.shape[0], step):
            yield start, queries @ self.vectors[start : start + step].T

    def top1(self, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            best = torch.full((queries.shape[0],), -torch.inf, device=self.device)
            rows = torch.zeros(queries.shape[0], dtype=torch.int64, device=self.device)
            for start, sims in self._blocks(queries):
                val, idx = sims.max(dim=1)  # first maximal index on ties
                better = val > best
                best = torch.where(better, val, best)
                rows = torch.where(better, idx + start, rows)
            return best.cpu().numpy(), rows.cpu().numpy()

    def topk(self, queries: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = queries.shape[0]
        kept_sims, kept_rows = np.empty((n, 0), np.float32), np.empty((n, 0), np.int64)
        with torch.inference_mode():
            for start, sims in self._blocks(queries):
                kk = min(k, sims.shape[1])
                val, idx = sims.topk(kk, dim=1)
                tied = (sims >= val[:, -1:]).sum(1) > kk  # decided on the device, copied once with the rest
                val, idx, tied_rows = val.cpu().numpy(), idx.cpu().numpy(), tied.cpu().numpy()
                if tied_rows.any():  # rare (equal rows): only those queries' similarities come to the host
                    _smallest_rows_on_ties(sims[tied].cpu().numpy(), val, idx, only=tied_rows)
                cand_sims = np.concatenate([kept_sims, val], axis=1)
                cand_rows = np.concatenate([kept_rows, idx + start], axis=1)
                kept_sims, kept_rows = merge_topk(cand_sims, cand_rows, k)
        return _pad_topk(kept_sims, kept_rows, k)


# A unit row stored in float16 moves each component by at most 2^-11 of itself (round to nearest), so
# the row moves by at most 2^-11 in L2 norm and its inner product with a unit query by at most 2^-11;
# float32 accumulation over 512 dimensions adds < 2^-16. Any row whose float16 similarity is more
# than 2 * FP16_MARGIN below the best float16 similarity cannot be the exact maximum.
FP16_MARGIN = 2.0**-11 + 2.0**-14
FP16_FIRST_K = 8  # float16 neighbours fetched first; a range search covers the rare longer windows


class Fp16Backend:
    """Scan float16 rows (faiss scalar quantiser, half the memory of float32), then re-score in
    float32 every row that can still be among the exact top k: the answers equal a float32 index's
    (up to float32 summation order), so no decision near a threshold changes.

    `rows(ids)` returns the exact float32 rows (store.Float32Rows: memory-mapped or ranged reads).
    """

    def __init__(self, index: faiss.Index, rows):
        self.index, self.rows, self.on_gpu = index, rows, False

    def _candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(query ids, row ids) of every row within the re-scoring window of each query's k-th best."""
        total = self.index.ntotal
        first = min(total, max(k, FP16_FIRST_K))
        sims, rows = self.index.search(queries, first)
        floor = sims[:, min(k, first) - 1] - 2 * FP16_MARGIN
        nonzero = np.abs(queries).max(axis=1) > 0  # zeroed (non-finite) queries are answered as NaN later
        pairs_q, pairs_r = [], []
        inside = (sims >= floor[:, None]) & (rows >= 0) & nonzero[:, None]
        q_ids, cols = np.nonzero(inside)
        pairs_q.append(q_ids)
        pairs_r.append(rows[q_ids, cols])
        longer = np.flatnonzero(nonzero & (first < total) & (sims[:, -1] >= floor))
        if len(longer):
            lims, dist, found = self.index.range_search(queries[longer], float(floor[longer].min()))
            owner = np.repeat(longer, np.diff(lims.astype(np.int64)))
            keep = dist >= floor[owner]
            pairs_q.append(owner[keep])
            pairs_r.append(found[keep].astype(np.int64))
        pairs = np.unique(np.stack([np.concatenate(pairs_q), np.concatenate(pairs_r)], axis=1), axis=0)
        return pairs[:, 0], pairs[:, 1]

    def topk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(queries)
        q_ids, r_ids = self._candidates(queries, k)
        unique, position = np.unique(r_ids, return_inverse=True)
        exact_rows = self.rows(unique)
        exact = np.einsum("ij,ij->i", queries[q_ids], exact_rows[position])
        # Best k per query by (similarity desc, row asc), the other backends' tie rule.
        order = np.lexsort((r_ids, -exact, q_ids))
        q_sorted = q_ids[order]
        starts = np.searchsorted(q_sorted, np.arange(n))
        rank = np.arange(len(order)) - starts[q_sorted]
        take = rank < k
        sims = np.full((n, k), -np.inf, np.float32)
        rows = np.full((n, k), -1, np.int64)
        sims[q_sorted[take], rank[take]] = exact[order][take]
        rows[q_sorted[take], rank[take]] = r_ids[order][take]
        zero = ~(np.abs(queries).max(axis=1) > 0)
        if zero.any():  # no meaningful answer; the caller turns these into NaN / -1
            sims[zero], rows[zero] = 0.0, 0
        return sims, rows

    def top1(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sims, rows = self.topk(queries, 1)
        return sims[:, 0], rows[:, 0]
