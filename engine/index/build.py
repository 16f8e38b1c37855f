"""Building a privacy index: normalise, split into shards, write shards, then index.json last.

Rows that are not finite or have zero norm cannot be compared with anything. By default the build
refuses them (UserError with the count and examples): an enrolled image that silently leaves the
index is an image the privacy test no longer protects. With `drop_invalid=True` they are dropped and
counted in index.json's `dropped` (reason -> count), next to whatever the source skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from facegen.engine.index.compat import impostor_summary
from facegen.engine.index.store import (
    INDEX_JSON,
    SHARD_DIR,
    IndexInfo,
    ShardInfo,
    normalize_rows,
    shard_name,
    write_info,
    write_shard,
)
from facegen.engine.storage import Storage
from facegen.models.errors import UserError

INVALID_ROW = "non-finite or zero-norm embedding"


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


def _prepare_output(out: Storage, overwrite: bool) -> None:
    out.check_writable()
    if out.exists(INDEX_JSON):
        if not overwrite:
            raise UserError(f"{out.url(INDEX_JSON)}: an index already exists here (use --overwrite)")
        out.delete(INDEX_JSON)  # first, so the old index stops being readable before it changes
    out.delete(SHARD_DIR)


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
) -> IndexInfo:
    """Write a privacy index of `embeddings` (raw or normalised) to `out`; returns its description.

    `dropped` carries counts of inputs the source already skipped (reason -> count) into index.json.
    `shard_sizes` overrides `shard_size` with explicit consecutive shard lengths. `skipped` lists
    (file, reason) of inputs left out on purpose (--skip-bad); they are recorded by name.
    The impostor score distribution is measured on the enrolled set and recorded (enrolment sanity).
    """
    embeddings = np.asarray(embeddings)
    _check_inputs(embeddings, identities, files)
    vectors, valid = normalize_rows(embeddings)
    identities = np.asarray([str(i) for i in identities], dtype=object)
    files = np.asarray([str(f) for f in files], dtype=object)
    dropped = dict(dropped or {})
    num_invalid = int((~valid).sum())
    if num_invalid:
        if not drop_invalid:
            examples = files[~valid][:3].tolist()
            raise UserError(f"build index: {num_invalid} embeddings are not finite or have zero norm "
                            f"(e.g. {examples}); fix the source or pass drop_invalid (--drop-invalid)")
        vectors, identities, files = vectors[valid], identities[valid], files[valid]
        dropped[INVALID_ROW] = dropped.get(INVALID_ROW, 0) + num_invalid
        if len(vectors) == 0:
            raise UserError("build index: no valid embeddings left")
    if shard_sizes is not None and num_invalid:
        raise UserError("build index: explicit shard_sizes cannot be combined with dropped rows")
    shards = plan_shards(len(vectors), shard_size, shard_sizes)

    _prepare_output(out, overwrite)
    for shard in shards:
        rows = slice(shard.offset, shard.offset + shard.count)
        write_shard(out, shard.name, vectors[rows], identities[rows], files[rows])
    info = IndexInfo(
        dim=int(vectors.shape[1]),
        count=int(len(vectors)),
        shards=tuple(shards),
        embedder_fingerprint=embedder_fingerprint,
        preprocessing=dict(preprocessing) if preprocessing is not None else None,
        source=source,
        dropped=dropped,
        num_identities=int(len(np.unique(identities.astype(str)))),
        created_by=_created_by(),
        embedder_weights=embedder_weights,
        impostor_scores=impostor_summary(vectors, identities.astype(str)),
        skipped=tuple({"file": str(f), "reason": str(r)} for f, r in skipped),
    )
    write_info(out, info)  # last: only now is the index readable
    return info


def _created_by() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"facegen {version('facegen')}"
    except PackageNotFoundError:
        return "facegen"
