"""`facegen disentangle`: rank which W+ / StyleSpace units of a generator carry identity (StyleID).

  facegen disentangle rank   --generator G --embedder E --out ranks.parquet
  facegen disentangle export ranks.parquet --generator G --space wplus --width 1 --out channels_rank.npy
  facegen disentangle import channels_rank.npy --generator G --space wplus --width 1 --out ranks.parquet
"""

from __future__ import annotations

import argparse
import io

from facegen.jobs.common import (
    add_seeded_face_options,
    add_swap_models,
    open_swap_space,
    read_uri,
    unit_widths,
    write_uri,
)
from facegen.jobs.embedder_options import preprocessing_flags, print_notes
from facegen.models.errors import UserError


def _spaces(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(","))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "disentangle",
        help="rank the W+ / StyleSpace units of a generator by how much identity they carry",
        description=(
            "StyleID-style identity disentanglement. `rank` swaps every unit (a channel, a group of channels or "
            "a whole layer) of W+ or StyleSpace between M seeded source/target faces and scores it by the "
            "identity change it causes (1 - cosine of the embedder's features) over the appearance change "
            "(RMS grey-level change of the low-pass image); see docs/anonymise.md. `export`/`import` convert "
            "between the rank table and StyleID's 2-D .npy arrays [layer, channel|group]."
        ),
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION")

    r = sub.add_parser("rank", help="score every swap unit; write a parquet rank table",
                       description="Score every swap unit of the chosen spaces and unit widths over --pairs "
                                   "seeded source/target faces; write one parquet table (one row per unit, "
                                   "rank 0 = most identity per appearance).")
    add_swap_models(r)
    r.add_argument("--out", required=True, help="rank table to write (.parquet; local path or fsspec URI)")
    r.add_argument("--space", type=_spaces, default=("wplus",),
                   help="comma-separated: wplus, style (default: wplus)")
    r.add_argument("--widths", type=unit_widths, default=(1, 256),
                   help="channels per unit, comma-separated; 'layer' = whole layers; a width above a layer's "
                        "size is the whole layer (default: 1,256, StyleID's channel and 256-group ranks)")
    r.add_argument("--pairs", type=int, default=32, help="source/target face pairs M (default: 32)")
    add_seeded_face_options(r, batch=64)
    r.add_argument("--pairs-per-task", type=int, default=8,
                   help="pairs per unit of work; the result does not depend on it (default: 8)")
    r.add_argument("--epsilon", type=float, default=0.5,
                   help="grey levels added to the appearance change before dividing (default: 0.5)")
    r.add_argument("--appearance-cap", type=float, default=1.0,
                   help="rank units whose appearance change is above this quantile of all units' after every unit "
                        "within it: 0.5 (the median) keeps a top-n swap's appearance change below n random units' "
                        "but moves identity less (default: 1, rank by identity per appearance alone)")
    r.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this process; ray: Ray actors (same table)")
    r.add_argument("--address", help="Ray address (default: an embedded local Ray)")
    r.add_argument("--actors", type=int, default=2, help="Ray actors (default: 2)")
    r.set_defaults(func=run_rank)

    e = sub.add_parser("export", help="write one (space, width) of a rank table as StyleID's .npy array")
    e.add_argument("ranks", help="rank table (.parquet)")
    e.add_argument("--generator", required=True, help="the generator the table was computed for")
    e.add_argument("--space", default="wplus", choices=["wplus", "style"])
    e.add_argument("--width", type=int, default=1, help="unit width (0 = whole layers)")
    e.add_argument("--out", required=True, help=".npy file: float scores [layer, channel|group], NaN padded")
    e.set_defaults(func=run_export)

    i = sub.add_parser("import", help="turn StyleID's [layer, channel|group] .npy array into a rank table",
                       description="Float arrays are scores (higher = more identity); integer arrays are rank "
                                   "positions (0 = first).")
    i.add_argument("array", help=".npy file, e.g. StyleID's channels_rank.npy or group_256_rank.npy")
    i.add_argument("--generator", required=True, help="the generator the array belongs to")
    i.add_argument("--space", default="wplus", choices=["wplus", "style"])
    i.add_argument("--width", type=int, default=1, help="unit width (0 = whole layers; 256 for group_256)")
    i.add_argument("--out", required=True, help="rank table to write (.parquet)")
    i.set_defaults(func=run_import)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _progress(label: str):
    """A bar on a terminal, plain lines elsewhere (engine.progress)."""
    from facegen.engine.progress import progress_callback

    return progress_callback(label, "task")


def run_rank(args: argparse.Namespace) -> int:
    from facegen.engine.anonymise.metric import Metric
    from facegen.engine.anonymise.rank import RankJob, Scorer, rank, ranks_bytes, run_locally
    from facegen.models.loading import load_embedder, load_generator
    from facegen.models.rendering import open_latent_spaces

    job = RankJob(spaces=args.space, widths=args.widths, pairs=args.pairs, seed=args.seed,
                  truncation_psi=args.truncation, batch_size=args.batch, pairs_per_task=args.pairs_per_task,
                  metric=Metric(lowpass_size=args.lowpass, epsilon=args.epsilon,
                                appearance_cap=args.appearance_cap))
    if not args.out.endswith(".parquet"):
        raise UserError(f"--out {args.out}: the rank table is a .parquet file")
    generator, embedder = load_generator(args.generator), load_embedder(args.embedder, **preprocessing_flags(args))
    print_notes(embedder)
    space = open_latent_spaces(generator)
    progress = _progress("disentangle rank")
    if args.executor == "ray":
        from facegen.cluster.disentangle import run_on_ray
        from facegen.cluster.executor import ray_connection

        if args.actors < 1:
            raise UserError("--actors must be >= 1")
        with ray_connection(args.address):
            table = rank(space, embedder, job, run_on_ray(generator, embedder, job, args.actors, progress=progress))
    else:
        table = rank(space, embedder, job, run_locally(Scorer(space, embedder, job), progress))
    write_uri(args.out, ranks_bytes(table))
    for name in job.spaces:
        for width in job.widths:
            _print_top(table, name, width)
    print(f"wrote {table.num_rows} ranked units to {args.out}")
    return 0


def _print_top(table, name: str, width: int, count: int = 5) -> None:
    from facegen.engine.anonymise.rank import select

    rows = select(table, name, width).slice(0, count).to_pylist()
    best = ", ".join(f"{r['layer_name']}[{r['start']}:{r['start'] + r['width']}] ({r['score']:.4g})" for r in rows)
    print(f"{name} width {width or 'layer'}: top {len(rows)}: {best}")


def run_export(args: argparse.Namespace) -> int:
    import numpy as np

    from facegen.engine.anonymise.rank import read_ranks, to_grid

    table = read_ranks(read_uri(args.ranks), args.ranks)
    grid = to_grid(table, open_swap_space(args.generator), args.space, args.width)
    buffer = io.BytesIO()
    np.save(buffer, grid.astype(np.float32), allow_pickle=False)
    write_uri(args.out, buffer.getvalue())
    print(f"wrote {args.space} width {args.width} scores {list(grid.shape)} to {args.out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    import numpy as np

    from facegen.engine.anonymise.rank import from_grid, ranks_bytes

    try:
        grid = np.load(io.BytesIO(read_uri(args.array)), allow_pickle=False)  # never unpickle a downloaded file
    except ValueError as err:
        raise UserError(f"{args.array}: not a plain .npy array ({err})") from None
    table = from_grid(grid, open_swap_space(args.generator), args.space, args.width)
    write_uri(args.out, ranks_bytes(table))
    print(f"wrote {table.num_rows} ranked units to {args.out}")
    return 0
