"""`facegen demo`: the whole pipeline on tiny seeded models, on this machine, in about a minute."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the example job end to end on tiny models (about a minute on a laptop CPU)",
        description=(
            "Creates tiny random-initialised models, enrols a stand-in real population into a privacy index, "
            "writes DIR/job.yaml (from jobs/examples/tiny.yaml) and generates a certified dataset in DIR/dataset. "
            "Rerunning with the same DIR resumes."
        ),
    )
    p.add_argument("--out", default="facegen-demo", help="folder for the models, index and dataset")
    p.add_argument("--executor", choices=["local", "ray"], default="local", help="where the job runs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from facegen.jobs.common import execute_job, print_job_summary
    from facegen.jobs.demo import prepare_demo

    spec = prepare_demo(args.out)
    spec = spec.model_copy(update={"run": spec.run.model_copy(update={"executor": args.executor})})
    report = execute_job(spec, resume=True)
    return print_job_summary(spec, report)
