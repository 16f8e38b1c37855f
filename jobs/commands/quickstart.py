"""`facegen quickstart`: the whole workflow on this machine, from nothing, with a short summary."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quickstart",
        help="the whole workflow on this machine in a few minutes: real population, certified dataset, FR",
        description=(
            "Renders a procedural VIS/NIR 'real' population and enrols it into a calibrated privacy index, "
            "generates a certified dataset with the example job (jobs/examples/tiny.yaml) on the embedded Ray, "
            "trains a small face recogniser on it for a few steps and verifies it on held-out world "
            "identities, then prints a summary: identities accepted, rejections by reason, the largest "
            "similarity to a real image against the calibrated threshold, throughput, FR accuracy and where "
            "the report is. Uses the demo models facegen ships when installed, else seeded random ones. "
            "Rerunning into the same DIR skips every finished stage."
        ),
    )
    p.add_argument("--out", default="facegen-quickstart",
                   help="folder for the models, population, index, dataset and FR run (default: %(default)s, "
                        "the folder jobs/examples/tiny.yaml names)")
    p.add_argument("--executor", choices=["local", "ray"], default="ray",
                   help="where the generation job runs (default: %(default)s, an embedded local Ray)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from facegen.jobs.quickstart import run_quickstart, summary_lines

    summary = run_quickstart(args.out, args.executor)
    for line in summary_lines(summary):
        print(line)
    return 0 if summary["report"]["privacy_certificate"]["violations"] == 0 else 1
