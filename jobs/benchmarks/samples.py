"""`facegen bench samples`: what a whole generation job costs as its samples grow.

The demo job (`facegen demo`'s models: 64² dual-branch generator, r18-shaped embedder, `--population`
enrolled stand-ins) run through the local executor once per (`--identities`, `--samples-per-identity`)
pair, each into a fresh output: wall seconds, samples/s, candidates/s (proposals + sample attempts)
and the process's peak memory growth during the job. Model loading is part of every run (as in a
real job); the demo's models and index are prepared once, before anything is timed. It runs unchanged
on a GPU node (`--device cuda`).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

from facegen.jobs.benchmarks import write_record
from facegen.jobs.common import positive_ints
from facegen.models.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("samples", help="job samples/s and memory as samples per identity and "
                                   "total samples grow", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", default="8", help="comma list of identity counts")
    parser.add_argument("--samples-per-identity", default="2,8,32", help="comma list of samples per identity")
    parser.add_argument("--population", type=int, default=400, help="enrolled stand-ins in the demo index")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the demo and outputs (default: temp)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    identities = positive_ints(args.identities, "--identities")
    per_identity = positive_ints(args.samples_per_identity, "--samples-per-identity")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA device is available here")
    from facegen.engine.local import run_local
    from facegen.engine.spec import build_spec
    from facegen.jobs.benchmarks.index import PeakMemory
    from facegen.jobs.demo import prepare_demo

    results = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        base = prepare_demo(Path(scratch) / "demo", population=args.population)
        tree = json.loads(base.model_dump_json())
        print(f"{'identities':>10} {'per id':>7} {'samples':>8} {'seconds':>8} {'samples/s':>10} "
              f"{'candidates/s':>13} {'peak growth':>12}")
        for n in identities:
            for k in per_identity:
                out = Path(scratch) / f"out-{n}-{k}"
                spec = build_spec(tree, [f"identities={n}", f"samples_per_identity={k}",
                                         f"batch_size={args.batch_size}", f"output.uri={out}",
                                         f"run.device={args.device}", "run.executor=local"])
                gc.collect()
                with PeakMemory() as memory:
                    start = time.perf_counter()
                    report = run_local(spec, progress=False)
                    seconds = time.perf_counter() - start
                samples = report["samples"]["written"]
                candidates = report["samples"]["attempts"] + (report["identities"]["proposed"] or 0)
                record = {"identities": n, "samples_per_identity": k, "samples": samples, "seconds": seconds,
                          "samples_per_s": samples / seconds, "candidates_per_s": candidates / seconds,
                          "peak_growth_bytes": memory.growth}
                results.append(record)
                print(f"{n:>10,} {k:>7} {samples:>8,} {seconds:>8.1f} {record['samples_per_s']:>10.2f} "
                      f"{record['candidates_per_s']:>13.2f} {memory.growth / 2**20:>8,.0f} MiB", flush=True)
    record = {"benchmark": "samples", "job": f"demo (population {args.population})", "batch_size": args.batch_size,
              "device": args.device, "results": results}
    write_record(args.json, record)
    return 0
