"""`facegen convert SRC DST [--what G_ema|G|D|D_NIR]`: any supported checkpoint -> native safetensors."""

from __future__ import annotations

import argparse


def run_convert(args: argparse.Namespace) -> int:
    from facegen.jobs.common import describe_module, print_info
    from facegen.models.checkpoint import save_native
    from facegen.models.loading import detect_format, load_module

    fmt = detect_format(args.src)
    module = load_module(args.src, what=args.what)
    path = save_native(module, args.dst)
    entry = {"entry": args.what} if fmt == "stylegan_pickle" else {}
    print_info({"source": str(args.src), "format": fmt, **entry, "path": str(path), **describe_module(module)},
               args.json)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a checkpoint to facegen's native .safetensors",
        description="Convert an ArcBiFaceGAN/StyleGAN2-ADA .pkl (no code from it is run), an insightface "
                    ".pth, a rosinality .pt or a native file into one native .safetensors file.")
    parser.add_argument("src", help="source checkpoint")
    parser.add_argument("dst", help="output .safetensors path (written atomically)")
    parser.add_argument("--what", default="G_ema", choices=["G_ema", "G", "D", "D_NIR"],
                        help="snapshot entry to convert (.pkl only; default G_ema)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run_convert)
