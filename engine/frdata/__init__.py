"""Face-recognition data from generated shards: `FRDataset` and a DataLoader around it.

```python
from facegen.engine.frdata import FRDataset, fr_loader, identity_counts

ds = FRDataset("s3://bucket/run1", mode="vis", image_size=112, flip=True, seed=0)
loader = fr_loader(ds, batch_size=512, num_workers=8)
for epoch in range(20):
    ds.set_epoch(epoch)
    for images, labels in loader:      # float32 [B, 3, 112, 112] in [-1, 1], int64 [B] in [0, num_classes)
        ...
```
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from facegen.engine.frdata.dataset import MODES, FRDataset
from facegen.engine.frdata.images import FRTransform, normalize_batch
from facegen.engine.frdata.split import Share, epoch_order, shares_for

__all__ = ["MODES", "FRDataset", "FRTransform", "Share", "epoch_order", "fr_loader", "identity_counts",
           "normalize_batch", "shares_for"]


def fr_loader(dataset: FRDataset, batch_size: int, num_workers: int = 2, *, drop_last: bool = False,
              pin_memory: bool = False) -> DataLoader:
    """A DataLoader over `dataset`; every worker reads its own disjoint share of the shards."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                      pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=4 if num_workers else None)


def identity_counts(label_batches) -> np.ndarray:
    """Distinct identities in each batch of labels (how well the loader mixes identity-sorted shards)."""
    return np.array([len(torch.as_tensor(labels).unique()) for labels in label_batches], dtype=np.int64)
