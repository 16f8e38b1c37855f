"""Building a privacy index: normalise, split into shards, write shards, then index.json last.

Rows that are not finite or have zero norm cannot be compared with anything. By default the build
refuses them (UserError with the count and examples): an enrolled image that silently leaves the
index is an image the privacy test no longer protects. With `drop_invalid=True` they are dropped and
counted in index.json's `dropped` (reason -> count), next to whatever the source skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from facegen.engine.index.store import IndexInfo, ShardInfo, shard_name
from facegen.engine.index.writer import INVALID_ROW, NORM_BLOCK, IndexWriter, valid_rows
from facegen.engine.storage import Storage
from facegen.models.errors import UserError

__all__ = ["INVALID_ROW", "build_index", "plan_shards"]
BLOCK_ROWS = 1 << 16  # rows handed to the writer at once (it normalises NORM_BLOCK rows at a time)


def _check_inputs(embeddings: np.ndarray, identities: Sequence[str], files: Sequence[str]) -> None:
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise UserError(f"build index: need a non-empty [rows, dim] embedding matrix, got {embeddings.shape}")
    if len(identities) != embeddings.shape[0] or len(files) != embeddings.shape[0]:
        raise UserError(f"build index: {embeddings.shape[0]} embeddings but {len(identities)} identities "
                        f"and {len(files)} files")


def plan_shards(count: int, shard_size: int, shard_sizes: Sequence[int] | None = None) -> list[ShardInfo]:
    """Consecutive row ranges: fixed `shard_size` (the last one shorter), or explicit sizes."""
    if shard_sizes is None:
        if shard_size <= 0:
            raise UserError(f"--shard-size: {shard_size} must be positive")
        shard_sizes = [min(shard_size, count - start) for start in range(0, count, shard_size)]
    if any(size <= 0 for size in shard_sizes) or sum(shard_sizes) != count:
        raise UserError(
            f"build index: shard sizes {list(shard_sizes)[:10]} must be positive and sum to {count}"
        )
    offsets = np.concatenate([[0], np.cumsum(shard_sizes)[:-1]]).tolist()
    return [ShardInfo(shard_name(i), int(o), int(n)) for i, (o, n) in enumerate(zip(offsets, shard_sizes))]


def build_index(
    embeddings: np.ndarray,
    identities: Sequence[str],
    files: Sequence[str],
    out: Storage,
    *,
    embedder_fingerprint: str | None,
    preprocessing: dict | None,
    shard_size: int = 1_000_000,
    source: str = "",
    drop_invalid: bool = False,
    dropped: Mapping[str, int] | None = None,
    shard_sizes: Sequence[int] | None = None,
    overwrite: bool = False,
    embedder_weights: str | None = None,
    skipped: Sequence[tuple[str, str]] = (),
    row_dtype: str = "float32",
) -> IndexInfo:
    """Write a privacy index of `embeddings` (raw or normalised) to `out`; returns its description.

    `dropped` carries counts of inputs the source already skipped (reason -> count) into index.json.
    `shard_sizes` overrides `shard_size` with explicit consecutive shard lengths. `skipped` lists
    (file, reason) of inputs left out on purpose (--skip-bad); they are recorded by name.
    The impostor score distribution is measured on (a seeded sample of) the enrolled set and recorded
    (enrolment sanity). Written block by block (`IndexWriter`): besides the caller's matrix, memory
    holds about one shard. `row_dtype` 'float16' halves the rows' memory (exact float32 re-scoring,
    engine/index/store.py).
    """
    embeddings = np.asarray(embeddings)  # a view when it already is an array: no copy of the matrix
    _check_inputs(embeddings, identities, files)
    num_invalid, examples = _count_invalid(embeddings, files)
    if num_invalid and not drop_invalid:  # refused before anything is written or replaced
        raise UserError(f"build index: {num_invalid} embeddings are not finite or have zero norm "
                        f"(e.g. {examples}); fix the source or pass drop_invalid (--drop-invalid)")
    if num_invalid == len(embeddings):
        raise UserError("build index: no valid embeddings left")
    if shard_sizes is not None:
        if num_invalid:
            raise UserError("build index: explicit shard_sizes cannot be combined with dropped rows")
        plan_shards(len(embeddings), shard_size, shard_sizes)  # checked before anything is written
    writer = IndexWriter(out, shard_size=shard_size, shard_sizes=shard_sizes, drop_invalid=drop_invalid,
                         overwrite=overwrite, row_dtype=row_dtype)
    for start in range(0, len(embeddings), BLOCK_ROWS):
        rows = slice(start, start + BLOCK_ROWS)
        writer.add(embeddings[rows], identities[rows], files[rows])
    return writer.finish(embedder_fingerprint=embedder_fingerprint,
                         preprocessing=dict(preprocessing) if preprocessing is not None else None,
                         source=source, dropped=dropped, created_by=created_by(), embedder_weights=embedder_weights,
                         skipped=tuple({"file": str(f), "reason": str(r)} for f, r in skipped))


def _count_invalid(embeddings: np.ndarray, files: Sequence[str]) -> tuple[int, list[str]]:
    """Rows that cannot be enrolled, and up to three of their files, checked block by block."""
    count, examples = 0, []
    for start in range(0, len(embeddings), NORM_BLOCK):
        _, valid = valid_rows(np.asarray(embeddings[start : start + NORM_BLOCK], dtype=np.float32))
        bad = np.flatnonzero(~valid)
        count += len(bad)
        examples += [str(files[start + i]) for i in bad[: 3 - len(examples)]]
    return count, examples


def created_by() -> str:
    """`facegen <version>`, recorded in index.json."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"facegen {version('facegen')}"
    except PackageNotFoundError:
        return "facegen"
