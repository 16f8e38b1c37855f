"""Reading a dataset back: samples, decoded batches, the manifest, single members by byte range.

Only complete shards (with a `done/` marker) are part of the dataset; a shard without a marker is
an interrupted write and is never read. Each shard is read by its format's reader (`formats.py`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from facegen.engine.dataset.codec import default_workers
from facegen.engine.dataset.formats import ShardReader, shard_reader
from facegen.engine.dataset.manifest import FIXED_SCHEMA, completed_shards, manifest_path, shard_path
from facegen.engine.dataset.samples import RawSample, Sample, ShardBatch, stack_samples
from facegen.engine.storage import Storage
from facegen.models.errors import UserError


def iter_shard(storage: Storage, shard_file: str) -> Iterator[Sample]:
    """Decoded samples of one shard file (`name-NNNNNN.tar` or `shards/name-NNNNNN.tar`)."""
    reader = shard_reader(shard_file)
    for raw in reader.iter_raw(storage, shard_file):
        yield reader.decode(raw)


def iter_dataset(storage: Storage) -> Iterator[Sample]:
    """Every sample of every complete shard, in shard-id order."""
    for marker in completed_shards(storage).values():
        yield from iter_shard(storage, marker["shard_file"])


def iter_batches(storage: Storage, batch_size: int, *, workers: int | None = None) -> Iterator[ShardBatch]:
    """The dataset as stacked `ShardBatch`es of `batch_size` (the last may be smaller).

    Batches run across shard boundaries; images decode on a thread pool (Pillow releases the GIL).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    files = [m["shard_file"] for m in completed_shards(storage).values()]
    raws = ((shard_reader(f), raw) for f in files for raw in shard_reader(f).iter_raw(storage, f))
    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="decode") as pool:
        chunk: list[tuple[ShardReader, RawSample]] = []
        for item in raws:
            chunk.append(item)
            if len(chunk) == batch_size:
                yield stack_samples(list(pool.map(_decode, chunk)))
                chunk = []
        if chunk:
            yield stack_samples(list(pool.map(_decode, chunk)))


def _decode(item: tuple[ShardReader, RawSample]) -> Sample:
    reader, raw = item
    return reader.decode(raw)


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
