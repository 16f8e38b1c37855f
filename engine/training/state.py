"""Where a training run starts from: fresh networks, a restart checkpoint, a `--resume` snapshot or an
original `.pkl`; and the optimisers (Adam with lazy-regularisation scaling, as StyleGAN2-ADA's
training_loop.py: lr and betas scaled by interval / (interval + 1)).

Our own snapshots restore everything (G, G_ema, D, D_NIR, optimisers, kimg, ADA, RNG); an original
StyleGAN2-ADA/ArcBiFaceGAN `.pkl` holds only networks and the ADA p, so it restarts the kimg count
(upstream does the same), and a plain StyleGAN2-ADA pickle without `D_NIR` gets a fresh NIR D. With
compat 'original' the NIR D always starts fresh from a `.pkl`, as the original loads only G, D and G_ema.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from facegen.engine.training.presets import Hyperparams, discriminator_configs, generator_config
from facegen.engine.training.snapshot import fetch_resume_source, load_snapshot
from facegen.models.discriminator import Discriminator
from facegen.models.errors import UserError
from facegen.models.generator import Generator
from facegen.models.loading import load_training_state

NETWORK_NAMES = ("G", "G_ema", "D", "D_NIR")


@dataclass
class StartPoint:
    kind: str  # fresh | checkpoint | snapshot | pkl
    source: str | None
    networks: dict[str, torch.nn.Module]
    state: dict[str, Any] | None = None  # our snapshots' state.pt
    augment_p: float | None = None
    notes: list[str] = field(default_factory=list)
    fresh_d_nir: bool = False  # D_NIR (and its optimiser) start fresh although the rest is restored

    def restart_d_nir(self, fresh: torch.nn.Module, why: str) -> None:
        """Train a fresh NIR D (no optimiser state for it either); `why` goes into the run's log."""
        self.networks["D_NIR"], self.fresh_d_nir = fresh, True
        self.notes.append(f"{self.source}: {why}")


def fresh_networks(hp: Hyperparams, resolution: int, c_dim: int, seed: int) -> dict[str, torch.nn.Module]:
    """Seeded initialisation, identical on every rank (no broadcast needed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G = Generator(generator_config(hp, resolution, c_dim))
        d_config, d_nir_config = discriminator_configs(hp, resolution, c_dim)
        D, D_nir = Discriminator(d_config), Discriminator(d_nir_config)
    return {"G": G, "G_ema": copy.deepcopy(G).eval(), "D": D, "D_NIR": D_nir}


def find_start(hp: Hyperparams, resolution: int, c_dim: int, seed: int, latest_checkpoint: str | None,
               resume: str | None, storage_options: dict[str, Any] | None) -> StartPoint:
    """A restart checkpoint wins over `--resume` (which only seeds the first attempt).

    `hp.compat == 'original'`: a `.pkl`'s D_NIR is ignored (fresh NIR D), as the original's resume.
    """
    fresh = fresh_networks(hp, resolution, c_dim, seed)
    if latest_checkpoint is not None:
        snap = load_snapshot(latest_checkpoint)
        start = StartPoint("checkpoint", latest_checkpoint, snap.networks, snap.state, snap.state.get("augment_p"))
    elif resume is not None:
        with tempfile.TemporaryDirectory(prefix="facegen-resume-") as workdir:
            kind, local, source = fetch_resume_source(resume, storage_options, workdir)
            if kind == "snapshot":
                snap = load_snapshot(local)
                start = StartPoint("snapshot", source, snap.networks, snap.state, snap.state.get("augment_p"))
            else:
                start = _from_pickle(local, resume, fresh, keep_d_nir=hp.compat != "original")
    else:
        return StartPoint("fresh", None, fresh)
    had = start.networks["D_NIR"].img_channels
    if start.kind != "checkpoint" and had != hp.nir_d_channels:
        # loss.nir_pair switched on (or off) for the resumed run: the rest of the state carries over
        start.restart_d_nir(fresh["D_NIR"], f"its NIR D reads {had} channel(s), loss.nir_pair "
                            f"{'on' if hp.nir_pair else 'off'} needs {hp.nir_d_channels}; the NIR D starts fresh")
    check_compatible(start, resolution, c_dim, hp)
    return start


def _from_pickle(path: str, source: str, fresh: dict[str, torch.nn.Module], keep_d_nir: bool = True) -> StartPoint:
    loaded = load_training_state(path)
    networks = {name: loaded[name] for name in ("G", "G_ema", "D")}
    start = StartPoint("pkl", source, networks, None, loaded.get("augment_p"))
    if not keep_d_nir:
        start.restart_d_nir(fresh["D_NIR"], "compat 'original': the NIR D starts fresh (the original resumes G, "
                            "D and G_ema only)")
    elif loaded.get("D_NIR") is None:
        start.restart_d_nir(fresh["D_NIR"], "no D_NIR in the pickle (plain StyleGAN2-ADA); the NIR D starts fresh")
    else:
        networks["D_NIR"] = loaded["D_NIR"]
    start.notes.append(f"{source}: an original pickle holds no optimiser state or kimg; training counts from 0")
    return start


def check_compatible(start: StartPoint, resolution: int, c_dim: int, hp: Hyperparams) -> None:
    """Refuse (naming the source) networks that cannot train on this dataset."""
    D, D_nir = start.networks["D"], start.networks["D_NIR"]
    where = f"resume: {start.source}"
    for name in ("G", "G_ema"):
        g = start.networks[name]
        if g.img_resolution != resolution or g.c_dim != c_dim or g.nir_channels != 1:
            raise UserError(f"{where}: {name} is {g.img_resolution}x{g.img_resolution}, c_dim {g.c_dim}, "
                            f"{g.nir_channels} NIR channel(s); the dataset needs {resolution}x{resolution}, "
                            f"c_dim {c_dim} and a NIR head")
    for name, d, channels, want_c in (("D", D, 3, c_dim), ("D_NIR", D_nir, hp.nir_d_channels, 0)):
        if d.img_resolution != resolution or d.img_channels != channels or d.c_dim != want_c:
            raise UserError(f"{where}: {name} takes {d.img_channels}-channel {d.img_resolution}x"
                            f"{d.img_resolution} images with c_dim {d.c_dim}; expected {channels}-channel "
                            f"{resolution}x{resolution} with c_dim {want_c}")
        group = d.config.mbstd_group_size or hp.batch_per_worker
        if hp.batch_per_worker % min(group, hp.batch_per_worker):
            raise UserError(f"{where}: {name}'s minibatch-stddev group {group} does not divide the "
                            f"per-worker batch {hp.batch_per_worker}")


def make_optimizer(module: torch.nn.Module, lr: float, reg_interval: int) -> torch.optim.Adam:
    """Adam β=(0, 0.99), eps 1e-8; lazy regularisation scales lr and betas by interval/(interval+1)."""
    ratio = reg_interval / (reg_interval + 1)
    params = [p for p in module.parameters()]
    return torch.optim.Adam(params, lr=lr * ratio, betas=(0.0**ratio, 0.99**ratio), eps=1e-8)


def make_optimizers(networks: dict[str, torch.nn.Module], lr: float, g_reg_interval: int,
                    d_reg_interval: int) -> dict[str, torch.optim.Adam]:
    return {"G": make_optimizer(networks["G"], lr, g_reg_interval),
            "D": make_optimizer(networks["D"], lr, d_reg_interval),
            "D_NIR": make_optimizer(networks["D_NIR"], lr, d_reg_interval)}


def load_optimizers(optimizers: dict[str, torch.optim.Adam], states: dict[str, Any], source: str) -> None:
    """Adam moments and step counts from a snapshot; lr and betas stay the current spec's."""
    for name, opt in optimizers.items():
        if name not in states:
            raise UserError(f"{source}: the training state has no optimiser '{name}'")
        hyper = [{k: g[k] for k in ("lr", "betas", "eps")} for g in opt.param_groups]
        try:
            opt.load_state_dict(states[name])
        except (ValueError, KeyError) as err:
            raise UserError(f"{source}: optimiser '{name}' does not match the networks ({err})") from None
        for group, values in zip(opt.param_groups, hyper):
            group.update(values)
