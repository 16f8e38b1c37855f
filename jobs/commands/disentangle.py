"""`facegen disentangle`: rank which W+ / StyleSpace units of a generator carry identity (StyleID).

  facegen disentangle rank   --generator G --embedder E --out ranks.parquet
  facegen disentangle export ranks.parquet --generator G --space wplus --width 1 --out channels_rank.npy
  facegen disentangle import channels_rank.npy --generator G --space wplus --width 1 --out ranks.parquet
"""

from __future__ import annotations

import argparse
import io

from facegen.jobs.embedder_options import add_preprocessing_flag, preprocessing_flags, print_notes
from facegen.models.errors import UserError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(0 if part.strip() == "layer" else int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers or 'layer', got {text!r}") from None


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
    r.add_argument("--generator", required=True, help="generator checkpoint (facegen, ArcBiFaceGAN .pkl, "
                                                      "rosinality/StyleID .pt)")
    r.add_argument("--embedder", required=True, help="face embedder (facegen iresnet, insightface .pth, .onnx)")
    add_preprocessing_flag(r)
    r.add_argument("--out", required=True, help="rank table to write (.parquet; local path or fsspec URI)")
    r.add_argument("--space", type=_spaces, default=("wplus",),
                   help="comma-separated: wplus, style (default: wplus)")
    r.add_argument("--widths", type=_ints, default=(1, 256),
                   help="channels per unit, comma-separated; 'layer' = whole layers; a width above a layer's "
                        "size is the whole layer (default: 1,256, StyleID's channel and 256-group ranks)")
    r.add_argument("--pairs", type=int, default=32, help="source/target face pairs M (default: 32)")
    r.add_argument("--seed", type=int, default=0, help="seed of the faces (default: 0)")
    r.add_argument("--truncation", type=float, default=0.7, help="truncation psi of the faces (default: 0.7)")
    r.add_argument("--batch", type=int, default=64, help="images per generator call (default: 64)")
    r.add_argument("--pairs-per-task", type=int, default=8,
                   help="pairs per unit of work; the result does not depend on it (default: 8)")
    r.add_argument("--lowpass", type=int, default=16,
                   help="side of the low-pass image the appearance change is measured on (default: 16)")
    r.add_argument("--epsilon", type=float, default=0.5,
                   help="grey levels added to the appearance change before dividing (default: 0.5)")
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


def _split(uri: str):
    from facegen.engine.storage import Storage

    folder, _, name = uri.rpartition("/")
    if not name:
        raise UserError(f"{uri}: expected a file name")
    return Storage(folder or "."), name


def _read(uri: str) -> bytes:
    storage, name = _split(uri)
    if not storage.exists(name):
        raise UserError(f"{uri}: file not found")
    return storage.read_bytes(name)


def _write(uri: str, data: bytes) -> None:
    storage, name = _split(uri)
    storage.write_bytes(name, data)


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
                  metric=Metric(lowpass_size=args.lowpass, epsilon=args.epsilon))
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
    _write(args.out, ranks_bytes(table))
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


def _space(path: str):
    from facegen.models.loading import load_generator
    from facegen.models.rendering import open_latent_spaces

    return open_latent_spaces(load_generator(path))


def run_export(args: argparse.Namespace) -> int:
    import numpy as np

    from facegen.engine.anonymise.rank import read_ranks, to_grid

    grid = to_grid(read_ranks(_read(args.ranks), args.ranks), _space(args.generator), args.space, args.width)
    buffer = io.BytesIO()
    np.save(buffer, grid.astype(np.float32), allow_pickle=False)
    _write(args.out, buffer.getvalue())
    print(f"wrote {args.space} width {args.width} scores {list(grid.shape)} to {args.out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    import numpy as np

    from facegen.engine.anonymise.rank import from_grid, ranks_bytes

    try:
        grid = np.load(io.BytesIO(_read(args.array)), allow_pickle=False)  # never unpickle a downloaded file
    except ValueError as err:
        raise UserError(f"{args.array}: not a plain .npy array ({err})") from None
    table = from_grid(grid, _space(args.generator), args.space, args.width)
    _write(args.out, ranks_bytes(table))
    print(f"wrote {table.num_rows} ranked units to {args.out}")
    return 0
