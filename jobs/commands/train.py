"""`facegen train`: train the identity-conditioned VIS+NIR generator (ArcBiFaceGAN) on Ray Train.

Every flag of the original ArcBiFaceGAN `training.py` (StyleGAN2-ADA's `train.py` plus
`--NIR_loss_weight` and `--gpu_device_number`) is accepted with its meaning, or refused with one line
that says why. Without a job spec the command line is the original's, so `compat` defaults to
'original' (the original's training where it is not a bug); a job spec says `compat:` itself.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    "subset": "data.subset",
    "workers": "data.loader_workers",
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
    "allow_tf32": "run.allow_tf32",
    "desc": "output.desc",
    "num_workers": "run.num_workers",
    "executor": "run.executor",
    "address": "run.address",
    "device": "run.device",
    "max_failures": "run.max_failures",
    "fid_weights": "metrics.fid_weights",
    "compat": "compat",
}
CFGS = ["auto", "stylegan2", "paper256", "paper512", "paper1024", "cifar", "auto_512", "biface256", "auto_128"]
AUGPIPES = ["blit", "geom", "color", "filter", "noise", "cutout", "bg", "bgc", "bgcf", "bgcfn", "bgcfnc"]
# The original's other metric names, each refused with the reason.
UNSUPPORTED_METRICS = {
    "pr50k3_full": "precision/recall needs the VGG16 feature network, which cannot be downloaded at run time",
    "pr50k3": "precision/recall needs the VGG16 feature network, which cannot be downloaded at run time",
    "is50k": "the Inception Score needs Inception's ImageNet classifier head, which the FID weights lack",
    "ppl2_wend": "perceptual path length needs the LPIPS VGG16 network, which cannot be downloaded at run time",
    "ppl_zfull": "perceptual path length needs the LPIPS VGG16 network, which cannot be downloaded at run time",
    "ppl_wfull": "perceptual path length needs the LPIPS VGG16 network, which cannot be downloaded at run time",
    "ppl_zend": "perceptual path length needs the LPIPS VGG16 network, which cannot be downloaded at run time",
    "ppl_wend": "perceptual path length needs the LPIPS VGG16 network, which cannot be downloaded at run time",
}
# The original's named --resume sources are URLs on NVIDIA's CDN.
NAMED_RESUMES = ("ffhq256", "ffhq512", "ffhq1024", "celebahq256", "lsundog256")


def _bool01(text: str) -> bool:
    """The original's bool flags (click's BOOL): 1/0, true/false, yes/no, y/n, t/f, on/off."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "t", "on"):
        return True
    if value in ("0", "false", "no", "n", "f", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/0 or true/false, got {text!r}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the identity-conditioned VIS+NIR generator (Ray Train, resumable)",
        description=(
            "Train ArcBiFaceGAN's dual-branch generator on a VIS/ NIR/ identity_features.json folder or "
            "on WebDataset shards. Settings come from JOB.yaml, then the flags, then --set KEY=VALUE (later "
            "wins). Every flag of the original training.py is accepted (see docs/training.md for the table). "
            "Without JOB.yaml the command line is the original's and --compat defaults to 'original'. "
            "Runs on Ray Train by default (automatic restart from the last checkpoint after a worker "
            "failure); --executor local runs in-process."
        ),
    )
    p.add_argument("job", nargs="?", help="training spec YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any spec key, e.g. loss.nir_r1=false (repeatable)")
    p.add_argument("--compat", choices=["original", "facegen"],
                   help="'original' reproduces the original's training where it is not a bug (NIR D settings, "
                        "w_avg updates, zero bias gradients, --gamma on the VIS D only, D_NIR fresh on .pkl "
                        "resume); the missing NIR R1 stays fixed (--set loss.nir_r1=false restores it). "
                        "Default: original without JOB.yaml, else the spec's (facegen)")
    p.add_argument("--num-workers", dest="num_workers", type=int, help="Ray Train workers (one per GPU)")
    p.add_argument("--executor", choices=["local", "ray"], help="ray (default) or one in-process worker")
    p.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where workers train")
    p.add_argument("--max-failures", dest="max_failures", type=int, help="automatic restarts after failures")
    p.add_argument("--fid-weights", dest="fid_weights",
                   help="pytorch-fid Inception weights (pt_inception-2015-12-05-6726825d.pth) for FID and KID; "
                        "without them --metrics are off (nothing is downloaded)")
    p.add_argument("--desc", help="run directory name suffix (default: derived like the original)")
    o = p.add_argument_group("original training.py flags")
    o.add_argument("--outdir", help="where run directories NNNNN-<desc> are created")
    o.add_argument("--gpus", type=int, help="number of GPUs, a power of two (= --num-workers N --device cuda)")
    o.add_argument("--snap", type=int, help="ticks between snapshots (default 50)")
    o.add_argument("--metrics", help="comma-separated list or 'none' (default fid50k_full): fid50k_full, fid50k, "
                                     "kid50k_full, kid50k; they need --fid-weights")
    o.add_argument("--seed", type=int, help="random seed (default 0)")
    o.add_argument("-n", "--dry-run", dest="dry_run", action="store_true",
                   help="print the training options and exit (creates nothing)")
    o.add_argument("--data", help="training data: VIS/ NIR/ identity_features.json folder or facegen shards")
    o.add_argument("--cond", type=_bool01, help="condition on identity features (default 1)")
    o.add_argument("--subset", type=int, help="train with only N images (a seeded random subset)")
    o.add_argument("--mirror", type=_bool01, help="x-flips (VIS and NIR together)")
    o.add_argument("--cfg", choices=CFGS, help="base config (default auto)")
    o.add_argument("--gamma", type=float, help="override R1 gamma (the VIS D's only with --compat original)")
    o.add_argument("--kimg", type=float, help="override training duration (thousands of images)")
    o.add_argument("--batch", type=int, help="override global batch size")
    o.add_argument("--aug", choices=["ada", "noaug", "fixed"], help="augmentation mode (default ada)")
    o.add_argument("--p", type=float, help="augmentation probability for --aug fixed")
    o.add_argument("--target", type=float, help="ADA target value for --aug ada (default 0.6)")
    o.add_argument("--augpipe", choices=AUGPIPES, help="augmentation pipeline (default bgc)")
    o.add_argument("--resume", help="run directory, snapshot folder or original .pkl to continue ('noresume': none)")
    o.add_argument("--freezed", type=int, help="Freeze-D: discriminator layers kept fixed (default 0)")
    o.add_argument("--fp32", type=_bool01, help="disable mixed-precision training")
    o.add_argument("--nhwc", type=_bool01, help="accepted; NHWC memory format is a speed option only")
    o.add_argument("--nobench", type=_bool01, help="disable cuDNN benchmarking")
    o.add_argument("--allow-tf32", dest="allow_tf32", type=_bool01, help="allow TF32 matmuls and convolutions")
    o.add_argument("--workers", type=int, help="DataLoader processes per training worker (default 2; original 3)")
    o.add_argument("--gpu_device_number", "--GPU_DEVICE_NUMBER", dest="gpu_device_number", type=int,
                   help="accepted; train on cuda (pick the GPU with CUDA_VISIBLE_DEVICES)")
    o.add_argument("--NIR_loss_weight", type=float, help="λ_NIR on the generator's NIR term (default 0.1)")
    p.set_defaults(func=run)


def _original_checks(args: argparse.Namespace) -> list[str]:
    """The original's refusals that the spec cannot see (it cannot tell a default from a given value);
    returns extra `key=value` settings."""
    flags = []
    if args.gpus is not None:
        if args.gpus < 1 or args.gpus & (args.gpus - 1):
            raise UserError(f"--gpus: {args.gpus} is not a power of two (the original requires one)")
        flags += [f"run.num_workers={args.gpus}", "run.device=cuda"]
    if args.gpu_device_number is not None:
        flags.append("run.device=cuda")
    if args.cfg == "auto_128":
        raise UserError("--cfg: auto_128 is listed by the original but never defined (it failed an assert there)")
    if args.aug == "fixed" and args.p is None:
        raise UserError("--aug fixed requires --p")
    if args.target is not None and args.aug not in (None, "ada"):
        raise UserError("--target can only be given with --aug ada")
    if args.augpipe is not None and args.aug == "noaug":
        raise UserError("--augpipe cannot be given with --aug noaug")
    if args.snap is not None and args.snap < 1:
        raise UserError("--snap must be at least 1")
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    if args.nobench is not None:
        flags.append(f"run.cudnn_benchmark={json.dumps(not args.nobench)}")
    if args.resume in NAMED_RESUMES:
        raise UserError(f"--resume: '{args.resume}' is a download from NVIDIA's CDN; nothing is downloaded at run "
                        f"time: fetch the .pkl yourself and pass its path")
    if args.resume == "noresume":
        args.resume = None
        flags.append("resume=null")
    if args.metrics is not None:
        flags.append(f"metrics.names={json.dumps(_metric_names(args.metrics))}")
    return flags


def _metric_names(text: str) -> list[str]:
    from facegen.engine.training.spec import METRIC_NAMES

    names = [m.strip() for m in text.split(",") if m.strip()]
    if [n.lower() for n in names] in ([], ["none"]):
        return []
    for name in names:
        if name in UNSUPPORTED_METRICS:
            raise UserError(f"--metrics: {name}: not supported ({UNSUPPORTED_METRICS[name]})")
        if name not in METRIC_NAMES:
            raise UserError(f"--metrics: {name!r} is not a metric; choose from {list(METRIC_NAMES)} or 'none'")
    return names


def resolve_spec(args: argparse.Namespace) -> TrainSpec:
    tree = _load_tree(args.job) if args.job else {}
    extra = _original_checks(args)
    if args.compat is None and not args.job:
        extra.append("compat=original")  # the original's command line: the original's training
    flags = [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in COMPAT_FLAGS.items()
             if getattr(args, flag, None) is not None]
    from facegen.engine.training.spec import build_train_spec

    return build_train_spec(tree, extra + flags + list(args.overrides))


def _load_tree(path: str) -> dict:
    from facegen.engine.spec import load_spec_file

    return load_spec_file(path, "training spec")


def announce(spec: TrainSpec) -> None:
    """What the user must not miss: the compat mode, and metrics that will not run."""
    from facegen.engine.training.ticks import compat_line, metrics_line

    print(f"# {compat_line(spec)}", file=sys.stderr)
    if spec.metrics.names and not spec.metrics.active:
        print(f"WARNING: {metrics_line(spec)}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from facegen.engine.training.launch import prepare
    from facegen.engine.training.spec import train_spec_to_yaml

    spec = resolve_spec(args)
    announce(spec)
    if args.dry_run:
        prepared = prepare(spec, create=False)
        print(train_spec_to_yaml(spec), end="")
        print(f"# run directory: {prepared.run_uri}")
        print(f"# dataset: {prepared.num_items} items, {prepared.resolution}x{prepared.resolution}, "
              f"c_dim {prepared.c_dim}")
        print("# hyperparameters: " + json.dumps(prepared.hyperparams.to_dict(), sort_keys=True))
        print("# Dry run; exiting.")
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
