"""The WebDataset output format: one POSIX tar per shard, its samples as `{key}.{member}` files.

Writing: encode a batch of samples, tar it reproducibly, publish atomically. Order of publication:
the tar (atomic, under its final name), then `manifest/{NNNNNN}.parquet`, then `done/{NNNNNN}.json`.
A crash at any point leaves either a complete shard with its marker or files without a marker, which
count as absent and are rewritten byte-for-byte identically on the next run.

Reproducibility: tar headers carry fixed metadata (mtime 0, uid/gid 0, empty owner names, mode
0o644, USTAR), images are encoded by the shared codec, and parquet uses fixed writer options. Output
bytes then depend only on the input arrays and library versions.

Reading: members of one key are contiguous in the tar, so a shard streams sample by sample.
Member names follow the webdataset library's convention (`cls`, `json`, `vis.png`, `nir.png`), so
`webdataset.WebDataset` and Hugging Face `datasets` read the shards without facegen.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from facegen.engine.dataset.codec import IMAGE_FORMATS, decode_image, iter_encoded, json_bytes, to_jsonable
from facegen.engine.dataset.manifest import (
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
from facegen.engine.dataset.samples import RawSample, Sample, ShardBatch, ShardResult
from facegen.engine.storage import Storage
from facegen.models.errors import UserError

EXTENSION = ".tar"
_VIS_MEMBERS = ("vis.png", "vis.jpg", "vis.webp")
_TAR_MTIME = 0  # fixed: a rerun must not depend on the clock


def shard_file_name(name: str, shard_id: int) -> str:
    return f"{name}-{shard_id:06d}{EXTENSION}"


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
            members = [("cls", str(int(label)).encode("ascii")), ("json", json_bytes(meta)),
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
                stats: dict[str, Any] | None = None, workers: int | None = None,
                guard: Callable[[], None] | None = None) -> ShardResult:
    """Write shard `shard_id`: tar, then manifest, then the completion marker (each atomic).

    `jpeg_quality` applies to JPEG and WebP. Rewriting the same batch yields identical bytes.
    `guard` runs before the old marker is removed and before the new one is written (the only
    writes that change what the dataset holds); it raises to stop a writer that may not publish.
    """
    guard = guard or (lambda: None)
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
    guard()
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
    guard()
    marker = {
        "format_version": MARKER_VERSION, "shard_id": shard_id, "shard_file": shard_file,
        "sha256": sha256, "num_bytes": num_bytes, "num_samples": n, "first_key": keys[0],
        "last_key": keys[-1], "image_format": vis_ext, "has_nir": batch.nir is not None,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "stats": to_jsonable(stats or {}, nonfinite="null", where="stats"),
    }
    write_marker(storage, shard_id, marker)
    return ShardResult(shard_id, shard_file, sha256, num_bytes, n, marker)


@dataclass(frozen=True)
class WebDatasetWriter:
    """The shard writer for `output.format: webdataset` (settings from the output spec)."""

    name: str = "facegen"
    image_format: str = "png"
    jpeg_quality: int = 95
    png_compress_level: int = 1

    def write(self, storage: Storage, shard_id: int, batch: ShardBatch, *, stats: dict[str, Any] | None = None,
              workers: int | None = None, guard: Callable[[], None] | None = None) -> ShardResult:
        return write_shard(storage, shard_id, batch, name=self.name, image_format=self.image_format,
                           jpeg_quality=self.jpeg_quality, png_compress_level=self.png_compress_level,
                           stats=stats, workers=workers, guard=guard)


# -- reading -----------------------------------------------------------------------------------
def iter_raw(storage: Storage, shard_file: str) -> Iterator[RawSample]:
    """Undecoded samples of one shard, streaming (members of a key are contiguous)."""
    key, members = None, {}
    with storage.open(shard_path(shard_file)) as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            member_key, _, ext = info.name.partition(".")
            if members and member_key != key:
                yield shard_file, key, members
                members = {}
            key = member_key
            members[ext] = tar.extractfile(info).read()
    if members:
        yield shard_file, key, members


def decode_sample(raw: RawSample) -> Sample:
    """Decode one raw sample; a missing or corrupt member is a UserError naming shard and key."""
    shard_file, key, members = raw
    where = f"{shard_file}:{key}"
    vis_ext = next((ext for ext in _VIS_MEMBERS if ext in members), None)
    if vis_ext is None or "cls" not in members:
        raise UserError(f"{where}: sample lacks a vis image or a .cls label (has {sorted(members)})")
    try:
        label = int(members["cls"].decode("ascii"))
        meta = json.loads(members["json"]) if "json" in members else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: unreadable .cls or .json ({err})") from err
    vis = decode_image(members[vis_ext], "RGB", f"{where}.{vis_ext}")
    nir = decode_image(members["nir.png"], "L", f"{where}.nir.png") if "nir.png" in members else None
    sample = int(meta.get("sample", key.rsplit("_", 1)[-1]))
    return Sample(key, label, sample, vis, nir, meta)


class WebDatasetReader:
    """The shard reader for tar shards: raw samples streamed from the tar, decoded separately (so
    callers can decode on a thread pool)."""

    extension = EXTENSION

    def iter_raw(self, storage: Storage, shard_file: str) -> Iterator[RawSample]:
        return iter_raw(storage, shard_file)

    def decode(self, raw: RawSample) -> Sample:
        return decode_sample(raw)
