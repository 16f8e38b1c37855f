"""`facegen bench filter`: privacy-query cost per candidate vs index size, batched exact search vs the
original filter's loop.

Baseline (measured in the same run): ArcBiFaceGAN's privacy test, a Python loop over every real
identity computing one torch cosine per identity per candidate and comparing it on the host (its
generate_recognition_data.py).
It is timed on `--baseline-candidates` candidates over at most `--baseline-max-identities` identities;
past that its cost (linear in the identity count) is extrapolated and marked so.
Ours: one `max_similarity` call over a batch of `--queries` candidates against every enrolled vector,
through the same `IndexShard` + `reduce_max` path as `PrivacyIndex`, per backend. Data: random unit
vectors (search cost does not depend on the values). Every candidate passes (random directions in 512-d
stay far below the threshold), so the loop never exits early, as for an accepted sample.
"""

from __future__ import annotations

import argparse
import gc
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facegen.engine.index import DEFAULT_COMPAT_THRESHOLDS, IndexShard, faiss_has_gpu, reduce_max
from facegen.jobs.benchmarks import write_record
from facegen.models.devices import resolve_device
from facegen.models.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "filter", help="privacy-query us/candidate vs index size: exact batched search vs the original loop",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000,1000000", help="enrolled vectors per index")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1024, help="candidates per batched query")
    parser.add_argument("--backends", default=None,
                        help="comma list of faiss,torch,numpy (default: all that run on --device)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (torch and faiss-gpu backends)")
    parser.add_argument("--shard-size", type=int, default=1_000_000, help="rows per shard")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per backend (best is kept)")
    parser.add_argument("--baseline-candidates", type=int, default=3)
    parser.add_argument("--baseline-max-identities", type=int, default=100_000,
                        help="identities the loop is timed over; larger sizes are extrapolated linearly")
    parser.add_argument("--data", choices=["random", "clustered"], default="random",
                        help="random unit vectors, or identities of --per-identity samples with an "
                             "ArcFace-like same-identity cosine of ~0.78")
    parser.add_argument("--per-identity", type=int, default=10)
    parser.add_argument("--prune-tau", type=float, default=None,
                        help="also time exact-by-certificate pruning at this threshold (one cluster per "
                             "identity with --data clustered, else n/16) and report the fraction searched")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    parser.set_defaults(func=run)


def _parse(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    try:
        sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--sizes: {args.sizes!r} is not a comma list of integers") from None
    if not sizes or min(sizes) <= 0 or args.queries <= 0 or args.repeats <= 0 or args.baseline_candidates <= 0:
        raise UserError("--sizes, --queries, --repeats, --baseline-candidates: must be positive")
    on_gpu = resolve_device(args.device, what="--device").type == "cuda"
    default = ["torch"] + (["faiss"] if faiss_has_gpu() else []) if on_gpu else ["faiss", "torch", "numpy"]
    backends = args.backends.split(",") if args.backends else default
    unknown = sorted(set(backends) - {"faiss", "torch", "numpy"})
    if unknown:
        raise UserError(f"--backends: unknown {unknown}; choose from faiss, torch, numpy")
    return sizes, backends


def unit_vectors(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    """Random unit float32 rows, generated in chunks (no float64 copy of a 2 GB matrix)."""
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, 1 << 16):
        block = rng.standard_normal((min(1 << 16, count - start), dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


# Sample = unit centre + noise of norm SAME_ID_NOISE: two samples of an identity then have cosine
# ~1 / (1 + noise^2) = 0.776, the typical same-identity ArcFace cosine hard-coded in ArcBiFaceGAN's
# generate_recognition_data.py.
SAME_ID_NOISE = float(np.sqrt(1 / 0.776 - 1))


def clustered_vectors(rng: np.random.Generator, count: int, dim: int, per_identity: int) -> np.ndarray:
    """Unit rows grouped in identities of `per_identity` consecutive samples."""
    centres = unit_vectors(rng, -(-count // per_identity), dim)
    out = np.repeat(centres, per_identity, axis=0)[:count]
    out += unit_vectors(rng, count, dim) * np.float32(SAME_ID_NOISE)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def original_filter_loop(candidate: torch.Tensor, real_features: list[torch.Tensor], threshold: float) -> bool:
    """ArcBiFaceGAN's privacy test: one cosine per real identity, each compared on the host."""
    for feature in real_features:
        if abs(F.cosine_similarity(candidate, feature).item()) > threshold:
            return False
    return True


def time_baseline(vectors: np.ndarray, queries: np.ndarray, args: argparse.Namespace) -> tuple[float, bool]:
    """(seconds per candidate at len(vectors) identities, whether it was extrapolated)."""
    looped = min(len(vectors), args.baseline_max_identities)
    device = torch.device(args.device)
    features = [row[None].to(device) for row in torch.from_numpy(vectors[:looped])]
    candidates = torch.from_numpy(queries[: args.baseline_candidates]).to(device)
    threshold = DEFAULT_COMPAT_THRESHOLDS["privacy"]
    original_filter_loop(candidates[:1], features[:100], threshold)  # warm-up
    _sync(args.device)
    start = time.perf_counter()
    for i in range(len(candidates)):
        original_filter_loop(candidates[i : i + 1], features, threshold)
    seconds = (time.perf_counter() - start) / len(candidates)
    return seconds * len(vectors) / looped, looped < len(vectors)


def make_shards(vectors: np.ndarray, backend: str, args: argparse.Namespace) -> list[IndexShard]:
    shards = []
    for offset in range(0, len(vectors), args.shard_size):
        rows = vectors[offset : offset + args.shard_size]
        labels = np.zeros(len(rows), dtype=object)
        shards.append(IndexShard.from_arrays(rows, labels, labels, offset=offset, backend=backend,
                                             device=args.device).load())
    return shards


def time_backend(vectors: np.ndarray, queries: np.ndarray, backend: str, args: argparse.Namespace
                 ) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    """(best seconds per candidate, the answer) for one backend."""
    shards = make_shards(vectors, backend, args)
    batch = torch.from_numpy(queries).to(args.device) if backend == "torch" else queries
    answer = reduce_max([s.max_similarity(batch[:8]) for s in shards])  # warm-up (allocations, kernels)
    best = float("inf")
    for _ in range(args.repeats):
        _sync(args.device)
        start = time.perf_counter()
        answer = reduce_max([s.max_similarity(batch) for s in shards])
        _sync(args.device)
        best = min(best, time.perf_counter() - start)
    del shards
    gc.collect()
    return best / len(queries), answer


def time_pruned(vectors: np.ndarray, queries: np.ndarray, args: argparse.Namespace
                ) -> tuple[float, float, float, tuple[np.ndarray, np.ndarray]]:
    """(seconds per candidate, fraction of comparisons done, build seconds, answer) of the pruned path."""
    from facegen.engine.index.prune import ClusteredShard

    clusters = len(vectors) // args.per_identity if args.data == "clustered" else None
    start = time.perf_counter()
    shard = ClusteredShard.build(vectors, num_clusters=clusters, seed=args.seed)
    build_s = time.perf_counter() - start
    best, searched, answer = float("inf"), 0.0, None
    for _ in range(args.repeats):
        start = time.perf_counter()
        sims, rows, searched = shard.max_similarity_above(queries, args.prune_tau)
        best = min(best, time.perf_counter() - start)
        answer = (sims, rows)
    return best / len(queries), searched, build_s, answer


def _pruned_entry(vectors, queries, loop_s, reference, args) -> dict:
    seconds, searched, build_s, (sims, rows) = time_pruned(vectors, queries, args)
    tau = args.prune_tau
    match = reference[0] > tau
    return {
        "us_per_candidate": seconds * 1e6,
        "speedup_vs_loop": loop_s / seconds,
        "searched_fraction": searched,
        "build_seconds": build_s,
        "tau": tau,
        "matches": int(match.sum()),
        "same_decisions_as_first": bool(((sims > tau) == match).all() and (rows[match] == reference[1][match]).all()),
    }


def run(args: argparse.Namespace) -> int:
    sizes, backends = _parse(args)
    rng = np.random.default_rng(args.seed)
    queries = unit_vectors(rng, args.queries, args.dim)
    results = []
    for size in sizes:
        vectors = (clustered_vectors(rng, size, args.dim, args.per_identity) if args.data == "clustered"
                   else unit_vectors(rng, size, args.dim))
        loop_s, extrapolated = time_baseline(vectors, queries, args)
        row = {"size": size, "loop_us_per_candidate": loop_s * 1e6, "loop_extrapolated": extrapolated,
               "backends": {}}
        reference = None
        for backend in backends:
            seconds, (sims, ids) = time_backend(vectors, queries, backend, args)
            if reference is None:
                reference = (sims, ids)
            row["backends"][backend] = {
                "us_per_candidate": seconds * 1e6,
                "speedup_vs_loop": loop_s / seconds,
                "max_abs_diff_vs_first": float(np.abs(sims - reference[0]).max()),
                "same_rows_as_first": bool((ids == reference[1]).all()),
            }
        if args.prune_tau is not None:
            row["backends"]["pruned"] = _pruned_entry(vectors, queries, loop_s, reference, args)
        results.append(row)
        print(format_row(row), flush=True)
        del vectors
        gc.collect()
    report = {"benchmark": "filter", "dim": args.dim, "queries": args.queries, "device": args.device,
              "data": args.data,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "results": results}
    write_record(args.json, report)
    return 0


def format_row(row: dict) -> str:
    mark = " (extrapolated)" if row["loop_extrapolated"] else ""
    parts = [f"size {row['size']:>9}: loop {row['loop_us_per_candidate']:>12.1f} us/candidate{mark}"]
    for name, entry in row["backends"].items():
        same = entry.get("same_rows_as_first", entry.get("same_decisions_as_first"))
        extra = "" if same else " (answers differ!)"
        if "searched_fraction" in entry:
            extra += (f"  searched {entry['searched_fraction']:.1%} at tau {entry['tau']}, "
                      f"{entry['matches']} matches, clustering {entry['build_seconds']:.1f} s")
        parts.append(f"  {name:<6}{entry['us_per_candidate']:>10.2f} us/candidate  "
                     f"x{entry['speedup_vs_loop']:,.0f} vs loop{extra}")
    return "\n".join(parts)
