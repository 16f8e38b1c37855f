"""Training configurations (`--cfg`): StyleGAN2-ADA's presets, ArcBiFaceGAN's, and explicit overrides.

The table is the original ArcBiFaceGAN `training.py`'s `cfg_specs` (StyleGAN2-ADA's plus `biface256` and
`auto_512`). `auto` follows StyleGAN2-ADA's formula at resolution `res` on `gpus` workers:
    mb = max(min(gpus · min(4096 // res, 32), 64), gpus)      mbstd = min(mb // gpus, 4)
    fmaps = 1 if res >= 512 else 0.5  (channel_base = fmaps · 32768)
    lr = 0.002 if res >= 1024 else 0.0025    γ = 0.0002 · res² / mb    ema = mb · 10 / 32 kimg, ramp 0.05
with ArcBiFaceGAN's 8 mapping layers and 10000 kimg; `auto_512` halves that batch. A preset sized for
`ref_gpus` GPUs keeps its per-GPU batch (`mb // ref_gpus`) on fewer workers and accumulates gradients
over several rounds. `cifar` also turns off path length and style mixing and uses the plain ('orig')
discriminator, as upstream.

`compat='original'` builds the NIR discriminator as the original does, with fixed settings whatever the
preset (`ORIGINAL_NIR_D`); otherwise it shares the VIS discriminator's preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from facegen.models.discriminator import DiscriminatorConfig
from facegen.models.errors import UserError
from facegen.models.generator import GeneratorConfig


@dataclass(frozen=True)
class Preset:
    ref_gpus: int
    kimg: float
    mb: int
    mbstd: int
    fmaps: float
    lr: float
    gamma: float
    ema_kimg: float
    ema_rampup: float | None
    mapping_layers: int
    cifar: bool = False  # upstream's CIFAR-10 tweaks: no path length, no style mixing, 'orig' D


PRESETS: dict[str, Preset | None] = {
    "auto": None,  # computed by `auto_preset`
    "biface256": Preset(ref_gpus=1, kimg=25000, mb=12, mbstd=4, fmaps=0.5, lr=0.0025, gamma=1, ema_kimg=20,
                        ema_rampup=None, mapping_layers=8),
    "paper256": Preset(ref_gpus=8, kimg=25000, mb=64, mbstd=8, fmaps=0.5, lr=0.0025, gamma=1, ema_kimg=20,
                       ema_rampup=None, mapping_layers=8),
    "stylegan2": Preset(ref_gpus=8, kimg=25000, mb=32, mbstd=4, fmaps=1, lr=0.002, gamma=10, ema_kimg=10,
                        ema_rampup=None, mapping_layers=8),
    "paper512": Preset(ref_gpus=8, kimg=25000, mb=64, mbstd=8, fmaps=1, lr=0.0025, gamma=0.5, ema_kimg=20,
                       ema_rampup=None, mapping_layers=8),
    "paper1024": Preset(ref_gpus=8, kimg=25000, mb=32, mbstd=4, fmaps=1, lr=0.002, gamma=2, ema_kimg=10,
                        ema_rampup=None, mapping_layers=8),
    "cifar": Preset(ref_gpus=2, kimg=100000, mb=64, mbstd=32, fmaps=1, lr=0.0025, gamma=0.01, ema_kimg=500,
                    ema_rampup=0.05, mapping_layers=2, cifar=True),
    "auto_512": None,  # `auto` with half the batch (the original's addition for 512x512)
}
# The original builds its NIR discriminator with these settings, whatever --cfg, --fp32 or --freezed say
# (ArcBiFaceGAN training_loop.py `disc_kwargs`): resnet, unconditional, never frozen.
ORIGINAL_NIR_D = {"channel_base": 16384, "channel_max": 512, "num_fp16_res": 4, "conv_clamp": 256,
                  "mbstd_group_size": 4, "freeze_layers": 0, "architecture": "resnet"}
COMPAT_MODES = ("facegen", "original")
AUTO_KIMG = 10000  # ArcBiFaceGAN's training length with --cfg auto
AUTO_MAPPING_LAYERS = 8  # ArcBiFaceGAN (StyleGAN2-ADA's auto uses 2)


def auto_preset(resolution: int, gpus: int, halve: bool = False) -> Preset:
    mb = max(min(gpus * min(4096 // resolution, 32), 64), gpus)
    mb = int(mb / 2) if halve else mb  # auto_512, as the original computes it
    return Preset(
        ref_gpus=gpus, kimg=AUTO_KIMG, mb=mb, mbstd=min(mb // gpus, 4),
        fmaps=1 if resolution >= 512 else 0.5, lr=0.002 if resolution >= 1024 else 0.0025,
        gamma=0.0002 * resolution**2 / mb, ema_kimg=mb * 10 / 32, ema_rampup=0.05,
        mapping_layers=AUTO_MAPPING_LAYERS)


@dataclass(frozen=True)
class Hyperparams:
    """Everything the loop needs that a preset decides, after overrides."""

    preset: str
    total_kimg: float
    batch_size: int  # global, across workers
    batch_per_worker: int  # per forward pass; rounds = batch_size // (batch_per_worker · workers)
    num_workers: int
    mbstd_group: int
    channel_base: int
    channel_max: int
    mapping_layers: int
    z_dim: int
    w_dim: int
    lr: float
    gamma: float
    ema_kimg: float
    ema_rampup: float | None
    num_fp16_res: int
    conv_clamp: float | None
    freeze_d: int
    gamma_nir: float  # R1 weight of the NIR D
    d_architecture: str = "resnet"
    path_length: bool = True  # False: the preset turns path length off (cifar)
    style_mixing: bool = True  # False: the preset turns style mixing off (cifar)
    compat: str = "facegen"  # "original": the NIR D gets the original's fixed settings
    nir_pair: bool = False  # the NIR D reads [NIR, VIS luminance] (2 channels)

    @property
    def nir_d_channels(self) -> int:
        return 2 if self.nir_pair else 1

    @property
    def rounds(self) -> int:
        return self.batch_size // (self.batch_per_worker * self.num_workers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve(preset: str, resolution: int, num_workers: int, overrides: dict[str, Any],
            compat: str = "facegen", gamma_nir: float | None = None, nir_pair: bool = False) -> Hyperparams:
    """Preset values, then the non-None `overrides` (keys as in `Hyperparams`, plus `batch`/`kimg`).

    The NIR D's R1 weight is `gamma_nir` when given, else: facegen, the VIS D's (an explicit `gamma`
    included); original, the preset's (the original's `--gamma` reaches the VIS D only).
    """
    if preset not in PRESETS:
        raise UserError(f"config.preset: unknown preset '{preset}'; choose from {sorted(PRESETS)}")
    if compat not in COMPAT_MODES:
        raise UserError(f"compat: unknown mode '{compat}'; choose from {list(COMPAT_MODES)}")
    spec = PRESETS[preset] or auto_preset(resolution, num_workers, halve=preset == "auto_512")
    o = {k: v for k, v in overrides.items() if v is not None}
    gamma = o.get("gamma", spec.gamma)
    if gamma_nir is None:
        gamma_nir = spec.gamma if compat == "original" else gamma
    batch = o.get("batch", spec.mb)
    # Upstream: an explicit --batch is split evenly over the GPUs; a preset keeps its per-GPU batch.
    per_worker = o.get("batch_per_worker", batch // num_workers if "batch" in o else spec.mb // spec.ref_gpus)
    rampup = o.get("ema_rampup", spec.ema_rampup)
    hp = Hyperparams(
        preset=preset, total_kimg=o.get("kimg", spec.kimg), batch_size=batch, batch_per_worker=per_worker,
        num_workers=num_workers, mbstd_group=o.get("mbstd_group", spec.mbstd),
        channel_base=o.get("channel_base", int(spec.fmaps * 32768)), channel_max=o.get("channel_max", 512),
        mapping_layers=o.get("mapping_layers", spec.mapping_layers), z_dim=o.get("z_dim", 512),
        w_dim=o.get("w_dim", 512), lr=o.get("lr", spec.lr), gamma=gamma,
        ema_kimg=o.get("ema_kimg", spec.ema_kimg), ema_rampup=rampup if rampup else None,
        num_fp16_res=0 if o.get("fp32") else 4, conv_clamp=None if o.get("fp32") else 256,
        freeze_d=o.get("freeze_d", 0), gamma_nir=gamma_nir, d_architecture="orig" if spec.cifar else "resnet",
        path_length=not spec.cifar, style_mixing=not spec.cifar, compat=compat, nir_pair=nir_pair)
    check(hp)
    return hp


def check(hp: Hyperparams) -> None:
    if hp.batch_size < hp.num_workers or hp.batch_size % hp.num_workers:
        raise UserError(f"config.batch: {hp.batch_size} must be at least and divisible by the number of "
                        f"workers ({hp.num_workers})")
    if hp.batch_per_worker < 1 or hp.batch_size % (hp.batch_per_worker * hp.num_workers):
        raise UserError(f"config.batch_per_worker: batch {hp.batch_size} must be a multiple of "
                        f"batch_per_worker ({hp.batch_per_worker}) x workers ({hp.num_workers})")
    group = min(hp.mbstd_group, hp.batch_per_worker)
    if hp.batch_per_worker % group:
        raise UserError(f"config.mbstd_group: the per-worker batch {hp.batch_per_worker} is not a multiple "
                        f"of the minibatch-stddev group {group}")
    nir_group = min(ORIGINAL_NIR_D["mbstd_group_size"], hp.batch_per_worker)
    if hp.compat == "original" and hp.batch_per_worker % nir_group:
        raise UserError(f"config.batch: the per-worker batch {hp.batch_per_worker} is not a multiple of the "
                        f"original NIR discriminator's minibatch-stddev group {nir_group} (compat 'original')")


def generator_config(hp: Hyperparams, resolution: int, c_dim: int) -> GeneratorConfig:
    return GeneratorConfig(
        z_dim=hp.z_dim, c_dim=c_dim, w_dim=hp.w_dim, img_resolution=resolution, img_channels=3,
        nir_channels=1, mapping_layers=hp.mapping_layers, channel_base=hp.channel_base,
        channel_max=hp.channel_max, num_fp16_res=hp.num_fp16_res, conv_clamp=hp.conv_clamp)


def discriminator_configs(hp: Hyperparams, resolution: int, c_dim: int
                          ) -> tuple[DiscriminatorConfig, DiscriminatorConfig]:
    """(VIS D: conditional by projection, 3 channels; NIR D: unconditional, 1 channel, or 2 with
    `hp.nir_pair`: the NIR image and its VIS image's luminance).

    The NIR D shares the VIS D's preset, or with `hp.compat == 'original'` has the original's fixed settings.
    """
    common = dict(img_resolution=resolution, architecture=hp.d_architecture, channel_base=hp.channel_base,
                  channel_max=hp.channel_max, num_fp16_res=hp.num_fp16_res, conv_clamp=hp.conv_clamp,
                  mbstd_group_size=hp.mbstd_group, freeze_layers=hp.freeze_d)
    nir = dict(common, **ORIGINAL_NIR_D) if hp.compat == "original" else common
    return (DiscriminatorConfig(c_dim=c_dim, img_channels=3, **common),
            DiscriminatorConfig(c_dim=0, img_channels=hp.nir_d_channels, **nir))
