"""Quality gates: which rendered faces are good enough to keep (pluggable, chosen by name).

The default is no gate. `frontal_heuristic` is the original's frontal test on 5-point landmarks
(SPEC §4); it is exposed for gates that have a landmark detector.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from models.errors import UserError

Gate = Callable[[np.ndarray], np.ndarray]  # uint8 [N, H, W, 3] -> bool [N]


def no_gate(images: np.ndarray) -> np.ndarray:
    return np.ones(len(images), dtype=bool)


def frontal_heuristic(left_eye_x: np.ndarray, right_eye_x: np.ndarray, nose_x: np.ndarray) -> np.ndarray:
    """The original's test: |dl + dr| < (|dl| + |dr|) / 3 with d = x_eye - x_nose (vectorised)."""
    dl = np.asarray(left_eye_x, np.float64) - nose_x
    dr = np.asarray(right_eye_x, np.float64) - nose_x
    return np.abs(dl + dr) < (np.abs(dl) + np.abs(dr)) / 3.0


GATES: dict[str, Gate] = {"none": no_gate}


def quality_gate(name: str) -> Gate:
    try:
        return GATES[name]
    except KeyError:
        raise UserError(f"filter.quality_gate: unknown gate {name!r} (known: {sorted(GATES)})") from None
