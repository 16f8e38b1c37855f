"""Counter-based random numbers: every draw is a pure function of (job seed, stream, slot, attempt).

An image must never depend on batch composition, worker count or retries (so that every executor
and every resume writes the same bytes), so no
draw may come from a stateful generator shared by a batch. Instead each value is a hash of its
coordinates: SplitMix64 over a 64-bit key, vectorised in numpy (uint64 arithmetic wraps modulo 2^64,
which is exactly what the hash needs). Normals come from Box-Muller in float64, then float32. The
result is identical on every platform and device, because the host computes it.
"""

from __future__ import annotations

import enum

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


class Stream(enum.IntEnum):
    """Independent purposes of randomness; a new purpose gets a new number, never a reused one."""

    CONDITION = 1
    LATENT = 2
    NOISE = 3
    CALIBRATION = 4
    WORLD_IDENTITY = 5  # the procedural face world (engine.world)
    WORLD_SAMPLE = 6
    # Identity swapping (engine/anonymise): the faces being anonymised and the faces lending identity.
    # Numbered apart from the generation streams so that other new purposes can take 5, 6, ...
    SWAP_SOURCE = 11
    SWAP_TARGET = 12
    SWAP_BASELINE = 13  # random swap units, the baseline a ranking is compared against
    REPAIR_TARGET = 14  # privacy repair in generation (engine/repair.py): the faces lending identity units


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        return x ^ (x >> np.uint64(31))


def draw_keys(seed: int, stream: Stream, slots: np.ndarray, attempts: np.ndarray | int = 0) -> np.ndarray:
    """One 64-bit key per (slot, attempt) pair: the identity of a random draw."""
    slots = np.asarray(slots, dtype=np.uint64)
    attempts = np.broadcast_to(np.asarray(attempts, dtype=np.uint64), slots.shape)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.full(slots.shape, seed, dtype=np.uint64) * _MIX1 + np.uint64(int(stream)))
        key = _splitmix64(key ^ slots)
        return _splitmix64(key ^ (attempts * _MIX2))


def uniform(keys: np.ndarray, size: int) -> np.ndarray:
    """`size` uniforms in (0, 1) for each key: float64 [len(keys), size]."""
    counters = np.arange(size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _splitmix64(keys[:, None] ^ _splitmix64(counters[None, :] * _GOLDEN))
    # 53 random bits -> (0, 1); the half-ulp offset keeps log() away from 0.
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def normal(keys: np.ndarray, size: int) -> np.ndarray:
    """`size` standard normals for each key: float32 [len(keys), size] (Box-Muller)."""
    half = (size + 1) // 2
    u = uniform(keys, 2 * half)
    radius = np.sqrt(-2.0 * np.log(u[:, :half]))
    angle = 2.0 * np.pi * u[:, half:]
    values = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return values[:, :size].astype(np.float32)


def random_directions(keys: np.ndarray, dim: int, norm: float) -> np.ndarray:
    """Isotropic random vectors of a given norm (the original's `norm · normalize(randn(dim))`)."""
    v = normal(keys, dim).astype(np.float64)
    v *= norm / np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float32)
