"""Per-shard manifests and completion markers: what makes a shard exist, in every output format.

A shard counts as written only when `done/{NNNNNN}.json` exists; the marker is written last and
atomically, after the shard file and its manifest. Everything here is plain functions over
`Storage`, so the local executor and Ray actors share one definition of "complete".
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from facegen.engine.storage import Storage
from facegen.models.errors import UserError

MARKER_VERSION = 1
SHARDS_DIR = "shards"
MANIFEST_DIR = "manifest"
DONE_DIR = "done"
TEMP_PREFIX = ".tmp-"

# Fixed manifest columns; flattened metadata columns follow them in sorted order.
MEMBER_FIELDS = ("vis", "nir", "cls", "json")
FIXED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.int64()),
        ("sample", pa.int64()),
        ("shard", pa.string()),
        ("shard_id", pa.int64()),
        ("vis_format", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
    + [(f"{m}_{part}", pa.int64()) for m in MEMBER_FIELDS for part in ("offset", "size")]
)
# Metadata keys already represented by fixed columns (`identity` is the label).
_SKIPPED_META = {"identity", "sample"}


def manifest_path(shard_id: int) -> str:
    return f"{MANIFEST_DIR}/{shard_id:06d}.parquet"


def marker_path(shard_id: int) -> str:
    return f"{DONE_DIR}/{shard_id:06d}.json"


def shard_path(shard_file: str) -> str:
    """Relative path of a shard given its file name (paths with a folder pass through)."""
    return shard_file if "/" in shard_file else f"{SHARDS_DIR}/{shard_file}"


def shard_id_of(file_name: str) -> int | None:
    """`facegen-000012.tar` -> 12, `000012.parquet` -> 12; None for names that are not ours."""
    stem = posixpath.basename(file_name).split(".", 1)[0]
    digits = stem.rsplit("-", 1)[-1]
    return int(digits) if len(digits) >= 6 and digits.isdigit() else None


# -- manifest table ----------------------------------------------------------------------------
def flatten_scalars(meta: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Scalar leaves of a (JSON-normalised) metadata dict; nested keys joined with '_'."""
    flat: dict[str, Any] = {}
    for name, value in meta.items():
        column = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(flatten_scalars(value, column + "_"))
        elif isinstance(value, (bool, int, float, str)):
            flat[column] = value
    return flat


def _arrow_type(name: str, values: list[Any]) -> pa.DataType | None:
    """One Arrow type for a metadata column, or None when its values do not share one.

    Types depend on the kind of value, never on its magnitude, so every shard of a dataset gets the
    same manifest schema (integers are always int64; ints written with .0 become float64).
    """
    kinds = {type(v) for v in values if v is not None}
    if kinds == {bool}:
        return pa.bool_()
    if kinds == {str}:
        return pa.string()
    if kinds and kinds <= {int, float}:
        if kinds == {int}:
            if any(not -(2**63) <= v < 2**63 for v in values if v is not None):
                raise ValueError(f"metadata {name!r}: integers must fit in int64 for the manifest "
                                 "(store larger ones as strings)")
            return pa.int64()
        return pa.float64()
    return None


def build_manifest(fixed_rows: dict[str, list], metas: list[dict[str, Any]]) -> pa.Table:
    """Manifest table: fixed columns (FIXED_SCHEMA) then flattened scalar metadata, sorted by name.

    Metadata columns whose values do not share one type (or collide with a fixed column) are left
    out of the manifest; they remain in each sample's `.json` member.
    """
    flats = [flatten_scalars(m) for m in metas]
    names = sorted({n for f in flats for n in f} - set(FIXED_SCHEMA.names) - _SKIPPED_META)
    fields, arrays = list(FIXED_SCHEMA), [pa.array(fixed_rows[f.name], f.type) for f in FIXED_SCHEMA]
    for name in names:
        values = [f.get(name) for f in flats]
        arrow_type = _arrow_type(name, values)
        if arrow_type is None:
            continue
        fields.append(pa.field(name, arrow_type))
        arrays.append(pa.array(values, arrow_type))
    schema = pa.schema(fields, metadata={"facegen.manifest_version": str(MARKER_VERSION)})
    return pa.Table.from_arrays(arrays, schema=schema)


def parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic parquet encoding (fixed writer options; same bytes for the same table)."""
    buffer = io.BytesIO()
    pq.write_table(
        table,
        buffer,
        compression="zstd",
        compression_level=3,
        use_dictionary=True,
        write_statistics=True,
        data_page_version="1.0",
        version="2.6",
    )
    return buffer.getvalue()


# -- markers -----------------------------------------------------------------------------------
def write_marker(storage: Storage, shard_id: int, marker: dict[str, Any]) -> None:
    """Write the completion marker (atomic); call only after the tar and manifest exist."""
    storage.write_json(marker_path(shard_id), marker)


def is_complete(storage: Storage, shard_id: int) -> bool:
    return storage.exists(marker_path(shard_id))


def completed_shards(storage: Storage) -> dict[int, dict[str, Any]]:
    """Markers of every complete shard, by shard id, in id order."""
    names = [n for n in storage.list(DONE_DIR, ".json") if shard_id_of(n) is not None]
    if not names:
        return {}
    # One batched read: object stores fetch the markers concurrently.
    contents = storage.fs.cat([storage.path(f"{DONE_DIR}/{n}") for n in names])
    by_name = {posixpath.basename(path): data for path, data in contents.items()}
    markers: dict[int, dict[str, Any]] = {}
    for name in names:
        where = storage.url(f"{DONE_DIR}/{name}")
        try:
            marker = json.loads(by_name[name])
        except (KeyError, json.JSONDecodeError) as err:
            raise UserError(f"{where}: unreadable completion marker ({err!r})") from err
        if not isinstance(marker, dict) or marker.get("shard_id") != shard_id_of(name):
            raise UserError(f"{where}: shard_id does not match the file name")
        markers[shard_id_of(name)] = marker
    return dict(sorted(markers.items()))


def _all_names(storage: Storage, folder: str) -> list[str]:
    """Every file name in `folder`, temporary ones included (Storage.list hides those)."""
    if not storage.exists(folder):
        return []
    paths = storage.fs.ls(storage.path(folder), detail=False)
    return sorted(posixpath.basename(p.rstrip("/")) for p in paths)


def remove_incomplete(storage: Storage) -> list[str]:
    """Delete shard files and manifests without a marker, markers without a shard file, and stray
    temp files.

    Returns the removed relative paths. Call it only while no writer runs on this dataset (at job
    start): an in-progress shard looks exactly like an abandoned one.
    """
    shard_files = set(storage.list(SHARDS_DIR))
    complete = {i: m for i, m in completed_shards(storage).items() if m.get("shard_file") in shard_files}
    # Markers go first: interrupted half way, the cleanup still leaves no marker without its files.
    keep = {
        DONE_DIR: {posixpath.basename(marker_path(i)) for i in complete},
        SHARDS_DIR: {m["shard_file"] for m in complete.values()},
        MANIFEST_DIR: {posixpath.basename(manifest_path(i)) for i in complete},
    }
    removed = []
    for folder, kept in keep.items():
        for name in _all_names(storage, folder):
            ours = name.startswith(TEMP_PREFIX) or shard_id_of(name) is not None
            if ours and name not in kept:
                removed.append(f"{folder}/{name}")
    for relative in removed:
        storage.delete(relative)
    return removed
