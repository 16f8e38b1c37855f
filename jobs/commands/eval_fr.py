"""`facegen eval-fr`: face verification of a model on a pairs list: 10-fold accuracy, TAR@FAR, EER, ROC."""

from __future__ import annotations

import argparse
import json
import os

from facegen.models.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval-fr",
        help="verification accuracy of a face-recognition model (10-fold, TAR@FAR, EER, ROC)",
        description=(
            "Evaluate a face-recognition model (train-fr's backbone.pth, an insightface .pth, a facegen "
            ".safetensors or an .onnx model) on verification pairs: an LFW-style pairs.txt over an image "
            "folder (--pairs FILE --images DIR), or pairs drawn from a generated dataset's shards "
            "(--dataset URI: shards, or a VIS/NIR image folder such as `facegen world render` writes, identities "
            "from the file names). Writes OUT/metrics.json (10-fold accuracy, TAR at FAR 1e-3 and 1e-4, EER, the "
            "best threshold on these pairs, and with --threshold the accuracy at a threshold chosen elsewhere) and "
            "OUT/roc.png, and prints the headline figures."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="the face-recognition model file")
    p.add_argument("--pairs", help="LFW-style pairs.txt")
    p.add_argument("--images", help="image folder the pairs file refers to (DIR/name/name_0001.jpg)")
    p.add_argument("--dataset", help="draw pairs from this generated dataset instead (local path or URI)")
    p.add_argument("--genuine", type=int, default=3000, help="genuine pairs drawn from --dataset")
    p.add_argument("--impostor", type=int, default=3000, help="impostor pairs drawn from --dataset")
    p.add_argument("--mode", choices=["vis", "nir"], default="vis", help="which images of --dataset")
    p.add_argument("--seed", type=int, default=0, help="seed of the pairs drawn from --dataset")
    p.add_argument("--folds", type=int, default=10, help="folds of the accuracy protocol")
    p.add_argument("--flip", action="store_true", help="add each image's mirror to its embedding")
    p.add_argument("--threshold", type=float,
                   help="also report accuracy, FAR and FRR at this fixed threshold, e.g. the best_threshold "
                        "another evaluation (a calibration split) wrote")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", required=True, help="output folder for metrics.json and roc.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # torch, pyarrow and numpy load only when the command runs, so `facegen --help` starts fast
    from facegen.engine.evaluation import at_threshold, best_threshold, roc, verification_report
    from facegen.engine.frdata.pairs import dataset_pairs, pair_scores, read_lfw_pairs
    from facegen.engine.plots import roc_png
    from facegen.engine.storage import Storage
    from facegen.models.loading import load_embedder

    if bool(args.dataset) == bool(args.pairs):
        raise UserError("give either --pairs FILE --images DIR or --dataset URI")
    if args.pairs and not args.images:
        raise UserError("--pairs needs --images DIR")
    if args.dataset:
        pairs = dataset_pairs(args.dataset, args.genuine, args.impostor, args.seed, mode=args.mode)
        storage = Storage(args.dataset)
    else:
        pairs, storage = read_lfw_pairs(args.pairs, args.images), None
    embedder = load_embedder(args.model)
    print(f"{len(pairs.issame)} pairs ({int(pairs.issame.sum())} genuine) over {len(pairs.images)} images",
          flush=True)
    scores = pair_scores(pairs, embedder, storage, args.batch_size, args.flip)
    metrics = {"model": args.model, "pairs_source": pairs.source, "flip": args.flip,
               **verification_report(scores, pairs.issame, folds=args.folds),
               "best_threshold": best_threshold(scores, pairs.issame)}
    if args.threshold is not None:
        metrics["at_threshold"] = at_threshold(scores, pairs.issame, args.threshold)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "metrics.json"), "w") as handle:
        json.dump(metrics, handle, indent=2, sort_keys=True)
    far, tar, _ = roc(scores, pairs.issame)
    with open(os.path.join(args.out, "roc.png"), "wb") as handle:
        handle.write(roc_png({os.path.basename(args.model): (far, tar)}, title=f"ROC: {pairs.source}"))
    tars = ", ".join(f"TAR@FAR={k} {v['tar']:.4f}" for k, v in metrics["tar_at_far"].items())
    print(f"accuracy {metrics['accuracy']:.4f} ± {metrics['accuracy_std']:.4f} ({args.folds}-fold), {tars}, "
          f"EER {metrics['eer']['eer']:.4f}, best threshold {metrics['best_threshold']:.4f}")
    if args.threshold is not None:
        fixed = metrics["at_threshold"]
        print(f"at threshold {args.threshold:.4f}: accuracy {fixed['accuracy']:.4f}, FAR {fixed['far']:.4f}, "
              f"FRR {fixed['frr']:.4f}")
    print(f"wrote {args.out}/metrics.json and roc.png")
    return 0
