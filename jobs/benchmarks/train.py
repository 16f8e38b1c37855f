"""`facegen bench train`: training speed (s/kimg) of the real loop at a given configuration, this device.

The production `Trainer` runs on an in-memory dataset of random VIS/NIR pairs and features (speed
does not depend on pixel values), one worker: `--warmup-steps` untimed steps, then at least
`--kimg-sample` thousand images rounded up to whole regulariser cycles (16 steps by default). Each
phase is timed (with a device sync), which gives the same-run comparison: the main phases alone vs
with the lazy regularisers (R1 every 16 steps on both D's, path length every 4). For scale: upstream
StyleGAN2-ADA trains 256² at 21.6-24.2 s/kimg on one V100.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facegen.engine.storage import Storage
from facegen.engine.training.context import TrainContext
from facegen.engine.training.loop import Trainer
from facegen.engine.training.spec import build_train_spec
from facegen.models.errors import UserError

UPSTREAM_V100_256 = (21.6, 24.2)  # s/kimg, StyleGAN2-ADA README, 1 GPU


class SyntheticPairs(torch.utils.data.Dataset):
    """Random uint8 VIS/NIR pairs and float features with `TrainingData`'s attributes."""

    def __init__(self, count: int, resolution: int, c_dim: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vis = torch.randint(0, 256, (count, 3, resolution, resolution), dtype=torch.uint8, generator=g)
        self.nir = torch.randint(0, 256, (count, 1, resolution, resolution), dtype=torch.uint8, generator=g)
        self.conditions = torch.randn(count, c_dim, generator=g).numpy().astype(np.float32)
        self.labels = np.arange(count) // 4
        self.resolution, self.c_dim, self.num_samples, self.name = resolution, c_dim, count, "synthetic"

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int):
        return self.vis[i], self.nir[i], torch.from_numpy(self.conditions[i])


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="training speed: s/kimg of the real loop on this device",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=64, help="image size (power of 2)")
    p.add_argument("--batch", type=int, default=8, help="batch size")
    p.add_argument("--cfg", default="auto", choices=["auto", "biface256", "paper256", "stylegan2"])
    p.add_argument("--channel-base", type=int, default=None, help="override the preset's channel_base")
    p.add_argument("--channel-max", type=int, default=None)
    p.add_argument("--c-dim", type=int, default=512, help="identity feature size (ArcFace: 512)")
    p.add_argument("--aug", choices=["ada", "noaug"], default="ada")
    p.add_argument("--fp32", action="store_true", help="no fp16 blocks (CUDA only uses them anyway)")
    p.add_argument("--kimg-sample", type=float, default=0.064, help="thousands of images to time")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any training spec key, e.g. config.mapping_layers=2 or loss.nir_r1=false (repeatable)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    p.set_defaults(func=run)


def _spec(args: argparse.Namespace, workdir: str):
    config = {"preset": args.cfg, "batch": args.batch, "fp32": args.fp32}
    config.update({k: v for k, v in (("channel_base", args.channel_base), ("channel_max", args.channel_max))
                   if v is not None})
    return build_train_spec({
        "seed": args.seed, "data": {"uri": "synthetic", "loader_workers": 0}, "output": {"dir": workdir},
        "config": config, "augment": {"mode": args.aug},
        "schedule": {"tick_kimg": 1e6, "snap": None, "checkpoint_minutes": None, "grid": [2, 2]},
        "run": {"executor": "local", "device": args.device}}, args.overrides)


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device available")
    if args.resolution < 8 or args.resolution & (args.resolution - 1):
        raise UserError(f"--resolution: {args.resolution} is not a power of two >= 8")
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="facegen-bench-train-") as workdir:
        spec = _spec(args, workdir)
        data = SyntheticPairs(max(4 * args.batch, 16), args.resolution, args.c_dim, args.seed)
        ctx = TrainContext(device=torch.device(args.device))
        trainer = Trainer(spec, ctx, Storage(workdir).child("run").uri, data)
        results = measure(trainer, args)
    print(format_results(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def measure(trainer: Trainer, args: argparse.Namespace) -> dict[str, Any]:
    for _ in range(args.warmup_steps):
        trainer.step()
    # Whole regulariser cycles, so every phase runs at its real frequency.
    cycle = np.lcm(trainer.spec.loss.g_reg_interval, trainer.spec.loss.d_reg_interval)
    steps = max(int(np.ceil(args.kimg_sample * 1000 / trainer.hp.batch_size)), 1)
    steps = int(np.ceil(steps / cycle) * cycle)
    trainer.phase_seconds = {}
    started = trainer._clock()
    for _ in range(steps):
        trainer.step()
    seconds = trainer._clock() - started
    kimg = steps * trainer.hp.batch_size / 1000
    phases = {name: s / kimg for name, s in trainer.phase_seconds.items()}
    main = sum(v for k, v in phases.items() if k.endswith("main"))
    hp = trainer.hp
    return {
        "device": str(trainer.device), "torch_threads": torch.get_num_threads(), "resolution": args.resolution,
        "batch": hp.batch_size, "preset": hp.preset, "channel_base": hp.channel_base, "c_dim": args.c_dim,
        "augment": args.aug, "steps": steps, "kimg": kimg, "seconds": seconds,
        "sec_per_kimg": seconds / kimg, "images_per_sec": kimg * 1000 / seconds,
        "phase_sec_per_kimg": phases, "main_phases_sec_per_kimg": main,
        "regularisation_overhead": (sum(phases.values()) - main) / main if main else None,
        "parameters": {k: sum(p.numel() for p in v.parameters()) for k, v in trainer.nets.items()},
        "upstream_v100_256_sec_per_kimg": list(UPSTREAM_V100_256),
    }


def format_results(r: dict[str, Any]) -> str:
    phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phase_sec_per_kimg"].items())
    lines = [
        f"facegen bench train: {r['resolution']}² batch {r['batch']} ({r['preset']}, channel_base "
        f"{r['channel_base']}, c_dim {r['c_dim']}, aug {r['augment']}) on {r['device']} "
        f"({r['torch_threads']} threads)",
        f"  {r['sec_per_kimg']:.2f} s/kimg  ({r['images_per_sec']:.1f} img/s over {r['steps']} steps, "
        f"{r['kimg']:g} kimg)",
        f"  per phase (s/kimg): {phases}",
        f"  main phases alone {r['main_phases_sec_per_kimg']:.2f} s/kimg; lazy regularisation adds "
        f"{100 * (r['regularisation_overhead'] or 0):.1f}%",
        f"  reference: upstream StyleGAN2-ADA 256² on one V100: {UPSTREAM_V100_256[0]}-{UPSTREAM_V100_256[1]} s/kimg",
    ]
    return "\n".join(lines)
