"""`facegen bench loader`: decoded, batched images/s of the FR loader from shards vs an image folder.

Both sides decode the same PNG images, resize them to the FR input and normalise them with the same
`FRTransform`, batched by a torch DataLoader with the same worker counts, in the same run:
  - shards: `FRDataset` (byte ranges from the manifest, several shards open, shuffle buffer);
  - baseline: the dataset exported as `label/xxx.png` files (`facegen export --to folder`) read by a
    map-style dataset with a shuffling DataLoader, the usual way FR trainers read image folders.
Each figure is one full epoch, worker start-up included. Also reported: distinct identities per batch.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from facegen.engine.dataset.samples import ShardBatch
from facegen.engine.dataset.webdataset import write_shard
from facegen.engine.export.folder import write_image_folder
from facegen.engine.export.source import encoded_samples
from facegen.engine.frdata import FRDataset, fr_loader, identity_counts
from facegen.engine.frdata.images import FRTransform
from facegen.engine.storage import Storage
from facegen.jobs.benchmarks import write_record


class FolderDataset(Dataset):
    """`root/<label>/<file>` images -> (normalised tensor, label): the image-folder baseline."""

    def __init__(self, root: str, size: int) -> None:
        labels = sorted(os.listdir(root))
        self.items = [(os.path.join(root, name, f), index) for index, name in enumerate(labels)
                      for f in sorted(os.listdir(os.path.join(root, name)))]
        self.transform = FRTransform(size=size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        with open(path, "rb") as handle:
            return self.transform(handle.read(), False, path), label


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("loader", help="FR loader images/s from shards vs an image folder, same run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="an existing dataset (default: a synthetic one in a temporary folder)")
    p.add_argument("--shards", type=int, default=8, help="synthetic dataset: shards")
    p.add_argument("--identities-per-shard", type=int, default=16, help="synthetic dataset: identities per shard")
    p.add_argument("--samples", type=int, default=8, help="synthetic dataset: samples per identity")
    p.add_argument("--resolution", type=int, default=256, help="synthetic dataset: image size")
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts, comma-separated")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument("--image-size", type=int, default=112, help="FR input size")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.set_defaults(func=run)


def synthetic_dataset(folder: str, shards: int, per_shard: int, samples: int, size: int) -> None:
    """Identity-sorted shards of smooth colour fields plus noise (PNG sizes like generated faces)."""
    rng = np.random.default_rng(0)
    storage = Storage(folder)
    for shard in range(shards):
        labels = np.repeat(np.arange(shard * per_shard, (shard + 1) * per_shard), samples)
        coarse = rng.integers(0, 256, (len(labels), 8, 8, 3)).astype(np.float32)
        fields = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(0, 3, 1, 2), size=(size, size),
                                                 mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
        vis = np.clip(fields + rng.normal(0, 2, fields.shape), 0, 255).astype(np.uint8)
        write_shard(storage, shard, ShardBatch(labels=labels, samples=np.tile(np.arange(samples), per_shard),
                                               vis=vis, nir=None))


def epoch(loader) -> tuple[float, int, np.ndarray]:
    started, count, labels = time.perf_counter(), 0, []
    for images, batch_labels in loader:
        count += len(images)
        labels.append(batch_labels)
    return count / (time.perf_counter() - started), count, identity_counts(labels)


def run(args: argparse.Namespace) -> int:
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="facegen-bench-loader-") as tmp:
        data = args.dataset
        if data is None:
            data = f"{tmp}/data"
            synthetic_dataset(data, args.shards, args.identities_per_shard, args.samples, args.resolution)
        folder = f"{tmp}/folder"
        write_image_folder(folder, encoded_samples(Storage(data), "vis", None, "png"), "png")
        shards_ds = FRDataset(data, image_size=args.image_size)
        folder_ds = FolderDataset(folder, args.image_size)
        print(f"{len(folder_ds)} images of {shards_ds.num_classes} identities, batch {args.batch}, "
              f"FR input {args.image_size}", flush=True)
        rows = []
        for count in workers:
            shard_rate, n_shards, shard_ids = epoch(fr_loader(shards_ds, args.batch, num_workers=count))
            folder_loader = DataLoader(folder_ds, batch_size=args.batch, shuffle=True, num_workers=count,
                                       generator=torch.Generator().manual_seed(0))
            folder_rate, n_folder, folder_ids = epoch(folder_loader)
            assert n_shards == n_folder == len(folder_ds)
            row = {"workers": count, "shards_img_s": shard_rate, "folder_img_s": folder_rate,
                   "ratio": shard_rate / folder_rate, "shards_ids_per_batch": float(shard_ids.mean()),
                   "folder_ids_per_batch": float(folder_ids.mean())}
            rows.append(row)
            print(f"workers {count}: shards {shard_rate:8.1f} img/s, folder {folder_rate:8.1f} img/s, "
                  f"ratio {row['ratio']:.2f}; identities per batch {row['shards_ids_per_batch']:.1f} vs "
                  f"{row['folder_ids_per_batch']:.1f}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = {"images": len(folder_ds), "batch": args.batch, "image_size": args.image_size, "load_1min": load,
              "rows": rows}
    write_record(args.json, result)
    return 0
