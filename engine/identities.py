"""`identities.parquet`: the persisted phase-2 decision. A resume reads it and never re-selects."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facegen.engine.phases import Identities
from facegen.engine.private import PRIVATE_DIR, write_table
from facegen.engine.storage import Storage

IDENTITIES_FILE = "identities.parquet"


def _vectors(matrix: np.ndarray) -> pa.Array:
    width = matrix.shape[1]
    flat = pa.array(np.ascontiguousarray(matrix, np.float32).reshape(-1), pa.float32())
    if not width:
        return pa.array([[]] * len(matrix), pa.list_(pa.float32()))
    return pa.FixedSizeListArray.from_arrays(flat, width)


def write_identities(storage: Storage, identities: Identities, selection_stats: dict) -> None:
    table = pa.table(
        {
            "label": pa.array(np.arange(len(identities)), pa.int64()),
            "slot": pa.array(identities.slot, pa.int64()),
            "condition": _vectors(identities.condition),
            "anchor": _vectors(identities.anchor),
            "anchor_real_sim": pa.array(identities.anchor_real_sim, pa.float32()),
            # Blank in the released file: the nearest real person is kept in private/ (engine/private.py).
            "anchor_real_identity": pa.array([""] * len(identities), pa.string()),
            # Only with privacy.repair, so files of jobs without it keep their bytes.
            **({} if identities.repair is None else {"repair": pa.array(identities.repair, pa.int64())}),
        }
    )
    table = table.replace_schema_metadata({"facegen.selection": json.dumps(selection_stats, sort_keys=True)})
    write_table(storage, f"{PRIVATE_DIR}/anchors.parquet", {
        "label": pa.array(np.arange(len(identities)), pa.int64()),
        "nearest_real_identity": pa.array([str(x) for x in identities.anchor_real_identity], pa.string()),
        "anchor_real_sim": pa.array(identities.anchor_real_sim, pa.float32()),
    })
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(IDENTITIES_FILE, buffer.getvalue())


def _matrix(column: pa.ChunkedArray, rows: int) -> np.ndarray:
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    # A writable copy: arrow buffers are read-only and torch refuses to wrap those safely.
    return np.array(flat, np.float32).reshape(rows, -1) if rows else np.zeros((0, 0), np.float32)


def read_identities(storage: Storage) -> tuple[Identities, dict]:
    table = pq.read_table(io.BytesIO(storage.read_bytes(IDENTITIES_FILE)))
    rows = table.num_rows
    identities = Identities(
        slot=table["slot"].to_numpy().copy(),
        condition=_matrix(table["condition"], rows),
        anchor=_matrix(table["anchor"], rows),
        anchor_real_sim=table["anchor_real_sim"].to_numpy().copy(),
        anchor_real_identity=np.array(table["anchor_real_identity"].to_pylist(), dtype=object),
        repair=table["repair"].to_numpy().copy() if "repair" in table.column_names else None,
    )
    metadata = table.schema.metadata or {}
    return identities, json.loads(metadata.get(b"facegen.selection", b"{}"))
