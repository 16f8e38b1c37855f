"""`facegen export`: a generated dataset in the formats face-recognition trainers already read."""

from __future__ import annotations

import argparse
import os

from facegen.models.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a dataset as insightface RecordIO (train.rec/.idx/property) or label/xxx.png folders",
        description=(
            "Export a generated dataset (complete shards only, identity order). --to insightface writes "
            "OUT/train.rec, OUT/train.idx and OUT/property in insightface's MXNet RecordIO layout (no MXNet "
            "needed; arcface_torch's MXFaceDataset reads it). --to folder writes OUT/<label>/<sample>.<ext> "
            "with 8-digit label folders. Images are resized to --image-size (0 keeps the stored size)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dataset", help="the dataset (local path or fsspec URI)")
    p.add_argument("--to", required=True, choices=["insightface", "folder"], help="output format")
    p.add_argument("out", help="output folder (must be empty or absent)")
    p.add_argument("--mode", choices=["vis", "nir"], default="vis", help="which images to export")
    p.add_argument("--image-size", type=int, default=112, help="square output size; 0 keeps the stored size")
    p.add_argument("--format", dest="image_format", choices=["jpg", "png"],
                   help="image encoding (default: jpg for insightface, png for folder)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # numpy, PIL and pyarrow load only when the command runs, so `facegen --help` starts fast
    from facegen.engine.export.folder import write_image_folder
    from facegen.engine.export.recordio import write_insightface_rec
    from facegen.engine.export.source import encoded_samples
    from facegen.engine.storage import Storage

    if os.path.isdir(args.out) and os.listdir(args.out):
        raise UserError(f"{args.out}: output folder is not empty")
    if args.image_size < 0 or 0 < args.image_size < 8:
        raise UserError(f"--image-size: {args.image_size} must be 0 (keep) or at least 8")
    storage = Storage(args.dataset)
    if not storage.exists("done"):
        raise UserError(f"{args.dataset}: no complete shards (no done/ markers)")
    fmt = args.image_format or ("jpg" if args.to == "insightface" else "png")
    samples = encoded_samples(storage, args.mode, args.image_size or None, fmt, args.quality)
    if args.to == "insightface":
        size = args.image_size or _stored_size(storage)
        result = write_insightface_rec(args.out, ((label, data) for label, _, data in samples), size)
    else:
        result = write_image_folder(args.out, samples, fmt)
    print(f"exported {result['images']} images of {result['identities']} identities to {args.out} ({args.to})")
    return 0


def _stored_size(storage) -> int:
    from facegen.engine.dataset.reader import read_manifest

    return int(read_manifest(storage)["height"][0].as_py())
