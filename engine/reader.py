"""Reading a dataset back: samples, decoded batches, the manifest, single members by byte range.

Only complete shards (with a `done/` marker) are part of the dataset; a tar without a marker is
an interrupted write and is never read.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from facegen.engine.manifest import FIXED_SCHEMA, completed_shards, manifest_path, shard_path
from facegen.engine.shards import ShardBatch, default_workers
from facegen.engine.storage import Storage
from facegen.models.errors import UserError

_VIS_EXTS = ("vis.png", "vis.jpg", "vis.webp")


@dataclass
class Sample:
    key: str
    label: int
    sample: int
    vis: np.ndarray  # uint8 HxWx3
    nir: np.ndarray | None  # uint8 HxW
    meta: dict[str, Any]


RawSample = tuple[str, str, dict[str, bytes]]  # (shard file, key, member extension -> bytes)


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


def _decode_image(data: bytes, mode: str, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image if image.mode == mode else image.convert(mode))
    except (OSError, ValueError) as err:  # PIL reports corrupt data as OSError
        raise UserError(f"{where}: cannot decode image ({err})") from err


def decode_sample(raw: RawSample) -> Sample:
    """Decode one raw sample; a missing or corrupt member is a UserError naming shard and key."""
    shard_file, key, members = raw
    where = f"{shard_file}:{key}"
    vis_ext = next((ext for ext in _VIS_EXTS if ext in members), None)
    if vis_ext is None or "cls" not in members:
        raise UserError(f"{where}: sample lacks a vis image or a .cls label (has {sorted(members)})")
    try:
        label = int(members["cls"].decode("ascii"))
        meta = json.loads(members["json"]) if "json" in members else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: unreadable .cls or .json ({err})") from err
    vis = _decode_image(members[vis_ext], "RGB", f"{where}.{vis_ext}")
    nir = _decode_image(members["nir.png"], "L", f"{where}.nir.png") if "nir.png" in members else None
    sample = int(meta.get("sample", key.rsplit("_", 1)[-1]))
    return Sample(key, label, sample, vis, nir, meta)


def iter_shard(storage: Storage, shard_file: str) -> Iterator[Sample]:
    """Decoded samples of one shard file (`name-NNNNNN.tar` or `shards/name-NNNNNN.tar`)."""
    for raw in iter_raw(storage, shard_file):
        yield decode_sample(raw)


def iter_dataset(storage: Storage) -> Iterator[Sample]:
    """Every sample of every complete shard, in shard-id order."""
    for marker in completed_shards(storage).values():
        yield from iter_shard(storage, marker["shard_file"])


def _stack(samples: list[Sample]) -> ShardBatch:
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


def iter_batches(storage: Storage, batch_size: int, *, workers: int | None = None) -> Iterator[ShardBatch]:
    """The dataset as stacked `ShardBatch`es of `batch_size` (the last may be smaller).

    Batches run across shard boundaries; images decode on a thread pool (Pillow releases the GIL).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    raws = (raw for m in completed_shards(storage).values() for raw in iter_raw(storage, m["shard_file"]))
    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="decode") as pool:
        chunk: list[RawSample] = []
        for raw in raws:
            chunk.append(raw)
            if len(chunk) == batch_size:
                yield _stack(list(pool.map(decode_sample, chunk)))
                chunk = []
        if chunk:
            yield _stack(list(pool.map(decode_sample, chunk)))


def read_manifest(storage: Storage) -> pa.Table:
    """Manifest rows of all complete shards, in shard-id order (metadata columns unified)."""
    paths = [manifest_path(i) for i in completed_shards(storage)]
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(path))) for path in paths]
    if not tables:
        return FIXED_SCHEMA.empty_table()
    # "permissive": a column that is int in one shard and float in another unifies to float.
    return pa.concat_tables(tables, promote_options="permissive")


def read_member(storage: Storage, shard_file: str, offset: int, size: int) -> bytes:
    """One member's bytes by its manifest byte range (a ranged GET on object stores)."""
    data = storage.fs.cat_file(storage.path(shard_path(shard_file)), start=offset, end=offset + size)
    if len(data) != size:
        raise UserError(f"{storage.url(shard_path(shard_file))}: byte range {offset}+{size} is past the end")
    return data
