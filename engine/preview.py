"""Looking at a generator: VIS|NIR samples for chosen seeds, StyleGAN2-ADA's `generate.py --seeds` habit.

A seed means what it means upstream: z = `np.random.RandomState(seed).randn(1, z_dim)`, so a converted
snapshot previews the same latents as the original script. An identity-conditioned generator gets,
per seed, a random identity direction drawn from the same RandomState after z (scaled to the
condition norm, as generation draws them), or the conditions given: then every row is one identity
and every column one seed, which shows whether an identity holds across latents.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from facegen.models.errors import UserError
from facegen.models.generator import Generator, images_to_uint8

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
MAX_SAMPLES = 4096


def parse_seeds(text: str) -> list[int]:
    """'0-15' / '1,5,9-11' -> [ints], in the order given."""
    seeds: list[int] = []
    for part in text.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise UserError(f"--seeds: {part.strip()!r} is not N or N-M (e.g. 0-15 or 1,5,9-11)")
        low, high = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if high < low:
            raise UserError(f"--seeds: range {part.strip()} is empty")
        if high >= 2**32:
            raise UserError(f"--seeds: {high} is above 2^32 - 1 (numpy RandomState seeds)")
        seeds += range(low, high + 1)
        if len(seeds) > MAX_SAMPLES:
            raise UserError(f"--seeds: more than {MAX_SAMPLES} seeds")
    return seeds


def latents(seeds: list[int], z_dim: int, c_dim: int, norm: float) -> tuple[np.ndarray, np.ndarray]:
    """z [n, z_dim] as upstream generate.py, and a random identity condition per seed [n, c_dim]."""
    zs, cs = [], []
    for seed in seeds:  # one RandomState per seed is the upstream definition of a seed's z
        rng = np.random.RandomState(seed)
        zs.append(rng.randn(z_dim))
        c = rng.randn(c_dim)
        cs.append(c * (norm / max(np.linalg.norm(c), 1e-12)) if c_dim else c)
    return np.asarray(zs, np.float32).reshape(len(seeds), z_dim), np.asarray(cs, np.float32).reshape(len(seeds), c_dim)


def load_conditions(path: str, c_dim: int, norm: float, rows: int) -> np.ndarray:
    """Identity conditions from identity_features.json (one row per identity: its first file's feature)
    or a float .npy [M, c_dim]; each scaled to `norm`. At most `rows`."""
    if c_dim == 0:
        raise UserError("--condition: this generator is unconditional (c_dim 0)")
    if path.endswith(".npy"):
        if not Path(path).is_file():
            raise UserError(f"--condition: {path}: not found")
        try:
            features = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise UserError(f"--condition: {path}: not a numeric .npy ({err})") from None
        if features.ndim == 1:
            features = features[None]
    else:
        from facegen.engine.index.sources import embeddings_from_identity_features

        source = embeddings_from_identity_features(path)
        _, first = np.unique(source.identities.astype(str), return_index=True)
        features = source.embeddings[np.sort(first)]
    if features.ndim != 2 or features.shape[1] != c_dim or not np.issubdtype(features.dtype, np.number):
        raise UserError(f"--condition: {path}: conditions are {features.shape} but the generator's c_dim is {c_dim}")
    features = features[:rows].astype(np.float64)
    lengths = np.linalg.norm(features, axis=1, keepdims=True)
    if (lengths == 0).any():
        raise UserError(f"--condition: {path}: a condition is all zeros")
    return (features * (norm / lengths)).astype(np.float32)


@torch.inference_mode()
def sample(generator: Generator, z: np.ndarray, c: np.ndarray, *, truncation: float = 1.0,
           noise_mode: str = "const", batch: int = 16, device: str = "cpu") -> tuple[np.ndarray, np.ndarray | None]:
    """VIS uint8 [n, R, R, 3] and NIR uint8 [n, R, R] (None without a NIR branch), in batches."""
    generator = generator.to(device).eval()
    vis_parts, nir_parts = [], []
    for start in range(0, len(z), batch):
        zb = torch.from_numpy(z[start:start + batch]).to(device)
        cb = torch.from_numpy(c[start:start + batch]).to(device) if generator.c_dim else None
        vis, nir = generator(zb, cb, truncation_psi=truncation, noise_mode=noise_mode)
        vis_parts.append(images_to_uint8(vis).permute(0, 2, 3, 1).cpu().numpy())
        if nir is not None:
            nir_parts.append(images_to_uint8(nir)[:, 0].cpu().numpy())
    return np.concatenate(vis_parts), (np.concatenate(nir_parts) if nir_parts else None)
