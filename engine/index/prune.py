"""Exact-by-certificate pruning: the scale path for indexes past ~10^7 vectors.

The privacy test only needs the decision `max similarity > tau` (and, for a match, its similarity and
row). Cluster a shard's unit vectors (spherical k-means); keep each cluster's unit centroid c and angular
radius r = max angle(x, c) over its members. Angular distance is a metric on the sphere, so for a
query q at angle t from c every member x satisfies angle(q, x) >= t - r, hence
    q.x <= cos(max(0, t - r))    (the cluster's upper bound).
A cluster whose bound is below tau - margin cannot hold a match and is skipped; the rest are searched
exactly. The decision is therefore the brute-force one; when it is a match, the similarity and row
are exactly brute force's (every skipped vector scores below tau < the match). When it is not a
match, the returned similarity is the best over the searched clusters: <= tau, like the true maximum.

`margin` absorbs float32 rounding of brute-force dot products (~1e-7 for unit vectors); radii and
angles are computed in float64 and padded so that the bound errs on the generous side.
"""

from __future__ import annotations

import faiss
import numpy as np

# Bound slack: far above float32 dot-product rounding of unit vectors, far below any useful tau gap.
MARGIN = 1e-5
# Padding on cosines before arccos, where arccos is ill-conditioned near 1.
COS_PAD = 1e-6
DEFAULT_MAX_CLUSTERS = 4096


def spherical_kmeans(vectors: np.ndarray, num_clusters: int, seed: int = 0, iters: int = 20) -> np.ndarray:
    """Cluster label per row (faiss k-means on the sphere, deterministic for a seed)."""
    num_clusters = max(1, min(num_clusters, len(vectors)))
    if num_clusters == 1:
        return np.zeros(len(vectors), np.int64)
    kmeans = faiss.Kmeans(vectors.shape[1], num_clusters, niter=iters, seed=seed, spherical=True,
                          verbose=False, min_points_per_centroid=1)
    kmeans.train(vectors)
    _, labels = kmeans.index.search(vectors, 1)
    return labels[:, 0].astype(np.int64)


class ClusteredShard:
    """A shard's vectors regrouped by cluster, with centroid + angular radius certificates."""

    def __init__(self, vectors: np.ndarray, labels: np.ndarray, offset: int = 0):
        order = np.argsort(labels, kind="stable")  # members of a cluster stay in row order
        used, counts = np.unique(labels[order], return_counts=True)
        self.vectors = np.ascontiguousarray(vectors[order], dtype=np.float32)
        self.rows = order.astype(np.int64) + offset  # global row of each regrouped vector
        self.bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.count = len(vectors)
        self.centroids, self.radii = self._certificates(len(used))

    @classmethod
    def build(cls, vectors: np.ndarray, *, offset: int = 0, num_clusters: int | None = None,
              seed: int = 0) -> ClusteredShard:
        """Cluster `vectors` (unit rows). Pruning needs small radii, hence many small clusters: the
        default is n/16 clusters (at most DEFAULT_MAX_CLUSTERS; k-means cost grows with n*k)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        k = num_clusters or min(DEFAULT_MAX_CLUSTERS, max(1, len(vectors) // 16))
        return cls(vectors, spherical_kmeans(vectors, k, seed), offset)

    def _certificates(self, num_clusters: int) -> tuple[np.ndarray, np.ndarray]:
        centroids = np.empty((num_clusters, self.vectors.shape[1]), np.float64)
        radii = np.empty(num_clusters, np.float64)
        for j in range(num_clusters):  # one pass per cluster, vectorised inside
            members = self.vectors[self.bounds[j] : self.bounds[j + 1]].astype(np.float64)
            mean = members.sum(axis=0)
            norm = np.linalg.norm(mean)
            centroids[j] = mean / norm if norm > 0 else members[0]
            lowest = float((members @ centroids[j]).min())
            radii[j] = np.arccos(np.clip(lowest - COS_PAD, -1.0, 1.0))
        return centroids, radii

    @property
    def num_clusters(self) -> int:
        return len(self.radii)

    def upper_bounds(self, queries: np.ndarray) -> np.ndarray:
        """[N, K] bound on the best similarity of any member of each cluster."""
        cos_to_centroid = queries.astype(np.float64) @ self.centroids.T
        angle = np.arccos(np.clip(cos_to_centroid + COS_PAD, -1.0, 1.0))
        return np.cos(np.maximum(0.0, angle - self.radii[None, :]))

    def max_similarity_above(self, queries: np.ndarray, tau: float
                             ) -> tuple[np.ndarray, np.ndarray, float]:
        """(sims [N], global rows [N], fraction of vector comparisons done) — see the module doc."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(queries)
        best = np.full(n, -np.inf, np.float32)
        best_rows = np.full(n, -1, np.int64)
        needed = self.upper_bounds(queries) >= tau - MARGIN  # [N, K]
        sizes = np.diff(self.bounds)
        for j in np.flatnonzero(needed.any(axis=0)):  # loop over clusters, batched over queries
            who = np.flatnonzero(needed[:, j])
            sims = queries[who] @ self.vectors[self.bounds[j] : self.bounds[j + 1]].T
            local = sims.argmax(axis=1)
            value = sims[np.arange(len(who)), local]
            row = self.rows[self.bounds[j] + local]
            better = (value > best[who]) | ((value == best[who]) & (row < best_rows[who]))
            best[who[better]], best_rows[who[better]] = value[better], row[better]
        searched = float((needed * sizes[None, :]).sum()) / max(1, n * self.count)
        return best, best_rows, searched
