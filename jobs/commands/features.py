"""`facegen features DATA --embedder PATH [--mode all|one] [--batch N] [--nir]`: identity_features.json."""

from __future__ import annotations

import argparse

from facegen.jobs.common import add_storage_option, parse_storage_options
from facegen.jobs.embedder_options import add_preprocessing_flag, preprocessing_flags, print_notes

# engine.features (torch) loads when the command runs; tests/jobs/test_cli_start.py checks these copies.
FEATURES_FILE = "identity_features.json"
NIR_FEATURES_FILE = "identity_features_nir.json"
MODES = ("all", "one")

SHOW = 10  # skipped/failed files listed by name; the rest are counted


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "features", help="write a training dataset's identity_features.json (raw embedder features)",
        description=f"Embed DATA/VIS/{{identity}}_{{sample}}.{{jpg,png}} (paired by name with DATA/NIR/) "
                    f"and write DATA/{FEATURES_FILE}: {{file name: raw feature}} in natural order. The "
                    f"original's create_training_identity_features.py, batched.")
    parser.add_argument("data", help="dataset folder or fsspec URI holding VIS/ and NIR/")
    parser.add_argument("--embedder", required=True,
                        help="face embedder (.safetensors, insightface .pth, .onnx)")
    add_preprocessing_flag(parser)
    parser.add_argument("--mode", choices=MODES, default="all",
                        help="all: each file its own feature; one: every file gets its identity's medoid "
                             "feature (default all)")
    parser.add_argument("--batch", type=int, default=64, help="images per embedder call (default 64)")
    parser.add_argument("--nir", action="store_true",
                        help=f"require NIR/ and also write DATA/{NIR_FEATURES_FILE} from the NIR images")
    parser.add_argument("--device", default="cpu", help="embedder device (cpu, cuda, cuda:1)")
    parser.add_argument("--workers", type=int, default=4, help="image decoding threads (default 4)")
    add_storage_option(parser, "DATA")
    parser.set_defaults(func=run_features)


def _list(title: str, items: list[tuple[str, str]]) -> None:
    if not items:
        return
    print(f"{title}: {len(items)}")
    for path, reason in items[:SHOW]:
        print(f"  {path}: {reason}")
    if len(items) > SHOW:
        print(f"  ... and {len(items) - SHOW} more")


def run_features(args: argparse.Namespace) -> int:
    from facegen.engine.features import compute_identity_features
    from facegen.models.loading import load_embedder

    embedder = load_embedder(args.embedder, **preprocessing_flags(args)).to(args.device)
    print_notes(embedder)
    result = compute_identity_features(args.data, embedder, mode=args.mode, batch_size=args.batch,
                                       nir=args.nir, num_workers=args.workers,
                                       storage_options=parse_storage_options(args.storage_option))
    _list("skipped (not images)", result.skipped)
    _list("failed (no feature written)", result.failed)
    print(f"wrote {result.path}: {len(result.names)} files of {result.num_identities} identities, "
          f"{embedder.dim}-d raw features, mode {args.mode}")
    if result.nir_path:
        print(f"wrote {result.nir_path}")
    return 0
