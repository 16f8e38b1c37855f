"""Writing WebDataset tar shards: encode a batch of samples, tar it reproducibly, publish atomically.

`write_shard` is the only way a shard comes into existence. Order of publication: the tar (atomic,
under its final name), then `manifest/{NNNNNN}.parquet`, then `done/{NNNNNN}.json`. A crash at any
point leaves either a complete shard with its marker or files without a marker, which count as
absent and are rewritten byte-for-byte identically on the next run.

Reproducibility: tar headers carry fixed metadata (mtime 0, uid/gid 0, empty owner names, mode
0o644, USTAR), images are encoded with fixed encoder settings and no metadata chunks, and parquet
uses fixed writer options. Output bytes then depend only on the input arrays and library versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from PIL import Image

from facegen.engine.manifest import (
    FIXED_SCHEMA,
    MARKER_VERSION,
    MEMBER_FIELDS,
    build_manifest,
    manifest_path,
    marker_path,
    parquet_bytes,
    shard_path,
    write_marker,
)
from facegen.engine.storage import Storage

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
_TAR_MTIME = 0  # fixed: a rerun must not depend on the clock


def sample_key(identity: int, sample: int) -> str:
    """WebDataset key; no dots (readers split the member name at the first dot)."""
    return f"{identity:08d}_{sample:03d}"


def shard_file_name(name: str, shard_id: int) -> str:
    return f"{name}-{shard_id:06d}.tar"


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
    shard_id: int
    shard_file: str  # file name under shards/
    sha256: str
    num_bytes: int
    num_samples: int
    marker: dict[str, Any]


# -- JSON -------------------------------------------------------------------------------------
def to_jsonable(obj: Any, *, nonfinite: str = "raise", where: str = "metadata") -> Any:
    """Plain-Python copy of `obj` (numpy scalars/arrays converted, keys as str).

    Non-finite floats raise (`nonfinite="raise"`) or become None (`"null"`): JSON has no NaN.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, nonfinite=nonfinite, where=f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        items = obj.tolist() if isinstance(obj, np.ndarray) else obj
        return [to_jsonable(v, nonfinite=nonfinite, where=where) for v in items]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        if nonfinite == "null":
            return None
        raise ValueError(f"{where}: non-finite value {obj} cannot be stored as JSON")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: {type(obj).__name__} is not JSON-serialisable")


def _json_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


# -- image encoding ---------------------------------------------------------------------------
def default_workers() -> int:
    """CPU cores this process may use (affinity-aware, so Ray's CPU pinning is respected)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(16, cores or 1))


def encode_image(array: np.ndarray, image_format: str = "png", *, quality: int = 95,
                 png_compress_level: int = 1) -> bytes:
    """One uint8 HxW (mode L) or HxWx3 (RGB) image, with fixed settings and no metadata chunks."""
    pil_format = IMAGE_FORMATS[image_format]
    options: dict[str, Any] = {"format": pil_format}
    if pil_format == "PNG":
        options.update(compress_level=png_compress_level, optimize=False)
    elif pil_format == "JPEG":
        options.update(quality=quality, subsampling="4:2:0", optimize=False, progressive=False)
    else:
        options.update(quality=quality, method=4, lossless=False)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, **options)
    return buffer.getvalue()


def _encode_sample(batch: ShardBatch, index: int, image_format: str, quality: int,
                   png_compress_level: int) -> tuple[bytes, bytes | None]:
    vis = encode_image(batch.vis[index], image_format, quality=quality, png_compress_level=png_compress_level)
    nir = None
    if batch.nir is not None:  # NIR is always lossless PNG (mode L)
        nir = encode_image(batch.nir[index], "png", png_compress_level=png_compress_level)
    return vis, nir


def iter_encoded(batch: ShardBatch, image_format: str = "png", *, quality: int = 95,
                 png_compress_level: int = 1, workers: int | None = None
                 ) -> Iterator[tuple[bytes, bytes | None]]:
    """(vis, nir) encoded bytes per sample, in order, encoded on a thread pool.

    Pillow releases the GIL while compressing, so threads scale with cores (docs/dataset-format.md
    has the measurements) without copying the arrays into worker processes.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format: must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    workers = min(workers or default_workers(), len(batch))
    if workers == 1:  # no pool: nothing to overlap with
        for i in range(len(batch)):
            yield _encode_sample(batch, i, image_format, quality, png_compress_level)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encode") as pool:
        futures = [pool.submit(_encode_sample, batch, i, image_format, quality, png_compress_level)
                   for i in range(len(batch))]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:  # on failure or early exit, do not encode the rest for nothing
                future.cancel()


# -- tar ---------------------------------------------------------------------------------------
class _HashingWriter:
    """File-like wrapper that hashes and counts what tarfile writes through it."""

    def __init__(self, handle: IO[bytes]):
        self.handle, self.sha256, self.num_bytes = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.handle.write(data)
        self.sha256.update(data)
        self.num_bytes += len(data)
        return len(data)

    def tell(self) -> int:
        return self.num_bytes


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    """Append one regular file with fixed header fields; returns (data offset, size) in the tar."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))
    padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return tar.offset - padded, len(data)


def _sample_metas(batch: ShardBatch) -> list[dict[str, Any]]:
    """Caller metadata, normalised, with identity and sample filled in (and checked)."""
    metas = []
    for key, label, sample, meta in zip(batch.keys(), batch.labels, batch.samples, batch.metas):
        meta = to_jsonable(meta, where=f"{key}.json")
        for name, value in (("identity", int(label)), ("sample", int(sample))):
            if meta.setdefault(name, value) != value:
                raise ValueError(f"{key}.json: {name}={meta[name]!r} disagrees with the batch ({value})")
        metas.append(meta)
    return metas


def _write_tar(handle: IO[bytes], batch: ShardBatch, metas: list[dict[str, Any]], vis_ext: str,
               encoded: Iterator[tuple[bytes, bytes | None]]) -> tuple[dict[str, list], str, int]:
    """Stream the samples into `handle`; returns member offsets per field, sha256 and size."""
    writer = _HashingWriter(handle)
    offsets: dict[str, list] = {f"{m}_{p}": [] for m in MEMBER_FIELDS for p in ("offset", "size")}
    with tarfile.open(fileobj=writer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, label, meta, (vis, nir) in zip(batch.keys(), batch.labels, metas, encoded):
            # Members of a sample in sorted name order: cls, json, nir, vis.
            members = [("cls", str(int(label)).encode("ascii")), ("json", _json_bytes(meta)),
                       ("nir", nir), ("vis", vis)]
            for field_name, data in members:
                offset, size = (None, None)
                if data is not None:
                    ext = {"nir": "nir.png", "vis": f"vis.{vis_ext}"}.get(field_name, field_name)
                    offset, size = _add_member(tar, f"{key}.{ext}", data)
                offsets[f"{field_name}_offset"].append(offset)
                offsets[f"{field_name}_size"].append(size)
    return offsets, writer.sha256.hexdigest(), writer.num_bytes


# -- the public entry point -------------------------------------------------------------------
def write_shard(storage: Storage, shard_id: int, batch: ShardBatch, *, name: str = "facegen",
                image_format: str = "png", jpeg_quality: int = 95, png_compress_level: int = 1,
                stats: dict[str, Any] | None = None, workers: int | None = None) -> ShardResult:
    """Write shard `shard_id`: tar, then manifest, then the completion marker (each atomic).

    `jpeg_quality` applies to JPEG and WebP. Rewriting the same batch yields identical bytes.
    """
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"shard name: letters, digits, '_' and '-' only, got {name!r}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format: must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    keys = batch.keys()
    if len(set(keys)) != len(keys):
        raise ValueError(f"shard {shard_id}: duplicate sample keys")
    vis_ext = "jpg" if image_format == "jpeg" else image_format
    shard_file = shard_file_name(name, shard_id)
    # A stale marker must not vouch for the files about to be replaced.
    storage.delete(marker_path(shard_id))

    # Phase 1: the tar, encoded while it streams into a temp file; published only when whole.
    metas = _sample_metas(batch)
    encoded = iter_encoded(batch, image_format, quality=jpeg_quality,
                           png_compress_level=png_compress_level, workers=workers)
    with contextlib.closing(encoded), storage.atomic_writer(shard_path(shard_file)) as handle:
        offsets, sha256, num_bytes = _write_tar(handle, batch, metas, vis_ext, encoded)

    # Phase 2: the manifest, one row per sample, with the members' byte ranges inside the tar.
    height, width = batch.vis.shape[1:3]
    n = len(batch)
    fixed = {"key": keys, "label": batch.labels.tolist(), "sample": batch.samples.tolist(),
             "shard": [shard_file] * n, "shard_id": [shard_id] * n, "vis_format": [vis_ext] * n,
             "height": [height] * n, "width": [width] * n, **offsets}
    assert set(fixed) == set(FIXED_SCHEMA.names)
    manifest = parquet_bytes(build_manifest(fixed, metas))
    storage.write_bytes(manifest_path(shard_id), manifest)

    # Phase 3: the marker, last; from now on the shard exists.
    marker = {
        "format_version": MARKER_VERSION, "shard_id": shard_id, "shard_file": shard_file,
        "sha256": sha256, "num_bytes": num_bytes, "num_samples": n, "first_key": keys[0],
        "last_key": keys[-1], "image_format": vis_ext, "has_nir": batch.nir is not None,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "stats": to_jsonable(stats or {}, nonfinite="null", where="stats"),
    }
    write_marker(storage, shard_id, marker)
    return ShardResult(shard_id, shard_file, sha256, num_bytes, n, marker)
