"""`facegen models init FAMILY --out PATH [--set key=value ...] [--seed N]` and `facegen models info PATH`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from facegen.jobs.common import describe_module, print_info
from facegen.models.errors import UserError

# models.checkpoint (torch) loads when a command runs; tests/jobs/test_cli_start.py checks this copy of
# its FAMILIES keys.
FAMILY_NAMES = ("arcbiface", "discriminator", "iresnet")


def _nir(value: Any) -> int:
    if isinstance(value, bool):
        return 1 if value else 0
    raise UserError(f"--set nir={value!r}: must be true or false")


# Friendlier names accepted by --set, per family: alias -> (config field, value converter or None).
ALIASES: dict[str, dict[str, tuple[str, Any]]] = {
    "arcbiface": {"resolution": ("img_resolution", None), "nir": ("nir_channels", _nir)},
    "discriminator": {"resolution": ("img_resolution", None)},
    "iresnet": {},
}


def parse_value(text: str) -> Any:
    """JSON when it parses (true/false, ints, floats, null, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def config_from_sets(family: str, sets: list[str]) -> Any:
    """The family's config dataclass, defaults overridden by `key=value` items."""
    from facegen.models.checkpoint import FAMILIES

    config_cls, _ = FAMILIES[family]
    fields = [f.name for f in dataclasses.fields(config_cls)]
    aliases = ALIASES.get(family, {})
    values: dict[str, Any] = {}
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value")
        value = parse_value(text)
        if key in aliases:
            key, convert = aliases[key]
            value = convert(value) if convert else value
        elif key not in fields:
            valid = sorted([*fields, *aliases])
            raise UserError(f"--set {key}: unknown {family} setting; valid keys: {', '.join(valid)}")
        values[key] = value
    try:
        return config_cls(**values)
    except TypeError as err:
        raise UserError(f"{family}: {err}") from None


def run_init(args: argparse.Namespace) -> int:
    import torch

    from facegen.models.checkpoint import FAMILIES, save_native

    config = config_from_sets(args.family, args.set)
    _, module_cls = FAMILIES[args.family]
    with torch.random.fork_rng(devices=[]):  # the seed decides the weights, not the caller's RNG state
        torch.manual_seed(args.seed)
        module = module_cls(config)
    path = save_native(module.eval(), args.out, family=args.family)
    print_info({"path": str(path), **describe_module(module)}, args.json)
    return 0


def _onnx_info(path: Path) -> dict[str, Any]:
    import numpy as np
    import onnx

    from facegen.models.embedder import OnnxEmbedder

    model = onnx.load(str(path))
    embedder = OnnxEmbedder(str(path))
    return {"format": "onnx", "family": "onnx-embedder", "embedding_dim": embedder.dim,
            "input_size": embedder.input_size,
            "parameters": int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer)),
            "fingerprint": embedder.fingerprint}


def run_info(args: argparse.Namespace) -> int:
    from facegen.models.loading import detect_format, load_module

    path = Path(args.path)
    fmt = detect_format(path)
    if fmt == "onnx":
        print_info({"path": str(path), **_onnx_info(path)}, args.json)
        return 0
    module = load_module(path, what=args.what)
    entry = {"entry": args.what} if fmt == "stylegan_pickle" else {}
    print_info({"path": str(path), "format": fmt, **entry, **describe_module(module)}, args.json)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="create and inspect model checkpoints",
                                   description="Create new native checkpoints and inspect any supported one.")
    sub = parser.add_subparsers(dest="models_action", metavar="ACTION")

    init = sub.add_parser("init", help="write a freshly initialised model as a native checkpoint")
    init.add_argument("family", choices=sorted(FAMILY_NAMES), help="model family")
    init.add_argument("--out", required=True, help="output .safetensors path")
    init.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config value (JSON or string); repeatable. arcbiface also takes resolution, nir")
    init.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    init.add_argument("--json", action="store_true", help="print one JSON object")
    init.set_defaults(func=run_init)

    info = sub.add_parser("info", help="family, config, parameter count and fingerprint of a checkpoint")
    info.add_argument("path", help="native .safetensors, StyleGAN2-ADA/ArcBiFaceGAN .pkl, rosinality .pt, "
                                   "insightface .pth or .onnx")
    info.add_argument("--what", default="G_ema", choices=["G_ema", "G", "D", "D_NIR"],
                      help="snapshot entry to inspect (.pkl only)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=run_info)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
