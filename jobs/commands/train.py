"""`facegen train`: train the identity-conditioned VIS+NIR generator (ArcBiFaceGAN) on Ray Train."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from facegen.models.errors import UserError

if TYPE_CHECKING:  # torch and the training engine load when the command runs, not when the CLI starts
    from facegen.engine.training.launch import Prepared
    from facegen.engine.training.spec import TrainSpec

# The original training.py flags -> spec keys (values pass through YAML parsing, so 0/1 work as bools).
COMPAT_FLAGS = {
    "data": "data.uri",
    "outdir": "output.dir",
    "NIR_loss_weight": "loss.nir_loss_weight",
    "cfg": "config.preset",
    "snap": "schedule.snap",
    "batch": "config.batch",
    "mirror": "data.mirror",
    "cond": "data.cond",
    "resume": "resume",
    "gamma": "config.gamma",
    "kimg": "config.kimg",
    "seed": "seed",
    "aug": "augment.mode",
    "p": "augment.p",
    "target": "augment.target",
    "augpipe": "augment.pipe",
    "freezed": "config.freeze_d",
    "fp32": "config.fp32",
    "desc": "output.desc",
    "num_workers": "run.num_workers",
    "executor": "run.executor",
    "address": "run.address",
    "device": "run.device",
    "max_failures": "run.max_failures",
    "fid_weights": "metrics.fid_weights",
}
METRICS = ("fid50k_full", "fid50k", "none")


def _bool01(text: str) -> bool:
    """The original's bool flags: 1/0, true/false, yes/no."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0 or true/false, got {text!r}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the identity-conditioned VIS+NIR generator (Ray Train, resumable)",
        description=(
            "Train ArcBiFaceGAN's dual-branch generator on a VIS/ NIR/ identity_features.json folder or "
            "on WebDataset shards. Settings come from JOB.yaml, then the flags, then --set KEY=VALUE (later "
            "wins). The original training.py flags are accepted. Runs on Ray Train by default (automatic "
            "restart from the last checkpoint after a worker failure); --executor local runs in-process."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("job", nargs="?", help="training spec YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any spec key, e.g. loss.nir_r1=false (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved spec and hyperparameters; do nothing")
    p.add_argument("--num-workers", dest="num_workers", type=int, help="Ray Train workers (one per GPU)")
    p.add_argument("--executor", choices=["local", "ray"], help="ray (default) or one in-process worker")
    p.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where workers train")
    p.add_argument("--max-failures", dest="max_failures", type=int, help="automatic restarts after failures")
    p.add_argument("--fid-weights", dest="fid_weights", help="Inception feature extractor for FID (else FID is off)")
    p.add_argument("--desc", help="run directory name suffix (default: derived like the original)")
    compat = p.add_argument_group("original training.py flags")
    compat.add_argument("--data", help="training data: VIS/ NIR/ identity_features.json folder or shards")
    compat.add_argument("--outdir", help="where run directories NNNNN-<desc> are created")
    compat.add_argument("--NIR_loss_weight", type=float, help="λ_NIR on the generator's NIR term (default 0.1)")
    compat.add_argument("--cfg", help="auto, biface256, paper256, stylegan2")
    compat.add_argument("--snap", type=int, help="ticks between snapshots")
    compat.add_argument("--batch", type=int, help="global batch size")
    compat.add_argument("--mirror", type=_bool01, help="x-flips (VIS and NIR together)")
    compat.add_argument("--gpus", type=int, help="= --num-workers N --device cuda")
    compat.add_argument("--gpu_device_number", type=int, help="accepted; pick the GPU with CUDA_VISIBLE_DEVICES")
    compat.add_argument("--cond", type=_bool01, help="condition on identity features (default 1)")
    compat.add_argument("--resume", help="run directory, snapshot folder or original .pkl to continue")
    compat.add_argument("--gamma", type=float, help="R1 weight (both D's)")
    compat.add_argument("--kimg", type=float, help="training length in thousands of images")
    compat.add_argument("--seed", type=int, help="random seed")
    compat.add_argument("--aug", choices=["ada", "noaug", "fixed"], help="augmentation mode")
    compat.add_argument("--p", type=float, help="augmentation probability for --aug fixed")
    compat.add_argument("--target", type=float, help="ADA target")
    compat.add_argument("--augpipe", help="augment pipe (bgc, bg, blit, geom, color, ...)")
    compat.add_argument("--freezed", type=int, help="Freeze-D layers")
    compat.add_argument("--fp32", type=_bool01, help="disable mixed precision")
    compat.add_argument("--nhwc", type=_bool01, help="accepted (memory layout only)")
    compat.add_argument("--metrics", help=f"one of {', '.join(METRICS)}; FID needs --fid-weights")
    p.set_defaults(func=run)


def resolve_spec(args: argparse.Namespace) -> TrainSpec:
    tree = _load_tree(args.job) if args.job else {}
    flags = [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in COMPAT_FLAGS.items()
             if getattr(args, flag, None) is not None]
    if args.gpus is not None:
        flags += [f"run.num_workers={args.gpus}", "run.device=cuda"]
    if args.gpu_device_number is not None:
        flags.append("run.device=cuda")
    if args.metrics is not None:
        names = [m.strip() for m in args.metrics.split(",") if m.strip()]
        unknown = sorted(set(names) - set(METRICS))
        if unknown:
            raise UserError(f"--metrics: {unknown} not supported; choose from {list(METRICS)}")
        if names == ["none"]:
            flags.append("metrics.fid_weights=null")
    from facegen.engine.training.spec import build_train_spec

    return build_train_spec(tree, flags + list(args.overrides))


def _load_tree(path: str) -> dict:
    from facegen.engine.spec import load_spec_file

    return load_spec_file(path, "training spec")


def run(args: argparse.Namespace) -> int:
    from facegen.engine.training.launch import prepare
    from facegen.engine.training.spec import train_spec_to_yaml

    spec = resolve_spec(args)
    if args.dry_run:
        prepared = prepare(spec, create=False)
        print(train_spec_to_yaml(spec), end="")
        print(f"# run directory: {prepared.run_uri}")
        print(f"# dataset: {prepared.num_items} items, {prepared.resolution}x{prepared.resolution}, "
              f"c_dim {prepared.c_dim}")
        print("# hyperparameters: " + json.dumps(prepared.hyperparams.to_dict(), sort_keys=True))
        return 0
    prepared = prepare(spec)
    print(f"run directory: {prepared.run_uri}", flush=True)
    summary = execute(spec, prepared)
    print(f"trained to kimg {summary['kimg']:g} in {prepared.run_uri}")
    return 0


def execute(spec: TrainSpec, prepared: Prepared) -> dict:
    if spec.run.executor == "ray":
        from facegen.cluster.train import run_ray_training

        return run_ray_training(spec, prepared)
    from facegen.engine.training.launch import run_local

    return run_local(spec, prepared)
