"""Streamed index builds: every source read block by block into an `IndexWriter`
(engine/index/writer.py writes the shards as they fill), so `facegen index build` holds about one
shard in memory whatever the row count. This module reads embedding tables; image folders
(`sources.image_stream`) and identity_features.json (`features_json.identity_feature_blocks`) stream
their own blocks into `build_index_from_blocks`.

Tables: a `.npy` float matrix with its labels in `<stem>.labels.parquet` or `<stem>.labels.csv`
(header `identity,file`), or a `.parquet` file with columns embedding (list<float>), identity, file.
Rows are read with plain sequential reads (no memory map: mapped pages would count as the process's
memory), locally or from any fsspec store.
"""

from __future__ import annotations

import csv
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import IO, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facegen.engine.index.store import IndexInfo
from facegen.engine.index.writer import IndexWriter
from facegen.engine.storage import Storage
from facegen.models.errors import UserError

BLOCK_BYTES = 4 << 20  # rows read at once: 2,048 rows of 512 float32
Block = tuple[np.ndarray, list[str], list[str]]


@dataclass
class TableStream:
    """One table's rows as blocks; `blocks()` may be iterated once."""

    path: str
    rows: int | None  # None for parquet tables until read
    dim: int | None
    _open: Any

    def blocks(self) -> Iterator[Block]:
        return self._open()


def _fs_open(path: str, storage_options: dict | None, mode: str = "rb") -> IO:
    try:
        return fsspec.open(path, mode, **(storage_options or {})).open()
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None


def _exists(path: str, storage_options: dict | None) -> bool:
    fs, inner = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs.exists(inner)


def open_table(path: str, storage_options: dict | None = None, block_rows: int | None = None) -> TableStream:
    """`block_rows` None: as many rows as fit in BLOCK_BYTES (parquet: 2,048)."""
    if path.endswith(".npy"):
        return _npy_table(path, storage_options, block_rows)
    if path.endswith(".parquet"):
        return TableStream(path, None, None, partial(_parquet_blocks, path, storage_options, block_rows or 2048))
    raise UserError(f"{path}: an embedding table must be a .parquet file or a .npy matrix")


def _npy_header(handle: IO, path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    try:
        version = np.lib.format.read_magic(handle)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, fortran, dtype = reader[version](handle)
    except (ValueError, KeyError) as err:
        raise UserError(f"{path}: not a numeric .npy matrix ({err})") from None
    if fortran or len(shape) != 2 or dtype.kind not in "fiu" or dtype.hasobject:
        raise UserError(f"{path}: expected a C-order numeric [rows, dim] matrix, got shape {shape}, {dtype}")
    return shape, dtype, handle.tell()


def _npy_table(path: str, storage_options: dict | None, block_rows: int | None) -> TableStream:
    with _fs_open(path, storage_options) as handle:
        (rows, dim), dtype, start = _npy_header(handle, path)
    block_rows = block_rows or max(1, BLOCK_BYTES // max(1, dim * dtype.itemsize))
    stem = path[: -len(".npy")]
    csv_path, parquet_path = f"{stem}.labels.csv", f"{stem}.labels.parquet"
    if _exists(csv_path, storage_options):
        labels = partial(_csv_labels, csv_path, storage_options, block_rows)
    elif _exists(parquet_path, storage_options):
        labels = partial(_parquet_labels, parquet_path, storage_options, block_rows)
    else:
        raise UserError(f"{path}: a .npy matrix needs its labels in {csv_path} or {parquet_path}")

    def blocks() -> Iterator[Block]:
        with ExitStack() as stack:
            handle = stack.enter_context(_fs_open(path, storage_options))
            handle.seek(start)
            width = dim * dtype.itemsize
            label_blocks = _rebatch(labels(), block_rows)
            for first in range(0, rows, block_rows):
                count = min(block_rows, rows - first)
                raw = handle.read(count * width)
                if len(raw) != count * width:
                    raise UserError(f"{path}: the file ends before its {rows} rows")
                identities, files = next(label_blocks, ([], []))
                if len(identities) != count:
                    raise UserError(f"{path}: its labels hold fewer rows than its {rows} embeddings")
                yield np.frombuffer(raw, dtype).reshape(count, dim), identities, files
            if next(label_blocks, None) is not None:
                raise UserError(f"{path}: its labels hold more rows than its {rows} embeddings")

    return TableStream(path, rows, dim, blocks)


def _csv_labels(path: str, storage_options: dict | None, block_rows: int) -> Iterator[tuple[list, list]]:
    with _fs_open(path, storage_options, "rt") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"identity", "file"} <= set(reader.fieldnames):
            raise UserError(f"{path}: needs a header with columns identity,file")
        identities, files = [], []
        for row in reader:
            identities.append(row["identity"])
            files.append(row["file"])
            if len(identities) == block_rows:
                yield identities, files
                identities, files = [], []
        if identities:
            yield identities, files


def _parquet_file(path: str, storage_options: dict | None, stack: ExitStack) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(stack.enter_context(_fs_open(path, storage_options)))
    except pa.ArrowInvalid as err:
        raise UserError(f"{path}: not a readable parquet file ({err})") from None


def _label_column(batch: pa.RecordBatch, name: str, path: str) -> list[str]:
    column = batch.column(batch.schema.get_field_index(name))
    if column.null_count:
        raise UserError(f"{path}: column '{name}' has {column.null_count} empty values")
    return [str(v) for v in column.to_pylist()]


def _parquet_labels(path: str, storage_options: dict | None, block_rows: int) -> Iterator[tuple[list, list]]:
    with ExitStack() as stack:
        table = _parquet_file(path, storage_options, stack)
        missing = sorted({"identity", "file"} - set(table.schema_arrow.names))
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}")
        for batch in table.iter_batches(batch_size=block_rows, columns=["identity", "file"]):
            yield _label_column(batch, "identity", path), _label_column(batch, "file", path)


def _rebatch(blocks: Iterator[tuple[list, list]], size: int) -> Iterator[tuple[list, list]]:
    """Label blocks of exactly `size` rows (the last shorter), whatever the reader's batching."""
    identities: list[str] = []
    files: list[str] = []
    for ids, fs in blocks:
        identities += ids
        files += fs
        while len(identities) >= size:
            yield identities[:size], files[:size]
            identities, files = identities[size:], files[size:]
    if identities:
        yield identities, files


def _parquet_blocks(path: str, storage_options: dict | None, block_rows: int) -> Iterator[Block]:
    with ExitStack() as stack:
        table = _parquet_file(path, storage_options, stack)
        missing = sorted({"embedding", "identity", "file"} - set(table.schema_arrow.names))
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}; need embedding (list<float>), identity, file")
        dim = None
        for batch in table.iter_batches(batch_size=block_rows, columns=["embedding", "identity", "file"]):
            column = batch.column(0)
            if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
                    or pa.types.is_fixed_size_list(column.type)):
                raise UserError(f"{path}: column 'embedding' must be a list of floats, not {column.type}")
            lengths = set(pc.list_value_length(column).to_numpy(zero_copy_only=False).tolist())
            if column.null_count or len(lengths) != 1 or (dim is not None and lengths != {dim}):
                raise UserError(f"{path}: every 'embedding' must be a list of the same length (found "
                                f"{sorted(lengths)[:5]}, {column.null_count} nulls)")
            dim = lengths.pop()
            flat = column.flatten().to_numpy(zero_copy_only=False)
            yield (flat.reshape(len(batch), dim), _label_column(batch, "identity", path),
                   _label_column(batch, "file", path))


def build_index_from_blocks(blocks: Iterable[Block], out: Storage, *, expected_dim: int | None = None,
                           info_fields: Callable[[], dict] | dict | None = None,
                           count_identities: Counter | None = None, embedder_name: str = "the embedder",
                           **writer_options: Any) -> IndexInfo:
    """Write every (embeddings, identities, files) block of a source through an `IndexWriter`: memory
    holds about one shard plus one block. `expected_dim`: the embedder's width, checked on every block.
    `info_fields` (or a function giving them once the source is read: what it skipped) go to index.json.
    `count_identities` counts rows per identity as they pass (for the build's summary); `embedder_name`
    names the embedder in a width mismatch."""
    blocks = iter(blocks)
    # The first block before the writer: a source that is unreadable or of the wrong width from its
    # start fails before the writer is made (a replaced index stays readable until the new one is finished).
    first = next(blocks, None)
    if first is not None and expected_dim is not None and first[0].shape[1] != expected_dim:
        raise UserError(f"index build: the source holds {first[0].shape[1]}-d embeddings but {embedder_name} "
                        f"produces {expected_dim}-d")
    writer = IndexWriter(out, **writer_options)
    try:
        for embeddings, identities, files in itertools.chain([first] if first is not None else [], blocks):
            if expected_dim is not None and embeddings.shape[1] != expected_dim:
                raise UserError(f"index build: the source holds {embeddings.shape[1]}-d embeddings but "
                                f"{embedder_name} produces {expected_dim}-d")
            writer.add(embeddings, identities, files)
            if count_identities is not None:
                count_identities.update(identities)
    except BaseException:
        writer.abort()
        raise
    fields = info_fields() if callable(info_fields) else dict(info_fields or {})
    return writer.finish(**fields)


def build_index_from_table(path: str, out: Storage, *, storage_options: dict | None = None,
                           block_rows: int | None = None, expected_dim: int | None = None,
                           info_fields: dict | None = None, **writer_options: Any) -> IndexInfo:
    """`facegen index build --table`: read, normalise and write shard by shard. `expected_dim`: the
    embedder's width, checked before anything is written."""
    stream = open_table(path, storage_options, block_rows)
    if expected_dim is not None and stream.dim is not None and stream.dim != expected_dim:
        raise UserError(f"index build: the source holds {stream.dim}-d embeddings but the embedder "
                        f"produces {expected_dim}-d")
    return build_index_from_blocks(stream.blocks(), out, expected_dim=expected_dim,
                                   info_fields={"source": f"table {path}", **(info_fields or {})},
                                   **writer_options)


__all__ = ["TableStream", "build_index_from_blocks", "build_index_from_table", "open_table"]
