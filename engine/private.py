"""What a dataset must not publish: which real person each synthetic sample came closest to.

The certificate is the similarity (in every sample's JSON and the manifest). The identity of the
nearest enrolled real person is information about real people, so it never enters a shard, a
sample's JSON, the manifest or `identities.parquet`; it goes to `private/` inside the dataset
folder, for the operator's own review, and docs/dataset-format.md says not to release that folder.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from facegen.engine.storage import Storage

PRIVATE_DIR = "private"
README = (
    "NOT FOR RELEASE. This folder names the enrolled real identity nearest to each synthetic sample\n"
    "(information about real people). Publish the dataset without it.\n"
)


def nearest_path(shard_id: int) -> str:
    return f"{PRIVATE_DIR}/nearest/{shard_id:06d}.parquet"


def write_table(out: Storage, relative: str, columns: dict) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    if not out.exists(f"{PRIVATE_DIR}/README.txt"):
        out.write_text(f"{PRIVATE_DIR}/README.txt", README)
    out.write_bytes(relative, buffer.getvalue())


def write_nearest(out: Storage, shard_id: int, keys: list[str], nearest: np.ndarray, similarity: np.ndarray) -> None:
    """One shard's sample key -> nearest real identity and its certified similarity."""
    write_table(out, nearest_path(shard_id), {
        "key": pa.array(keys, pa.string()),
        "nearest_real_identity": pa.array([str(x) for x in nearest], pa.string()),
        "privacy_max_sim": pa.array(np.asarray(similarity, np.float64), pa.float64()),
    })


def read_nearest(out: Storage) -> pa.Table:
    names = out.list(f"{PRIVATE_DIR}/nearest", ".parquet") if out.exists(f"{PRIVATE_DIR}/nearest") else []
    tables = [pq.read_table(io.BytesIO(out.read_bytes(f"{PRIVATE_DIR}/nearest/{n}"))) for n in sorted(names)]
    return pa.concat_tables(tables) if tables else pa.table({"key": pa.array([], pa.string())})
