"""`facegen bench overlap`: phase 3's writer pipeline (`engine.pipeline`) with shard writing overlapped
and inline, on real shards, when the device's share of a shard takes a given time.

On a GPU the host spends a shard's device time waiting for the device (the GIL free, as in a CUDA
synchronize), then encodes PNGs on its CPU cores. This benchmark holds the device part fixed at
`--device-ms` per shard (a sleep: the host waits exactly as it waits for a device) and runs the real
encoding and writing (`engine.job.publish_shard`: the encoder pool, tar, manifest, marker) of
`--samples` VIS+NIR images per shard at `--resolution`, so it measures what overlap recovers on this
machine's CPUs for a device of that speed, without a GPU. `--device-ms auto` uses the measured
inline write time per shard (device and encoder equally fast: the most overlap can give, 2×). Both
runs' files are compared byte for byte. `facegen bench suite`'s overlap section measures the same
pipeline on a real job, with the real device.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from facegen.engine.dataset.samples import ShardBatch
from facegen.engine.job import PreparedShard, publish_shard
from facegen.engine.pipeline import ShardPipeline
from facegen.engine.spec import build_spec
from facegen.engine.storage import Storage
from facegen.jobs.benchmarks import write_record
from facegen.models.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("overlap", help="phase 3 with shard writing overlapped vs inline, same run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=256, help="image size (ArcBiFaceGAN: 256)")
    p.add_argument("--samples", type=int, default=64, help="samples (VIS + NIR) per shard")
    p.add_argument("--shards", type=int, default=6, help="shards per run")
    p.add_argument("--device-ms", default="auto",
                   help="device time per shard in ms, or 'auto' (= the inline write time per shard)")
    p.add_argument("--workers", type=int, default=0, help="encoder threads (0: the process's CPU budget)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.set_defaults(func=run)


def faces(count: int, resolution: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth images with a little noise: they compress like faces (pure noise would not compress)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:resolution, 0:resolution] / resolution
    phase = rng.uniform(0, 6.28, (count, 1, 1, 3))
    base = 128 + 60 * np.sin(xx[None, ..., None] * 7 + phase) * np.cos(yy[None, ..., None] * 5 + phase)
    vis = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    return vis, vis[..., 1].copy()


def shard(shard_id: int, samples: int, resolution: int) -> PreparedShard:
    vis, nir = faces(samples, resolution, shard_id)
    labels = np.repeat(np.arange(shard_id * samples, (shard_id + 1) * samples) // 8, 1)
    batch = ShardBatch(labels=labels, samples=np.arange(samples) % 8, vis=vis, nir=nir,
                       metas=[{"privacy_max_sim": 0.1} for _ in range(samples)])
    return PreparedShard(shard_id, batch, {"attempts": samples}, nearest=None)


def run_once(folder: Path, prepared: list[PreparedShard], device_s: float, overlap: bool, workers: int) -> dict:
    spec = build_spec({"generator": {"path": "-"}, "embedder": {"path": "-"}, "index": {"uri": "-"},
                       "output": {"uri": str(folder)}})
    out = Storage(str(folder))

    def prepare(shard_id: int) -> PreparedShard:
        time.sleep(device_s)  # the host waiting for the device
        return prepared[shard_id]

    pipeline = ShardPipeline(prepare, lambda p: publish_shard(spec.output, out, p, workers=workers or None),
                             overlap=overlap)
    return pipeline.run(list(range(len(prepared)))).as_dict()


def digests(folder: Path) -> dict[str, str]:
    return {f"{sub}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("shards", "manifest", "done") for p in sorted((folder / sub).iterdir())}


def run(args: argparse.Namespace) -> int:
    if args.resolution < 8 or args.samples < 1 or args.shards < 2:
        raise UserError("--resolution >= 8, --samples >= 1 and --shards >= 2 (overlap needs a next shard)")
    prepared = [shard(i, args.samples, args.resolution) for i in range(args.shards)]
    with tempfile.TemporaryDirectory(prefix="facegen-bench-overlap-") as tmp:
        run_once(Path(tmp) / "warm-up", prepared[:1], 0.0, False, args.workers)  # imports, first allocations
        if args.device_ms == "auto":
            probe = run_once(Path(tmp) / "probe", prepared[:2], 0.0, False, args.workers)
            device_s = probe["write_s"] / 2
        else:
            try:
                device_s = float(args.device_ms) / 1000
            except ValueError:
                raise UserError(f"--device-ms: {args.device_ms!r} is neither a number nor 'auto'") from None
        rows = {}
        for overlap in (False, True):
            rows[overlap] = run_once(Path(tmp) / f"overlap-{overlap}", prepared, device_s, overlap, args.workers)
        identical = digests(Path(tmp) / "overlap-False") == digests(Path(tmp) / "overlap-True")
    record = {"benchmark": "overlap", "resolution": args.resolution, "samples_per_shard": args.samples,
              "shards": args.shards, "device_ms_per_shard": device_s * 1000, "inline": rows[False],
              "overlapped": rows[True], "speedup": rows[False]["wall_s"] / rows[True]["wall_s"],
              "identical_shards": identical}
    print(f"{args.shards} shards of {args.samples} VIS+NIR {args.resolution}² images, device "
          f"{device_s * 1000:.0f} ms/shard")
    print(f"{'writing':<11} {'wall s':>7} {'device s':>9} {'write s':>8} {'wait s':>7}")
    for name, r in (("inline", rows[False]), ("overlapped", rows[True])):
        print(f"{name:<11} {r['wall_s']:>7.2f} {r['compute_s']:>9.2f} {r['write_s']:>8.2f} {r['wait_s']:>7.2f}")
    print(f"overlapped vs inline: {record['speedup']:.2f}x; shards {'identical' if identical else 'DIFFERENT'}")
    write_record(args.json, record)
    return 0 if identical else 1
