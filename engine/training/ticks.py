"""Once-per-tick maintenance of the training loop: statistics, log line, grids, snapshots, checkpoints.

`TickWork` sees the run through two small inputs: `TickSetup` (what is fixed for the run: spec, context,
hyperparameters, data, networks, where to write) and `Progress` (the loop's counters, passed to each
call; the loop alone advances them, `cur_tick` included). What changes inside a tick (the reduced
statistics, the ADA p, the collective training-state payload) is passed to `run` as arguments.

Every rank calls `run` at the same steps (ticks are decided from counters all ranks share); rank 0
alone writes the run directory. A checkpoint is due at a network snapshot, every `checkpoint_ticks`,
when `checkpoint_minutes` have passed on rank 0 (the decision is shared with one all-reduce), and at
the end. It is handed to `ctx.report` as a folder named `checkpoint-<nimg>`.
"""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from facegen.engine.progress import duration
from facegen.engine.storage import Storage
from facegen.engine.training import distributed as dist
from facegen.engine.training.context import TrainContext
from facegen.engine.training.presets import Hyperparams
from facegen.engine.training.rundir import RunDir, default_grid
from facegen.engine.training.snapshot import checkpoint_name, save_snapshot, snapshot_name, upload_folder
from facegen.engine.training.spec import TrainSpec
from facegen.engine.training.state import StartPoint
from facegen.engine.training.stats import scalar
from facegen.models.generator import images_to_uint8


@dataclass(frozen=True)
class TickSetup:
    """What tick work needs that stays fixed for the whole run."""

    spec: TrainSpec
    ctx: TrainContext
    hp: Hyperparams
    data: Any  # TrainingData or any dataset with its attributes (resolution, c_dim, conditions, ...)
    conditions: torch.Tensor  # [N, c_dim] on the device: the fake conditions' source
    nets: dict[str, torch.nn.Module]  # G, G_ema, D, D_NIR
    start: StartPoint
    run_storage: Storage
    out: RunDir | None  # rank 0 only

    @property
    def device(self) -> torch.device:
        return self.ctx.device


@dataclass(frozen=True)
class Progress:
    """The loop's counters at the moment of a call."""

    cur_nimg: int
    cur_tick: int
    batch_idx: int


class TickWork:
    def __init__(self, setup: TickSetup, progress: Progress) -> None:
        self.t = setup
        self.sched = setup.spec.schedule
        now = time.time()
        self.start_time = self.tick_start_time = self.last_checkpoint_time = now
        self.tick_start_nimg = progress.cur_nimg
        self.maintenance_sec = 0.0
        self.snapshots: list[str] = []
        self.checkpoints = 0
        self.last_metrics: dict[str, Any] = {}
        self.metrics = None
        grid = self.sched.grid or default_grid(setup.data.resolution)
        self.grid = (int(grid[0]), int(grid[1]))

    # -- start ---------------------------------------------------------------------------------------
    def begin(self, progress: Progress) -> None:
        t, out = self.t, self.t.out
        if t.spec.metrics.active and t.ctx.is_main:
            from facegen.engine.training.fid import FidMetric

            self.metrics = FidMetric(t.spec.metrics, t.device)
        if out is None:
            return
        self._grid_inputs()
        if t.start.kind == "checkpoint":
            dropped = out.truncate_stats(progress.cur_nimg / 1000)
            out.log(f"Restarted from checkpoint {Path(t.start.source).name} at kimg {progress.cur_nimg / 1000:.3f}, "
                    f"continuing with tick {progress.cur_tick}; {dropped} stats entries past it dropped")
        else:
            self._log_start(progress)
        out.flush()
        self.start_time = self.tick_start_time = self.last_checkpoint_time = time.time()  # after the setup

    def _log_start(self, progress: Progress) -> None:
        t, out = self.t, self.t.out
        out.write_options(self.options())
        data = t.data
        out.log(f"Dataset {data.name}: {len(data)} items ({data.num_samples} pairs, mirror {t.spec.data.mirror}), "
                f"{data.resolution}x{data.resolution}, c_dim {data.c_dim}")
        for name, net in t.nets.items():
            out.log(f"{name}: {sum(p.numel() for p in net.parameters()):,} parameters")
        hp = t.hp
        out.log(f"Preset {hp.preset}: batch {hp.batch_size} ({t.ctx.world_size} workers x {hp.batch_per_worker} "
                f"x {hp.rounds} rounds), lr {hp.lr:g}, gamma {hp.gamma:g} (NIR D {hp.gamma_nir:g}), "
                f"ema {hp.ema_kimg:g} kimg, {hp.total_kimg:g} kimg; lambda_NIR {t.spec.loss.nir_loss_weight:g}, "
                f"NIR R1 {t.spec.loss.nir_r1}")
        out.log(compat_line(t.spec))
        for note in t.start.notes:
            out.log(note)
        if t.start.kind != "fresh":
            out.log(f"Resuming from {t.start.kind} {t.start.source} at kimg {progress.cur_nimg / 1000:.3f}")
        out.log(metrics_line(t.spec))
        vis, nir = self._reals
        out.write_grid("reals.png", vis, self.grid)
        out.write_grid("reals_nir.png", nir, self.grid)
        self._write_fakes("fakes_init")

    def options(self) -> dict[str, Any]:
        t, nets = self.t, self.t.nets
        return {"spec": t.spec.model_dump(mode="json"), "hyperparameters": t.hp.to_dict(),
                "G_kwargs": nets["G"].config.to_dict(), "D_kwargs": nets["D"].config.to_dict(),
                "D_NIR_kwargs": nets["D_NIR"].config.to_dict(), "num_gpus": t.ctx.world_size,
                "batch_size": t.hp.batch_size, "batch_gpu": t.hp.batch_per_worker, "total_kimg": t.hp.total_kimg,
                "kimg_per_tick": self.sched.tick_kimg, "network_snapshot_ticks": self.sched.snap,
                "image_snapshot_ticks": self.sched.image_snap or self.sched.snap, "random_seed": t.spec.seed,
                "training_set_kwargs": {"path": t.spec.data.uri, "resolution": t.data.resolution,
                                        "use_labels": t.spec.data.cond, "xflip": t.spec.data.mirror,
                                        "max_size": len(t.data)},
                "metrics": list(t.spec.metrics.active), "compat": t.spec.compat,
                "run_dir": t.run_storage.uri, "device": str(t.device)}

    def _grid_inputs(self) -> None:
        """Fixed grid samples: seeded real pairs, their conditions, and seeded z."""
        t = self.t
        n = self.grid[0] * self.grid[1]
        g = torch.Generator().manual_seed(t.spec.seed)
        order = torch.randperm(t.data.num_samples, generator=g)
        picks = order[torch.arange(n) % len(order)].tolist()
        items = [t.data[i] for i in picks]
        self._reals = (torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]))
        self.grid_c = torch.as_tensor(t.data.conditions[picks], dtype=torch.float32)
        self.grid_z = torch.randn([n, t.nets["G"].z_dim], generator=g)

    @torch.no_grad()
    def _write_fakes(self, stem: str) -> None:
        t = self.t
        vis_parts, nir_parts = [], []
        for z, c in zip(self.grid_z.split(t.hp.batch_per_worker), self.grid_c.split(t.hp.batch_per_worker)):
            vis, nir = t.nets["G_ema"](z.to(t.device), c.to(t.device), noise_mode="const")
            vis_parts.append(images_to_uint8(vis).cpu())
            nir_parts.append(images_to_uint8(nir).cpu())
        t.out.write_grid(f"{stem}.png", torch.cat(vis_parts), self.grid)
        t.out.write_grid(f"{stem}_nir.png", torch.cat(nir_parts), self.grid)

    # -- every tick ------------------------------------------------------------------------------------
    def due(self, progress: Progress) -> bool:
        return progress.cur_tick == 0 or progress.cur_nimg >= self.tick_start_nimg + self.sched.tick_kimg * 1000

    def run(self, progress: Progress, done: bool, stats: dict[str, dict[str, float]], augment_p: float,
            training_state: Callable[[], dict[str, Any]]) -> None:
        """One tick's work. `stats` are the reduced loss statistics since the last tick; `training_state()`
        is the collective that gathers every rank's restart state (called on every rank or on none)."""
        t, s = self.t, self.sched
        tick = progress.cur_tick
        tick_end = time.time()
        snapshot_now = s.snap is not None and (done or tick % s.snap == 0)
        image_snap = s.image_snap or s.snap
        images_now = image_snap is not None and (done or tick % image_snap == 0)
        timed = s.checkpoint_minutes is not None and tick_end - self.last_checkpoint_time >= 60 * s.checkpoint_minutes
        every = s.checkpoint_ticks is not None and tick % s.checkpoint_ticks == 0
        checkpoint_now = dist.any_rank(done or snapshot_now or every or (timed and t.ctx.is_main),
                                       t.ctx.world_size, t.device)
        stats = dict(stats)
        stats.update(self._progress(progress, tick_end, augment_p))
        stats["Progress/replica_spread"] = scalar(self._replica_spread())

        folder = None
        if snapshot_now or checkpoint_now:
            payload = training_state()  # collective: every rank contributes its RNG
            if t.ctx.is_main:
                folder = self._write_snapshot(progress, payload, snapshot_now, stats)
            self.last_checkpoint_time = time.time()
        if t.out is not None:
            t.out.log(self._line(stats))
            if images_now:
                self._write_fakes(f"fakes{progress.cur_nimg // 1000:06d}")
            t.out.append_stats(stats)
            t.out.flush()
        self.last_metrics = {k: v["mean"] for k, v in stats.items()}
        report_dir = str(folder) if folder is not None and checkpoint_now else None
        t.ctx.report({**self.last_metrics, "kimg": progress.cur_nimg / 1000, "tick": tick}, report_dir)
        if folder is not None:
            shutil.rmtree(folder.parent, ignore_errors=True)
            self.checkpoints += int(checkpoint_now)

        self.tick_start_nimg = progress.cur_nimg
        self.tick_start_time = time.time()
        self.maintenance_sec = self.tick_start_time - tick_end

    def _progress(self, progress: Progress, tick_end: float, augment_p: float) -> dict[str, dict[str, float]]:
        t = self.t
        nimg = max(progress.cur_nimg - self.tick_start_nimg, 1)
        gpu_gb = torch.cuda.max_memory_allocated(t.device) / 2**30 if t.device.type == "cuda" else 0.0
        if t.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(t.device)
        values = {
            "Progress/tick": progress.cur_tick, "Progress/kimg": progress.cur_nimg / 1000,
            "Progress/augment": augment_p,
            "Timing/total_sec": tick_end - self.start_time, "Timing/sec_per_tick": tick_end - self.tick_start_time,
            "Timing/sec_per_kimg": (tick_end - self.tick_start_time) / nimg * 1000,
            "Timing/maintenance_sec": self.maintenance_sec,
            "Resources/cpu_mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "Resources/peak_gpu_mem_gb": gpu_gb,
        }
        return {k: scalar(v) for k, v in values.items()}

    def _line(self, stats: dict[str, dict[str, float]]) -> str:
        v = {k: e["mean"] for k, e in stats.items()}
        # the last tick's pace over what is left: a rough but honest estimate on a steady run
        left_sec = max(self.t.hp.total_kimg - v["Progress/kimg"], 0.0) * v["Timing/sec_per_kimg"]
        return (f"tick {int(v['Progress/tick']):<5d} kimg {v['Progress/kimg']:<8.1f} "
                f"time {duration(v['Timing/total_sec'], ' '):<12s} sec/tick {v['Timing/sec_per_tick']:<7.1f} "
                f"sec/kimg {v['Timing/sec_per_kimg']:<7.2f} maintenance {v['Timing/maintenance_sec']:<6.1f} "
                f"cpumem {v['Resources/cpu_mem_gb']:<6.2f} gpumem {v['Resources/peak_gpu_mem_gb']:<6.2f} "
                f"augment {v['Progress/augment']:.3f} ETA {duration(left_sec, ' ')}")

    def _replica_spread(self) -> float:
        """Largest difference between ranks of the weight sums: 0 when DDP keeps the replicas equal."""
        t = self.t
        sums = [float(sum(p.detach().double().sum() for p in t.nets[k].parameters())) for k in ("G", "D", "D_NIR")]
        every = dist.gather_objects(sums, t.ctx.world_size)
        return max(abs(a - b) for rank in every for a, b in zip(rank, every[0]))

    # -- snapshots ---------------------------------------------------------------------------------
    def _write_snapshot(self, progress: Progress, state: dict[str, Any], keep: bool, stats: dict) -> Path:
        t = self.t
        folder = Path(tempfile.mkdtemp(prefix="facegen-ckpt-")) / checkpoint_name(progress.cur_nimg)
        info = {"cur_nimg": progress.cur_nimg, "kimg": progress.cur_nimg / 1000, "cur_tick": progress.cur_tick,
                "augment_p": state["augment_p"], "run_dir": t.run_storage.uri,
                "dataset": t.spec.data.uri, "resolution": t.data.resolution, "c_dim": t.data.c_dim}
        save_snapshot(folder, dict(t.nets), state, info)
        if keep:
            name = snapshot_name(progress.cur_nimg)
            upload_folder(folder, t.run_storage, name)
            self.snapshots.append(name)
            if self.metrics is not None:
                results = self.metrics.evaluate(t.nets["G_ema"], t.data, t.conditions)
                stats.update({f"Metrics/{k}": scalar(v) for k, v in results.items()})
                t.out.storage.write_text(f"metric-{name}.json", json.dumps(results) + "\n")
        return folder

    # -- end ---------------------------------------------------------------------------------------------
    def finish(self, progress: Progress) -> dict[str, Any]:
        t = self.t
        if t.out is not None:
            t.out.log(f"Done: kimg {progress.cur_nimg / 1000:.3f}, tick {progress.cur_tick}")
            t.out.flush()
        return {"run_dir": t.run_storage.uri, "cur_nimg": progress.cur_nimg, "kimg": progress.cur_nimg / 1000,
                "batch_idx": progress.batch_idx, "ticks": progress.cur_tick, "start": t.start.kind,
                "snapshots": self.snapshots, "checkpoints": self.checkpoints, "metrics": self.last_metrics}


def compat_line(spec: TrainSpec) -> str:
    """What the compat mode changes, for log.txt and the CLI's start message."""
    if spec.compat == "original":
        kept = "on: facegen's fix" if spec.loss.nir_r1 else "off, as the original (loss.nir_r1=false)"
        return ("Compat: original (NIR D with the original's fixed settings, w_avg updated on its extra mapping "
                "calls, zero gradients for the output biases in Greg, --gamma on the VIS D only, ADA counts the R1 "
                f"phase's real signs, D_NIR fresh and ADA speed 100 kimg on .pkl/--resume); NIR R1 {kept}")
    return "Compat: facegen (set compat=original to reproduce the original training; see docs/training.md)"


def metrics_line(spec: TrainSpec) -> str:
    m = spec.metrics
    if m.active:
        return f"Metrics: {', '.join(m.active)} (VIS and NIR) at network snapshots"
    if m.names:
        return (f"Metrics: OFF - {', '.join(m.names)} requested, but no Inception feature-extractor weights "
                f"(metrics.fid_weights / --fid-weights; pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                f"cannot be downloaded at run time)")
    return "Metrics: none requested"
