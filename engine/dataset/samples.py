"""The units every output format writes and reads, whatever its container.

`ShardBatch` is what a shard writer receives (the accepted samples of one shard, stacked) and what
`iter_batches` yields back; `Sample` is one decoded sample; `RawSample` is one sample's undecoded
members, as a format's reader yields them before decoding (so decoding can run on a thread pool).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facegen.models.errors import UserError


def sample_key(identity: int, sample: int) -> str:
    """The sample's key in every format; no dots (WebDataset readers split member names at the first)."""
    return f"{identity:08d}_{sample:03d}"


@dataclass
class ShardBatch:
    """Samples of one shard, in the order they are written (the caller sorts by key)."""

    labels: np.ndarray  # int64 [N] identity labels
    samples: np.ndarray  # int [N] sample index within the identity
    vis: np.ndarray  # uint8 [N,H,W,3]
    nir: np.ndarray | None  # uint8 [N,H,W] or None when the generator has no NIR branch
    metas: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.samples = np.asarray(self.samples, dtype=np.int64)
        n = len(self.labels)
        if n == 0 or self.labels.shape != (n,) or self.samples.shape != (n,):
            raise ValueError(f"ShardBatch: labels and samples must be non-empty 1-D of equal length, "
                             f"got {self.labels.shape} and {self.samples.shape}")
        if (self.labels < 0).any() or (self.samples < 0).any():
            raise ValueError("ShardBatch: labels and samples must be non-negative")
        vis = self.vis
        if vis.dtype != np.uint8 or vis.ndim != 4 or vis.shape[0] != n or vis.shape[3] != 3:
            raise ValueError(f"ShardBatch: vis must be uint8 [{n},H,W,3], got {vis.dtype} {vis.shape}")
        if self.nir is not None and (self.nir.dtype != np.uint8 or self.nir.shape != self.vis.shape[:3]):
            raise ValueError(f"ShardBatch: nir must be uint8 {self.vis.shape[:3]}, "
                             f"got {self.nir.dtype} {self.nir.shape}")
        if not self.metas:
            self.metas = [{} for _ in range(n)]
        if len(self.metas) != n:
            raise ValueError(f"ShardBatch: {len(self.metas)} metadata dicts for {n} samples")

    def __len__(self) -> int:
        return len(self.labels)

    def keys(self) -> list[str]:
        return [sample_key(int(i), int(s)) for i, s in zip(self.labels, self.samples)]


@dataclass(frozen=True)
class ShardResult:
    """What a shard writer published: the shard file and its completion marker."""

    shard_id: int
    shard_file: str  # file name under shards/
    sha256: str
    num_bytes: int
    num_samples: int
    marker: dict[str, Any]


@dataclass
class Sample:
    key: str
    label: int
    sample: int
    vis: np.ndarray  # uint8 HxWx3
    nir: np.ndarray | None  # uint8 HxW
    meta: dict[str, Any]


RawSample = tuple[str, str, dict[str, bytes]]  # (shard file, key, member name -> bytes)


def stack_samples(samples: list[Sample]) -> ShardBatch:
    """Decoded samples as one batch; they must share an image size and all have NIR or none."""
    shapes = {s.vis.shape for s in samples}
    if len(shapes) != 1:
        raise UserError(f"cannot batch images of different sizes {sorted(shapes)} (at {samples[0].key})")
    has_nir = {s.nir is not None for s in samples}
    if len(has_nir) != 1:
        raise UserError(f"some samples have NIR and some do not (near {samples[0].key})")
    return ShardBatch(
        labels=np.array([s.label for s in samples], dtype=np.int64),
        samples=np.array([s.sample for s in samples], dtype=np.int64),
        vis=np.stack([s.vis for s in samples]),
        nir=np.stack([s.nir for s in samples]) if has_nir == {True} else None,
        metas=[s.meta for s in samples],
    )
