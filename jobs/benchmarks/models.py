"""`facegen bench models`: generator and embedder throughput, batched fast path vs the original's batch 1.

The baseline is measured in the same run: for each timed iteration the same number of images goes
through the batched path (one call of `--batch` images) and the reference path (`--batch` calls of
one image, with the generator's `fast=False` reference convolutions, as ArcBiFaceGAN's filter runs).
Weights are random: throughput does not depend on their values.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from facegen.jobs.benchmarks import write_record
from facegen.models.devices import resolve_device
from facegen.models.embedder import Preprocessing, TorchEmbedder
from facegen.models.errors import UserError
from facegen.models.generator import Generator, GeneratorConfig
from facegen.models.iresnet import DEPTH_LAYERS, IResNet, IResNetConfig

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CONDITION_NORM = 4.0  # ArcBiFaceGAN's condition: 4 · normalize(randn) (generate_recognition_data.py)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="generator and embedder images/s: batched fast path vs batch-1 reference, same run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--resolution", type=int, default=64, help="generator output size (power of 2)")
    parser.add_argument("--batch", type=int, default=16, help="images per batched call")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="fp32; bf16 = autocast for G and embedder; fp16 = G's fp16 blocks + "
                             "fp16 autocast for the embedder (CUDA only, like ArcBiFaceGAN)")  # fmt: skip
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--embedder-depth", type=int, choices=sorted(DEPTH_LAYERS), default=18)
    parser.add_argument("--embedder-width", type=int, default=64, help="iResNet base width (64 = insightface)")
    parser.add_argument("--channel-base", type=int, default=16384, help="generator channel_base (ArcBiFaceGAN)")
    parser.add_argument("--channel-max", type=int, default=512)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (each: one batch per path)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations before timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = _check_args(args)
    torch.manual_seed(args.seed)
    generator, embedder = _build_models(args, device)
    z, c = _latents(args.batch, generator, device, args.seed)
    autocast = _autocast(device, DTYPES[args.dtype] if args.dtype == "bf16" else None)

    def g_batched():
        return generator(z, c, truncation_psi=1, noise_mode="const", fast=True)[0]

    def g_reference():
        return [generator(z[i : i + 1], c[i : i + 1], truncation_psi=1, noise_mode="const")[0] for i in range(len(z))]

    with torch.inference_mode(), autocast:
        images = g_batched()
        max_abs_diff = float((images.float() - torch.cat(g_reference()).float()).abs().max())
        seconds = {
            "generator": (_time(g_batched, args, device), _time(g_reference, args, device)),
            "embedder": (
                _time(lambda: embedder.embed(images), args, device),
                _time(lambda: [embedder.embed(images[i : i + 1]) for i in range(len(images))], args, device),
            ),
        }

    results = _results(args, device, generator, embedder, max_abs_diff, seconds)
    print(format_table(results))
    write_record(args.json, results)
    return 0


def _check_args(args: argparse.Namespace) -> torch.device:
    for key in ("batch", "iters"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key}: must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        raise UserError(f"--warmup: must be >= 0, got {args.warmup}")
    device = resolve_device(args.device, what="--device")
    if args.dtype == "fp16" and device.type != "cuda":
        raise UserError("--dtype fp16: fp16 runs only on CUDA (use fp32 or bf16 on CPU)")
    return device


def _build_models(args: argparse.Namespace, device: torch.device) -> tuple[Generator, TorchEmbedder]:
    g_config = GeneratorConfig(
        img_resolution=args.resolution,
        channel_base=args.channel_base,
        channel_max=args.channel_max,
        num_fp16_res=4 if args.dtype == "fp16" else 0,
    )
    generator = Generator(g_config).eval().requires_grad_(False).to(device)
    e_config = IResNetConfig(depth=args.embedder_depth, base_width=args.embedder_width)
    module = IResNet(e_config).eval().requires_grad_(False)
    embedder = TorchEmbedder(module, Preprocessing(input_size=e_config.input_size), autocast_dtype=DTYPES[args.dtype])
    return generator, embedder.to(device)


def _latents(n: int, generator: Generator, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator.z_dim, generator=g)
    c = F.normalize(torch.randn(n, generator.c_dim, generator=g), dim=1) * CONDITION_NORM
    return z.to(device), c.to(device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _time(step: Callable[[], object], args: argparse.Namespace, device: torch.device) -> float:
    """Seconds per iteration of `step`, after warm-up; CUDA work is synchronised before reading clocks."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync()
    return (time.perf_counter() - start) / args.iters


def _results(args, device, generator, embedder, max_abs_diff: float, seconds: dict) -> dict:
    """The JSON record; `seconds[stage]` = (batched, reference) seconds per iteration of `batch` images."""
    n = args.batch

    def rates(stage: str) -> dict:
        batched_s, single_s = seconds[stage]
        return {
            "batched_images_per_s": n / batched_s,
            "reference_images_per_s": n / single_s,
            "speedup": single_s / batched_s,
        }

    return {
        "benchmark": "models",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch": n,
        "iters": args.iters,
        "warmup": args.warmup,
        "generator": {
            "resolution": args.resolution,
            "channel_base": args.channel_base,
            "params": sum(p.numel() for p in generator.parameters()),
            "max_abs_diff_fast_vs_reference": max_abs_diff,
            **rates("generator"),
        },
        "embedder": {
            "model": f"iresnet{args.embedder_depth}",
            "base_width": args.embedder_width,
            "input_size": embedder.input_size,
            "params": sum(p.numel() for p in embedder.module.parameters()),
            **rates("embedder"),
        },
    }


def format_table(results: dict) -> str:
    g, e, n = results["generator"], results["embedder"], results["batch"]
    lines = [
        f"facegen bench models: {results['device_name']} ({results['device']}), dtype {results['dtype']}, "
        f"torch {results['torch']}, {results['threads']} threads, {results['iters']} iters",
        f"generator {g['resolution']}x{g['resolution']} ({g['params'] / 1e6:.2f} M params), "
        f"embedder {e['model']} width {e['base_width']} at {e['input_size']}x{e['input_size']} "
        f"({e['params'] / 1e6:.2f} M params)",
        "",
        f"{'stage':<10} {'path':<28} {'images/s':>10} {'ms/image':>10}",
    ]
    rows = [
        ("generator", "reference (batch 1)", g["reference_images_per_s"]),
        ("generator", f"fast, batched ({n})", g["batched_images_per_s"]),
        ("embedder", "batch 1", e["reference_images_per_s"]),
        ("embedder", f"batched ({n})", e["batched_images_per_s"]),
    ]
    lines += [f"{stage:<10} {path:<28} {rate:>10.2f} {1000 / rate:>10.2f}" for stage, path, rate in rows]
    lines += [
        "",
        f"speedup vs batch-1 reference: generator {g['speedup']:.2f}x, embedder {e['speedup']:.2f}x",
        f"generator fast vs reference output: max |diff| = {g['max_abs_diff_fast_vs_reference']:.2e}",
    ]
    return "\n".join(lines)
