"""`facegen bench …`: benchmarks are a user feature; each reports ratios against a baseline measured
in the same run. One module per benchmark in `jobs/benchmarks/`, each exposing `register(subparsers)`."""

from __future__ import annotations

import argparse

BENCHMARKS = ["models", "filter", "generate", "train", "scaling", "suite"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure throughput on this machine (ratios against a same-run baseline)",
        description=(
            "Benchmarks. Each prints absolute rates and the ratio to a baseline measured in the same run."
        ),
    )
    from facegen.jobs.cli import register_modules

    subparsers = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    register_modules(subparsers, "facegen.jobs.benchmarks", BENCHMARKS)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
