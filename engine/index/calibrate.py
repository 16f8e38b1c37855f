"""Decision thresholds from the enrolled set itself: genuine (same identity) and impostor (different
identity) cosine scores, and the threshold at a target false-match rate.

A pair *matches* when its score is strictly above the threshold t. The threshold at FMR f is the
smallest t with (impostor scores > t) / (impostor pairs) <= f: the (n - k)-th smallest impostor score
for k = floor(f * n). It can only be resolved down to f ~ 1/n, which is why the pair count is recorded.

Pairs: every genuine pair and every impostor pair while they fit in the budgets; beyond, a
deterministic uniform sample (seeded, with replacement). Scores are computed in batches (blocked
matmul for all impostor pairs, gathered row dot products for pair lists): no Python loop over pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from facegen.engine.index.store import read_info, write_info
from facegen.models.errors import UserError

# ArcBiFaceGAN's hard-coded cosine thresholds for its ArcFace model (generate_recognition_data.py),
# from a typical same-identity cosine of 0.776 ± 0.077: privacy 0.776 - 2*0.077
# (a sample must stay at or below it against every real identity), diversity 0.776 + 0.077.
DEFAULT_COMPAT_THRESHOLDS = {"privacy": 0.622, "diversity": 0.853}
DEFAULT_FMRS = (1e-3, 1e-4)
# Pairs scored per batch of gathered dot products (both gathered rows: 2 x 8192 x dim x 4 bytes, 32 MiB at
# 512-d; 2^20 pairs held 4 GiB), and similarity-block size for the exact impostor pass.
PAIR_BATCH = 1 << 13
BLOCK_ELEMENTS = 1 << 24


@dataclass
class CalibrationScores:
    genuine: np.ndarray  # float32 scores of same-identity pairs
    impostor: np.ndarray  # float32 scores of different-identity pairs
    genuine_exhaustive: bool  # True: every genuine pair; False: a sample
    impostor_exhaustive: bool


def _groups(identities: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(identity code per row, rows sorted by identity, group start in that order, group size)."""
    _, codes = np.unique(np.asarray(identities, dtype=str), return_inverse=True)
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return codes, order, starts, sizes


def genuine_pairs(identities: Sequence[str], max_pairs: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Row pairs (a, b), a != b, of the same identity: all of them, or `max_pairs` sampled uniformly."""
    _, order, starts, sizes = _groups(identities)
    per_group = sizes * (sizes - 1) // 2
    ends = np.cumsum(per_group)
    total = int(ends[-1]) if len(ends) else 0
    exhaustive = total <= max_pairs
    pair_ids = np.arange(total, dtype=np.int64) if exhaustive else np.sort(rng.integers(0, total, max_pairs))
    group = np.searchsorted(ends, pair_ids, side="right")
    a, b = triangular_pair(pair_ids - (ends[group] - per_group[group]))  # pair index inside its group
    return order[starts[group] + a], order[starts[group] + b], exhaustive


def triangular_pair(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair number q -> (a, b), a < b, enumerating pairs by b then a: q = b(b-1)/2 + a."""
    q = np.asarray(q, np.int64)
    b = np.floor((1 + np.sqrt(1 + 8 * q.astype(np.float64))) / 2).astype(np.int64)
    b -= b * (b - 1) // 2 > q  # float sqrt may be off by one either way for large q
    b += (b + 1) * b // 2 <= q
    return q - b * (b - 1) // 2, b


def pair_scores(vectors: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine scores of row pairs (unit vectors), in batches."""
    out = np.empty(len(a), np.float32)
    for start in range(0, len(a), PAIR_BATCH):
        end = start + PAIR_BATCH
        out[start:end] = np.einsum("ij,ij->i", vectors[a[start:end]], vectors[b[start:end]])
    return out


def all_impostor_scores(vectors: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Every different-identity pair's score (upper triangle of the Gram matrix), blocked matmul."""
    count = len(vectors)
    step = max(1, BLOCK_ELEMENTS // count)
    parts = []
    for start in range(0, count, step):
        end = min(count, start + step)
        sims = vectors[start:end] @ vectors[start:].T  # columns from `start`: the upper triangle
        cols = np.arange(start, count)
        upper = cols[None, :] > np.arange(start, end)[:, None]
        keep = upper & (codes[start:end, None] != codes[None, start:])
        parts.append(sims[keep])
    return np.concatenate(parts).astype(np.float32)


def sampled_impostor_pairs(codes: np.ndarray, num_pairs: int, rng: np.random.Generator
                           ) -> tuple[np.ndarray, np.ndarray]:
    """`num_pairs` uniform random different-identity row pairs (with replacement), seeded."""
    a_parts, b_parts, have = [], [], 0
    for _ in range(1000):
        a = rng.integers(0, len(codes), 2 * (num_pairs - have) + 16)
        b = rng.integers(0, len(codes), len(a))
        keep = codes[a] != codes[b]
        a_parts.append(a[keep])
        b_parts.append(b[keep])
        have += int(keep.sum())
        if have >= num_pairs:
            return np.concatenate(a_parts)[:num_pairs], np.concatenate(b_parts)[:num_pairs]
    raise UserError("calibrate: almost every pair shares an identity; cannot sample impostor pairs")


def calibration_scores(vectors: np.ndarray, identities: Sequence[str], *, max_genuine_pairs: int = 5_000_000,
                       max_impostor_pairs: int = 20_000_000, seed: int = 0) -> CalibrationScores:
    """Genuine and impostor score sets of unit `vectors` labelled by `identities`."""
    rng = np.random.default_rng(seed)
    codes, _, _, sizes = _groups(identities)
    if len(sizes) < 2:
        raise UserError("calibrate: the index holds a single identity; impostor scores need at least two")
    a, b, genuine_exhaustive = genuine_pairs(identities, max_genuine_pairs, rng)
    genuine = pair_scores(vectors, a, b)
    count = len(vectors)
    num_impostor = count * (count - 1) // 2 - int((sizes * (sizes - 1) // 2).sum())
    if num_impostor <= max_impostor_pairs:
        return CalibrationScores(genuine, all_impostor_scores(vectors, codes), genuine_exhaustive, True)
    a, b = sampled_impostor_pairs(codes, max_impostor_pairs, rng)
    return CalibrationScores(genuine, pair_scores(vectors, a, b), genuine_exhaustive, False)


def threshold_at_fmr(impostor: np.ndarray, fmr: float) -> float:
    """Smallest t with fraction(impostor > t) <= fmr."""
    n = len(impostor)
    if not 0.0 < fmr < 1.0:
        raise UserError(f"--fmr: {fmr} must be in (0, 1)")
    allowed = math.floor(fmr * n)  # impostor scores allowed above t; guard float rounding of fmr*n
    while (allowed + 1) <= fmr * n * (1 + 1e-12):
        allowed += 1
    while allowed > 0 and allowed > fmr * n * (1 + 1e-12):
        allowed -= 1
    position = n - allowed - 1
    return float(np.partition(impostor, position)[position])


def thresholds_from_scores(scores: CalibrationScores, fmrs: Sequence[float], seed: int = 0) -> list[dict]:
    """The index.json `thresholds` entries for `fmrs`."""
    entries = []
    for fmr in fmrs:
        threshold = threshold_at_fmr(scores.impostor, float(fmr))
        tmr = float((scores.genuine > threshold).mean()) if len(scores.genuine) else None
        entries.append({
            "fmr": float(fmr),
            "threshold": threshold,
            "tmr": tmr,
            "num_genuine_pairs": int(len(scores.genuine)),
            "num_impostor_pairs": int(len(scores.impostor)),
            "genuine_pairs": "all" if scores.genuine_exhaustive else "sampled",
            "impostor_pairs": "all" if scores.impostor_exhaustive else "sampled",
            "empirical_fmr": float((scores.impostor > threshold).mean()),
            "seed": seed,
        })
    return entries


def calibrate(index, fmrs: Sequence[float] = DEFAULT_FMRS, *, max_impostor_pairs: int = 20_000_000,
              max_genuine_pairs: int = 5_000_000, seed: int = 0, write: bool = True) -> list[dict]:
    """Calibrate thresholds on a `PrivacyIndex`'s own enrolled set; with `write`, replace the
    `thresholds` list in its index.json (atomically) and in `index.info`. Returns the entries."""
    if not fmrs:
        raise UserError("calibrate: give at least one --fmr")
    for fmr in fmrs:
        if not 0.0 < float(fmr) < 1.0:
            raise UserError(f"--fmr: {fmr} must be in (0, 1)")
    identities, _ = index.labels()
    scores = calibration_scores(index.embeddings(), identities, max_genuine_pairs=max_genuine_pairs,
                                max_impostor_pairs=max_impostor_pairs, seed=seed)
    entries = thresholds_from_scores(scores, fmrs, seed)
    if write:
        import dataclasses

        info = dataclasses.replace(read_info(index.storage), thresholds=tuple(entries))
        write_info(index.storage, info)
        index.info = info
    return entries
