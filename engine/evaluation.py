"""Verification metrics on similarity scores: accuracy (10-fold, LFW protocol), TAR@FAR, EER, ROC.

Conventions, stated once: a pair is accepted as "same person" when its score (cosine similarity) is
>= the threshold, except for TAR@FAR, which uses a strict > against the (k+1)-th highest impostor
score so that at most k = floor(FAR x impostors) impostors are accepted even with tied scores.
FAR = FMR = accepted impostors / impostors; TAR = accepted genuine pairs / genuine pairs;
FRR = FNMR = 1 - TAR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from facegen.models.errors import UserError


def _check(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, issame = np.asarray(scores, np.float64), np.asarray(issame, bool)
    if scores.shape != issame.shape or scores.ndim != 1:
        raise UserError(f"scores {scores.shape} and labels {issame.shape} must be 1-D of equal length")
    if not np.isfinite(scores).all():
        raise UserError("scores must be finite")
    return scores, issame


def accuracy_at(scores, issame, threshold: float) -> float:
    scores, issame = _check(scores, issame)
    return float(np.mean((scores >= threshold) == issame))


def at_threshold(scores, issame, threshold: float) -> dict:
    """Accuracy, false accept rate (impostors accepted) and false reject rate at a fixed threshold."""
    scores, issame = _check(scores, issame)
    accepted = scores >= threshold
    return {"threshold": float(threshold), "accuracy": float(np.mean(accepted == issame)),
            "far": float(accepted[~issame].mean()) if (~issame).any() else 0.0,
            "frr": float((~accepted[issame]).mean()) if issame.any() else 0.0}


def best_threshold(scores, issame) -> float:
    """The threshold (one of the scores, or +inf) with the highest accuracy; the lowest such one."""
    scores, issame = _check(scores, issame)
    candidates = np.append(np.unique(scores), np.inf)
    # accepted (score >= t) counts for every candidate at once, from the sorted scores
    genuine, impostor = np.sort(scores[issame]), np.sort(scores[~issame])
    true_accepts = len(genuine) - np.searchsorted(genuine, candidates, side="left")
    true_rejects = np.searchsorted(impostor, candidates, side="left")
    correct = true_accepts + true_rejects
    return float(candidates[int(np.argmax(correct))])


@dataclass(frozen=True)
class FoldResult:
    accuracy: float
    std: float
    thresholds: list[float]
    fold_accuracies: list[float]


def kfold_accuracy(scores, issame, folds: int = 10) -> FoldResult:
    """LFW protocol: for each of `folds` contiguous folds (in pair order, as sklearn's KFold without
    shuffling), pick the best threshold on the other folds and measure accuracy on this one."""
    scores, issame = _check(scores, issame)
    if len(scores) < folds:
        raise UserError(f"{len(scores)} pairs cannot be split into {folds} folds")
    parts = np.array_split(np.arange(len(scores)), folds)
    accuracies, thresholds = [], []
    for test in parts:
        train = np.setdiff1d(np.arange(len(scores)), test)
        threshold = best_threshold(scores[train], issame[train])
        thresholds.append(threshold)
        accuracies.append(accuracy_at(scores[test], issame[test], threshold))
    return FoldResult(float(np.mean(accuracies)), float(np.std(accuracies)), thresholds, accuracies)


def tar_at_far(scores, issame, far: float) -> dict:
    """TAR at a FAR: accept scores above the (k+1)-th highest impostor score, k = floor(far x impostors).

    `resolved` is False when there are fewer than 1/far impostors (the FAR cannot be measured that low;
    the figure is then the TAR at zero accepted impostors)."""
    scores, issame = _check(scores, issame)
    genuine, impostor = scores[issame], np.sort(scores[~issame])[::-1]
    if not len(genuine) or not len(impostor):
        raise UserError("TAR@FAR needs both genuine and impostor pairs")
    allowed = int(math.floor(far * len(impostor) + 1e-9))
    if allowed >= len(impostor):
        return {"far": far, "tar": 1.0, "threshold": -math.inf, "resolved": True}
    threshold = float(impostor[allowed])
    return {"far": far, "tar": float(np.mean(genuine > threshold)), "threshold": threshold,
            "resolved": len(impostor) * far >= 1}


def roc(scores, issame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, thresholds) for every distinct score as threshold (accept >= t), thresholds descending."""
    scores, issame = _check(scores, issame)
    thresholds = np.unique(scores)[::-1]
    genuine, impostor = np.sort(scores[issame]), np.sort(scores[~issame])
    tar = (len(genuine) - np.searchsorted(genuine, thresholds, side="left")) / max(len(genuine), 1)
    far = (len(impostor) - np.searchsorted(impostor, thresholds, side="left")) / max(len(impostor), 1)
    return far, tar, thresholds


def eer(scores, issame) -> dict:
    """Equal error rate: at the threshold where FAR and FRR are closest, their mean."""
    far, tar, thresholds = roc(scores, issame)
    frr = 1 - tar
    # include "accept nothing" (FAR 0, FRR 1) so a perfectly separated set has EER 0 at its edge
    far, frr = np.append(far, 0.0), np.append(frr, 1.0)
    thresholds = np.append(thresholds, np.inf)
    i = int(np.argmin(np.abs(far - frr)))
    return {"eer": float((far[i] + frr[i]) / 2), "threshold": float(thresholds[i])}


def verification_report(scores, issame, folds: int = 10, fars: tuple[float, ...] = (1e-3, 1e-4)) -> dict:
    scores, issame = _check(scores, issame)
    fold = kfold_accuracy(scores, issame, folds)
    return {
        "pairs": int(len(scores)), "genuine": int(issame.sum()), "impostor": int((~issame).sum()),
        "accuracy": fold.accuracy, "accuracy_std": fold.std, "fold_thresholds": fold.thresholds,
        "tar_at_far": {f"{far:g}": tar_at_far(scores, issame, far) for far in fars},
        "eer": eer(scores, issame),
    }
