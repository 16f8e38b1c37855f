"""`facegen world render`: a procedural VIS/NIR face population in the original's dataset layout."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    world = subparsers.add_parser(
        "world", help="render a procedural VIS/NIR face population (no models needed)",
        description="A procedural world of faces: every identity has fixed traits (face shape, skin tone, eyes, "
                    "brows, nose, mouth, hair), every sample new pose, expression, lighting and background, "
                    "and an aligned NIR twin. A stand-in real population for indexes, and training data for "
                    "small models.")
    sub = world.add_subparsers(dest="world_command", metavar="COMMAND")
    p = sub.add_parser(
        "render", help="write OUT/VIS/{identity}_{sample}.png and OUT/NIR/ (what index build, features and "
                       "train read)",
        description="Render N identities x K samples into OUT/VIS/ (RGB) and OUT/NIR/ (greyscale) with the same "
                    "file names, and OUT/world.json. Deterministic: the same flags give byte-identical files "
                    "on every machine; rerunning into the same OUT renders only what is missing.")
    p.add_argument("out", metavar="OUT", help="output folder or fsspec URI (empty, or an earlier render of the "
                                               "same flags)")
    p.add_argument("--identities", type=int, required=True, help="number of identities N")
    p.add_argument("--samples", type=int, required=True, help="samples per identity K")
    p.add_argument("--resolution", type=int, default=64, help="image size in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="world seed: which population (default 0)")
    p.add_argument("--batch", type=int, default=64, help="images rendered at once (memory only; default 64)")
    p.add_argument("--sheet", metavar="PNG", help="also write a VIS|NIR contact sheet of the first identities")
    p.set_defaults(func=run_render)
    world.set_defaults(func=lambda args: world.print_help() or 2)


def run_render(args: argparse.Namespace) -> int:
    from facegen.engine.world.dataset import render_dataset
    from facegen.models.errors import UserError

    if args.batch < 1:
        raise UserError(f"--batch: {args.batch} must be at least 1")
    result = render_dataset(args.out, args.identities, args.samples, resolution=args.resolution, seed=args.seed,
                            batch=args.batch)
    print(f"wrote {args.identities} identities x {args.samples} samples ({args.resolution}px, seed {args.seed}) "
          f"to {result['uri']}: {result['rendered']} rendered, {result['already_present']} already there")
    if args.sheet:
        write_sheet(args.sheet, args.identities, args.samples, args.resolution, args.seed)
        print(f"contact sheet: {args.sheet}")
    return 0


def write_sheet(path: str, identities: int, samples: int, resolution: int, seed: int) -> None:
    """Up to 8 identities, one per row, up to 6 samples each, VIS|NIR pairs."""
    import numpy as np
    from PIL import Image

    from facegen.engine.sheets import pair_grid
    from facegen.engine.world import render

    rows, columns = min(identities, 8), min(samples, 6)
    vis, nir = render(seed, np.repeat(np.arange(rows), columns), np.tile(np.arange(columns), rows), resolution)
    Image.fromarray(pair_grid(vis, nir, columns)).save(path)
