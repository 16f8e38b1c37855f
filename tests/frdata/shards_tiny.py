"""Small real datasets for the FR tests: real shard files written by `write_shard`, images that
encode their identity (a flat colour per identity, plus noise), optionally NIR."""

from __future__ import annotations

import numpy as np

from facegen.engine.dataset.samples import ShardBatch
from facegen.engine.dataset.webdataset import write_shard
from facegen.engine.storage import Storage


def identity_images(labels: np.ndarray, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 VIS [N,S,S,3] and NIR [N,S,S]: a per-identity colour and stripe pattern, plus noise."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(1234).integers(30, 226, size=(int(labels.max()) + 1, 3))
    base = colours[labels][:, None, None, :].astype(np.float32)
    stripes = (np.arange(size)[None, :] * (labels[:, None] % 5 + 1) // 4 % 2) * 40.0  # [N, S]
    vis = base + stripes[:, None, :, None] + rng.normal(0, 6, size=(len(labels), size, size, 3))
    nir = vis.mean(axis=3)
    return np.clip(vis, 0, 255).astype(np.uint8), np.clip(nir, 0, 255).astype(np.uint8)


def write_dataset(folder, num_shards: int, ids_per_shard: int, samples_per_id: int, *, size: int = 24,
                  nir: bool = True, label_step: int = 1, image_format: str = "png") -> Storage:
    """`num_shards` shards of `ids_per_shard` identities each (identity-sorted, like `generate`).

    label_step > 1 leaves gaps between labels (as a dataset filtered by other tools could)."""
    storage = Storage(str(folder))
    for shard in range(num_shards):
        ids = np.arange(shard * ids_per_shard, (shard + 1) * ids_per_shard)
        labels = np.repeat(ids * label_step, samples_per_id)
        samples = np.tile(np.arange(samples_per_id), ids_per_shard)
        vis, nir_images = identity_images(labels, size, seed=shard)
        batch = ShardBatch(labels=labels, samples=samples, vis=vis, nir=nir_images if nir else None)
        write_shard(storage, shard, batch, image_format=image_format, workers=1)
    return storage
