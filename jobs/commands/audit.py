"""`facegen audit`: re-embed every image of a dataset and check it against an index of real people."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "audit",
        help="independently check a dataset's privacy against an index of real identities",
        description=(
            "Decode every image in DATASET's shards, embed it with --embedder (any model the index was built "
            "with, not necessarily the generator's), and report each sample's maximum similarity to the enrolled "
            "real images. Exit code 1 when any sample exceeds the threshold."
        ),
    )
    p.add_argument("dataset", help="dataset location written by `facegen generate`")
    p.add_argument("--index", required=True, help="privacy index URI (built with the same --embedder)")
    p.add_argument("--embedder", required=True, help="embedder checkpoint (native, insightface .pth, .onnx)")
    p.add_argument("--threshold", type=float,
                   help="violation threshold (default: the dataset's privacy.threshold from its job.yaml)")
    p.add_argument("--nir", action="store_true", help="audit the NIR images too")
    p.add_argument("--batch", type=int, default=64, help="images per embedder call")
    p.add_argument("--out", help="write per-sample results as parquet to this file (local or fsspec URI)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option for the dataset and index (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from facegen.engine.audit import audit_dataset, write_audit
    from facegen.engine.index.search import PrivacyIndex
    from facegen.engine.spec import load_spec_yaml_text
    from facegen.engine.storage import Storage
    from facegen.models.errors import UserError
    from facegen.models.loading import load_embedder

    options = dict(item.split("=", 1) for item in args.storage_option)
    dataset = Storage(args.dataset, options)
    threshold = args.threshold
    if threshold is None:
        if not dataset.exists("job.yaml"):
            raise UserError(f"{args.dataset}: no job.yaml; pass --threshold")
        threshold = load_spec_yaml_text(dataset.read_text("job.yaml")).privacy.threshold
    embedder = load_embedder(args.embedder)
    index = PrivacyIndex.open(args.index, options)
    result = audit_dataset(dataset, index, embedder, threshold, include_nir=args.nir, batch_size=args.batch,
                           progress=True)
    if args.out:
        folder, _, name = args.out.rpartition("/")
        write_audit(result, Storage(folder or ".", options), name)
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(f"audited {summary['samples']} samples against {index.count} enrolled images: "
              f"max similarity {summary['max_similarity']:.6f} (at {summary['worst_key']}), "
              f"threshold {threshold}, violations {summary['violations']}")
    return 1 if summary["violations"] else 0
