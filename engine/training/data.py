"""Training datasets: (VIS uint8 [3,R,R], NIR uint8 [1,R,R], condition float32 [c_dim]) per item.

Two sources, detected from the folder's content:
  folder      the original's layout: VIS/, NIR/ (paired by file name) and identity_features.json
              (conditions = those raw features, in the dataset's natural file order; not normalised:
              the generator's embed layer normalises). Labels are the integer identity prefixes.
  webdataset  a `facegen generate` output: shards + manifest + identities.parquet; the condition of a
              sample is its identity's `condition` row, so a generated dataset can be a training set.

Items are decoded lazily (the DataLoader's workers parallelise); the file list, byte ranges and
conditions are read once at open. `mirror=True` doubles the length: item N+i is item i with VIS and
NIR x-flipped together (StyleGAN2-ADA's --mirror=1).
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from facegen.engine.dataset.manifest import DONE_DIR
from facegen.engine.dataset.reader import read_manifest, read_member
from facegen.engine.features import FEATURES_FILE, list_pairs
from facegen.engine.identities import IDENTITIES_FILE, read_identities
from facegen.engine.index.sources import embeddings_from_identity_features
from facegen.engine.storage import Storage
from facegen.models.errors import UserError

SHOW_NAMES = 20


def decode_pair_images(vis_bytes: bytes, nir_bytes: bytes, where: str, resolution: int | None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(VIS HxWx3, NIR HxW) uint8, resized (Lanczos, as StyleGAN2-ADA's dataset_tool) when asked.

    Refuses non-square images and VIS/NIR pairs of different sizes (they must be pixel-aligned).
    """
    images = []
    for data, mode, kind in ((vis_bytes, "RGB", "VIS"), (nir_bytes, "L", "NIR")):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image if image.mode == mode else image.convert(mode)
                image.load()
        except (OSError, ValueError) as err:  # PIL reports corrupt data as OSError
            raise UserError(f"{where} ({kind}): cannot decode image ({err})") from err
        images.append(image)
    vis, nir = images
    if vis.size != nir.size:
        raise UserError(f"{where}: VIS is {vis.size[0]}x{vis.size[1]} but NIR is {nir.size[0]}x{nir.size[1]}")
    if vis.width != vis.height:
        raise UserError(f"{where}: image is {vis.width}x{vis.height}; training images must be square")
    if resolution is not None and vis.width != resolution:
        vis = vis.resize((resolution, resolution), Image.LANCZOS)
        nir = nir.resize((resolution, resolution), Image.LANCZOS)
    return np.array(vis), np.array(nir)  # writable copies: torch refuses read-only buffers


@dataclass
class _FolderSource:
    names: list[str]

    def read(self, storage: Storage, index: int) -> tuple[bytes, bytes, str]:
        vis, nir = f"VIS/{self.names[index]}", f"NIR/{self.names[index]}"
        return storage.read_bytes(vis), storage.read_bytes(nir), storage.url(vis)

    def take(self, indices: np.ndarray) -> _FolderSource:
        return _FolderSource([self.names[i] for i in indices])


@dataclass
class _ShardSource:
    keys: np.ndarray  # object [N]
    shards: np.ndarray  # object [N] shard file names
    ranges: np.ndarray  # int64 [N, 4]: vis offset, vis size, nir offset, nir size

    def read(self, storage: Storage, index: int) -> tuple[bytes, bytes, str]:
        shard, (vis_offset, vis_size, nir_offset, nir_size) = self.shards[index], self.ranges[index]
        vis = read_member(storage, shard, int(vis_offset), int(vis_size))
        nir = read_member(storage, shard, int(nir_offset), int(nir_size))
        return vis, nir, f"{storage.url()}:{shard}:{self.keys[index]}"

    def take(self, indices: np.ndarray) -> _ShardSource:
        return _ShardSource(self.keys[indices], self.shards[indices], self.ranges[indices])


@dataclass(eq=False)
class TrainingData(torch.utils.data.Dataset):
    """Map-style dataset of aligned VIS/NIR pairs and their conditions.

    `labels` [N] and `conditions` [N, c_dim] describe the N base samples (mirroring adds no rows):
    the loop draws fake conditions as rows of `conditions` ("features of random training images").
    """

    storage: Storage
    source: Any  # _FolderSource | _ShardSource
    labels: np.ndarray  # int64 [N]
    conditions: np.ndarray  # float32 [N, c_dim]
    resolution: int
    name: str
    kind: str  # "folder" | "webdataset"
    mirror: bool = False
    resize: bool = False  # decode at another size than stored
    skipped: list[tuple[str, str]] = field(default_factory=list)  # files left out, with the reason

    @property
    def c_dim(self) -> int:
        return int(self.conditions.shape[1])

    @property
    def num_identities(self) -> int:
        return int(len(np.unique(self.labels)))

    @property
    def num_samples(self) -> int:
        """Base samples (without mirrored copies)."""
        return int(len(self.labels))

    def __len__(self) -> int:
        return self.num_samples * (2 if self.mirror else 1)

    def subset(self, size: int, seed: int) -> TrainingData:
        """`size` base samples drawn with `seed`, kept in dataset order (StyleGAN2-ADA's `max_size`:
        shuffle with RandomState(seed), take the first `size`, sort); mirroring applies after."""
        if not 1 <= size <= self.num_samples:
            raise UserError(f"data.subset: {size} must be between 1 and {self.num_samples} (the dataset's size)")
        if size == self.num_samples:
            return self
        order = np.arange(self.num_samples, dtype=np.int64)
        np.random.RandomState(seed).shuffle(order)
        keep = np.sort(order[:size])
        return dataclasses.replace(self, source=self.source.take(keep), labels=self.labels[keep],
                                   conditions=self.conditions[keep], name=self.name)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        base, flip = index % self.num_samples, index >= self.num_samples
        vis_bytes, nir_bytes, where = self.source.read(self.storage, base)
        vis, nir = decode_pair_images(vis_bytes, nir_bytes, where, self.resolution if self.resize else None)
        if vis.shape[0] != self.resolution:
            raise UserError(f"{where}: image is {vis.shape[0]}x{vis.shape[0]} but the dataset's resolution "
                            f"is {self.resolution} (pass a resolution to resize every image)")
        if flip:  # VIS and NIR flipped together: the pair stays pixel-aligned
            vis, nir = vis[:, ::-1], nir[:, ::-1]
        vis_t = torch.from_numpy(np.ascontiguousarray(vis.transpose(2, 0, 1)))
        nir_t = torch.from_numpy(np.ascontiguousarray(nir[None]))
        return vis_t, nir_t, torch.from_numpy(self.conditions[base].copy())


# -------------------------------------------------------------------------------- opening
def open_training_data(uri: str, *, resolution: int | None = None, mirror: bool = False,
                       use_conditions: bool = True, storage_options: dict | None = None) -> TrainingData:
    """Open a training set: the original's VIS/NIR folder or a facegen WebDataset dataset directory.

    `resolution` resizes images whose size differs; without it every image must have the size of the
    first. `use_conditions=False` gives c_dim 0 (an unconditional generator).
    """
    if resolution is not None and resolution <= 0:
        raise UserError(f"resolution: {resolution} must be positive")
    storage = Storage(uri, storage_options)
    if not storage.exists():
        raise UserError(f"{storage.url()}: training dataset not found")
    if storage.exists(DONE_DIR) or storage.exists(IDENTITIES_FILE):
        data = _open_webdataset(storage, use_conditions)
    elif storage.exists("VIS"):
        data = _open_folder(storage, use_conditions)
    else:
        raise UserError(f"{storage.url()}: neither a VIS/ + NIR/ folder nor a facegen dataset "
                        f"(shards with done/ markers and {IDENTITIES_FILE})")
    data.mirror = mirror
    _set_resolution(data, resolution)
    return data


def _set_resolution(data: TrainingData, resolution: int | None) -> None:
    """Native resolution from the first item; resize only when a different one is asked for."""
    vis_bytes, nir_bytes, where = data.source.read(data.storage, 0)
    native = decode_pair_images(vis_bytes, nir_bytes, where, None)[0].shape[0]
    data.resolution = resolution or native
    data.resize = resolution is not None and resolution != native


def _dataset_name(storage: Storage) -> str:
    return posixpath.basename(storage.uri.rstrip("/")) or "dataset"


def _open_folder(storage: Storage, use_conditions: bool) -> TrainingData:
    pairs = list_pairs(storage, require_nir=True)
    names, labels, skipped = pairs.names, pairs.identities, list(pairs.skipped)
    if not use_conditions:
        conditions = np.zeros((len(names), 0), np.float32)
    else:
        if not storage.exists(FEATURES_FILE):
            raise UserError(f"{storage.url(FEATURES_FILE)}: not found; run `facegen features {storage.url()} "
                            f"--embedder MODEL` first (or train without conditions)")
        source = embeddings_from_identity_features(storage.url(FEATURES_FILE), storage.storage_options)
        row_of = {str(f): i for i, f in enumerate(source.files)}
        stale = sorted(set(row_of) - set(names))
        if stale:
            raise UserError(f"{storage.url(FEATURES_FILE)}: describes files that are not image pairs of "
                            f"this dataset ({len(stale)}: {', '.join(stale[:SHOW_NAMES])}); "
                            f"re-run `facegen features`")
        # Files without a feature (undecodable when the features were computed) are left out, listed.
        has_feature = np.array([n in row_of for n in names], bool)
        skipped += [(f"VIS/{n}", f"no entry in {FEATURES_FILE}") for n in np.array(names)[~has_feature]]
        names = [n for n, ok in zip(names, has_feature) if ok]
        labels = labels[has_feature]
        conditions = source.embeddings[[row_of[n] for n in names]].astype(np.float32)
        if not names:
            raise UserError(f"{storage.url(FEATURES_FILE)}: no image of the dataset has a feature")
    return TrainingData(storage, _FolderSource(names), labels, conditions, 0, _dataset_name(storage),
                        "folder", skipped=skipped)


def _open_webdataset(storage: Storage, use_conditions: bool) -> TrainingData:
    manifest = read_manifest(storage)
    if manifest.num_rows == 0:
        raise UserError(f"{storage.url()}: the dataset has no complete shard")
    columns = {name: manifest.column(name).to_pylist() for name in
               ("key", "label", "shard", "vis_offset", "vis_size", "nir_offset", "nir_size")}
    missing_nir = [k for k, off in zip(columns["key"], columns["nir_offset"]) if off is None]
    if missing_nir:
        raise UserError(f"{storage.url()}: {len(missing_nir)} samples have no NIR image (e.g. "
                        f"{', '.join(missing_nir[:5])}); training needs VIS+NIR pairs")
    labels = np.asarray(columns["label"], np.int64)
    ranges = np.array([columns[c] for c in ("vis_offset", "vis_size", "nir_offset", "nir_size")], np.int64).T
    if use_conditions:
        if not storage.exists(IDENTITIES_FILE):
            raise UserError(f"{storage.url(IDENTITIES_FILE)}: not found; it holds the identity conditions "
                            f"(or train without conditions)")
        identities, _ = read_identities(storage)
        if labels.max() >= len(identities):
            raise UserError(f"{storage.url(IDENTITIES_FILE)}: has {len(identities)} identities but a sample "
                            f"has label {int(labels.max())}")
        conditions = identities.condition[labels].astype(np.float32)
    else:
        conditions = np.zeros((len(labels), 0), np.float32)
    source = _ShardSource(np.asarray(columns["key"], object), np.asarray(columns["shard"], object), ranges)
    return TrainingData(storage, source, labels, conditions, 0, _dataset_name(storage), "webdataset")
