"""How separable and diverse a generated dataset's identities are, under a face embedder.

Every sample is embedded; genuine scores are all same-identity pairs, impostor scores all pairs of
different identities (or a seeded sample of them past `max_impostors`). Per identity: the mean and
minimum similarity of its own pairs, the spread around its centroid (mean 1 - cos to the centroid)
and the similarity of its centroid to the nearest other identity's centroid.
"""

from __future__ import annotations

import numpy as np
import torch

from facegen.engine.dataset.reader import iter_batches
from facegen.engine.evaluation import eer, tar_at_far
from facegen.engine.storage import Storage
from facegen.models.errors import UserError


def embed_dataset(storage: Storage, embedder, mode: str = "vis", batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N], L2-normalised embeddings [N, D]) of every sample of the complete shards."""
    labels, embeddings = [], []
    for batch in iter_batches(storage, batch_size):
        if mode == "nir":
            if batch.nir is None:
                raise UserError(f"{storage.uri}: mode nir, but the dataset has no NIR images")
            images = torch.from_numpy(batch.nir)[:, None]
        else:
            images = torch.from_numpy(batch.vis).permute(0, 3, 1, 2)
        embeddings.append(embedder.embed(images).cpu().numpy())
        labels.append(batch.labels)
    if not labels:
        raise UserError(f"{storage.uri}: no complete shards")
    return np.concatenate(labels), np.concatenate(embeddings).astype(np.float64)


def _blocks(labels: np.ndarray) -> list[np.ndarray]:
    """Sample indices of each identity, identities in label order."""
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, bounds)


def pair_scores_by_label(labels: np.ndarray, embeddings: np.ndarray, max_impostors: int,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(genuine scores, impostor scores): every same-identity pair; every pair of different identities
    when there are at most `max_impostors` of them, else `max_impostors` random such pairs."""
    genuine = [(embeddings[b] @ embeddings[b].T)[np.triu_indices(len(b), k=1)] for b in _blocks(labels)]
    n = len(labels)
    if n * (n - 1) // 2 - sum(len(g) for g in genuine) <= max_impostors:
        i, j = np.triu_indices(n, k=1)
        keep = labels[i] != labels[j]
        i, j = i[keep], j[keep]
    else:  # sample with replacement; pairs of one identity are redrawn
        rng = np.random.default_rng(seed)
        i, j = np.zeros(0, np.int64), np.zeros(0, np.int64)
        while len(i) < max_impostors:
            a, b = rng.integers(0, n, (2, 2 * max_impostors))
            keep = labels[a] != labels[b]
            i, j = np.concatenate([i, a[keep]]), np.concatenate([j, b[keep]])
        i, j = i[:max_impostors], j[:max_impostors]
    impostor = np.einsum("ij,ij->i", embeddings[i], embeddings[j])
    return np.concatenate(genuine) if genuine else np.zeros(0), impostor


def identity_spread(labels: np.ndarray, embeddings: np.ndarray) -> dict[str, np.ndarray]:
    """Per identity (sorted labels): samples, mean/min own-pair similarity, centroid spread, nearest other."""
    blocks = _blocks(labels)
    ids = np.array([labels[b[0]] for b in blocks])
    counts = np.array([len(b) for b in blocks])
    sums = np.stack([embeddings[b].sum(axis=0) for b in blocks])
    centroids = sums / np.linalg.norm(sums, axis=1, keepdims=True).clip(1e-12)
    own = [(embeddings[b] @ embeddings[b].T)[np.triu_indices(len(b), k=1)] for b in blocks]
    mean_own = np.array([o.mean() if len(o) else np.nan for o in own])
    min_own = np.array([o.min() if len(o) else np.nan for o in own])
    spread = np.array([1 - (embeddings[b] @ c).mean() for b, c in zip(blocks, centroids)])
    nearest = np.full(len(ids), np.nan)
    for start in range(0, len(ids) if len(ids) > 1 else 0, 4096):  # identities x identities, in row blocks
        block = centroids[start:start + 4096] @ centroids.T
        block[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf
        nearest[start:start + len(block)] = block.max(axis=1)
    return {"label": ids, "samples": counts, "mean_similarity": mean_own, "min_similarity": min_own,
            "centroid_spread": spread, "nearest_other_centroid": nearest}


def dataset_separability(labels: np.ndarray, embeddings: np.ndarray, max_impostors: int = 1_000_000,
                         seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """(figures, genuine scores, impostor scores)."""
    genuine, impostor = pair_scores_by_label(labels, embeddings, max_impostors, seed)
    if not len(genuine) or not len(impostor):
        raise UserError("separability needs at least two identities and one identity with two samples")
    scores = np.concatenate([genuine, impostor])
    issame = np.arange(len(scores)) < len(genuine)
    spread = identity_spread(labels, embeddings)

    def summary(values: np.ndarray) -> dict:
        values = values[np.isfinite(values)]
        if not len(values):
            return {}
        q = np.percentile(values, [5, 50, 95])
        return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
                "p5": float(q[0]), "median": float(q[1]), "p95": float(q[2]), "max": float(values.max())}

    fnmr = {}
    for fmr in (1e-2, 1e-3):
        t = tar_at_far(scores, issame, fmr)
        fnmr[f"{fmr:g}"] = {"fnmr": 1 - t["tar"], "threshold": t["threshold"], "resolved": t["resolved"]}
    figures = {
        "samples": int(len(labels)), "identities": int(len(spread["label"])),
        "genuine_pairs": int(len(genuine)), "impostor_pairs": int(len(impostor)),
        "genuine": summary(genuine), "impostor": summary(impostor),
        "eer": eer(scores, issame), "fnmr_at_fmr": fnmr,
        "per_identity": {name: summary(np.asarray(values, np.float64))
                         for name, values in spread.items() if name not in ("label",)},
        "worst_identities": _worst(spread),
    }
    return figures, genuine, impostor


def _worst(spread: dict[str, np.ndarray], count: int = 10) -> list[dict]:
    """Identities closest to another identity (the least separable ones), most at risk first."""
    order = np.argsort(-np.nan_to_num(spread["nearest_other_centroid"], nan=-np.inf))[:count]
    return [{name: (int(values[i]) if name in ("label", "samples") else float(values[i]))
             for name, values in spread.items()} for i in order]
