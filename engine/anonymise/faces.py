"""Seeded faces for swapping: the W+ codes of sources and targets, one pure function of (seed, slot).

A face is (condition, z) mapped with truncation toward `w_avg`, exactly like a generated identity's
anchor. Both come from `engine.seeding` streams, so a rank table or an anonymised dataset is the same
on every machine and under any split of the work: attempt 2t draws the condition and 2t+1 the latent
of a face's t-th try (a target that failed certification is replaced by try t+1).
"""

from __future__ import annotations

import numpy as np
import torch

from facegen.engine.seeding import Stream, draw_keys, normal, random_directions
from facegen.models.rendering import LatentSpaces

CONDITION_NORM = 4.0  # ArcBiFaceGAN's generation script: c = 4 · normalize(randn(512))


def face_ws(space: LatentSpaces, seed: int, stream: Stream, slots: np.ndarray, tries: np.ndarray | int = 0,
            truncation_psi: float = 0.7) -> torch.Tensor:
    """W+ codes [len(slots), num_ws, w_dim] of seeded faces."""
    slots = np.asarray(slots, dtype=np.int64)
    tries = np.broadcast_to(np.asarray(tries, dtype=np.int64), slots.shape)
    z = torch.from_numpy(normal(draw_keys(seed, stream, slots, 2 * tries + 1), space.z_dim))
    c = None
    if space.c_dim:
        keys = draw_keys(seed, stream, slots, 2 * tries)
        c = torch.from_numpy(random_directions(keys, space.c_dim, CONDITION_NORM))
    with torch.no_grad():
        return space.w_plus(z, c, truncation_psi=truncation_psi)
