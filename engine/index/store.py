"""On-storage layout of a privacy index, and the few functions that read and write it.

```
index.json              written LAST, atomically: an index without it is not an index
shards/NNNNN.faiss      faiss.IndexFlatIP over L2-normalised float32 (faiss.write_index format);
                        row_dtype float16: a faiss.IndexScalarQuantizer (QT_fp16) of the same rows
shards/NNNNN.f32        row_dtype float16 only: the float32 rows, raw row-major little-endian, read
                        row by row to re-score the candidates near a query's maximum exactly
shards/NNNNN.parquet    one row per vector, in faiss order: identity (string), file (string)
```
Global row ids run over the shards in order: shard i holds rows [offset_i, offset_i + count_i).
Everything goes through `Storage`, so local folders and object stores behave the same.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facegen.engine.storage import Storage
from facegen.models.errors import UserError

FORMAT_VERSION = 1
INDEX_JSON = "index.json"
SHARD_DIR = "shards"
METRIC = "ip"
# |norm - 1| allowed for a vector to count as L2-normalised (float32 rounding is ~1e-7).
NORM_TOLERANCE = 1e-3
ROW_DTYPES = ("float32", "float16")
IO_CHUNK = 64 << 20  # bytes per write call when streaming a shard to storage


@dataclass(frozen=True)
class ShardInfo:
    name: str  # "00000": files shards/00000.faiss and shards/00000.parquet
    offset: int  # global row id of the shard's first row
    count: int


@dataclass(frozen=True)
class IndexInfo:
    """The parsed `index.json`."""

    dim: int
    count: int
    shards: tuple[ShardInfo, ...]
    embedder_fingerprint: str | None = None
    preprocessing: dict | None = None
    source: str = ""
    thresholds: tuple[dict, ...] = ()
    dropped: dict = field(default_factory=dict)  # reason -> count, rows refused or skipped upstream
    num_identities: int | None = None
    embedder_weights: str | None = None  # sha256 of the weights alone (older indexes: unknown)
    impostor_scores: dict | None = None  # enrolment sanity: median/p99/max cosine of different identities
    skipped: tuple[dict, ...] = ()  # inputs left out at enrolment: {"file", "reason"}
    row_dtype: str = "float32"  # float16: half-memory rows, exact float32 re-scoring near the maximum
    created_by: str = "facegen"
    metric: str = METRIC
    format_version: int = FORMAT_VERSION

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def __getitem__(self, key: str) -> Any:
        """Read access by index.json key (`info["thresholds"]`), for code that treats it as the JSON."""
        return self.to_dict()[key]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["num_shards"] = self.num_shards
        data["shards"] = [asdict(s) for s in self.shards]
        data["thresholds"] = [dict(t) for t in self.thresholds]
        data["skipped"] = [dict(item) for item in self.skipped]
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = INDEX_JSON) -> IndexInfo:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(
                f"{where}: format_version {version!r} is not supported (expected {FORMAT_VERSION})"
            )
        if data.get("metric") != METRIC:
            raise UserError(f"{where}: metric {data.get('metric')!r} is not supported (expected {METRIC!r})")
        try:
            shards = tuple(
                ShardInfo(str(s["name"]), int(s["offset"]), int(s["count"])) for s in data["shards"]
            )
            info = cls(
                dim=int(data["dim"]),
                count=int(data["count"]),
                shards=shards,
                embedder_fingerprint=data.get("embedder_fingerprint"),
                preprocessing=data.get("preprocessing"),
                source=str(data.get("source", "")),
                thresholds=tuple(data.get("thresholds", ())),
                dropped=dict(data.get("dropped", {})),
                num_identities=data.get("num_identities"),
                embedder_weights=data.get("embedder_weights"),
                impostor_scores=data.get("impostor_scores"),
                skipped=tuple(dict(item) for item in data.get("skipped", ())),
                row_dtype=str(data.get("row_dtype", "float32")),
                created_by=str(data.get("created_by", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{where}: malformed index description ({type(err).__name__}: {err})") from None
        info.validate(where)
        return info

    def validate(self, where: str = INDEX_JSON) -> None:
        offset = 0
        for shard in self.shards:
            if shard.offset != offset or shard.count <= 0:
                raise UserError(f"{where}: shard {shard.name} has offset {shard.offset}, count {shard.count};"
                                f" expected offset {offset} and a positive count")
            offset += shard.count
        if offset != self.count:
            raise UserError(f"{where}: shards hold {offset} rows but count is {self.count}")
        if self.row_dtype not in ROW_DTYPES:
            raise UserError(f"{where}: row_dtype {self.row_dtype!r} is not one of {ROW_DTYPES}")

    def threshold_at(self, fmr: float) -> float | None:
        """The calibrated threshold for exactly this FMR, or None when it was not calibrated."""
        for entry in self.thresholds:
            if np.isclose(float(entry["fmr"]), fmr, rtol=1e-9, atol=0.0):
                return float(entry["threshold"])
        return None


def shard_name(i: int) -> str:
    return f"{i:05d}"


def read_info(storage: Storage) -> IndexInfo:
    if not storage.exists(INDEX_JSON):
        raise UserError(
            f"{storage.url(INDEX_JSON)}: not found; not a privacy index (or its build did not finish)"
        )
    return IndexInfo.from_dict(storage.read_json(INDEX_JSON), storage.url(INDEX_JSON))


def write_info(storage: Storage, info: IndexInfo) -> None:
    info.validate(storage.url(INDEX_JSON))
    storage.write_json(INDEX_JSON, info.to_dict())


# ------------------------------------------------------------------------------------ shards
def write_shard(storage: Storage, name: str, vectors: np.ndarray, identities: Sequence[str],
                files: Sequence[str], *, row_dtype: str = "float32") -> None:
    """Write one shard's faiss index and its label table (vectors already normalised float32).

    Streamed to storage (faiss.write_index through a callback): no serialised copy of the shard."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if row_dtype == "float16":
        index = faiss.IndexScalarQuantizer(vectors.shape[1], faiss.ScalarQuantizer.QT_fp16,
                                           faiss.METRIC_INNER_PRODUCT)
        with storage.atomic_writer(f"{SHARD_DIR}/{name}.f32") as handle:
            flat = vectors.reshape(-1).view(np.uint8)
            for start in range(0, len(flat), IO_CHUNK):
                handle.write(flat[start : start + IO_CHUNK])
    else:
        index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    with storage.atomic_writer(f"{SHARD_DIR}/{name}.faiss") as handle:
        faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write))
    del index
    table = pa.table({"identity": pa.array(list(identities), pa.string()),
                      "file": pa.array(list(files), pa.string())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(f"{SHARD_DIR}/{name}.parquet", buffer.getvalue())


def read_shard_vectors(storage: Storage, shard: ShardInfo, dim: int) -> faiss.Index:
    """The shard's faiss index (flat, or fp16 scalar-quantised), checked against index.json.

    Streamed from storage into the index's own memory: opening a shard holds it once, not as
    serialised bytes plus a copy."""
    relative = f"{SHARD_DIR}/{shard.name}.faiss"
    try:
        with storage.open(relative) as handle:
            index = faiss.read_index(faiss.PyCallbackIOReader(handle.read))
    except FileNotFoundError:
        raise UserError(f"{storage.url(relative)}: not found") from None
    except RuntimeError as err:
        raise UserError(f"{storage.url(relative)}: not a readable faiss index ({err})") from None
    fp16 = isinstance(index, faiss.IndexScalarQuantizer) and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16
    if not (isinstance(index, faiss.IndexFlat) or fp16):
        raise UserError(f"{storage.url(relative)}: a {type(index).__name__}, expected a flat or fp16 index")
    if index.d != dim or index.ntotal != shard.count or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise UserError(f"{storage.url(relative)}: holds {index.ntotal} x {index.d} (metric "
                        f"{index.metric_type}), index.json says {shard.count} x {dim} inner product")
    return index


def flat_vectors(index: faiss.IndexFlat) -> np.ndarray:
    """The float32 [n, dim] matrix inside a flat faiss index (a copy)."""
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d).copy()


class Float32Rows:
    """Random access to a float16 shard's exact float32 rows (`NNNNN.f32`): memory-mapped on a local
    disk, ranged reads elsewhere. Only the rows asked for are read."""

    def __init__(self, storage: Storage, shard: ShardInfo, dim: int):
        self.storage, self.dim, self.count = storage, dim, shard.count
        self.relative = f"{SHARD_DIR}/{shard.name}.f32"
        self._map: np.ndarray | None = None
        if storage.is_local:
            self._map = np.memmap(storage.path(self.relative), np.float32, "r", shape=(self.count, dim))

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if self._map is not None:
            return np.asarray(self._map[rows])
        out = np.empty((len(rows), self.dim), np.float32)
        width = self.dim * 4
        with self.storage.open(self.relative) as handle:
            for i, row in enumerate(rows):
                handle.seek(int(row) * width)
                out[i] = np.frombuffer(handle.read(width), np.float32)
        return out

    def all(self) -> np.ndarray:
        """Every row, as a float32 matrix (the numpy and torch backends search these)."""
        if self._map is not None:
            return np.array(self._map)
        with self.storage.open(self.relative) as handle:
            return np.frombuffer(handle.read(), np.float32).reshape(self.count, self.dim).copy()


def read_shard_labels(storage: Storage, shard: ShardInfo) -> tuple[np.ndarray, np.ndarray]:
    """(identities, files) as numpy object arrays of str, in row order."""
    relative = f"{SHARD_DIR}/{shard.name}.parquet"
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(relative)), columns=["identity", "file"])
    except (pa.ArrowInvalid, KeyError) as err:
        raise UserError(f"{storage.url(relative)}: not a label table with identity/file ({err})") from None
    if table.num_rows != shard.count:
        raise UserError(f"{storage.url(relative)}: {table.num_rows} rows, index.json says {shard.count}")
    identities = np.asarray(table.column("identity").to_pylist(), dtype=object)
    files = np.asarray(table.column("file").to_pylist(), dtype=object)
    return identities, files


# ------------------------------------------------------------------------------ normalising
def normalize_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit-norm float32 rows, mask of rows that were valid: finite and non-zero)."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise UserError(f"embeddings: expected a 2-D [rows, dim] matrix, got shape {x.shape}")
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    valid = np.isfinite(x).all(axis=1) & np.isfinite(norms) & (norms > 0)
    out = np.zeros_like(x)
    out[valid] = (x[valid] / norms[valid, None]).astype(np.float32)
    return out, valid
