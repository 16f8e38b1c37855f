"""A procedural VIS/NIR face world: a population with known identities, rendered without any model.

Each identity is a vector of traits (face shape, skin tone, eye spacing and size, brows, nose, mouth,
hair, beard); each sample adds nuisance (pose shift and rotation, yaw and pitch, expression, gaze,
lighting, background, clothes). The NIR twin of a sample has the same geometry and the reflectance of
skin, eyes and hair at ~850 nm under a near-frontal illuminator. It is a stand-in "real" population
for the privacy index, a training set for small embedders and generators, and a realistic test
fixture, deterministic from (seed, identity, sample) on every machine.
"""

from __future__ import annotations

import numpy as np

from facegen.engine.world.render import render_faces
from facegen.engine.world.traits import Identity, Nuisance, identity_traits, nuisance

__all__ = ["Identity", "Nuisance", "identity_traits", "nuisance", "render", "render_faces"]


def render(seed: int, identities: np.ndarray, samples: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """VIS uint8 [n, R, R, 3] and NIR uint8 [n, R, R] for the (identity, sample) pairs given."""
    identities = np.asarray(identities, np.int64)
    samples = np.asarray(samples, np.int64)
    if identities.shape != samples.shape or identities.ndim != 1:
        raise ValueError(f"identities {identities.shape} and samples {samples.shape} must be equal 1-d arrays")
    traits = identity_traits(seed, identities)
    return render_faces(traits, nuisance(seed, identities, samples), resolution, seed, identities, samples)
