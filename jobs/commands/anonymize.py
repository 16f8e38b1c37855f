"""`facegen anonymize`: swap the identity units of faces with other faces' (StyleID), certified.

  facegen anonymize --generator G --embedder E --ranks ranks.parquet --n 32 --count 1000 --out DIR
  facegen anonymize ... --latents sources.npy [--targets targets.npy]
  facegen anonymize ... --images PHOTOS/ --index IDX --threshold 0.4 [--blend [--mask-onnx parser.onnx]]
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import TYPE_CHECKING

from facegen.jobs.common import add_seeded_face_options, add_swap_models, comma_ints, open_swap_space, read_uri
from facegen.jobs.embedder_options import preprocessing_flags, print_notes
from facegen.models.errors import UserError

if TYPE_CHECKING:  # torch loads when the command runs, not when the CLI starts
    import torch


def _threshold(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "anonymize",
        help="anonymise generated faces, W+ latents or real photos by swapping identity units (StyleID)",
        description=(
            "Each source face gets the top-n ranked units (see `facegen disentangle rank`) of its W+ or StyleSpace "
            "code replaced by a target face's, or whole W+ layers with --layers; n is the privacy knob. Sources are "
            "seeded generated faces (--count), W+ codes (--latents, .npy [N, num_ws, w_dim]) or photos (--images, "
            "aligned square face crops, projected into W+ by optimisation first). Targets are seeded random "
            "faces, or --targets. With --threshold an output "
            "whose identity similarity to its source (or, with --index, to any enrolled person) exceeds it is "
            "retried with a fresh random target, and dropped after --max-tries. Writes shards like `generate` "
            "(per sample: source_similarity, appearance_change) and report.json/html with the privacy/utility "
            "trade-off over n (tradeoff.png). Rerunning with the same --out resumes."
        ),
    )
    add_swap_models(p)
    p.add_argument("--out", required=True, help="output dataset location (local path or fsspec URI)")
    p.add_argument("--ranks", help="rank table from `facegen disentangle rank` (needed for --n and the curve)")
    p.add_argument("--space", default="wplus", choices=["wplus", "style"], help="space to swap in (default: wplus)")
    p.add_argument("--unit-width", type=int, default=1,
                   help="which ranking of the table: channels per unit, 0 = whole layers (default: 1)")
    p.add_argument("--n", type=int, default=0, help="privacy knob: how many top-ranked units to swap")
    p.add_argument("--layers", type=comma_ints, default=(),
                   help="swap these whole W+ layers instead (e.g. StyleID's 5,6,7,8,9 at 1024²)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--count", type=int, help="anonymise this many seeded generated faces")
    source.add_argument("--latents", help="anonymise these W+ codes (.npy float [N, num_ws, w_dim])")
    source.add_argument("--images", help="anonymise the face photos in this folder (aligned square crops)")
    p.add_argument("--targets", help="target W+ codes (.npy [M, num_ws, w_dim]; source i takes row i mod M); "
                                     "default: seeded random faces")
    p.add_argument("--index", help="privacy index of the real people every output is certified against")
    p.add_argument("--threshold", type=_threshold,
                   help="highest identity similarity an output may have to its source / anyone enrolled: a "
                        "number, or 'auto' for the --index's threshold calibrated at --fmr for this embedder")
    p.add_argument("--fmr", type=float,
                   help="false-match rate of --threshold auto (default: 1e-4; `facegen index calibrate` adds others)")
    p.add_argument("--max-tries", type=int, default=4, help="random targets tried per source (default: 4)")
    add_seeded_face_options(p, batch=32)
    p.add_argument("--samples-per-shard", type=int, default=64, help="outputs per shard (default: 64)")
    p.add_argument("--curve-pairs", type=int, default=16,
                   help="face pairs for the trade-off curve in the report; 0 = no curve (default: 16)")
    photos = p.add_argument_group("real images (--images)")
    photos.add_argument("--steps", type=int, default=300, help="projection optimiser steps (default: 300)")
    photos.add_argument("--learning-rate", type=float, default=0.05,
                        help="projection Adam learning rate on W+ (default: 0.05)")
    photos.add_argument("--identity-weight", type=float, default=0.1,
                        help="weight of the identity loss in the projection (default: 0.1)")
    photos.add_argument("--blend", action="store_true",
                        help="blend the anonymised face into the photo through a face mask (an ellipse around the "
                             "face of an aligned crop, or --mask-onnx)")
    photos.add_argument("--mask-onnx", metavar="PATH",
                        help="with --blend: a face-segmentation ONNX model for the mask. Input: one float NCHW RGB "
                             "image [N, 3, S, S], (pixel/255 - mean)/std; output: a face probability [N, 1, H, W] "
                             "or class scores [N, K, H, W] (then give --mask-classes). See docs/anonymise.md")
    photos.add_argument("--mask-classes", type=comma_ints, default=(),
                        help="the face classes of a multi-class --mask-onnx (comma-separated class numbers; the "
                             "mask is their summed softmax probability)")
    photos.add_argument("--mask-mean", type=_floats, default=(0.485, 0.456, 0.406),
                        help="per-channel RGB mean of the --mask-onnx input (default: ImageNet's)")
    photos.add_argument("--mask-std", type=_floats, default=(0.229, 0.224, 0.225),
                        help="per-channel RGB std of the --mask-onnx input (default: ImageNet's)")
    p.set_defaults(func=run)


def _load_npy(uri: str) -> torch.Tensor:
    import numpy as np
    import torch

    try:
        array = np.load(io.BytesIO(read_uri(uri)), allow_pickle=False)
    except ValueError as err:
        raise UserError(f"{uri}: not a plain .npy array ({err})") from None
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"{uri}: expected float W+ codes [N, num_ws, w_dim], got {array.dtype} {list(array.shape)}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def run(args: argparse.Namespace) -> int:
    from facegen.engine.anonymise.metric import Metric
    from facegen.engine.anonymise.rank import read_ranks
    from facegen.engine.anonymise.run import AnonymiseJob, anonymise_generated
    from facegen.engine.anonymise.swap import Swapper
    from facegen.engine.index.compat import calibrated_threshold, embedder_for_index
    from facegen.engine.index.search import PrivacyIndex
    from facegen.engine.progress import progress_callback
    from facegen.engine.storage import Storage

    if args.layers and args.space != "wplus":
        raise UserError("--layers swaps whole W+ layers; use it with --space wplus")
    if args.threshold == "auto" and not args.index:
        raise UserError("--threshold auto is the --index's calibrated threshold: give --index, or a number")
    if args.fmr is not None and (args.threshold != "auto" or not 0.0 < args.fmr < 1.0):
        raise UserError("--fmr chooses the calibration of --threshold auto: a rate in (0, 1), with --threshold auto")
    if args.index and args.threshold is None:
        raise UserError("--index needs --threshold (the similarity no output may exceed)")
    if args.images and (not args.index or args.threshold is None):
        raise UserError("--images: real people must be certified: give --index and --threshold")
    if args.mask_onnx and not (args.images and args.blend):
        raise UserError("--mask-onnx is the face mask of --images --blend; give both")
    if args.mask_classes and not args.mask_onnx:
        raise UserError("--mask-classes names classes of a --mask-onnx model; give the model")
    face_mask = None
    if args.mask_onnx:
        from facegen.engine.anonymise.masks import OnnxFaceMask

        face_mask = OnnxFaceMask(args.mask_onnx, args.mask_classes, args.mask_mean, args.mask_std)
    index = PrivacyIndex.open(args.index) if args.index else None
    threshold, calibration = args.threshold, None
    if threshold == "auto":
        chosen = calibrated_threshold(index.info, args.fmr or 1e-4, args.index, ("--threshold", "--fmr"))
        threshold, calibration = chosen["threshold"], chosen["text"]
    sources = _load_npy(args.latents) if args.latents else None
    targets = _load_npy(args.targets) if args.targets else None
    table = read_ranks(read_uri(args.ranks), args.ranks) if args.ranks else None
    count = args.count if args.count is not None else len(sources) if sources is not None else 1
    job = AnonymiseJob(space=args.space, unit_width=args.unit_width, n=args.n, layers=args.layers, count=count,
                       seed=args.seed, truncation_psi=args.truncation, batch_size=args.batch,
                       samples_per_shard=args.samples_per_shard, threshold=threshold,
                       max_tries=args.max_tries, metric=Metric(lowpass_size=args.lowpass),
                       threshold_calibration=calibration)
    space = open_swap_space(args.generator)
    # With an index, the same weights default to the preprocessing it was built with.
    embedder = embedder_for_index(args.embedder, preprocessing_flags(args), index.info if index else None)
    print_notes(embedder)
    if index is not None:
        index.check_compatible(embedder)
    if calibration:
        print(f"threshold: {threshold:.6f}, the index's, {calibration}")
    swapper = Swapper(space, embedder, job.metric, job.batch_size)
    out = Storage(args.out)
    progress = progress_callback("anonymize", "shard")
    if args.images:
        from facegen.engine.anonymise.photos import PhotoSettings, anonymise_photos
        from facegen.engine.anonymise.project import ProjectionSettings

        projection = ProjectionSettings(steps=args.steps, learning_rate=args.learning_rate,
                                        identity_weight=args.identity_weight)
        settings = PhotoSettings(projection=projection, blend=args.blend)
        report = anonymise_photos(swapper, table, job, out, args.images, settings, index=index, targets_ws=targets,
                                  curve_pairs=args.curve_pairs, progress=progress, face_mask=face_mask)
    else:
        report = anonymise_generated(swapper, table, job, out, index=index, sources_ws=sources, targets_ws=targets,
                                     curve_pairs=args.curve_pairs, progress=progress)
    totals, privacy = report["totals"], report["privacy"]
    if report.get("projection", {}).get("mean_psnr_db") is not None:
        print(f"projection: mean PSNR {report['projection']['mean_psnr_db']:.2f} dB over the written photos")
    print(f"anonymised {totals['written']} of {totals['sources']} sources into {args.out} "
          f"({totals['dropped']} dropped, {totals['retried']} retried); max similarity to source "
          f"{_figure(privacy['max_source_similarity'])}"
          + (f", to anyone enrolled {_figure(privacy['max_real_similarity'])}" if index is not None else "")
          + f", threshold {_figure(privacy['threshold'])}")
    if totals["dropped"]:
        tries = 1 if args.targets else args.max_tries
        print(f"facegen: {totals['dropped']} sources had no output at or below the threshold after {tries} "
              f"tries ({totals['dropped_near_source']} still too close to themselves, "
              f"{totals['dropped_near_enrolled']} to someone enrolled); to keep more, swap more units (--n, "
              "or --layers), allow more tries (--max-tries), or check that the embedder tells different "
              "people apart (`facegen index build` prints its impostor scores)", file=sys.stderr)
    return 0


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6f}"
