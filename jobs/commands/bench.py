"""`facegen bench …`: benchmarks are a user feature; each reports ratios against a baseline measured
in the same run. One module per benchmark in `jobs/benchmarks/`, each exposing `register(subparsers)`.

Benchmark modules import torch, faiss and Ray at the top; they are imported only when a benchmark is
chosen, so `facegen --help` and every other command start without them.
"""

from __future__ import annotations

import argparse

# name -> the one line `facegen bench --help` shows (the module's own parser has the full help)
BENCHMARKS = {
    "models": "generator and embedder images/s: batched fast path vs batch-1 reference",
    "filter": "privacy-query us/candidate vs index size: exact batched search vs the original loop",
    "generate": "end-to-end candidates/s vs an original-style loop",
    "train": "training speed: s/kimg of the real loop on this device",
    "scaling": "candidates/s with 1 vs N generator actors on Ray (scaling efficiency)",
    "suite": "every throughput and correctness figure in one time-boxed run (GPU: < 8 min)",
    "index": "privacy index build time/memory, size and query cost as rows grow",
    "separability": "selection and expansion separability time/memory as accepted identities grow",
    "samples": "samples/s and memory of a whole job as samples per identity and total samples grow",
    "loader": "FR loader images/s from shards vs an image folder of the same images",
    "overlap": "phase 3 with shard writing overlapped vs inline, for a given device time per shard",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    listing = "\n".join(f"  {name:<10} {text}" for name, text in BENCHMARKS.items())
    parser = subparsers.add_parser(
        "bench",
        help="measure throughput on this machine (ratios against a same-run baseline)",
        description="Benchmarks. Each prints absolute rates and the ratio to a baseline measured in the same run.",
        epilog=f"benchmarks:\n{listing}\n\n`facegen bench BENCHMARK --help` shows a benchmark's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("benchmark", nargs="?", choices=list(BENCHMARKS), metavar="BENCHMARK",
                        help=f"one of: {', '.join(BENCHMARKS)}")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's options")
    parser.set_defaults(func=lambda args: run(parser, args))


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not args.benchmark:
        parser.print_help()
        return 2
    from facegen.jobs.cli import register_modules

    inner = argparse.ArgumentParser(prog="facegen bench")
    register_modules(inner.add_subparsers(dest="benchmark", metavar="BENCHMARK"), "facegen.jobs.benchmarks",
                     [args.benchmark])
    chosen = inner.parse_args([args.benchmark, *args.options])
    return int(chosen.func(chosen) or 0)
