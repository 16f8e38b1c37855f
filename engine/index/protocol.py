"""What generation asks of a privacy index, wherever its vectors live.

`PrivacyIndex` (every shard searched in this process) and the cluster's `RemoteIndex` (shards held by
index-shard actors) both implement `Index`, and answer identically: exact maximum cosine similarity
with ties to the smallest global row, and labels by global row.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Index(Protocol):
    @property
    def dim(self) -> int: ...

    @property
    def count(self) -> int: ...

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the embedder the index was built with (None: not recorded)."""
        ...

    def check_compatible(self, embedder: Any) -> None:
        """Raise a UserError if `embedder`'s embeddings cannot be compared with the index's."""
        ...

    def max_similarity(self, queries: Any) -> tuple[np.ndarray, np.ndarray]:
        """(max cosine float32 [N], global row int64 [N]) of L2-normalised queries [N, dim];
        a non-finite query gets NaN and row -1."""
        ...

    def identity_of(self, rows: Any) -> np.ndarray:
        """Enrolled identity (str) of global rows; row -1 gives ""."""
        ...

    def file_of(self, rows: Any) -> np.ndarray:
        """Enrolled file (str) of global rows; row -1 gives ""."""
        ...


def checked_rows(rows: Any, count: int) -> np.ndarray:
    """`rows` as int64, refusing any outside [-1, count): -1 is the row of a non-finite query."""
    rows = np.asarray(rows, np.int64)
    if ((rows < -1) | (rows >= count)).any():
        raise IndexError(f"privacy index: row ids must be in [-1, {count}), got {rows.min()}..{rows.max()}")
    return rows
