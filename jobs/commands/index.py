"""`facegen index build|calibrate|info|query`: the privacy index of real identity embeddings."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from facegen.jobs.common import add_storage_option, parse_storage_options
from facegen.jobs.embedder_options import add_preprocessing_flag, preprocessing_flags, print_notes
from facegen.models.errors import UserError

if TYPE_CHECKING:
    import numpy as np

    from facegen.engine.index import PrivacyIndex

# engine.index (torch, faiss) loads when an index command runs; tests/jobs/test_cli_start.py checks
# that these copies equal engine.index.BACKENDS and DEFAULT_FMRS.
BACKENDS = ("auto", "faiss", "torch", "numpy")
DEFAULT_FMRS = (1e-3, 1e-4)

SHOW_SKIPPED = 10  # skipped files listed by name; the rest are counted


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index", help="build, calibrate, inspect and query the privacy index of real identities",
        description="The privacy index: every enrolled real image's embedding, searched exactly.")
    sub = parser.add_subparsers(dest="index_command", metavar="ACTION")

    build = sub.add_parser("build", help="embed or import real identities and write an index")
    build.add_argument("out", help="index location (folder or fsspec URI, e.g. s3://bucket/index)")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", help="the original's identity_features.json")
    source.add_argument("--table", help="embedding table: .parquet (embedding, identity, file) or .npy + labels")
    source.add_argument("--images", help="image folder (VIS/ [NIR/] or flat), files {identity}_{sample}.ext")
    build.add_argument("--embedder", help="face embedder (.safetensors, .pth, .onnx): embeds --images; "
                       "with --features/--table it records its fingerprint")
    add_preprocessing_flag(build)
    build.add_argument("--shard-size", type=int, default=1_000_000, help="rows per shard (default 1e6)")
    nir = build.add_mutually_exclusive_group()
    nir.add_argument("--nir", action="store_true", default=None,
                     help="with --images: require NIR/ and enrol it (default: enrol NIR/ whenever it exists)")
    nir.add_argument("--no-nir", dest="nir", action="store_false", help="with --images: enrol VIS/ only")
    build.add_argument("--skip-bad", action="store_true",
                       help="leave out images that cannot be decoded or are misnamed (listed in index.json and "
                            "here) instead of failing")
    build.add_argument("--fmr", type=float, action="append",
                       help="with --features: calibrate at these FMRs right away (default "
                            f"{', '.join(f'{f:g}' for f in DEFAULT_FMRS)})")
    build.add_argument("--batch", type=int, default=64, help="images per embedder call")
    build.add_argument("--device", default="cpu", help="embedder device (cpu, cuda, cuda:1)")
    build.add_argument("--drop-invalid", action="store_true",
                       help="drop non-finite/zero embeddings (counted in index.json) instead of refusing")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index")
    build.add_argument("--row-dtype", choices=["float32", "float16"], default="float32",
                       help="float16 halves the rows' memory when searched with faiss on the CPU; every "
                            "row near a query's maximum is re-scored in float32, so answers are unchanged")
    add_storage_option(build)
    build.set_defaults(func=run_build)

    cal = sub.add_parser("calibrate", help="set decision thresholds at target false-match rates")
    cal.add_argument("uri")
    cal.add_argument("--fmr", type=float, action="append", help=f"target FMR (repeatable; default {DEFAULT_FMRS})")
    cal.add_argument("--embedder", help="check that this embedder matches the index (and record it when the "
                     "index was imported without one)")
    add_preprocessing_flag(cal)
    cal.add_argument("--max-impostor-pairs", type=int, default=20_000_000)
    cal.add_argument("--max-genuine-pairs", type=int, default=5_000_000)
    cal.add_argument("--seed", type=int, default=0)
    add_storage_option(cal)
    cal.set_defaults(func=run_calibrate)

    info = sub.add_parser("info", help="print an index's description")
    info.add_argument("uri")
    info.add_argument("--json", action="store_true", help="print index.json as is")
    add_storage_option(info)
    info.set_defaults(func=run_info)

    query = sub.add_parser("query", help="nearest enrolled images of query embeddings or images")
    query.add_argument("uri")
    queries = query.add_mutually_exclusive_group(required=True)
    queries.add_argument("--embeddings", help=".npy matrix [N, dim] (normalised here)")
    queries.add_argument("--images", help="folder of query images (needs --embedder)")
    query.add_argument("--embedder", help="face embedder for --images; must match the index")
    add_preprocessing_flag(query)
    query.add_argument("--top", type=int, default=1, help="nearest rows per query (default 1)")
    query.add_argument("--backend", choices=BACKENDS, default="auto")
    query.add_argument("--device", default="cpu")
    query.add_argument("--json", action="store_true", help="one JSON object per line")
    add_storage_option(query)
    query.set_defaults(func=run_query)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _load_embedder(path: str, device: str, explicit: dict, info=None):
    from facegen.engine.index.compat import embedder_for_index

    embedder = embedder_for_index(path, explicit, info, device)
    print_notes(embedder)
    return embedder


# ----------------------------------------------------------------------------------- build
def run_build(args: argparse.Namespace) -> int:
    """Every source streams into the index (engine/index/stream.py): memory stays near one shard."""
    from collections import Counter

    from facegen.engine.index import PrivacyIndex, calibrate
    from facegen.engine.index.build import created_by
    from facegen.engine.index.compat import print_impostor_lines
    from facegen.engine.index.features_json import identity_feature_blocks
    from facegen.engine.index.sources import image_stream
    from facegen.engine.index.stream import build_index_from_blocks, open_table
    from facegen.engine.storage import Storage

    options = parse_storage_options(args.storage_option)
    explicit = preprocessing_flags(args)
    if explicit and not args.embedder:
        raise UserError("index build: --preprocessing needs --embedder")
    if args.images and not args.embedder:
        raise UserError("index build --images: needs --embedder to embed the images")
    if not args.images and args.nir is not None:
        raise UserError("index build: --nir/--no-nir apply to --images only")
    if args.fmr and not args.features:
        raise UserError("index build: --fmr applies to --features (calibrate other indexes with "
                        "`facegen index calibrate`)")
    out = Storage(args.out, options)
    out.check_writable()  # before any embedding work
    if out.exists("index.json") and not args.overwrite:
        raise UserError(f"{out.url('index.json')}: an index already exists here (use --overwrite)")
    embedder = _load_embedder(args.embedder, args.device, explicit) if args.embedder else None
    skipped: list = []
    if args.images:
        stream = image_stream(args.images, embedder, args.batch, include_nir=args.nir, storage_options=options,
                              skip_bad=args.skip_bad)
        blocks, description, skipped = stream.blocks(), stream.description, stream.skipped
    elif args.table:
        table = open_table(args.table, options)
        blocks, description = table.blocks(), f"table {args.table}"
    else:
        blocks = identity_feature_blocks(args.features, options)
        description = f"identity_features.json {args.features}"
    fields = {"embedder_fingerprint": embedder.fingerprint if embedder else None,
              "preprocessing": embedder.preprocessing.to_dict() if embedder else None,
              "embedder_weights": embedder.weights_fingerprint if embedder else None,
              "source": description, "created_by": created_by()}

    def info_fields() -> dict:  # once the source is read: what it skipped
        return {**fields, "dropped": dict(Counter(reason.split(":")[0] for _, reason in skipped)),
                "skipped": tuple({"file": str(f), "reason": str(r)} for f, r in skipped)}

    per_identity: Counter = Counter()
    info = build_index_from_blocks(
        blocks, out, expected_dim=embedder.dim if embedder else None, info_fields=info_fields,
        count_identities=per_identity, embedder_name=f"--embedder {args.embedder}", shard_size=args.shard_size,
        drop_invalid=args.drop_invalid,
        overwrite=args.overwrite, row_dtype=args.row_dtype)
    print(f"wrote {args.out}: {info.count} embeddings of {info.num_identities} identities, dim {info.dim}, "
          f"{info.num_shards} shard(s)")
    if not args.table:
        print_identity_counts(per_identity)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    for reason, count in sorted(info.dropped.items()):
        print(f"dropped {count}: {reason}")
    print_impostor_lines(info.impostor_scores)
    if args.features:
        # The original's identity features come with no thresholds of their own: calibrate now, so
        # `privacy.threshold: auto` works on this index without another step.
        index = PrivacyIndex.open(out, backend="numpy")
        for entry in calibrate(index, args.fmr or DEFAULT_FMRS):
            print(_threshold_line(entry))
            _warn_unresolved(entry)
    return 0


def print_identity_counts(per_identity: Mapping[str, int], show: int = 20) -> None:
    """Images enrolled per identity: every identity while few, else a summary and the smallest."""
    import numpy as np

    names = np.asarray(sorted(per_identity), dtype=str)
    counts = np.asarray([per_identity[n] for n in names], np.int64)
    if len(names) <= show:
        print("images per identity: " + ", ".join(f"{n} {c}" for n, c in zip(names, counts)))
        return
    order = np.argsort(counts, kind="stable")[:5]
    print(f"images per identity: min {counts.min()}, median {int(np.median(counts))}, max {counts.max()}; "
          "fewest: " + ", ".join(f"{names[i]} {counts[i]}" for i in order))


# ------------------------------------------------------------------------------- calibrate
def run_calibrate(args: argparse.Namespace) -> int:
    from facegen.engine.index import PrivacyIndex, calibrate
    from facegen.engine.index.compat import print_impostor_lines
    from facegen.engine.index.store import write_info

    index = PrivacyIndex.open(args.uri, parse_storage_options(args.storage_option), backend="numpy")
    explicit = preprocessing_flags(args)
    if explicit and not args.embedder:
        raise UserError("index calibrate: --preprocessing needs --embedder")
    if args.embedder:
        embedder = _load_embedder(args.embedder, "cpu", explicit, index.info)
        index.check_compatible(embedder)
        if index.info.embedder_fingerprint is None:
            import dataclasses

            index.info = dataclasses.replace(
                index.info, embedder_fingerprint=embedder.fingerprint, embedder_weights=embedder.weights_fingerprint,
                preprocessing=embedder.preprocessing.to_dict())
            write_info(index.storage, index.info)
            print(f"recorded embedder {embedder.fingerprint[:16]}… in {index.storage.url('index.json')}")
    entries = calibrate(index, args.fmr or DEFAULT_FMRS, max_impostor_pairs=args.max_impostor_pairs,
                        max_genuine_pairs=args.max_genuine_pairs, seed=args.seed)
    print_impostor_lines(index.info.impostor_scores)
    for entry in entries:
        print(_threshold_line(entry))
        _warn_unresolved(entry)
    return 0


def _warn_unresolved(entry: dict) -> None:
    from facegen.engine.index.compat import PAIRS_PER_FMR, required_pairs

    pairs, fmr = entry["num_impostor_pairs"], entry["fmr"]
    if pairs < required_pairs(fmr):
        print(f"WARNING: FMR {fmr:g} is finer than {pairs} impostor pairs resolve (needs {required_pairs(fmr)} = "
              f"{PAIRS_PER_FMR}/FMR): this threshold is not an estimate of that FMR, and `privacy.threshold: auto` "
              "refuses it. Enrol more identities or calibrate at a coarser FMR.", file=sys.stderr)


def _threshold_line(entry: dict) -> str:
    tmr = "n/a" if entry.get("tmr") is None else f"{entry['tmr']:.4f}"
    return (f"FMR {entry['fmr']:.0e}: threshold {entry['threshold']:.6f}  TMR {tmr}  "
            f"({entry['num_impostor_pairs']} impostor / {entry['num_genuine_pairs']} genuine pairs)")


# ------------------------------------------------------------------------------------ info
def run_info(args: argparse.Namespace) -> int:
    from facegen.engine.index import PrivacyIndex

    index = PrivacyIndex.open(args.uri, parse_storage_options(args.storage_option))
    info = index.info
    if args.json:
        print(json.dumps(info.to_dict(), indent=2, sort_keys=True))
        return 0
    print(f"index        {index.storage.uri}")
    print(f"embeddings   {info.count}")
    print(f"identities   {info.num_identities if info.num_identities is not None else 'unknown'}")
    print(f"dim          {info.dim} (metric {info.metric})")
    print(f"shards       {info.num_shards}")
    print(f"embedder     {info.embedder_fingerprint or 'unknown (not recorded)'}")
    if info.embedder_weights:
        print(f"weights      {info.embedder_weights}")
    if info.preprocessing:
        print(f"preprocess   {json.dumps(info.preprocessing, sort_keys=True)}")
    print(f"source       {info.source or '-'}")
    for reason, count in sorted(info.dropped.items()):
        print(f"dropped      {count}: {reason}")
    for item in info.skipped:
        print(f"skipped      {item['file']}: {item['reason']}")
    if info.impostor_scores:
        scores = info.impostor_scores
        print(f"impostors    median {scores['median']:.3f}, p99 {scores['p99']:.3f}, max {scores['max']:.3f} "
              f"({scores['pairs']} pairs)")
    if not info.thresholds:
        print("thresholds   none (run `facegen index calibrate`)")
    for entry in info.thresholds:
        print(f"threshold    {_threshold_line(entry)}")
    print(f"created by   {info.created_by}")
    return 0


# ----------------------------------------------------------------------------------- query
def _query_embeddings(args: argparse.Namespace, index: PrivacyIndex, options: dict
                      ) -> tuple[np.ndarray, list[str]]:
    import numpy as np

    from facegen.engine.index import embeddings_from_images, normalize_rows

    if args.embeddings:
        try:
            matrix = np.load(args.embeddings, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"{args.embeddings}: not a readable .npy matrix ({err})") from None
        if matrix.ndim != 2 or matrix.shape[1] != index.dim:
            raise UserError(f"{args.embeddings}: shape {matrix.shape}, the index needs [N, {index.dim}]")
        vectors, _ = normalize_rows(matrix)
        vectors[~np.isfinite(matrix).all(axis=1) | ~vectors.any(axis=1)] = np.nan  # answered NaN, row -1
        return vectors, [str(i) for i in range(len(vectors))]
    if not args.embedder:
        raise UserError("index query --images: needs --embedder")
    embedder = _load_embedder(args.embedder, args.device, preprocessing_flags(args), index.info)
    index.check_compatible(embedder)
    # Queries are not enrolment: an unreadable query image is reported and the others answered.
    source = embeddings_from_images(args.images, embedder, storage_options=options, require_identity=False,
                                    skip_bad=True)
    for path, reason in source.skipped:
        print(f"skipped {path}: {reason}")
    return source.embeddings, source.files.tolist()


def run_query(args: argparse.Namespace) -> int:
    from facegen.engine.index import PrivacyIndex

    options = parse_storage_options(args.storage_option)
    index = PrivacyIndex.open(args.uri, options, backend=args.backend, device=args.device)
    queries, names = _query_embeddings(args, index, options)
    sims, rows = index.search(queries, args.top)
    identities, files = index.identity_of(rows), index.file_of(rows)
    if not args.json:
        print("query\trank\tsimilarity\tidentity\tfile")
    for i, name in enumerate(names):
        for rank in range(args.top):
            record = {"query": name, "rank": rank + 1, "similarity": float(sims[i, rank]),
                      "row": int(rows[i, rank]), "identity": identities[i, rank], "file": files[i, rank]}
            if args.json:
                print(json.dumps(record))
            else:
                print(f"{name}\t{rank + 1}\t{record['similarity']:.6f}\t{record['identity']}\t{record['file']}")
    return 0
