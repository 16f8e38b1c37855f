"""Threshold calibration on clustered synthetic identities, against a numpy reference."""

import itertools
import json

import numpy as np
import pytest

from facegen.engine.index import (
    DEFAULT_COMPAT_THRESHOLDS,
    PrivacyIndex,
    build_index,
    calibrate,
    calibration_scores,
    threshold_at_fmr,
)
from facegen.engine.index.calibrate import genuine_pairs, triangular_pair
from facegen.engine.storage import Storage
from facegen.models.errors import UserError


def clustered(rng, num_identities=40, per_identity=6, dim=16, spread=0.6):
    """Identities as random centres with noisy samples around them, unit-normalised."""
    centres = rng.standard_normal((num_identities, dim))
    samples = np.repeat(centres, per_identity, axis=0) + spread * rng.standard_normal(
        (num_identities * per_identity, dim))
    vectors = (samples / np.linalg.norm(samples, axis=1, keepdims=True)).astype(np.float32)
    identities = np.repeat([f"id{i}" for i in range(num_identities)], per_identity)
    order = rng.permutation(len(vectors))  # identities interleaved across shards
    return vectors[order], identities[order].astype(object)


def reference_scores(vectors, identities):
    gram = vectors.astype(np.float64) @ vectors.astype(np.float64).T
    upper = np.triu(np.ones_like(gram, dtype=bool), k=1)
    same = identities[:, None] == identities[None, :]
    return gram[upper & same], gram[upper & ~same]


def reference_threshold(impostor, fmr):
    """Smallest t with mean(impostor > t) <= fmr, scanning every candidate value (count above each)."""
    candidates = np.sort(impostor)
    above = len(impostor) - np.searchsorted(candidates, candidates, side="right")
    return candidates[np.flatnonzero(above / len(impostor) <= fmr)[0]]


@pytest.fixture
def clustered_index(tmp_path):
    rng = np.random.default_rng(0)
    vectors, identities = clustered(rng)
    build_index(vectors, identities, [f"{i}_{n}" for n, i in enumerate(identities)], Storage(str(tmp_path)),
                embedder_fingerprint="fp", preprocessing=None, shard_size=70)
    return PrivacyIndex.open(str(tmp_path), backend="numpy"), vectors, identities


def test_exhaustive_calibration_equals_reference(clustered_index):
    index, vectors, identities = clustered_index
    fmrs = [1e-2, 1e-3, 1e-4]
    entries = calibrate(index, fmrs)
    genuine, impostor = reference_scores(vectors, identities)
    for entry, fmr in zip(entries, fmrs):
        assert entry["num_genuine_pairs"] == len(genuine) == 40 * 15
        assert entry["num_impostor_pairs"] == len(impostor) == 240 * 239 // 2 - 600
        assert entry["genuine_pairs"] == entry["impostor_pairs"] == "all"
        expected = reference_threshold(impostor, fmr)
        assert entry["threshold"] == pytest.approx(expected, abs=1e-6)
        # Empirical FMR at the threshold is within target; anything below the threshold is not.
        assert (impostor > entry["threshold"] + 1e-6).mean() <= fmr
        assert (impostor > expected).mean() <= fmr
        below = impostor[impostor < expected - 1e-6].max()
        assert (impostor > below).mean() > fmr
        assert entry["tmr"] == pytest.approx((genuine > expected).mean(), abs=2 / len(genuine))
    assert entries[0]["tmr"] > 0.5  # clustered identities are separable at FMR 1e-2


def test_calibration_is_written_to_index_json(clustered_index):
    index, _, _ = clustered_index
    entries = calibrate(index, [1e-3])
    stored = json.loads(index.storage.read_text("index.json"))
    assert stored["thresholds"] == entries
    reopened = PrivacyIndex.open(index.storage)
    assert reopened.info.threshold_at(1e-3) == entries[0]["threshold"]
    assert reopened.info.threshold_at(1e-4) is None
    assert reopened.info.embedder_fingerprint == "fp" and reopened.count == 240


def test_sampled_calibration_is_deterministic_and_close(clustered_index):
    index, vectors, identities = clustered_index
    exact = calibrate(index, [1e-2], write=False)[0]
    first = calibrate(index, [1e-2], max_impostor_pairs=20_000, max_genuine_pairs=300, seed=3, write=False)
    again = calibrate(index, [1e-2], max_impostor_pairs=20_000, max_genuine_pairs=300, seed=3, write=False)
    other = calibrate(index, [1e-2], max_impostor_pairs=20_000, max_genuine_pairs=300, seed=4, write=False)
    assert first == again and first != other
    assert first[0]["impostor_pairs"] == first[0]["genuine_pairs"] == "sampled"
    assert first[0]["num_impostor_pairs"] == 20_000 and first[0]["num_genuine_pairs"] == 300
    assert abs(first[0]["threshold"] - exact["threshold"]) < 0.05
    # Sampled pairs really are impostor pairs: their scores lie among the exhaustive ones.
    scores = calibration_scores(vectors, identities, max_impostor_pairs=300, max_genuine_pairs=50, seed=1)
    genuine, impostor = reference_scores(vectors, identities)
    assert np.abs(scores.impostor[:, None] - impostor[None, :]).min(axis=1).max() < 1e-6
    assert np.abs(scores.genuine[:, None] - genuine[None, :]).min(axis=1).max() < 1e-6


def test_genuine_pairs_enumerate_every_same_identity_pair():
    identities = np.asarray(["b", "a", "b", "c", "b", "a", "b"], dtype=object)
    a, b, exhaustive = genuine_pairs(identities, 100, np.random.default_rng(0))
    got = sorted(tuple(sorted(p)) for p in zip(a.tolist(), b.tolist()))
    expected = sorted(p for p in itertools.combinations(range(7), 2) if identities[p[0]] == identities[p[1]])
    assert exhaustive and got == expected
    # A group of 1000 samples: every pair exactly once.
    big = np.full(1000, "x", dtype=object)
    a, b, _ = genuine_pairs(big, 10**9, np.random.default_rng(0))
    assert len(a) == 1000 * 999 // 2 and (a < b).all()
    assert len(np.unique(a * 1000 + b)) == len(a)


def test_triangular_pair_decoding_is_exact_for_huge_groups():
    # Around triangular numbers of b ~ 1e9 (q ~ 5e17), where float sqrt alone is off by one.
    tri = np.arange(10**9 - 500, 10**9 + 500, dtype=np.int64)
    q = np.concatenate([tri * (tri - 1) // 2 + d for d in (-1, 0, 1)])
    a, b = triangular_pair(q)
    assert (a >= 0).all() and (a < b).all()
    np.testing.assert_array_equal(b * (b - 1) // 2 + a, q)


def test_threshold_at_fmr_rounding_and_bounds():
    scores = np.arange(30_000, dtype=np.float32)
    # 1e-4 * 30000 is 3.0000000000000004 in floating point: 3 scores may exceed the threshold.
    assert threshold_at_fmr(scores, 1e-4) == 29_996.0
    assert threshold_at_fmr(scores, 1 / 30_000 * 0.999) == 29_999.0
    with pytest.raises(UserError, match="--fmr"):
        threshold_at_fmr(scores, 0.0)


def test_single_identity_cannot_be_calibrated(tmp_path):
    build_index(np.eye(3), ["a"] * 3, ["1", "2", "3"], Storage(str(tmp_path)), embedder_fingerprint=None,
                preprocessing=None)
    with pytest.raises(UserError, match="single identity"):
        calibrate(PrivacyIndex.open(str(tmp_path)))


def test_compat_thresholds_are_arcbifacegans():
    assert DEFAULT_COMPAT_THRESHOLDS == {"privacy": 0.622, "diversity": 0.853}
    assert DEFAULT_COMPAT_THRESHOLDS["privacy"] == pytest.approx(0.776 - 2 * 0.077)
    assert DEFAULT_COMPAT_THRESHOLDS["diversity"] == pytest.approx(0.776 + 0.077)
