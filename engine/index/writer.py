"""Writing a privacy index one block of rows at a time: memory stays near one shard, whatever the
row count.

`IndexWriter.add` normalises each incoming block (float64 norms of that block only) straight into the
current shard's buffer; a full buffer is written as a shard and reused. `finish` writes index.json
last, so an interrupted build leaves no readable index. A build that fails part-way (an invalid row
found in a later block, a storage error) removes the shards it wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facegen.engine.index.compat import impostor_summary
from facegen.engine.index.store import (
    INDEX_JSON,
    ROW_DTYPES,
    SHARD_DIR,
    IndexInfo,
    ShardInfo,
    read_info,
    shard_name,
    write_info,
    write_shard,
)
from facegen.engine.storage import Storage
from facegen.models.errors import UserError

INVALID_ROW = "non-finite or zero-norm embedding"
SANITY_SAMPLE = 8192  # rows kept for the impostor-score sanity check (all of a smaller index)
NORM_BLOCK = 2048  # rows normalised at once: their float64 copy is 8 MiB at 512-d


def valid_rows(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 norms, mask of finite non-zero rows) of a float32 block; the arithmetic of
    `store.normalize_rows`, so a streamed build stores the same bits as one over the whole matrix."""
    norms = np.linalg.norm(block.astype(np.float64), axis=1)
    return norms, np.isfinite(block).all(axis=1) & np.isfinite(norms) & (norms > 0)


class IndexWriter:
    """Streamed index build: `add(embeddings, identities, files)` blocks, then `finish(...)`.

    `shard_sizes` (explicit consecutive shard lengths) replaces `shard_size`; `row_dtype` 'float16'
    stores rows at half the memory with exact float32 copies for re-scoring (engine/index/store.py).
    """

    def __init__(self, out: Storage, *, shard_size: int = 1_000_000, shard_sizes: Sequence[int] | None = None,
                 drop_invalid: bool = False, overwrite: bool = False, row_dtype: str = "float32"):
        if shard_sizes is None and shard_size <= 0:
            raise UserError(f"--shard-size: {shard_size} must be positive")
        if shard_sizes is not None and (not len(shard_sizes) or min(shard_sizes) <= 0):
            raise UserError(f"build index: shard sizes {list(shard_sizes)[:10]} must be positive")
        if row_dtype not in ROW_DTYPES:
            raise UserError(f"index row dtype {row_dtype!r}: choose from {', '.join(ROW_DTYPES)}")
        self.out, self.drop_invalid, self.row_dtype = out, drop_invalid, row_dtype
        self._planned = list(shard_sizes) if shard_sizes is not None else None
        self._shard_size = shard_size
        self._buffer: np.ndarray | None = None
        self._fill = 0
        self._identities: list[str] = []
        self._files: list[str] = []
        self.shards: list[ShardInfo] = []
        self.count = 0
        self.invalid = 0
        # Distinct identities as Arrow strings, one array per shard: Python strings kept until the end
        # would pin every shard's freed label memory (pymalloc arenas) and grow the process with the rows.
        self._distinct: list[pa.Array] = []
        # A seeded reservoir sample of rows for the enrolment sanity check (impostor scores): every
        # row when the index is small, a bounded uniform sample when it is not.
        self._rng = np.random.default_rng(0)
        self._sample: np.ndarray | None = None
        self._sample_ids: list[str] = []
        self._seen = 0
        self._replaced = _prepare_output(out, overwrite)
        # A replacement writes its shards under names the index it replaces does not use, so that
        # index stays whole and readable until the new index.json is in place.
        self._prefix = REPLACEMENT_PREFIX if any(not n.startswith(REPLACEMENT_PREFIX) for n in self._replaced) else ""

    @property
    def dim(self) -> int | None:
        return None if self._buffer is None else self._buffer.shape[1]

    def _capacity(self) -> int:
        if self._planned is None:
            return self._shard_size
        index = len(self.shards)
        if index >= len(self._planned):
            raise UserError(f"build index: more rows than the shard sizes {self._planned[:10]} hold")
        return self._planned[index]

    def add(self, embeddings: np.ndarray, identities: Sequence[str], files: Sequence[str]) -> None:
        """Normalise and append one block (raw or normalised rows, any float dtype)."""
        try:
            self._add(embeddings, identities, files)
        except BaseException:
            self.abort()
            raise

    def _add(self, embeddings: np.ndarray, identities: Sequence[str], files: Sequence[str]) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] == 0:
            raise UserError(f"build index: need a [rows, dim] embedding matrix, got {embeddings.shape}")
        if len(identities) != len(embeddings) or len(files) != len(embeddings):
            raise UserError(f"build index: {len(embeddings)} embeddings but {len(identities)} identities "
                            f"and {len(files)} files")
        if self._buffer is None:
            self._buffer = np.empty((self._capacity(), embeddings.shape[1]), np.float32)
        elif embeddings.shape[1] != self.dim:
            raise UserError(f"build index: a block of {embeddings.shape[1]}-d embeddings after {self.dim}-d ones")
        for start in range(0, len(embeddings), NORM_BLOCK):
            self._add_normalised(embeddings[start : start + NORM_BLOCK], identities[start : start + NORM_BLOCK],
                                 files[start : start + NORM_BLOCK])

    def _add_normalised(self, block: np.ndarray, identities: Sequence[str], files: Sequence[str]) -> None:
        block = np.asarray(block, dtype=np.float32)  # as normalize_rows: float32 first, then the norms
        norms, valid = valid_rows(block)
        if not valid.all():
            bad = np.flatnonzero(~valid)
            if not self.drop_invalid:
                examples = [str(files[i]) for i in bad[:3]]
                raise UserError(f"build index: embeddings that are not finite or have zero norm (e.g. {examples});"
                                " fix the source or pass drop_invalid (--drop-invalid)")
            if self._planned is not None:
                raise UserError("build index: explicit shard_sizes cannot be combined with dropped rows")
            self.invalid += len(bad)
            keep = np.flatnonzero(valid)
            block, norms = block[keep], norms[keep]
            identities, files = [identities[i] for i in keep], [files[i] for i in keep]
        done = 0
        while done < len(block):
            take = min(len(block) - done, len(self._buffer) - self._fill)
            rows = slice(self._fill, self._fill + take)
            part = slice(done, done + take)
            # Divide in float64 (the norms), round once to float32: the same values as normalising the
            # whole matrix at once.
            np.divide(block[part], norms[part, None], out=self._buffer[rows], casting="same_kind")
            self._keep_sample(self._buffer[rows], identities[part])
            self._identities += [str(i) for i in identities[part]]
            self._files += [str(f) for f in files[part]]
            self._fill += take
            done += take
            if self._fill == len(self._buffer):
                self._flush()

    def _keep_sample(self, vectors: np.ndarray, identities: Sequence[str]) -> None:
        """Reservoir sampling (Algorithm R), vectorised per block: row t replaces a random slot
        j < SANITY_SAMPLE when j = uniform(0..t) falls there; later rows win, as sequentially."""
        if self._sample is None:
            self._sample = np.empty((SANITY_SAMPLE, vectors.shape[1]), np.float32)
        n, seen = len(vectors), self._seen
        fill = max(0, min(n, SANITY_SAMPLE - seen))
        self._sample[seen : seen + fill] = vectors[:fill]
        self._sample_ids += [str(i) for i in identities[:fill]]
        if fill < n:
            slots = self._rng.integers(0, np.arange(seen + fill, seen + n) + 1)
            hit = np.flatnonzero(slots < SANITY_SAMPLE)
            for i in hit:  # in row order: a later row replaces an earlier one in the same slot
                self._sample[slots[i]] = vectors[fill + i]
                self._sample_ids[slots[i]] = str(identities[fill + i])
        self._seen += n

    def _flush(self) -> None:
        if self._fill == 0:
            return
        name = self._prefix + shard_name(len(self.shards))
        write_shard(self.out, name, self._buffer[: self._fill], self._identities, self._files,
                    row_dtype=self.row_dtype)
        self.shards.append(ShardInfo(name, self.count, self._fill))
        self.count += self._fill
        self._distinct.append(pc.unique(pa.array(self._identities, pa.string())))
        self._fill, self._identities, self._files = 0, [], []
        if self._planned is not None and len(self.shards) < len(self._planned):
            self._buffer = np.empty((self._capacity(), self._buffer.shape[1]), np.float32)

    def finish(self, *, dropped: Mapping[str, int] | None = None, **fields: Any) -> IndexInfo:
        """Write the last shard and index.json; `fields` are IndexInfo's descriptive fields."""
        try:
            self._flush()
            if self.count == 0:
                raise UserError("build index: no valid embeddings" if self.invalid else
                                "build index: need a non-empty [rows, dim] embedding matrix")
            if self._planned is not None and len(self.shards) != len(self._planned):
                raise UserError(f"build index: shard sizes {self._planned[:10]} must sum to {self.count}")
            dropped = dict(dropped or {})
            if self.invalid:
                dropped[INVALID_ROW] = dropped.get(INVALID_ROW, 0) + self.invalid
            kept = min(self._seen, SANITY_SAMPLE)
            info = IndexInfo(dim=int(self.dim), count=self.count, shards=tuple(self.shards), dropped=dropped,
                             num_identities=self.num_identities(), row_dtype=self.row_dtype,
                             impostor_scores=impostor_summary(self._sample[:kept], self._sample_ids[:kept]),
                             **fields)
            write_info(self.out, info)  # last: only now is the (new) index readable
        except BaseException:
            self.abort()
            raise
        self._buffer = None
        _delete_shards_except(self.out, {s.name for s in self.shards})  # the replaced index's shards
        return info

    def num_identities(self) -> int:
        return len(pc.unique(pa.chunked_array(self._distinct, pa.string()))) if self._distinct else 0

    def abort(self) -> None:
        """Remove what this build wrote; an index it was to replace stays as it was."""
        self._buffer = None
        _delete_shards_except(self.out, self._replaced)


REPLACEMENT_PREFIX = "next-"  # shard names of a build that replaces an index named without it


def _prepare_output(out: Storage, overwrite: bool) -> set[str]:
    """Check the output; returns the shard names of the readable index `overwrite` will replace (it is
    left in place until the new one is finished) after clearing any other shard files."""
    out.check_writable()
    replaced: set[str] = set()
    if out.exists(INDEX_JSON):
        if not overwrite:
            raise UserError(f"{out.url(INDEX_JSON)}: an index already exists here (use --overwrite)")
        try:
            replaced = {s.name for s in read_info(out).shards}
        except UserError:  # an unreadable index.json: nothing worth keeping
            out.delete(INDEX_JSON)
    _delete_shards_except(out, replaced)
    return replaced


def _delete_shards_except(out: Storage, keep: set[str]) -> None:
    """Remove the shard files (and the folder, when nothing is kept) not named in `keep`."""
    if not keep:
        out.delete(SHARD_DIR)
        return
    for name in out.list(SHARD_DIR):
        if name.split(".", 1)[0] not in keep:
            out.delete(f"{SHARD_DIR}/{name}")


def write_blocks(writer: IndexWriter, blocks: Iterable[tuple[np.ndarray, Sequence[str], Sequence[str]]]
                 ) -> IndexWriter:
    for embeddings, identities, files in blocks:
        writer.add(embeddings, identities, files)
    return writer
