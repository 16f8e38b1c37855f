"""Verification pairs: LFW-style `pairs.txt` over an image folder, or pairs drawn from a dataset's shards
or from a VIS/NIR image folder (`facegen world render`'s layout).

pairs.txt (LFW, "View 2"): an optional header line of numbers (folds, pairs per fold), then one pair
per line: `name i j` (the same person, images i and j) or `name1 i name2 j` (different people),
images at `DIR/name/name_{i:04d}.jpg` (any image extension).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from facegen.engine.dataset.reader import read_manifest, read_member
from facegen.engine.frdata.folder import FolderCatalog, is_image_folder
from facegen.engine.storage import Storage
from facegen.models.errors import UserError

_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class Pairs:
    """Pairs as indices into `images` (unique image references), with same-person flags."""

    images: list  # paths, or (shard file, offset, size) byte ranges
    first: np.ndarray
    second: np.ndarray
    issame: np.ndarray
    source: str


def _image_path(folder: str, name: str, number: str, where: str) -> str:
    stem = os.path.join(folder, name, f"{name}_{int(number):04d}")
    for ext in _EXTENSIONS:
        if os.path.isfile(stem + ext):
            return stem + ext
    raise UserError(f"{where}: no image {stem}.jpg (or .png, ...)")


def read_lfw_pairs(pairs_file: str, images_dir: str) -> Pairs:
    try:
        with open(pairs_file, encoding="utf-8") as handle:
            lines = [line.split() for line in handle if line.strip()]
    except FileNotFoundError:
        raise UserError(f"{pairs_file}: pairs file not found") from None
    if lines and all(field.isdigit() for field in lines[0]) and len(lines[0]) <= 2:
        lines = lines[1:]  # header: folds and pairs per fold
    index: dict[str, int] = {}
    first, second, same = [], [], []
    for number, fields in enumerate(lines, start=1):
        where = f"{pairs_file}:{number}"
        try:
            if len(fields) == 3:
                a, b = (fields[0], fields[1]), (fields[0], fields[2])
            elif len(fields) == 4:
                a, b = (fields[0], fields[1]), (fields[2], fields[3])
            else:
                raise ValueError
            paths = [_image_path(images_dir, name, n, where) for name, n in (a, b)]
        except ValueError:
            raise UserError(f"{where}: expected 'name i j' or 'name1 i name2 j', got {' '.join(fields)!r}") from None
        ids = [index.setdefault(path, len(index)) for path in paths]
        first.append(ids[0])
        second.append(ids[1])
        same.append(len(fields) == 3)
    if not same:
        raise UserError(f"{pairs_file}: no pairs")
    return Pairs(list(index), np.array(first), np.array(second), np.array(same), pairs_file)


def dataset_pairs(uri: str, genuine: int, impostor: int, seed: int = 0, storage_options: dict | None = None,
                  mode: str = "vis") -> Pairs:
    """`genuine` same-identity pairs (two different samples) and `impostor` pairs of different
    identities, drawn with a seeded generator from the dataset's complete shards (or, for a VIS/NIR
    image folder, its files, labelled by their identity prefix); mode vis or nir."""
    storage = Storage(uri, storage_options)
    if is_image_folder(storage):
        catalog = FolderCatalog(uri, storage_options)
        if mode == "nir" and not catalog.has_nir:
            raise UserError(f"{uri}: mode nir, but the folder has no NIR/")
        labels = catalog.identities
        refs = [f"{mode.upper()}/{name}" for name in catalog.names.tolist()]
        rows, first, second, same = draw_pairs(labels, genuine, impostor, np.random.default_rng(seed), uri)
        return Pairs([refs[r] for r in rows], first, second, same, uri)
    table = read_manifest(storage)
    if table.num_rows == 0:
        raise UserError(f"{uri}: no complete shards")
    if mode == "nir" and table["nir_offset"].null_count:
        raise UserError(f"{uri}: mode nir, but the dataset has no NIR images")
    rows, first, second, same = draw_pairs(table["label"].to_numpy(), genuine, impostor,
                                           np.random.default_rng(seed), uri)
    shard = table["shard"].to_numpy(zero_copy_only=False)
    offset, size = table[f"{mode}_offset"].to_numpy(), table[f"{mode}_size"].to_numpy()
    images = [(str(shard[r]), int(offset[r]), int(size[r])) for r in rows]
    return Pairs(images, first, second, same, uri)


def draw_pairs(labels: np.ndarray, genuine: int, impostor: int, rng: np.random.Generator,
               where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows used, first, second, issame): pairs as indices into `rows`, genuine and impostor interleaved."""
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.unique(labels))
    counts = np.diff(np.append(starts, len(labels)))
    multi = np.nonzero(counts >= 2)[0]
    if genuine and not len(multi):
        raise UserError(f"{where}: no identity has two samples, so there are no genuine pairs")
    if impostor and len(starts) < 2:
        raise UserError(f"{where}: one identity only, so there are no impostor pairs")
    group = rng.choice(multi, genuine) if genuine else np.zeros(0, np.int64)
    a = rng.integers(0, counts[group])
    b = (a + rng.integers(1, counts[group])) % counts[group]  # a different sample of the same identity
    g1, g2 = order[starts[group] + a], order[starts[group] + b]
    x = rng.integers(0, len(starts), impostor)
    y = (x + rng.integers(1, len(starts), impostor)) % len(starts)  # a different identity
    i1 = order[starts[x] + rng.integers(0, counts[x])]
    i2 = order[starts[y] + rng.integers(0, counts[y])]
    first, second = np.concatenate([g1, i1]), np.concatenate([g2, i2])
    same = np.arange(len(first)) < genuine
    mix = rng.permutation(len(first))  # folds are contiguous: interleave genuine and impostor pairs
    rows = np.unique(np.concatenate([first, second]))
    remap = np.searchsorted(rows, np.stack([first[mix], second[mix]]))
    return rows, remap[0], remap[1], same[mix]


def load_images(pairs: Pairs, indices: list[int], size: int, storage: Storage | None) -> torch.Tensor:
    """uint8 NCHW RGB images `indices` of `pairs.images`, resized to `size` where they are not."""
    arrays = []
    for i in indices:
        ref = pairs.images[i]
        if isinstance(ref, tuple):
            data = read_member(storage, *ref)
        else:  # a folder dataset's file relative to `storage`, or an LFW image path
            data = storage.read_bytes(ref) if storage is not None else open(ref, "rb").read()
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert("RGB")
                if image.size != (size, size):
                    image = image.resize((size, size), Image.BILINEAR)
                arrays.append(np.asarray(image))
        except OSError as err:
            raise UserError(f"{ref}: cannot decode image ({err})") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def pair_scores(pairs: Pairs, embedder, storage: Storage | None = None, batch_size: int = 64,
                flip: bool = False) -> np.ndarray:
    """Cosine similarity of each pair; every image embedded once (flip: plus its mirror, summed, as
    insightface's verification does)."""
    embeddings = []
    for start in range(0, len(pairs.images), batch_size):
        batch = load_images(pairs, list(range(start, min(start + batch_size, len(pairs.images)))),
                            embedder.input_size, storage)
        emb = embedder.embed(batch)
        if flip:
            emb = torch.nn.functional.normalize(emb + embedder.embed(batch.flip(3)), dim=1)
        embeddings.append(emb.cpu())
    matrix = torch.cat(embeddings).numpy().astype(np.float64)
    return np.einsum("ij,ij->i", matrix[pairs.first], matrix[pairs.second])
