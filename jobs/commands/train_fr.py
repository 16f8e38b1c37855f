"""`facegen train-fr`: train a face-recognition iResNet on a generated dataset (Ray Train)."""

from __future__ import annotations

import argparse
import json

FLAGS = {
    "data": "data.uri",
    "outdir": "output.dir",
    "follow": "data.follow",
    "resume": "resume",
    "num_workers": "run.num_workers",
    "executor": "run.executor",
    "address": "run.address",
    "device": "run.device",
    "max_failures": "run.max_failures",
    "steps": "optim.steps",
    "epochs": "optim.epochs",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-fr",
        help="train a face-recognition iResNet (ArcFace/CosFace, partial FC) on a generated dataset",
        description=(
            "Train an insightface-style iResNet with an ArcFace or CosFace margin head on a facegen dataset, "
            "reading its shards directly (no unpacking), optionally while `facegen generate` is still writing "
            "it (--follow). Class centres are split across workers and can be sampled per step (head.sample_rate, "
            "insightface's partial FC). Runs on Ray Train (gloo on CPU, NCCL on GPU) with checkpoints and "
            "automatic restart after a worker failure; --resume continues a run. The result, RUN/backbone.pth, "
            "is a plain insightface state dict: `facegen eval-fr --model RUN/backbone.pth`. Settings come from "
            "JOB.yaml, then the flags, then --set KEY=VALUE."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("job", nargs="?", help="train-fr spec YAML (see docs/training-fr.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any spec key, e.g. head.margin=cosface (repeatable)")
    p.add_argument("--data", help="the dataset (local path or fsspec URI)")
    p.add_argument("--outdir", help="where run directories NNNNN-<desc> are created")
    p.add_argument("--follow", action="store_true", default=None,
                   help="read the dataset while it is being generated (ends with the job's report)")
    p.add_argument("--resume", help="a train-fr run directory or checkpoint folder to continue")
    p.add_argument("--steps", type=int, help="training length in optimiser steps")
    p.add_argument("--epochs", type=float, help="training length in epochs (instead of --steps)")
    p.add_argument("--num-workers", dest="num_workers", type=int, help="Ray Train workers (one per GPU)")
    p.add_argument("--executor", choices=["local", "ray"], help="ray (default) or one in-process worker")
    p.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where workers train")
    p.add_argument("--max-failures", dest="max_failures", type=int, help="automatic restarts after failures")
    p.add_argument("--dry-run", action="store_true", help="print the resolved spec; train nothing")
    p.set_defaults(func=run)


def resolve_spec(args: argparse.Namespace):
    from facegen.engine.frtrain.spec import build_fr_spec
    from facegen.engine.spec import load_spec_file

    tree = load_spec_file(args.job, "train-fr spec") if args.job else {}
    flags = [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in FLAGS.items()
             if getattr(args, flag, None) is not None]
    if args.steps is not None:
        flags.append("optim.epochs=null")
    if args.epochs is not None:
        flags.append("optim.steps=null")
    return build_fr_spec(tree, flags + list(args.overrides))


def run(args: argparse.Namespace) -> int:
    # torch and Ray load only when the command runs, so `facegen --help` starts fast
    from facegen.engine.frtrain.launch import prepare
    from facegen.engine.frtrain.spec import fr_spec_to_yaml

    spec = resolve_spec(args)
    if args.dry_run:
        prepared = prepare(spec, create=False)
        print(fr_spec_to_yaml(spec), end="")
        print(f"# run directory: {prepared.run_uri}")
        print(f"# identities: {prepared.num_classes if prepared.num_classes is not None else 'not chosen yet'}")
        return 0
    prepared = prepare(spec)
    print(f"run directory: {prepared.run_uri}", flush=True)
    summary = execute(spec, prepared)
    print(f"trained {summary.get('step')} steps; backbone: {prepared.run_uri}/backbone.pth")
    return 0


def execute(spec, prepared) -> dict:
    from facegen.engine.frtrain.launch import run_local

    if spec.run.executor == "ray":
        from facegen.cluster.train_fr import run_ray_fr_training

        return run_ray_fr_training(spec, prepared)
    return run_local(spec, prepared)
