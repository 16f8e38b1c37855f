"""`facegen preview G --seeds 0-15 [--condition FILE] [--truncation PSI] --out grid.png`: look at a generator."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "preview", help="write a VIS|NIR grid of a generator's samples (generate.py --seeds)",
        description="Sample a generator (native .safetensors, ArcBiFaceGAN/StyleGAN2-ADA .pkl, rosinality .pt) "
                    "for the given seeds and write one PNG grid: each sample's VIS image with its NIR twin on "
                    "the right. A seed's z is upstream generate.py's RandomState(seed).randn(z_dim); a "
                    "conditioned generator gets a random identity per seed, or with --condition one row per "
                    "identity and one column per seed.")
    p.add_argument("generator", metavar="G", help="generator checkpoint")
    p.add_argument("--seeds", default="0-15", help="seeds, e.g. 0-15 or 1,5,9-11 (default 0-15)")
    p.add_argument("--condition", metavar="FILE",
                   help="identity conditions: identity_features.json (first file of each identity) or a .npy "
                        "[M, c_dim]; rows of the grid")
    p.add_argument("--rows", type=int, default=4, help="identities taken from --condition (default 4)")
    p.add_argument("--condition-norm", type=float, default=4.0,
                   help="length every condition is scaled to (default 4, as generation)")
    p.add_argument("--truncation", "--trunc", type=float, default=1.0, help="truncation psi (default 1)")
    p.add_argument("--noise-mode", choices=["const", "random", "none"], default="const",
                   help="synthesis noise (default const, as upstream)")
    p.add_argument("--columns", type=int, default=8, help="pairs per row without --condition (default 8)")
    p.add_argument("--batch", type=int, default=16, help="samples per generator call (default 16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.set_defaults(func=run_preview)


def run_preview(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from facegen.engine.preview import latents, load_conditions, parse_seeds, sample
    from facegen.engine.sheets import pair_grid
    from facegen.models.errors import UserError

    seeds = parse_seeds(args.seeds)
    for name in ("rows", "columns", "batch"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}: {getattr(args, name)} must be at least 1")
    if args.condition_norm <= 0:
        raise UserError(f"--condition-norm: {args.condition_norm} must be positive")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out: {out} must end in .png")
    if not out.parent.resolve().is_dir():
        raise UserError(f"--out: folder {out.parent} does not exist")
    from facegen.models.devices import resolve_device

    resolve_device(args.device, what="--device")  # a missing GPU is refused before the model loads

    from facegen.models.loading import load_generator

    generator = load_generator(args.generator)
    z, c = latents(seeds, generator.z_dim, generator.c_dim, args.condition_norm)
    columns = min(args.columns, len(seeds))
    if args.condition:
        rows = load_conditions(args.condition, generator.c_dim, args.condition_norm, args.rows)
        z = np.tile(z, (len(rows), 1))
        c = np.repeat(rows, len(seeds), axis=0)
        columns = len(seeds)
    vis, nir = sample(generator, z, c, truncation=args.truncation, noise_mode=args.noise_mode, batch=args.batch,
                      device=args.device)
    from PIL import Image

    grid = pair_grid(vis, nir, columns)
    Image.fromarray(grid).save(out)
    kind = "VIS|NIR pairs" if nir is not None else "VIS images (no NIR branch)"
    print(f"wrote {out}: {len(vis)} {kind}, {grid.shape[1]}x{grid.shape[0]} px, seeds {args.seeds}, "
          f"truncation {args.truncation}")
    return 0
