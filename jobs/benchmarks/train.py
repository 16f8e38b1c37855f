"""`facegen bench train`: training speed (s/kimg) of the real loop at the ArcBiFaceGAN 256² configuration,
with 1 and N workers, beside StyleGAN2-ADA's published V100 figures.

Two measurements of the production code:
- scaling: `facegen train`'s own path (Ray Train, one worker per GPU or per CPU slot, the DataLoader
  decoding PNG pairs from a dataset folder written for the bench) with each worker count of
  `--workers`; each worker keeps `--batch` images per step (weak scaling, as StyleGAN2-ADA's auto
  config up to 4 GPUs). One warm-up step (tick 0), then `--kimg-sample` thousand images rounded up to
  whole regulariser cycles, timed by the loop's own tick clock (`Timing/sec_per_kimg`).
- phases (1 worker, in this process, in-memory random pairs): each phase timed with a device sync,
  which gives the main phases alone vs with the lazy regularisers (R1 every 16 steps on both D's,
  path length every 4).

The ArcBiFaceGAN 256² configuration is its README's command line: `--cfg auto --batch 12` at 256²,
8 mapping layers, 512-d identity conditions, NIR heads and the NIR D, ADA 'bgc'. `--quick` runs the same
code on tiny networks (CI, any CPU). `run_train_bench(args)` is the entry point for `facegen bench suite`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from facegen.engine.storage import Storage
from facegen.engine.training.context import TrainContext
from facegen.engine.training.loop import Trainer
from facegen.engine.training.spec import build_train_spec
from facegen.jobs.benchmarks import write_record
from facegen.models.devices import resolve_device
from facegen.models.errors import UserError

# StyleGAN2-ADA README, "Expected training time" (stylegan2-ada-pytorch, NVlabs): sec/kimg at 256x256 on
# NVIDIA Tesla V100 GPUs, default settings (--cfg=auto --aug=ada --metrics=none), by number of GPUs.
PUBLISHED_V100_256 = {1: (21.6, 24.2), 2: (11.2, 11.8), 4: (5.6, 5.9), 8: (4.4, 5.5)}
PUBLISHED_SOURCE = ("StyleGAN2-ADA README (NVlabs/stylegan2-ada-pytorch), 'Expected training time', 256x256, "
                    "Tesla V100, --cfg=auto --aug=ada --metrics=none: 16 images per GPU, 2 mapping layers, "
                    "unconditional, no NIR heads or NIR D")
# The tiny configuration of --quick: the same code, networks small enough for any CPU.
QUICK = {"resolution": 32, "batch": 4, "channel_base": 1024, "channel_max": 32, "c_dim": 16,
         "kimg_sample": 0.016, "warmup_steps": 1, "workers": "1,2",
         "set": ["config.z_dim=32", "config.w_dim=32", "config.mapping_layers=2", "config.mbstd_group=2"]}


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
    p = subparsers.add_parser("train", help="training speed: s/kimg with 1 and N workers vs published V100 figures",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny networks at 32² (the same code; CI and CPUs)")
    p.add_argument("--workers", default=None, help="comma-separated worker counts (default '1' on one GPU, "
                                                   "'1,N' with N GPUs; --quick: '1,2')")
    p.add_argument("--resolution", type=int, default=None, help="image size (default 256)")
    p.add_argument("--batch", type=int, default=None, help="images per worker per step (default 12)")
    p.add_argument("--cfg", default="auto", choices=["auto", "biface256", "paper256", "stylegan2"])
    p.add_argument("--channel-base", type=int, default=None, help="override the preset's channel_base")
    p.add_argument("--channel-max", type=int, default=None)
    p.add_argument("--c-dim", type=int, default=None, help="identity feature size (default 512, ArcFace)")
    p.add_argument("--aug", choices=["ada", "noaug"], default="ada")
    p.add_argument("--fp32", action="store_true", help="no fp16 blocks (CUDA only uses them anyway)")
    p.add_argument("--compat", choices=["facegen", "original"], default=None,
                   help="training mode (default: original, as the original's command line; --quick: facegen, "
                        "whose NIR D is as tiny as the rest)")
    p.add_argument("--kimg-sample", type=float, default=None, help="thousands of images to time (default 0.384)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps of the phase breakdown (default 2)")
    p.add_argument("--no-scaling", dest="scaling", action="store_false", help="only the in-process phase breakdown")
    p.add_argument("--no-phases", dest="phases", action="store_false", help="only the 1 and N worker runs")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any training spec key, e.g. config.mapping_layers=2 or loss.nir_r1=false (repeatable)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")


def bench_args(quick: bool = False, **overrides: Any) -> argparse.Namespace:
    """The bench's arguments as `facegen bench train` would parse them (for `facegen bench suite`)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--quick"] if quick else [])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def _settle(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults: the ArcBiFaceGAN 256² configuration, or --quick's tiny one."""
    args = argparse.Namespace(**vars(args))
    defaults = dict(QUICK) if args.quick else {"resolution": 256, "batch": 12, "c_dim": 512, "kimg_sample": 0.384,
                                                "warmup_steps": 2, "set": []}
    for key in ("resolution", "batch", "channel_base", "channel_max", "c_dim", "kimg_sample", "warmup_steps"):
        if getattr(args, key, None) is None and key in defaults:
            setattr(args, key, defaults[key])
    args.overrides = list(defaults["set"]) + list(args.overrides)
    args.compat = args.compat or ("facegen" if args.quick else "original")
    args.device = resolve_device(args.device, what="--device").type
    if args.resolution < 8 or args.resolution & (args.resolution - 1):
        raise UserError(f"--resolution: {args.resolution} is not a power of two >= 8")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    text = args.workers or defaults.get("workers") or ("1" if gpus <= 1 else f"1,{gpus}")
    try:
        args.worker_counts = sorted({int(w) for w in str(text).split(",") if w.strip()})
    except ValueError:
        raise UserError(f"--workers: {text!r} is not a comma-separated list of integers") from None
    if not args.worker_counts or min(args.worker_counts) < 1:
        raise UserError(f"--workers: {text!r}: counts must be at least 1")
    if args.device == "cuda" and max(args.worker_counts) > gpus:
        raise UserError(f"--workers: {max(args.worker_counts)} workers need as many GPUs; this machine has {gpus}")
    return args


def _tree(args: argparse.Namespace, workdir: str, data_uri: str, workers: int) -> dict[str, Any]:
    config = {"preset": args.cfg, "batch": args.batch * workers, "batch_per_worker": args.batch, "fp32": args.fp32}
    config.update({k: v for k, v in (("channel_base", args.channel_base), ("channel_max", args.channel_max))
                   if v is not None})
    return {
        "compat": args.compat, "seed": args.seed,
        "data": {"uri": data_uri, "loader_workers": 0 if data_uri == "synthetic" else 2},
        "output": {"dir": workdir}, "config": config, "augment": {"mode": args.aug},
        "metrics": {"names": []},
        "schedule": {"tick_kimg": 1e6, "snap": None, "checkpoint_minutes": None, "grid": [2, 2]},
        "run": {"executor": "local" if workers == 1 and data_uri == "synthetic" else "ray",
                "num_workers": workers, "device": args.device, "max_failures": 0}}


def run(args: argparse.Namespace) -> int:
    results = run_train_bench(args)
    print(format_results(results))
    write_record(args.json, results)
    return 0


def run_train_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Both measurements; a JSON-safe dict (see `format_results`)."""
    args = _settle(args)
    torch.manual_seed(args.seed)
    if not (args.phases or args.scaling):
        raise UserError("--no-phases and --no-scaling: nothing left to measure")
    with tempfile.TemporaryDirectory(prefix="facegen-bench-train-") as workdir:
        results = configuration(args)
        if args.phases:
            results["phases"] = measure_phases(args, workdir)
        if args.scaling:
            results["workers"] = measure_scaling(args, workdir)
            one = results["workers"].get("1")
            for entry in results["workers"].values():
                entry["speedup_vs_1"] = one["sec_per_kimg"] / entry["sec_per_kimg"] if one else None
    results["published_v100_256_sec_per_kimg"] = {str(k): list(v) for k, v in PUBLISHED_V100_256.items()}
    results["published_source"] = PUBLISHED_SOURCE
    return results


def configuration(args: argparse.Namespace) -> dict[str, Any]:
    """What was measured, where (the resolved hyperparameters of one worker)."""
    from facegen.engine.training.spec import resolve_hyperparams

    spec = build_train_spec(_tree(args, "/unused", "synthetic", 1), args.overrides)
    hp = resolve_hyperparams(spec, args.resolution, 1)
    device = torch.device(args.device)
    return {"device": str(device), "device_name": _device_name(device), "torch_threads": torch.get_num_threads(),
            "quick": args.quick, "resolution": args.resolution, "batch_per_worker": args.batch, "preset": hp.preset,
            "compat": spec.compat, "channel_base": hp.channel_base, "c_dim": args.c_dim,
            "mapping_layers": hp.mapping_layers, "augment": args.aug}


# -- 1 worker in process: the phase breakdown -------------------------------------------------------------
def measure_phases(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    spec = build_train_spec(_tree(args, workdir, "synthetic", 1), args.overrides)
    data = SyntheticPairs(max(4 * args.batch, 16), args.resolution, args.c_dim, args.seed)
    trainer = Trainer(spec, TrainContext(device=torch.device(args.device)), Storage(workdir).child("phases").uri, data)
    for _ in range(args.warmup_steps):
        trainer.step()
    steps = _timed_steps(trainer.spec, args.kimg_sample, trainer.hp.batch_size)
    trainer.phase_seconds = {}
    started = trainer._clock()
    for _ in range(steps):
        trainer.step()
    seconds = trainer._clock() - started
    kimg = steps * trainer.hp.batch_size / 1000
    phases = {name: s / kimg for name, s in trainer.phase_seconds.items()}
    main = sum(v for k, v in phases.items() if k.endswith("main"))
    return {
        "batch": trainer.hp.batch_size, "steps": steps, "kimg": kimg, "seconds": seconds,
        "sec_per_kimg": seconds / kimg, "images_per_sec": kimg * 1000 / seconds,
        "phase_sec_per_kimg": phases, "main_phases_sec_per_kimg": main,
        "regularisation_overhead": (sum(phases.values()) - main) / main if main else None,
        "parameters": {k: sum(p.numel() for p in v.parameters()) for k, v in trainer.nets.items()},
    }


def _timed_steps(spec, kimg_sample: float, batch: int) -> int:
    """At least `kimg_sample` thousand images, in whole regulariser cycles (every phase at its real rate)."""
    cycle = int(np.lcm(spec.loss.g_reg_interval, spec.loss.d_reg_interval))
    steps = max(int(np.ceil(kimg_sample * 1000 / batch)), 1)
    return int(np.ceil(steps / cycle) * cycle)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# -- 1 and N workers: facegen train's own path --------------------------------------------------------------
def write_pairs(root: Path, count: int, resolution: int, c_dim: int, seed: int) -> Path:
    """A dataset folder in the original layout (VIS/, NIR/, identity_features.json) of random pairs."""
    rng = np.random.default_rng(seed)
    (root / "VIS").mkdir(parents=True)
    (root / "NIR").mkdir()
    features = {}
    for i in range(count):
        name = f"{i // 4}_{i % 4}.png"
        vis = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(vis).save(root / "VIS" / name, compress_level=1)
        Image.fromarray(vis.mean(axis=2).astype(np.uint8)).save(root / "NIR" / name, compress_level=1)
        features[name] = rng.normal(size=c_dim).round(5).tolist()
    (root / "identity_features.json").write_text(json.dumps(features))
    return root


def measure_scaling(args: argparse.Namespace, workdir: str) -> dict[str, dict[str, Any]]:
    from facegen.cluster.train import run_ray_training
    from facegen.engine.training.launch import prepare

    count = max(4 * args.batch * max(args.worker_counts), 32)
    data = write_pairs(Path(workdir) / "pairs", count, args.resolution, args.c_dim, args.seed)
    out = {}
    for workers in args.worker_counts:
        batch = args.batch * workers
        tree = _tree(args, str(Path(workdir) / f"runs{workers}"), str(data), workers)
        timed = _timed_steps(build_train_spec(tree, args.overrides), args.kimg_sample, batch)
        # Tick 0 comes after the first (warm-up) step; the one tick after it covers exactly the timed steps.
        tree["config"]["kimg"] = (1 + timed) * batch / 1000
        tree["schedule"]["tick_kimg"] = timed * batch / 1000
        if args.device == "cpu":
            tree["run"]["cpus_per_worker"] = 1
        spec = build_train_spec(tree, args.overrides)
        prepared = prepare(spec)
        run_ray_training(spec, prepared)
        stats = [json.loads(line) for line in Storage(prepared.run_uri).read_text("stats.jsonl").splitlines()]
        last = stats[-1]
        sec_per_kimg = last["Timing/sec_per_kimg"]["mean"]
        out[str(workers)] = {"workers": workers, "batch": batch, "steps": timed, "kimg": timed * batch / 1000,
                             "sec_per_kimg": sec_per_kimg, "images_per_sec": 1000 / sec_per_kimg,
                             "published_v100_sec_per_kimg": list(PUBLISHED_V100_256.get(workers, ())) or None}
    return out


def format_results(r: dict[str, Any]) -> str:
    lines = [
        f"facegen bench train: {r['resolution']}² {r['preset']} (compat {r['compat']}, channel_base "
        f"{r['channel_base']}, c_dim {r['c_dim']}, {r['mapping_layers']} mapping layers, aug {r['augment']})"
        f"{' --quick' if r['quick'] else ''} on {r['device_name']} ({r['torch_threads']} threads)"]
    if r.get("phases"):
        p = r["phases"]
        phases = ", ".join(f"{k} {v:.2f}" for k, v in p["phase_sec_per_kimg"].items())
        lines += [
            f"  1 worker in process, batch {p['batch']}: {p['sec_per_kimg']:.2f} s/kimg ({p['images_per_sec']:.1f} "
            f"img/s over {p['steps']} steps)",
            f"  per phase (s/kimg): {phases}; main phases alone {p['main_phases_sec_per_kimg']:.2f}, lazy "
            f"regularisation adds {100 * (p['regularisation_overhead'] or 0):.1f}%"]
    if r.get("workers"):
        lines.append("  workers  batch  s/kimg    img/s    speedup  | StyleGAN2-ADA V100 256² s/kimg (published)")
        for entry in r["workers"].values():
            published = entry["published_v100_sec_per_kimg"]
            ref = f"{published[0]}-{published[1]}" if published else "-"
            lines.append(f"  {entry['workers']:>7d}  {entry['batch']:>5d}  {entry['sec_per_kimg']:>7.2f}  "
                         f"{entry['images_per_sec']:>7.1f}  {entry['speedup_vs_1'] or 0:>7.2f}x  | {ref}")
    lines.append(f"  published figures: {r['published_source']}")
    return "\n".join(lines)
