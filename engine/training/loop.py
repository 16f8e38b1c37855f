"""The ArcBiFaceGAN training loop (StyleGAN2-ADA's training_loop.py with a NIR D) as a plain function
of a `TrainContext`.

`train(spec, ctx, run_uri)` runs on every rank. Each step: the phases Gmain, Greg (every
`g_reg_interval`), Dmain and Dreg (every `d_reg_interval`) — the D phases update the VIS D and the NIR
D together from the same fakes — each followed by one DDP-style gradient all-reduce and an Adam step;
then the G EMA update and, every `augment.interval` steps, the ADA adjustment. Every `tick_kimg`:
statistics, a log line, image grids, snapshots and a restart checkpoint handed to `ctx.report`.

The global batch is split across ranks; each rank reads its share of a seeded, step-indexed sample
order, so a restart at step s reads exactly what the uninterrupted run would have read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from facegen.engine.storage import Storage
from facegen.engine.training import distributed as dist
from facegen.engine.training.augment import AdaController, augment_pipe_from_name
from facegen.engine.training.context import TrainContext
from facegen.engine.training.data import TrainingData, open_training_data
from facegen.engine.training.loss import ArcBiFaceLoss, LossConfig
from facegen.engine.training.presets import Hyperparams
from facegen.engine.training.rundir import RunDir
from facegen.engine.training.spec import TrainSpec, ada_speed_kimg, resolve_hyperparams
from facegen.engine.training.state import find_start, load_optimizers, make_optimizers
from facegen.engine.training.stats import TickStats
from facegen.engine.training.ticks import Progress, TickSetup, TickWork


def loss_config(spec: TrainSpec, hp: Hyperparams) -> LossConfig:
    """The loss settings of a spec at its resolved hyperparameters (a preset may turn terms off)."""
    ls = spec.loss
    return LossConfig(
        r1_gamma=hp.gamma, r1_gamma_nir=hp.gamma_nir, nir_r1=ls.nir_r1, nir_loss_weight=ls.nir_loss_weight,
        pl_weight=ls.pl_weight if hp.path_length else 0.0, pl_batch_shrink=ls.pl_batch_shrink,
        pl_decay=ls.pl_decay, style_mixing_prob=ls.style_mixing_prob if hp.style_mixing else 0.0,
        original=spec.compat == "original",
        identity_weight=ls.identity_weight if ls.identity_embedder else 0.0,
        identity_nir_weight=ls.identity_nir_weight if ls.identity_embedder else 0.0,
        identity_blur=ls.identity_blur, noise=ls.noise, nir_pair=ls.nir_pair,
        diversity_weight=ls.diversity_weight, diversity_target=ls.diversity_target)


def identity_embedder(spec: TrainSpec, c_dim: int, device: torch.device):
    """The frozen, differentiable embedder of the identity loss (None when the spec has none)."""
    path = spec.loss.identity_embedder
    if path is None:
        return None
    from facegen.models.embedder import TorchEmbedder
    from facegen.models.errors import UserError
    from facegen.models.loading import load_embedder

    embedder = load_embedder(path)
    if not isinstance(embedder, TorchEmbedder):
        raise UserError(f"loss.identity_embedder {path}: the identity loss back-propagates through the embedder, "
                        "so it must be a torch model (native .safetensors or insightface .pth), not ONNX")
    if embedder.dim != c_dim:
        raise UserError(f"loss.identity_embedder {path}: gives {embedder.dim}-d features but the data's conditions "
                        f"are {c_dim}-d; use the embedder whose features the conditions are")
    embedder.to(device)
    embedder.module.eval().requires_grad_(False)
    return embedder.embed_differentiable


@dataclass
class Phase:
    name: str
    modules: list[torch.nn.Module]
    optimizers: list[torch.optim.Optimizer]
    interval: int


class StepSampler(torch.utils.data.Sampler):
    """Infinite sample order: step s takes global positions [s·B, (s+1)·B) of a stream of seeded
    permutations (one per epoch); rank r reads its contiguous share. Depends only on (seed, s)."""

    def __init__(self, num_items: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start_step: int) -> None:
        self.num_items, self.batch_size = num_items, batch_size
        self.per_rank = batch_size // world_size
        self.rank, self.seed, self.start_step = rank, seed, start_step

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        epoch, order = -1, []
        step = self.start_step
        while True:
            first = step * self.batch_size + self.rank * self.per_rank
            for position in range(first, first + self.per_rank):
                e, i = divmod(position, self.num_items)
                if e != epoch:
                    epoch, order = e, self._permutation(e)
                yield order[i]
            step += 1


def set_backend_flags(spec: TrainSpec) -> None:
    """cuDNN autotuning and TF32, as the original sets them at the start of its training loop."""
    torch.backends.cudnn.benchmark = spec.run.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = spec.run.allow_tf32
    torch.backends.cudnn.allow_tf32 = spec.run.allow_tf32


def open_spec_data(spec: TrainSpec) -> TrainingData:
    """The spec's training set (its `subset`, if any, drawn with the job seed)."""
    d = spec.data
    data = open_training_data(d.uri, resolution=d.resolution, mirror=d.mirror, use_conditions=d.cond,
                              storage_options=d.storage_options)
    return data.subset(d.subset, spec.seed) if d.subset is not None else data


def train(spec: TrainSpec, ctx: TrainContext, run_uri: str, data: TrainingData | None = None) -> dict[str, Any]:
    """Train (or continue training) `spec` in the run directory `run_uri`; returns a summary.

    `data` replaces opening `spec.data.uri` (an in-memory dataset of the same shape, e.g. the bench's).
    """
    return Trainer(spec, ctx, run_uri, data).run()


class Trainer:
    def __init__(self, spec: TrainSpec, ctx: TrainContext, run_uri: str, data: TrainingData | None = None) -> None:
        self.spec, self.ctx, self.device = spec, ctx, ctx.device
        self.run_storage = Storage(run_uri, spec.output.storage_options)
        self.out = RunDir(self.run_storage) if ctx.is_main else None
        set_backend_flags(spec)
        self.data = data if data is not None else open_spec_data(spec)
        self.hp: Hyperparams = resolve_hyperparams(spec, self.data.resolution, ctx.world_size)

        # -- networks, optimisers, augmentation: fresh or restored ---------------------------------
        self.start = find_start(self.hp, self.data.resolution, self.data.c_dim, spec.seed, ctx.latest_checkpoint,
                                spec.resume, spec.output.storage_options)
        self.nets = {k: v.to(self.device).requires_grad_(False) for k, v in self.start.networks.items()}
        self.G, self.G_ema, self.D, self.D_nir = (self.nets[k] for k in ("G", "G_ema", "D", "D_NIR"))
        loss_spec = spec.loss
        self.opts = make_optimizers(self.nets, self.hp.lr, loss_spec.g_reg_interval, loss_spec.d_reg_interval)
        self.augment_pipe = self.ada = None
        aug = spec.augment
        if aug.mode != "noaug":
            self.augment_pipe = augment_pipe_from_name(aug.pipe, aug.p if aug.mode == "fixed" else 0.0)
            self.augment_pipe.to(self.device)
        if aug.mode == "ada":
            self.ada = AdaController(batch_size=self.hp.batch_size, target=aug.target, interval=aug.interval,
                                     speed_kimg=ada_speed_kimg(spec), pipe=self.augment_pipe)
        self.conditions = torch.as_tensor(self.data.conditions, dtype=torch.float32).to(self.device)
        self.stats = TickStats(self.device)
        self.loss = ArcBiFaceLoss(self.G, self.D, self.D_nir, loss_config(spec, self.hp), self.augment_pipe,
                                  self.stats.add, identity_embedder(spec, self.data.c_dim, self.device))
        self.phases = self._phases()
        self.cur_nimg = self.cur_tick = self.batch_idx = 0  # the loop's counters; tick work only reads them
        self.phase_seconds: dict[str, float] | None = None  # set to {} to time each phase (syncs the device)
        self._restore_state()
        self.batches = self._batches()
        self.ticks = TickWork(TickSetup(spec, ctx, self.hp, self.data, self.conditions, self.nets, self.start,
                                        self.run_storage, self.out), self.progress)

    # -- setup helpers --------------------------------------------------------------------------------
    @property
    def progress(self) -> Progress:
        return Progress(self.cur_nimg, self.cur_tick, self.batch_idx)

    def _phases(self) -> list[Phase]:
        ls, cfg = self.spec.loss, self.loss.config
        phases = [Phase("Gmain", [self.G], [self.opts["G"]], 1)]
        if cfg.pl_weight != 0:
            phases.append(Phase("Greg", [self.G], [self.opts["G"]], ls.g_reg_interval))
        ds, dopts = [self.D, self.D_nir], [self.opts["D"], self.opts["D_NIR"]]
        phases.append(Phase("Dmain", ds, dopts, 1))
        if cfg.r1_gamma != 0 or (cfg.nir_r1 and cfg.gamma_nir != 0):
            phases.append(Phase("Dreg", ds, dopts, ls.d_reg_interval))
        return phases

    def _restore_state(self) -> None:
        """Counters, optimisers, ADA and the per-rank RNG from our own snapshot; seeds otherwise."""
        start, state = self.start, self.start.state
        if start.augment_p is not None and self.ada is not None:  # an original pickle's ADA p
            self.ada.p = float(start.augment_p)
            self.augment_pipe.p.fill_(self.ada.p)
        rank_seed = self.spec.seed * self.ctx.world_size + self.ctx.rank  # upstream's per-rank seed
        if state is None:
            torch.manual_seed(rank_seed)
            return
        self.cur_nimg, self.batch_idx = int(state["cur_nimg"]), int(state["batch_idx"])
        self.cur_tick = int(state["cur_tick"]) + 1  # the saved tick had finished
        load_optimizers({k: v for k, v in self.opts.items() if not (start.fresh_d_nir and k == "D_NIR")},
                        state["optimizers"], start.source)
        if self.ada is not None and state.get("ada") is not None:
            self.ada.load_state_dict(state["ada"])
        ranks = state.get("ranks") or []
        if len(ranks) == self.ctx.world_size:
            mine = ranks[self.ctx.rank]
            self.loss.pl_mean.fill_(float(mine["pl_mean"]))
            torch.set_rng_state(mine["rng_cpu"])
            if self.device.type == "cuda" and mine.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(mine["rng_cuda"], self.device)
        else:  # another world size: a fresh but reproducible stream for this point of the run
            torch.manual_seed(rank_seed + 7919 * self.batch_idx)

    def _batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        per_rank = self.hp.batch_size // self.ctx.world_size
        sampler = StepSampler(len(self.data), self.hp.batch_size, self.ctx.rank, self.ctx.world_size,
                              self.spec.seed, self.batch_idx)
        workers = self.spec.data.loader_workers
        loader = torch.utils.data.DataLoader(
            self.data, batch_size=per_rank, sampler=sampler, num_workers=workers, drop_last=True,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(self.spec.seed))  # keeps the global RNG untouched
        return iter(loader)

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.ticks.begin(self.progress)
        total_nimg = self.hp.total_kimg * 1000
        done = self.cur_nimg >= total_nimg
        while not done:
            if self.ctx.step_hook is not None:
                self.ctx.step_hook(self.ctx, self.batch_idx)
            self.step()
            done = self.cur_nimg >= total_nimg
            if done or self.ticks.due(self.progress):
                self.ticks.run(self.progress, done, self.stats.reduce(self.ctx.world_size), self._augment_p(),
                               self._training_state)
                self.cur_tick += 1
        return self.ticks.finish(self.progress)

    def _augment_p(self) -> float:
        return float(self.augment_pipe.p) if self.augment_pipe is not None else 0.0

    def _training_state(self) -> dict[str, Any]:
        """Everything a restart needs besides the networks (a collective: every rank's RNG and pl_mean)."""
        mine = {"rng_cpu": torch.get_rng_state(), "pl_mean": float(self.loss.pl_mean),
                "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        ranks = dist.gather_objects(mine, self.ctx.world_size)
        return {
            "cur_nimg": self.cur_nimg, "cur_tick": self.cur_tick, "batch_idx": self.batch_idx,
            "world_size": self.ctx.world_size, "seed": self.spec.seed,
            "optimizers": {name: opt.state_dict() for name, opt in self.opts.items()},
            "augment_p": self._augment_p(),
            "ada": self.ada.state_dict() if self.ada is not None else None,
            "ranks": ranks,
        }

    def step(self) -> None:
        """One training step: every due phase on one global batch, the EMA update, ADA."""
        vis, nir, c = next(self.batches)
        vis = vis.to(self.device, non_blocking=True).to(torch.float32) / 127.5 - 1
        nir = nir.to(self.device, non_blocking=True).to(torch.float32) / 127.5 - 1
        c = c.to(self.device, non_blocking=True)
        n, z_dim = vis.shape[0], self.G.z_dim
        gen_z = torch.randn([len(self.phases), n, z_dim], device=self.device)
        picks = torch.randint(len(self.conditions), [len(self.phases), n], device=self.device)
        gen_c = self.conditions[picks]  # fake conditions = features of random training images
        for i, phase in enumerate(self.phases):
            if self.batch_idx % phase.interval == 0:
                started = self._clock() if self.phase_seconds is not None else 0.0
                self._run_phase(phase, vis, nir, c, gen_z[i], gen_c[i])
                if self.phase_seconds is not None:  # the bench's breakdown; off in training
                    self.phase_seconds[phase.name] = self.phase_seconds.get(phase.name, 0.0) + self._clock() - started
        self._update_ema()
        self.cur_nimg += self.hp.batch_size
        self.batch_idx += 1
        if self.ada is not None:  # adjusts p every `augment.interval` steps, from all ranks' signs
            self.ada.step(all_reduce=self._sum_over_ranks)

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce_sum_(t.to(self.device), self.ctx.world_size).cpu()

    def _run_phase(self, phase: Phase, vis: torch.Tensor, nir: torch.Tensor, c: torch.Tensor,
                   gen_z: torch.Tensor, gen_c: torch.Tensor) -> None:
        for opt in phase.optimizers:
            opt.zero_grad(set_to_none=True)
        for module in phase.modules:
            module.requires_grad_(True)
        b = self.hp.batch_per_worker
        for r in range(self.hp.rounds):
            part = slice(r * b, (r + 1) * b)
            real_logits = self.loss.accumulate_gradients(phase.name, vis[part], nir[part], c[part], gen_z[part],
                                                         gen_c[part], gain=phase.interval)
            if real_logits is not None and self.ada is not None:
                self.ada.accumulate(real_logits)
        for module in phase.modules:
            module.requires_grad_(False)
        params = [p for module in phase.modules for p in module.parameters()]
        dist.average_gradients(params, self.ctx.world_size)
        for p in params:
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        for opt in phase.optimizers:
            opt.step()

    @torch.no_grad()
    def _update_ema(self) -> None:
        ema_nimg = self.hp.ema_kimg * 1000
        if self.hp.ema_rampup is not None:
            ema_nimg = min(ema_nimg, self.cur_nimg * self.hp.ema_rampup)
        beta = 0.5 ** (self.hp.batch_size / max(ema_nimg, 1e-8))
        torch._foreach_lerp_(list(self.G_ema.parameters()), list(self.G.parameters()), 1.0 - beta)
        for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()):
            b_ema.copy_(b)
