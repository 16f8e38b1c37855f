"""`facegen generate`: a privacy-certified synthetic dataset from a job spec (or the original's flags)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import TYPE_CHECKING

from facegen.jobs.common import execute_job, print_job_summary
from facegen.jobs.embedder_options import add_preprocessing_flag, preprocessing_flags

if TYPE_CHECKING:  # the spec module (pydantic) loads when a command runs, not when the CLI starts
    from facegen.engine.spec import JobSpec

# The original generate_recognition_data.py flags (and the ones for what it hard-coded) -> spec keys.
COMPAT_FLAGS = {
    "gen_model": "generator.path",
    "rec_model": "embedder.path",
    "training_ids": "index.features",
    "outdir": "output.uri",
    "ids": "identities",
    "samples_per_id": "samples_per_identity",
    "truncation": "generator.truncation_psi",
    "seed": "seed",
    "privacy_threshold": "privacy.threshold",
    "fmr": "privacy.fmr",
    "separability_threshold": "privacy.separability_threshold",
    "same_threshold": "filter.same_threshold",
    "diversity_threshold": "filter.diversity_threshold",
    "condition_norm": "condition.norm",
    "max_attempts": "filter.max_attempts",
    "generator": "generator.path",
    "embedder": "embedder.path",
    "index": "index.uri",
    "out": "output.uri",
    "executor": "run.executor",
    "address": "run.address",
    "device": "run.device",
    "batch": "batch_size",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate a privacy-certified synthetic VIS+NIR face dataset",
        description=(
            "Generate N identities x K samples, every sample certified against every enrolled real image, "
            "as WebDataset shards with a manifest and a report. Settings come from JOB.yaml, then the "
            "flags below, then --set KEY=VALUE (later wins). The original generate_recognition_data.py "
            "flags are accepted too."
        ),
    )
    p.add_argument("job", nargs="?", help="job spec YAML (see jobs/examples/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any spec key, e.g. privacy.threshold=0.6 (repeatable)")
    p.add_argument("--out", "--outdir", dest="out", help="dataset location (local path or fsspec URI)")
    p.add_argument("--resume", action="store_true", help="continue the job already in the output location")
    p.add_argument("--dry-run", action="store_true",
                   help="open and cross-check every input (models, index, output), print the resolved spec and "
                        "the plan; write nothing")
    p.add_argument("--executor", choices=["local", "ray"], help="run in this process, or on Ray")
    p.add_argument("--address", help="Ray cluster address for --executor ray")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where models run")
    p.add_argument("--batch", type=int, help="candidates per model call (hashed: it can move a similarity by an ulp)")
    p.add_argument("--generator", help="generator checkpoint (native .safetensors or ArcBiFaceGAN .pkl)")
    p.add_argument("--embedder", help="face embedder (native, insightface .pth or .onnx)")
    add_preprocessing_flag(p)
    p.add_argument("--index", help="privacy index URI built with `facegen index build`")
    compat = p.add_argument_group("original generate_recognition_data.py flags")
    compat.add_argument("--gen_model", help="= --generator")
    compat.add_argument("--rec_model", help="= --embedder")
    compat.add_argument("--training_ids", help="identity_features.json of the real training identities")
    compat.add_argument("--ids", type=int, help="number of synthetic identities")
    compat.add_argument("--samples_per_id", type=int, help="samples per identity")
    compat.add_argument("--truncation", type=float, help="truncation psi")
    compat.add_argument("--seed", type=int, help="job seed")
    compat.add_argument("--gpu_device_number", type=int, help="accepted; choose the GPU with CUDA_VISIBLE_DEVICES")
    hard = p.add_argument_group("thresholds the original hard-coded")
    hard.add_argument("--privacy-threshold", dest="privacy_threshold",
                      help="a number in (0, 1), or 'auto' (default): the index's threshold calibrated at --fmr")
    hard.add_argument("--fmr", type=float, help="false-match rate of the 'auto' privacy threshold (default 1e-4)")
    hard.add_argument("--separability-threshold", dest="separability_threshold", type=float,
                      help="default: the privacy threshold")
    hard.add_argument("--same-threshold", dest="same_threshold", type=float, help="default 0.622")
    hard.add_argument("--diversity-threshold", dest="diversity_threshold", type=float, help="default 0.853")
    hard.add_argument("--condition-norm", dest="condition_norm", type=float, help="default 4")
    hard.add_argument("--max-attempts", dest="max_attempts", type=int, help="default 2500")
    p.set_defaults(func=run)


def resolve_spec(args: argparse.Namespace) -> JobSpec:
    from facegen.engine.spec import build_spec, load_spec_file

    tree = load_spec_file(args.job) if args.job else {}
    flags = [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in COMPAT_FLAGS.items()
             if getattr(args, flag, None) is not None]
    if args.gpu_device_number is not None:
        flags.append("run.device=cuda")
    if args.address and args.executor is None:
        flags.append('run.executor="ray"')  # joining a cluster means running on it
    explicit = preprocessing_flags(args)
    if explicit:  # flags win field by field over the job file's embedder.preprocessing
        merged = {**tree.get("embedder", {}).get("preprocessing", {}), **explicit}
        flags.append(f"embedder.preprocessing={json.dumps(merged)}")
    return build_spec(tree, flags + list(args.overrides))


def run(args: argparse.Namespace) -> int:
    from facegen.engine.spec import spec_hash, spec_to_yaml

    spec = resolve_spec(args)
    if args.dry_run:
        from facegen.engine.preflight import preflight

        checked = preflight(spec, args.resume)
        print(spec_to_yaml(spec), end="")
        for line in checked:
            print(f"# {line}")
        print(f"# spec sha256: {spec_hash(spec)}")
        print(f"# plan: {spec.identities} identities x {spec.samples_per_identity} samples in {spec.num_shards} "
              f"shards of up to {spec.identities_per_shard} identities; at most {spec.max_slots} identity "
              f"proposals; executor {spec.run.executor}; output {spec.output.uri}")
        return 0
    try:
        report = execute_job(spec, args.resume)
    except KeyboardInterrupt:
        print(f"facegen: {interrupted(spec)}", file=sys.stderr)
        return 130
    except SystemExit as stop:  # Ray's driver turns SIGTERM into sys.exit(SIGTERM)
        if stop.code != signal.SIGTERM:
            raise
        print(f"facegen: {interrupted(spec)}", file=sys.stderr)
        return 130
    return print_job_summary(spec, report)


def interrupted(spec: JobSpec) -> str:
    """One line for Ctrl-C / SIGTERM: how far the job got, from what is on storage."""
    from facegen.engine.dataset.manifest import completed_shards
    from facegen.engine.identities import IDENTITIES_FILE, read_identities
    from facegen.engine.job import shards_for
    from facegen.engine.storage import Storage

    try:
        out = Storage(spec.output.uri, spec.output.storage_options)
        if not out.exists(IDENTITIES_FILE):
            return "interrupted while selecting identities, before any shard; rerun with --resume"
        total = shards_for(spec, len(read_identities(out)[0]))
        return f"interrupted after {len(completed_shards(out))} of {total} shards; rerun with --resume"
    except Exception:  # noqa: BLE001 - the message must not turn an interrupt into a traceback
        return "interrupted; rerun with --resume"
