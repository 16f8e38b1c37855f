"""Where enrolled embeddings come from: the original's identity_features.json, embedding tables, or
image folders embedded here. Each returns an `EmbeddingSource` (raw, not yet normalised, vectors
with identity and file labels, plus every input it skipped and why).

Identity labels are strings: the part of the file name before the first '_' (`{identity}_{sample}.ext`,
ArcBiFaceGAN's training-set naming). File labels are paths relative to the source (the JSON key, or `VIS/0001_03.png`).
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps

from facegen.engine.index.features_json import identity_feature_blocks, identity_of_name
from facegen.engine.progress import progress_bar
from facegen.engine.storage import Storage
from facegen.models.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
BAD_NAME = "file name is not {identity}_{sample}.ext"


@dataclass
class EmbeddingSource:
    embeddings: np.ndarray  # float32 [M, dim], as produced (normalised later by build_index)
    identities: np.ndarray  # object [M] of str
    files: np.ndarray  # object [M] of str
    description: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def skipped_by_reason(self) -> dict[str, int]:
        """Counts of skipped inputs by reason (the reason's text before any ':' detail)."""
        return dict(Counter(reason.split(":")[0] for _, reason in self.skipped))


def _read_bytes(path: str, storage_options: dict | None) -> bytes:
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as handle:
            return handle.read()
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None


# ------------------------------------------------------------------------ identity_features.json
def embeddings_from_identity_features(path: str, storage_options: dict | None = None) -> EmbeddingSource:
    """The original's `identity_features.json`: {"<VIS file name>": [floats], ...} (raw features, file
    order), read entry by entry (engine/index/features_json.py; `identity_feature_blocks` streams it)."""
    blocks = list(identity_feature_blocks(path, storage_options))
    return EmbeddingSource(np.concatenate([b[0] for b in blocks]),
                           np.asarray([i for b in blocks for i in b[1]], dtype=object),
                           np.asarray([f for b in blocks for f in b[2]], dtype=object),
                           f"identity_features.json {path}")


# ---------------------------------------------------------------------------------- tables
def embeddings_from_table(path: str, storage_options: dict | None = None) -> EmbeddingSource:
    """A parquet table (columns embedding: list<float>, identity, file) or a `.npy` matrix with a
    sidecar `<stem>.labels.csv` (header `identity,file`) or `<stem>.labels.parquet`, one row per row."""
    if path.endswith(".parquet"):
        return _from_parquet(path, storage_options)
    if path.endswith(".npy"):
        return _from_npy(path, storage_options)
    raise UserError(f"{path}: an embedding table must be a .parquet file or a .npy matrix")


def _from_parquet(path: str, storage_options: dict | None) -> EmbeddingSource:
    try:
        table = pq.read_table(io.BytesIO(_read_bytes(path, storage_options)))
    except pa.ArrowInvalid as err:
        raise UserError(f"{path}: not a readable parquet file ({err})") from None
    missing = sorted({"embedding", "identity", "file"} - set(table.column_names))
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; need embedding (list<float>), identity, file")
    column = table.column("embedding").combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)):
        raise UserError(f"{path}: column 'embedding' must be a list of floats, not {column.type}")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if column.null_count or len(set(lengths.tolist())) != 1:
        raise UserError(f"{path}: every 'embedding' must be a list of the same length (found "
                        f"{sorted(set(lengths.tolist()))[:5]}, {column.null_count} nulls)")
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    embeddings = flat.reshape(table.num_rows, int(lengths[0]))
    return EmbeddingSource(embeddings, _labels(table, "identity", path), _labels(table, "file", path),
                           f"table {path}")


def _labels(table: pa.Table, name: str, path: str) -> np.ndarray:
    column = table.column(name)
    if column.null_count:
        raise UserError(f"{path}: column '{name}' has {column.null_count} empty values")
    return np.asarray([str(v) for v in column.to_pylist()], dtype=object)


def _from_npy(path: str, storage_options: dict | None) -> EmbeddingSource:
    try:
        embeddings = np.load(io.BytesIO(_read_bytes(path, storage_options)), allow_pickle=False)
    except ValueError as err:
        raise UserError(f"{path}: not a numeric .npy matrix ({err})") from None
    if embeddings.ndim != 2:
        raise UserError(f"{path}: expected a [rows, dim] matrix, got shape {embeddings.shape}")
    stem = path[: -len(".npy")]
    fs, _ = fsspec.core.url_to_fs(path, **(storage_options or {}))
    csv_path, parquet_path = f"{stem}.labels.csv", f"{stem}.labels.parquet"
    if fs.exists(fsspec.core.strip_protocol(csv_path)):
        text = _read_bytes(csv_path, storage_options).decode("utf-8")
        rows = list(csv.DictReader(io.StringIO(text)))
        if rows and not {"identity", "file"} <= set(rows[0]):
            raise UserError(f"{csv_path}: needs a header with columns identity,file")
        identities = np.asarray([r["identity"] for r in rows], dtype=object)
        files = np.asarray([r["file"] for r in rows], dtype=object)
        labels_path = csv_path
    elif fs.exists(fsspec.core.strip_protocol(parquet_path)):
        table = pq.read_table(io.BytesIO(_read_bytes(parquet_path, storage_options)))
        identities, files = _labels(table, "identity", parquet_path), _labels(table, "file", parquet_path)
        labels_path = parquet_path
    else:
        raise UserError(f"{path}: a .npy matrix needs its labels in {csv_path} or {parquet_path}")
    if len(identities) != embeddings.shape[0]:
        raise UserError(f"{labels_path}: {len(identities)} label rows for {embeddings.shape[0]} embeddings")
    return EmbeddingSource(embeddings.astype(np.float32), identities, files, f"table {path}")


# ---------------------------------------------------------------------------------- images
def list_images(folder: Storage, include_nir: bool | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative paths of the images to embed (VIS/ and, when present or asked, NIR/; else the flat
    folder), and the files skipped because they are not images. `include_nir` None: NIR/ when it exists."""
    has_vis = folder.exists("VIS")
    if include_nir is None:
        include_nir = has_vis and folder.exists("NIR")
    subfolders = ["VIS", "NIR"] if include_nir else ["VIS"]
    if not has_vis:
        if include_nir:
            raise UserError(f"{folder.url()}: --nir needs the VIS/ and NIR/ layout")
        subfolders = [""]
    paths, skipped = [], []
    for sub in subfolders:
        if sub and not folder.exists(sub):
            raise UserError(f"{folder.url(sub)}: not found")
        for name in folder.list(sub):
            relative = posixpath.join(sub, name) if sub else name
            if folder.fs.isdir(folder.path(relative)):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(relative)
            else:
                skipped.append((relative, "not an image file (extension)"))
    return paths, skipped


# PIL modes holding more than 8 bits per sample, and the full-scale value each is scaled from.
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0}


def _wide_to_uint8(image: Image.Image) -> np.ndarray:
    """A 16-bit / 32-bit integer or float single-channel image -> uint8, scaled to its full range
    (a 16-bit white is 65535, so values are divided, never clipped at 255)."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode in _WIDE_MODES:
        full = _WIDE_MODES[image.mode]
    elif image.mode == "F":
        top = float(np.nanmax(values)) if values.size else 0.0
        full = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
    else:  # "I": 32-bit integers, in practice 16-bit data (PNG/TIFF); wider data uses its own maximum
        top = float(values.max()) if values.size else 0.0
        full = 65535.0 if top <= 65535.0 else top
    return np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)


def image_to_rgb8(image: Image.Image) -> np.ndarray:
    """Any PIL image -> HWC uint8 RGB as a viewer shows it: EXIF orientation applied, 16-bit and
    float data scaled to 8 bits, palette/greyscale/CMYK converted, alpha composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_MODES or image.mode in ("I", "F"):
        grey = _wide_to_uint8(image)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"))


def decode_image(folder: Storage, relative: str) -> np.ndarray | str:
    """CHW uint8 RGB (NIR's single channel replicated), or the reason it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(folder.read_bytes(relative))) as image:
            return np.ascontiguousarray(image_to_rgb8(image).transpose(2, 0, 1))
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data; all mean "bad file"
        return f"undecodable image: {type(err).__name__}: {err}"


def embed_image_batch(images: list[np.ndarray], embed: Any) -> np.ndarray:
    """Apply `embed` (uint8 NCHW tensor -> [n, dim] tensor) to CHW uint8 images of possibly
    different sizes: one call per distinct size, results in input order, float32 numpy."""
    out: np.ndarray | None = None
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for positions in by_shape.values():
        batch = embed(torch.from_numpy(np.stack([images[i] for i in positions])))
        batch = batch.detach().to("cpu", torch.float32).numpy()
        if out is None:
            out = np.empty((len(images), batch.shape[1]), np.float32)
        out[positions] = batch
    return out if out is not None else np.zeros((0, 0), np.float32)


@dataclass
class ImageStream:
    """An image folder's embeddings as blocks of one embedder batch each; `skipped` fills as it goes."""

    storage: Storage
    named: list[tuple[str, str]]  # (relative path, identity) of every image to embed, in order
    embedder: Any
    batch_size: int
    skipped: list[tuple[str, str]]
    skip_bad: bool
    num_workers: int = 4
    progress: bool = True

    @property
    def description(self) -> str:
        return f"images {self.storage.url()}"

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(reason.split(":")[0] for _, reason in self.skipped))

    def blocks(self) -> Iterator[tuple[np.ndarray, list[str], list[str]]]:
        """(float32 [n, dim], identities, files) per batch. Decoding runs in threads while the embedder
        runs the previous batch; a bad image fails the build (or, with skip_bad, is listed)."""
        storage, named, size = self.storage, self.named, self.batch_size
        chunks = [named[start : start + size] for start in range(0, len(named), size)]
        embedded = 0
        with progress_bar(len(named), "embedding real images", "img", self.progress) as bar, \
                ThreadPoolExecutor(max_workers=max(1, self.num_workers)) as pool:
            pending = [pool.submit(decode_image, storage, path) for path, _ in chunks[0]]
            for i, chunk in enumerate(chunks):
                decoded = [future.result() for future in pending]
                if i + 1 < len(chunks):
                    pending = [pool.submit(decode_image, storage, path) for path, _ in chunks[i + 1]]
                bad = [(item[0], image) for item, image in zip(chunk, decoded) if isinstance(image, str)]
                if bad and not self.skip_bad:
                    for future in pending:
                        future.cancel()
                    raise UserError(f"{storage.url(bad[0][0])}: {bad[0][1]}; fix or remove it, or pass "
                                    "--skip-bad to leave unreadable images out (they are then listed in index.json)")
                self.skipped += bad
                good = [(item, image) for item, image in zip(chunk, decoded) if not isinstance(image, str)]
                bar.update(len(chunk))
                if good:
                    embedded += len(good)
                    yield (embed_image_batch([image for _, image in good], self.embedder.embed),
                           [identity for (_, identity), _ in good], [path for (path, _), _ in good])
        if not embedded:
            raise UserError(f"{storage.url()}: none of {len(named)} images could be decoded")


def image_stream(folder: str | Storage, embedder: Any, batch_size: int = 64, *,
                 include_nir: bool | None = False, storage_options: dict | None = None,
                 num_workers: int = 4, progress: bool = True,
                 require_identity: bool = True, skip_bad: bool = False) -> ImageStream:
    """The images under `folder` (VIS/ and NIR/ with include_nir, None: NIR/ when present; or a flat
    folder), listed and name-checked now, embedded batch by batch as `blocks()` is read.

    An image that cannot be decoded or (with `require_identity`) is not named
    `{identity}_{sample}.ext` fails the build naming the file: an enrolled person who silently
    drops out is a person the privacy test no longer protects. With `skip_bad` such files are
    skipped and listed with their reason instead. Files without an image extension are always
    skipped and listed.
    """
    if batch_size <= 0:
        raise UserError(f"--batch: {batch_size} must be positive")
    storage = folder if isinstance(folder, Storage) else Storage(str(folder), storage_options)
    if not storage.exists():
        raise UserError(f"{storage.url()}: image folder not found")
    paths, skipped = list_images(storage, include_nir)
    named = [(p, identity_of_name(p)) for p in paths]
    if require_identity:
        badly_named = [p for p, identity in named if identity is None]
        if badly_named and not skip_bad:
            raise UserError(f"{storage.url(badly_named[0])}: {BAD_NAME} ({len(badly_named)} such file(s)); "
                            "rename them, or pass --skip-bad to leave them out")
        skipped += [(p, BAD_NAME) for p in badly_named]
        named = [(p, identity) for p, identity in named if identity is not None]
    else:
        named = [(p, identity or "") for p, identity in named]
    if not named:
        wanted = "named {identity}_{sample}.ext " if require_identity else ""
        raise UserError(f"{storage.url()}: no images {wanted}found")
    return ImageStream(storage, named, embedder, batch_size, skipped, skip_bad, num_workers, progress)


def embeddings_from_images(folder: str | Storage, embedder: Any, batch_size: int = 64, **options: Any
                           ) -> EmbeddingSource:
    """Every image of `image_stream(folder, embedder, batch_size, **options)` embedded, in one matrix
    (queries; enrolment streams the blocks into the index instead)."""
    stream = image_stream(folder, embedder, batch_size, **options)
    blocks = list(stream.blocks())
    return EmbeddingSource(np.concatenate([b[0] for b in blocks]),
                           np.asarray([i for b in blocks for i in b[1]], dtype=object),
                           np.asarray([f for b in blocks for f in b[2]], dtype=object),
                           stream.description, stream.skipped)
