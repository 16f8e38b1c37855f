"""`facegen bench separability`: what separability costs as the accepted identities grow.

Two measurements per `--identities` count N, each against the path it replaced, in the same run:

- **selection**: N proposals (random unit anchors, every one passing the other filters; random
  `--dim`-d vectors are nearly orthogonal, so all N are accepted) offered in slot order, in blocks of
  `--block` as `facegen generate` offers them: `engine.phases.Selection` (exact search of an
  `AnchorIndex` + float64 decisions near the threshold) against the dense float32 path (every earlier
  anchor in one growing matrix, re-concatenated per block). Seconds and the process's peak memory
  growth; the accepted identities must be identical.
- **expand**: `--candidates` candidates checked against all N anchors except their own, as one
  expansion batch does: the anchor search (`AnchorShards`, faiss on CPU; torch/faiss-gpu on CUDA) +
  `max_other_above`, against the dense [candidates x N] product on `--device` (torch). µs per
  candidate and peak memory growth; the decisions must be identical.

It runs unchanged on a GPU node (`--device cuda`).
"""

from __future__ import annotations

import argparse
import gc
import time
from functools import partial
from pathlib import Path

import numpy as np

from facegen.jobs.benchmarks import mib, write_record
from facegen.models.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("separability", help="selection and expansion separability cost as "
                                   "identities grow", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", default="100,1000,10000", help="comma list of accepted identity counts")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--block", type=int, default=512, help="proposals offered at once (selection)")
    parser.add_argument("--candidates", type=int, default=256, help="candidates per expansion batch")
    parser.add_argument("--threshold", type=float, default=0.5, help="separability threshold (cosine)")
    parser.add_argument("--dense-up-to", type=int, default=100_000,
                        help="skip the dense baseline above this many identities (it grows quadratically)")
    parser.add_argument("--repeats", type=int, default=3, help="timed expansion batches (the best is kept)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--backend", default=None, choices=["torch", "faiss", "numpy", "auto"],
                        help="anchor search backend (default: the engine's, engine.index.anchors.BACKEND)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    parser.set_defaults(func=run)


def _counts(args: argparse.Namespace) -> list[int]:
    try:
        counts = [int(float(v)) for v in args.identities.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--identities: {args.identities!r} is not a comma list of integers") from None
    if not counts or min(counts) < 2 or args.dim < 1 or args.block < 1 or args.candidates < 1:
        raise UserError("--identities (each >= 2), --dim, --block, --candidates: must be positive")
    if not 0 < args.threshold < 1:
        raise UserError(f"--threshold: {args.threshold} must be in (0, 1)")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device is available here")
    return counts


def proposals_of(anchors: np.ndarray):
    from facegen.engine.phases import Proposals

    n = len(anchors)
    return Proposals(slot=np.arange(n, dtype=np.int64), condition=np.zeros((n, 0), np.float32), anchor=anchors,
                     real_sim=np.zeros(n, np.float32), real_identity=np.full(n, "", object),
                     verdict=np.full(n, "ok", object))


def select_indexed(anchors: np.ndarray, threshold: float, block: int, device: str) -> list[int]:
    from facegen.engine.phases import Selection

    selection = Selection(wanted=len(anchors), threshold=threshold, device=device)
    proposals = proposals_of(anchors)
    for start in range(0, len(anchors), block):
        part = slice(start, start + block)
        selection.offer(type(proposals)(proposals.slot[part], proposals.condition[part], anchors[part],
                                        proposals.real_sim[part], proposals.real_identity[part],
                                        proposals.verdict[part]))
    return [int(s) for rows in selection.rows for s in rows.slot]


def select_dense(anchors: np.ndarray, threshold: float, block: int) -> list[int]:
    """The selection before the anchor index: float32 products against one growing dense matrix."""
    accepted, matrix = [], np.zeros((0, anchors.shape[1]), np.float32)
    for start in range(0, len(anchors), block):
        rows = anchors[start : start + block]
        ok = ~((rows @ matrix.T).max(axis=1, initial=-np.inf) > threshold)
        within = rows @ rows.T
        taken: list[int] = []
        for i in np.flatnonzero(ok):
            if not (taken and (within[i, taken] > threshold).any()):
                taken.append(int(i))
        accepted += [start + i for i in taken]
        matrix = np.concatenate([matrix, rows[taken]])
    return accepted


def expand_indexed(anchors, queries, own, threshold, device, backend=None):
    from facegen.engine.index.anchors import BACKEND, AnchorShards, max_other_above

    index = AnchorShards(anchors, device=device, backend=backend or BACKEND)
    return lambda: max_other_above(index.search, index.vectors, queries, threshold, exclude=own)[1]


def expand_dense(anchors, queries, own, threshold, device):
    import torch

    all_anchors = torch.tensor(anchors, device=device)
    q = torch.tensor(queries, device=device)
    own_t = torch.from_numpy(own).to(device)

    def step():
        others = q @ all_anchors.T
        others[torch.arange(len(q), device=device), own_t] = -torch.inf
        return (others.max(dim=1).values > threshold).cpu().numpy()

    return step


def timed(make, repeats: int, device: str) -> tuple[float, int, np.ndarray]:
    """(best seconds of one call, peak memory growth of building + calling, the call's result)."""
    from facegen.jobs.benchmarks.index import PeakMemory

    gc.collect()
    with PeakMemory() as memory:
        step = make()
        result = step()  # warm-up (builds the search index on first use)
        _sync(device)
        best = float("inf")
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            step()
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return best, memory.growth, result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> int:
    from facegen.jobs.benchmarks.filter import unit_vectors
    from facegen.jobs.benchmarks.index import PeakMemory

    counts = _counts(args)
    results = []
    print(f"{'identities':>10} {'select s':>9} {'dense s':>8} {'select peak':>12} {'dense peak':>11} "
          f"{'expand us/cand':>15} {'dense us/cand':>14} {'expand peak':>12} {'dense peak':>11}")
    for n in counts:
        rng = np.random.default_rng(n)
        anchors = unit_vectors(rng, n, args.dim)
        dense = n <= args.dense_up_to
        gc.collect()
        with PeakMemory() as memory:
            start = time.perf_counter()
            accepted = select_indexed(anchors, args.threshold, args.block, args.device)
            select_s = time.perf_counter() - start
        record = {"identities": n, "accepted": len(accepted), "select_seconds": select_s,
                  "select_peak_growth_bytes": memory.growth}
        if dense:
            gc.collect()
            with PeakMemory() as memory:
                start = time.perf_counter()
                reference = select_dense(anchors, args.threshold, args.block)
                dense_s = time.perf_counter() - start
            record.update(dense_select_seconds=dense_s, dense_select_peak_growth_bytes=memory.growth)
            if reference != accepted:
                raise RuntimeError(f"{n} identities: the indexed selection accepted other identities than the "
                                   "dense one")
        queries = unit_vectors(rng, args.candidates, args.dim)
        own = rng.integers(0, n, args.candidates)
        queries[::4] = anchors[own[::4]]  # some candidates close to their own anchor, as real ones are
        seconds, growth, decided = timed(partial(expand_indexed, anchors, queries, own, args.threshold, args.device,
                                                 args.backend),
                                         args.repeats, args.device)
        record.update(expand_us_per_candidate=seconds / args.candidates * 1e6, expand_peak_growth_bytes=growth)
        if dense:
            seconds, growth, want = timed(partial(expand_dense, anchors, queries, own, args.threshold, args.device),
                                          args.repeats, args.device)
            record.update(dense_expand_us_per_candidate=seconds / args.candidates * 1e6,
                          dense_expand_peak_growth_bytes=growth)
            if not np.array_equal(decided, want):
                raise RuntimeError(f"{n} identities: the anchor search decided otherwise than the dense product")
        results.append(record)
        print(f"{n:>10,} {record['select_seconds']:>9.2f} {_opt(record, 'dense_select_seconds', '{:.2f}'):>8} "
              f"{mib(record['select_peak_growth_bytes']):>12} {_opt_mib(record, 'dense_select_peak_growth_bytes'):>11} "
              f"{record['expand_us_per_candidate']:>15.1f} "
              f"{_opt(record, 'dense_expand_us_per_candidate', '{:.1f}'):>14} "
              f"{mib(record['expand_peak_growth_bytes']):>12} {_opt_mib(record, 'dense_expand_peak_growth_bytes'):>11}",
              flush=True)
    from facegen.engine.index.anchors import BACKEND

    out = {"benchmark": "separability", "backend": args.backend or BACKEND, "dim": args.dim, "block": args.block,
           "candidates": args.candidates,
           "threshold": args.threshold, "device": args.device, "results": results}
    write_record(args.json, out)
    return 0


def _opt(record: dict, key: str, fmt: str) -> str:
    return fmt.format(record[key]) if key in record else "-"


def _opt_mib(record: dict, key: str) -> str:
    return mib(record[key]) if key in record else "-"
