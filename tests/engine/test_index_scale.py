"""The privacy index past memory: streamed builds, float16 rows with exact re-scoring."""

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facegen.engine.index import PrivacyIndex, build_index
from facegen.engine.index.backends import FP16_MARGIN
from facegen.engine.index.stream import build_index_from_table
from facegen.engine.storage import Storage
from facegen.models.errors import UserError


def write_npy_table(folder, rows: int, dim: int, seed: int = 0, chunk: int = 50_000, name: str = "table"):
    """A .npy matrix + labels parquet, written in chunks (the test process never holds it whole)."""
    path = folder / f"{name}.npy"
    matrix = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, chunk):
        matrix[start : start + chunk] = rng.standard_normal((min(chunk, rows - start), dim), dtype=np.float32)
    matrix.flush()
    del matrix
    ids = np.arange(rows)
    pq.write_table(pa.table({"identity": pa.array((ids // 10).astype(str)), "file": pa.array(ids.astype(str))}),
                   folder / f"{name}.labels.parquet")
    return path


MEASURE = """
import re, sys
from facegen.jobs.cli import main

def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

# A small build first: the first one imports torch, faiss, pyarrow and starts their pools (~0.4 GB
# that any command pays once); what is measured is the second build's own memory.
assert main(["index", "build", sys.argv[1] + "-warm", "--table", sys.argv[4], "--shard-size", "500"]) == 0
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
code = main(["index", "build", sys.argv[1], "--table", sys.argv[2], "--shard-size", sys.argv[3]])
print("growth", status("VmHWM") - before, "code", code)
"""


@pytest.mark.slow
def test_streamed_build_stays_under_a_memory_budget(tmp_path):
    rows, dim, shard = 300_000, 256, 10_000
    table = write_npy_table(tmp_path, rows, dim)
    warm = write_npy_table(tmp_path, 1000, dim, name="warm")
    matrix_bytes = rows * dim * 4  # 307 MB of rows
    # A shard is 10 MB; measured here: ~80-105 MB for the first large build of a process (allocator
    # pools included), ~25 MB for the next, the same at 10^6 rows. The build before streaming peaked at
    # ~5x the matrix (1.5 GB).
    budget = 128 << 20
    assert matrix_bytes > 2 * budget
    out = tmp_path / "index"
    done = subprocess.run([sys.executable, "-c", MEASURE, str(out), str(table), str(shard), str(warm)],
                          capture_output=True, text=True, timeout=600, check=True)
    growth = int(done.stdout.split("growth ")[1].split()[0])
    assert "code 0" in done.stdout
    assert growth < budget, f"peak memory grew by {growth / 2**20:.1f} MiB"
    index = PrivacyIndex.open(str(out))
    assert index.count == rows and index.num_shards == rows // shard and index.info.num_identities == rows // 10
    # spot check: row 123,456 is the normalised table row, where the table put it
    raw = np.load(table, mmap_mode="r")[123_456]
    want = (raw / np.linalg.norm(raw.astype(np.float64))).astype(np.float32)
    assert np.array_equal(index.shard(12).vectors()[123_456 - 12 * shard], want)


def test_streamed_table_build_equals_the_in_memory_build(tmp_path):
    table = write_npy_table(tmp_path, 3000, 16, chunk=700)
    streamed, direct = Storage(str(tmp_path / "streamed")), Storage(str(tmp_path / "direct"))
    build_index_from_table(str(table), streamed, block_rows=512, shard_size=1000)
    embeddings = np.load(table)
    labels = pq.read_table(tmp_path / "table.labels.parquet")
    build_index(embeddings, labels["identity"].to_pylist(), labels["file"].to_pylist(), direct,
                embedder_fingerprint=None, preprocessing=None, shard_size=1000)
    for name in ("00000.faiss", "00001.faiss", "00002.faiss", "00002.parquet"):
        assert streamed.read_bytes(f"shards/{name}") == direct.read_bytes(f"shards/{name}")
    a, b = PrivacyIndex.open(streamed).info, PrivacyIndex.open(direct).info
    assert (a.count, a.num_identities, a.shards) == (b.count, b.num_identities, b.shards) == (3000, 300, a.shards)


def test_labels_that_do_not_match_the_rows_are_refused_and_leave_nothing(tmp_path):
    table = write_npy_table(tmp_path, 100, 8)
    pq.write_table(pa.table({"identity": ["a"] * 99, "file": ["f"] * 99}), tmp_path / "table.labels.parquet")
    out = tmp_path / "index"
    with pytest.raises(UserError, match="fewer rows"):
        build_index_from_table(str(table), Storage(str(out)), block_rows=40, shard_size=40)
    assert not (out / "index.json").exists() and not (out / "shards").exists()


def test_float16_rows_never_change_a_decision_near_the_threshold(tmp_path):
    rng = np.random.default_rng(3)
    dim, tau = 64, 0.6
    rows = rng.standard_normal((4000, dim)).astype(np.float32)
    names = [str(i) for i in range(len(rows))]
    for where, dtype in (("f32", "float32"), ("f16", "float16")):
        build_index(rows, names, names, Storage(str(tmp_path / where)), embedder_fingerprint=None,
                    preprocessing=None, shard_size=1500, row_dtype=dtype)
    exact, half = PrivacyIndex.open(str(tmp_path / "f32")), PrivacyIndex.open(str(tmp_path / "f16"))
    assert half.info.row_dtype == "float16" and half.shard(0).load()._engine.index.sa_code_size() == 2 * dim

    # Queries at cosine tau ± (0 .. 2·FP16_MARGIN) from an enrolled row: the float16 rounding alone
    # would move them across the threshold; a few near-ties between two rows as well.
    enrolled = exact.embeddings()
    targets = rng.integers(0, len(enrolled), 600)
    # (|offset| >= 1e-6: closer than that, float32 summation order alone decides, in any backend)
    offsets = rng.choice([-1, 1], 600) * rng.uniform(1e-6, FP16_MARGIN / 4, 600)
    v = enrolled[targets].astype(np.float64)
    u = rng.standard_normal(v.shape)
    u -= (u * v).sum(axis=1, keepdims=True) * v
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    cos = tau + offsets
    queries = (cos[:, None] * v + np.sqrt(1 - cos[:, None] ** 2) * u).astype(np.float32)
    queries[-40:] = (enrolled[targets[-40:]] + enrolled[targets[-40:] - 1]) / 2  # two rows at once
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    want_sims, want_rows = exact.max_similarity(queries)
    got_sims, got_rows = half.max_similarity(queries)
    # Two rows tied to float32 rounding may swap (summation order); everything else is the same row.
    assert np.array_equal(got_rows[:-40], want_rows[:-40])
    assert np.isin(got_rows[-40:] - targets[-40:], [0, -1]).all()
    np.testing.assert_allclose(got_sims, want_sims, rtol=0, atol=1e-6)
    assert np.array_equal(got_sims > tau, want_sims > tau)
    assert 500 < (np.abs(want_sims - tau) < FP16_MARGIN).sum()  # the test is about the hard cases
    # ... where the float16 scan alone decides otherwise (what the float32 re-scoring repairs)
    scans = [shard.load()._engine.index.search(queries, 1) for shard in half._shards]
    raw = np.max([sims[:, 0] for sims, _ in scans], axis=0)
    assert ((raw > tau) != (want_sims > tau)).sum() > 10
    # top-k too, and the embeddings a reader gets back are the float32 rows
    want_top, got_top = exact.search(queries[:-40], 5), half.search(queries[:-40], 5)
    assert np.array_equal(got_top[1], want_top[1])
    assert np.array_equal(half.embeddings(), enrolled)
