"""`facegen bench index`: what the privacy index costs as it grows: build time and memory, size on
storage, memory once opened, and query µs per candidate, per row count and row storage.

For each `--rows` count a random unit-vector table (`.npy` + labels parquet, identities of
`--per-identity` rows) is written to a scratch folder, then enrolled exactly as `facegen index build
--table` does (streamed, `--shards` shards). Memory is the process's peak resident growth during the
step (Linux: the peak is reset before each step), so the first row count also pays one-time library
pools (~0.1 GB); compare the rows with each other. Query cost is one batched `max_similarity` of
`--queries` candidates through `PrivacyIndex` on `--device` (faiss on CPU; torch or faiss-gpu on
CUDA). It runs unchanged on a GPU node.
"""

from __future__ import annotations

import argparse
import gc
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from facegen.jobs.benchmarks import mib, write_record
from facegen.models.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("index", help="index build time/memory, size and query cost as rows grow",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="100000,1000000", help="comma list of enrolled row counts (1e6 ok)")
    parser.add_argument("--shards", type=int, default=4, help="shards per index")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--row-dtypes", default="float32,float16", help="row storage(s) to measure")
    parser.add_argument("--queries", type=int, default=1024, help="candidates per batched query")
    parser.add_argument("--per-identity", type=int, default=10, help="rows per enrolled identity")
    parser.add_argument("--repeats", type=int, default=3, help="timed query calls (the best is kept)")
    parser.add_argument("--device", default="cpu", help="query device: cpu or cuda[:i]")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for tables and indexes (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    parser.set_defaults(func=run)


def _parse(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    try:
        rows = [int(float(v)) for v in args.rows.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--rows: {args.rows!r} is not a comma list of integers") from None
    dtypes = [d.strip() for d in args.row_dtypes.split(",") if d.strip()]
    if not rows or min(rows) < args.shards or args.shards < 1 or args.dim < 1 or args.queries < 1:
        raise UserError("--rows, --shards, --dim, --queries: must be positive, with at least one row per shard")
    if not dtypes or set(dtypes) - {"float32", "float16"}:
        raise UserError(f"--row-dtypes: {args.row_dtypes!r}; choose from float32, float16")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device is available here")
    return rows, dtypes


class PeakMemory:
    """Peak resident-memory growth of this process during a `with` block (Linux /proc; elsewhere
    the lifetime peak from getrusage, which only grows)."""

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.before = self._rss()
        return self

    def __exit__(self, *exc) -> None:
        self.growth = max(0, self._peak() - self.before)

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            match = re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text())
        except OSError:
            return None
        return int(match.group(1)) * 1024 if match else None

    def _rss(self) -> int:
        return self._status("VmRSS") or 0

    def _peak(self) -> int:
        peak = self._status("VmHWM") if self.reset else None
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak


def write_table(folder: Path, rows: int, dim: int, per_identity: int, seed: int = 0) -> Path:
    """Random unit rows in a .npy (written in chunks) and its labels parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from facegen.jobs.benchmarks.filter import unit_vectors

    path = folder / f"table-{rows}.npy"
    matrix = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, 1 << 17):
        matrix[start : start + (1 << 17)] = unit_vectors(rng, min(1 << 17, rows - start), dim)
    matrix.flush()
    del matrix
    ids = np.arange(rows)
    pq.write_table(pa.table({"identity": pa.array((ids // per_identity).astype(str)),
                             "file": pa.array(ids.astype(str))}), folder / f"table-{rows}.labels.parquet")
    return path


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(table: Path, out: Path, rows: int, dtype: str, queries: np.ndarray, args) -> dict:
    from facegen.engine.index import PrivacyIndex
    from facegen.engine.index.stream import build_index_from_table
    from facegen.engine.storage import Storage

    shard_size = -(-rows // args.shards)
    shutil.rmtree(out, ignore_errors=True)
    with PeakMemory() as build_memory:
        start = time.perf_counter()
        info = build_index_from_table(str(table), Storage(str(out)), shard_size=shard_size, row_dtype=dtype)
        build_s = time.perf_counter() - start
    gc.collect()
    with PeakMemory() as open_memory:
        start = time.perf_counter()
        backend = "torch" if args.device.startswith("cuda") and dtype == "float16" else "auto"
        index = PrivacyIndex.open(str(out), backend=backend, device=args.device)
        for i in range(index.num_shards):
            index.shard(i).load()
        open_s = time.perf_counter() - start
    index.max_similarity(queries[:8])  # warm-up
    best = float("inf")
    for _ in range(max(1, args.repeats)):
        start = time.perf_counter()
        index.max_similarity(queries)
        best = min(best, time.perf_counter() - start)
    matrix = rows * args.dim * 4
    record = {"rows": rows, "row_dtype": dtype, "shards": info.num_shards, "identities": info.num_identities,
              "matrix_bytes": matrix, "build_seconds": build_s, "build_peak_growth_bytes": build_memory.growth,
              "shard_bytes": shard_size * args.dim * 4, "storage_bytes": folder_bytes(out),
              "open_seconds": open_s, "open_peak_growth_bytes": open_memory.growth,
              "query_us_per_candidate": best / len(queries) * 1e6, "backend": index.backend}
    del index
    gc.collect()
    return record


def run(args: argparse.Namespace) -> int:
    counts, dtypes = _parse(args)
    from facegen.jobs.benchmarks.filter import unit_vectors

    queries = unit_vectors(np.random.default_rng(99), args.queries, args.dim)
    results = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        folder = Path(scratch)
        print(f"{'rows':>10} {'rows as':>8} {'build s':>8} {'build peak':>11} {'shard':>8} {'on storage':>11} "
              f"{'open peak':>10} {'query us/cand':>14}")
        for rows in counts:
            table = write_table(folder, rows, args.dim, args.per_identity)
            for dtype in dtypes:
                r = measure(table, folder / "index", rows, dtype, queries, args)
                results.append(r)
                print(f"{rows:>10,} {dtype:>8} {r['build_seconds']:>8.1f} {mib(r['build_peak_growth_bytes'], 0):>11} "
                      f"{mib(r['shard_bytes'], 0):>8} {mib(r['storage_bytes'], 0):>11} "
                      f"{mib(r['open_peak_growth_bytes'], 0):>10} {r['query_us_per_candidate']:>14.1f}", flush=True)
            table.unlink()
    record = {"benchmark": "index", "dim": args.dim, "shards": args.shards, "queries": args.queries,
              "device": args.device, "results": results}
    write_record(args.json, record)
    return 0
