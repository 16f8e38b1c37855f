"""Verification metrics against values computed by hand (in the comments) on a small score list."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from facegen.engine.evaluation import (
    accuracy_at,
    at_threshold,
    best_threshold,
    eer,
    kfold_accuracy,
    roc,
    tar_at_far,
    verification_report,
)
from facegen.engine.plots import histogram_png, roc_png
from facegen.models.errors import UserError

SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
SAME = np.array([True, True, False, True, False, False, True, False])
# genuine 0.9 0.8 0.6 0.3; impostor 0.7 0.5 0.4 0.2


def test_accuracy_at_a_known_threshold():
    # accept >= 0.65: 0.9 ok, 0.8 ok, 0.7 false accept, 0.6 false reject, 0.5 ok, 0.4 ok, 0.3 false reject, 0.2 ok
    assert accuracy_at(SCORES, SAME, 0.65) == 5 / 8
    assert accuracy_at(SCORES, SAME, 0.6) == 6 / 8  # inclusive: 0.6 is accepted


def test_rates_at_a_fixed_threshold_by_hand():
    # accept >= 0.65: impostor 0.7 accepted (1 of 4), genuine 0.6 and 0.3 rejected (2 of 4)
    assert at_threshold(SCORES, SAME, 0.65) == {"threshold": 0.65, "accuracy": 5 / 8, "far": 1 / 4, "frr": 2 / 4}
    assert at_threshold(SCORES, SAME, -1.0) == {"threshold": -1.0, "accuracy": 4 / 8, "far": 1.0, "frr": 0.0}


def test_best_threshold_is_the_lowest_of_the_best():
    # 6 of 8 correct at 0.8 and at 0.6; every other threshold gets at most 5
    assert best_threshold(SCORES, SAME) == 0.6


def test_kfold_accuracy_two_folds_by_hand():
    # fold 1 (pairs 0-3) takes its threshold from pairs 4-7: rejecting all (inf) gets 3 of 4 there,
    # and on pairs 0-3 rejecting all is right once: 0.25. Fold 2 takes 0.6 from pairs 0-3 (3 of 4),
    # which rejects all of pairs 4-7: 3 of 4 right. Mean 0.5.
    result = kfold_accuracy(SCORES, SAME, folds=2)
    assert result.thresholds == [math.inf, 0.6]
    assert result.fold_accuracies == [0.25, 0.75] and result.accuracy == 0.5 and result.std == 0.25


def test_tar_at_far_by_hand():
    # 4 impostors; FAR 0.25 allows 1 false accept: threshold = 2nd highest impostor 0.5; genuine > 0.5: 3 of 4
    assert tar_at_far(SCORES, SAME, 0.25) == {"far": 0.25, "tar": 0.75, "threshold": 0.5, "resolved": True}
    # FAR 0.1 allows none: above the highest impostor 0.7: 0.9 and 0.8; fewer than 10 impostors: unresolved
    assert tar_at_far(SCORES, SAME, 0.1) == {"far": 0.1, "tar": 0.5, "threshold": 0.7, "resolved": False}
    # ties: two impostors at 0.7 and FAR 0.5 of 4 -> 2 allowed, threshold the 3rd highest
    tied = tar_at_far([0.9, 0.7, 0.7, 0.1, 0.1], [True, False, False, False, False], 0.5)
    assert tied["threshold"] == 0.1 and tied["tar"] == 1.0


def test_eer_and_roc_by_hand():
    far, tar, thresholds = roc(SCORES, SAME)
    assert thresholds.tolist() == [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    assert far.tolist() == [0, 0, 0.25, 0.25, 0.5, 0.75, 0.75, 1.0]
    assert tar.tolist() == [0.25, 0.5, 0.5, 0.75, 0.75, 0.75, 1.0, 1.0]
    # at 0.6: FAR 1/4 and FRR 1/4
    assert eer(SCORES, SAME) == {"eer": 0.25, "threshold": 0.6}
    # perfectly separated: EER 0
    assert eer([0.9, 0.8, 0.1], [True, True, False])["eer"] == 0.0


def test_report_and_charts():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0.6, 0.1, 300), rng.normal(0.1, 0.1, 3000)])
    same = np.arange(3300) < 300
    order = rng.permutation(3300)  # folds are contiguous: mix genuine and impostor pairs, as pairs.txt does
    scores, same = scores[order], same[order]
    report = verification_report(scores, same)
    assert report["pairs"] == 3300 and report["genuine"] == 300
    assert report["accuracy"] > 0.95 and set(report["tar_at_far"]) == {"0.001", "0.0001"}
    assert report["tar_at_far"]["0.001"]["resolved"] and not report["tar_at_far"]["0.0001"]["resolved"]
    far, tar, _ = roc(scores, same)
    for png in (roc_png({"model": (far, tar)}), histogram_png({"genuine": scores[same], "impostor": scores[~same]},
                                                              markers={"eer": 0.35})):
        image = Image.open(io.BytesIO(png))
        assert image.size == (640, 440) and image.format == "PNG"
        assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 3  # something was drawn


def test_bad_input():
    with pytest.raises(UserError, match="equal length"):
        accuracy_at([0.1, 0.2], [True], 0.5)
    with pytest.raises(UserError, match="genuine and impostor"):
        tar_at_far([0.1, 0.2], [True, True], 0.1)
    with pytest.raises(UserError, match="folds"):
        kfold_accuracy([0.1, 0.2], [True, False], folds=10)
