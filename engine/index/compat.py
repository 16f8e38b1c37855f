"""An embedder and an index together: which preprocessing to use, whether they can be compared, the
operating threshold, and the enrolment sanity check.

An index records the weights it was built with (`embedder_weights`) and the preprocessing
(`preprocessing`). Embeddings are only comparable when both agree. So a command given the same
weights without preprocessing flags uses the index's preprocessing; flags win field by field; and a
refusal names what differs: the weights, or which preprocessing fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from facegen.engine.index.store import IndexInfo
from facegen.models.embedder import FaceEmbedder, Preprocessing, fields_text, preprocessing_diff
from facegen.models.errors import UserError

# Different people whose median cosine is above this are not being told apart by the embedder
# (measured: a real recogniser on real photos, impostor median ~0.1; the same model fed the wrong
# normalisation, ~0.9).
IMPOSTOR_MEDIAN_WARNING = 0.5
# A threshold at FMR f is only meaningful with at least this many impostor pairs per 1/f.
PAIRS_PER_FMR = 10
SANITY_PAIRS = 20_000  # enough for a median and p99; bounded memory at enrolment


def embedder_for_index(path: str, explicit: Mapping[str, Any], info: IndexInfo | None,
                       device: str = "cpu") -> FaceEmbedder:
    """Load the embedder at `path` for use with an index: graph detection or defaults, then the
    index's recorded preprocessing when the weights are the ones it was built with, then `explicit`
    fields. Every choice is appended to `embedder.notes`."""
    from facegen.models.loading import load_embedder

    embedder = load_embedder(path, **dict(explicit))
    if info is not None and info.preprocessing and info.embedder_weights == embedder.weights_fingerprint:
        recorded = Preprocessing.from_dict(info.preprocessing)
        wanted = Preprocessing.from_dict({**recorded.to_dict(), **dict(explicit)})
        if wanted != embedder.preprocessing:
            embedder.set_preprocessing(wanted, f"{path}: preprocessing from the index (built with these weights): "
                                               f"{fields_text(recorded.to_dict())}")
    return embedder.to(device)


def mismatch(info: IndexInfo, embedder: FaceEmbedder) -> str | None:
    """Why `embedder`'s embeddings cannot be compared with the index's, or None when they can."""
    if int(embedder.dim) != info.dim:
        return f"the index holds {info.dim}-d embeddings but the embedder produces {embedder.dim}-d"
    if info.embedder_fingerprint is None or embedder.fingerprint == info.embedder_fingerprint:
        return None
    recorded = Preprocessing.from_dict(info.preprocessing) if info.preprocessing else None
    if info.embedder_weights is not None and info.embedder_weights != embedder.weights_fingerprint:
        return (f"the index was built with other weights (sha256 {info.embedder_weights[:16]}…, this model's "
                f"{embedder.weights_fingerprint[:16]}…); use the model it was built with or rebuild the index")
    if recorded is not None:
        fields = preprocessing_diff(recorded, embedder.preprocessing)
        if fields:
            mine, theirs = embedder.preprocessing.to_dict(), recorded.to_dict()
            detail = "; ".join(f"{k}: index {theirs[k]}, given {mine[k]}" for k in fields)
            same = "the same weights" if info.embedder_weights else "possibly the same weights"
            return (f"{same} but other preprocessing ({detail}); drop the --preprocessing flags (or "
                    f"embedder.preprocessing) that change {', '.join(fields)} to use the index's")
    return ("the index was built with another embedder (fingerprint "
            f"{info.embedder_fingerprint[:16]}…, this one {embedder.fingerprint[:16]}…)")


def check_embedder(info: IndexInfo, embedder: FaceEmbedder, where: str) -> None:
    problem = mismatch(info, embedder)
    if problem:
        raise UserError(f"{where}: {problem}")


# ----------------------------------------------------------------------------------- thresholds
def required_pairs(fmr: float) -> int:
    return math.ceil(PAIRS_PER_FMR / fmr)


def calibrate_command(uri: str, fmr: float) -> str:
    return f"facegen index calibrate {uri} --fmr {fmr:g}"


def calibrated_threshold(info: IndexInfo, fmr: float, uri: str, names: tuple[str, str] = ("privacy.threshold",
                                                                                            "privacy.fmr")) -> dict:
    """The index's threshold at `fmr` with where it came from; refuses (naming the command to run)
    when the index is uncalibrated at that FMR or its impostor pairs cannot resolve it. `names`: how
    the caller's user spells the threshold and FMR settings (job spec keys or CLI flags)."""
    threshold_name, fmr_name = names
    entry = next((t for t in info.thresholds if np.isclose(float(t["fmr"]), fmr, rtol=1e-9, atol=0.0)), None)
    if entry is None:
        have = ", ".join(f"{float(t['fmr']):g}" for t in info.thresholds) or "none"
        raise UserError(f"{threshold_name} auto: the index {uri} is not calibrated at FMR {fmr:g} "
                        f"(calibrated: {have}); run `{calibrate_command(uri, fmr)}`, or give "
                        f"{threshold_name} as a number")
    pairs = int(entry.get("num_impostor_pairs", 0))
    if pairs < required_pairs(fmr):
        raise UserError(f"{threshold_name} auto: the index {uri} has {pairs} impostor pairs, too few to resolve "
                        f"FMR {fmr:g} (needs {required_pairs(fmr)} = {PAIRS_PER_FMR}/FMR); enrol more "
                        f"identities, choose a coarser {fmr_name}, or give {threshold_name} as a number")
    return {"threshold": float(entry["threshold"]), "source": "calibrated", "fmr": float(fmr),
            "impostor_pairs": pairs, "text": f"calibrated at FMR {fmr:g} on {pairs} impostor pairs"}


def given_threshold(value: float) -> dict:
    return {"threshold": float(value), "source": "given", "fmr": None, "impostor_pairs": None,
            "text": "given by hand"}


def resolve_threshold(value: float | str, fmr: float, info: IndexInfo, uri: str) -> dict:
    """`privacy.threshold` (a number, or 'auto') -> {threshold, source, fmr, impostor_pairs, text}."""
    return calibrated_threshold(info, fmr, uri) if value == "auto" else given_threshold(float(value))


# --------------------------------------------------------------------------------------- sanity
def impostor_summary(vectors: np.ndarray, identities: Any, *, max_pairs: int = SANITY_PAIRS,
                     seed: int = 0) -> dict | None:
    """Median, p99 and max cosine over different-identity pairs (all, or a seeded sample); None
    when the set has a single identity."""
    from facegen.engine.index.calibrate import calibration_scores

    if len(np.unique(np.asarray(identities, dtype=str))) < 2:
        return None
    scores = calibration_scores(vectors, identities, max_genuine_pairs=0, max_impostor_pairs=max_pairs,
                                seed=seed).impostor
    return {"median": float(np.median(scores)), "p99": float(np.quantile(scores, 0.99)),
            "max": float(scores.max()), "pairs": int(len(scores))}


def impostor_lines(summary: dict | None) -> list[tuple[str, str]]:
    """(level, text) lines describing the impostor distribution: 'info', or a loud 'warning'."""
    if not summary:
        return [("info", "impostor scores: n/a (a single identity)")]
    lines = [("info", f"impostor scores (different identities, {summary['pairs']} pairs): median "
                      f"{summary['median']:.3f}, p99 {summary['p99']:.3f}, max {summary['max']:.3f}")]
    if summary["median"] > IMPOSTOR_MEDIAN_WARNING:
        lines.append(("warning", "WARNING: different identities are nearly indistinguishable (median impostor "
                                 f"cosine {summary['median']:.3f} > {IMPOSTOR_MEDIAN_WARNING}). The embedder is "
                                 "probably fed the wrong preprocessing (normalisation or channel order) or is not "
                                 "a face recogniser; privacy decisions with it mean nothing. Check "
                                 "--preprocessing / embedder.preprocessing."))
    return lines


def print_impostor_lines(summary: dict | None, emit: Callable[[str], None] | None = None) -> None:
    import sys

    for level, text in impostor_lines(summary):
        (emit or (lambda t, lv=level: print(t, file=sys.stderr if lv == "warning" else sys.stdout)))(text)
