"""The training job spec: YAML + `key=value` overrides -> a frozen, validated `TrainSpec`.

Same conventions as `engine.spec` (the generation spec): pydantic, `extra='forbid'`, errors that name
the dotted key. `resolve_hyperparams` turns `config` (a preset plus explicit overrides) into the
numbers the loop uses, once the dataset resolution and the number of workers are known.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from facegen.engine.spec import validate_tree
from facegen.engine.training.presets import Hyperparams, resolve


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Section):
    uri: str = Field(description="VIS/ NIR/ identity_features.json folder, or WebDataset shards (any fsspec URI)")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    mirror: bool = Field(False, description="x-flip augmentation, applied to VIS and NIR together")
    cond: bool = Field(True, description="condition on identity features (the original's --cond)")
    resolution: int | None = Field(None, ge=4, description="resize to this (default: the images' size)")
    subset: int | None = Field(None, ge=1, description="train on a seeded random N of the pairs (--subset)")
    loader_workers: int = Field(2, ge=0, description="DataLoader processes per training worker (--workers)")


class ConfigSpec(_Section):
    """A preset (`--cfg`) and explicit overrides; null = the preset's value."""

    preset: Literal["auto", "auto_512", "biface256", "paper256", "paper512", "paper1024", "stylegan2", "cifar"] = "auto"
    kimg: float | None = Field(None, gt=0, description="training length in thousands of real images")
    batch: int | None = Field(None, ge=1, description="global batch size")
    batch_per_worker: int | None = Field(None, ge=1, description="per forward pass (gradient accumulation)")
    gamma: float | None = Field(None, ge=0, description="R1 weight")
    lr: float | None = Field(None, gt=0)
    ema_kimg: float | None = Field(None, ge=0, description="G EMA half-life")
    ema_rampup: float | None = Field(None, ge=0, description="0 = no ramp-up")
    mbstd_group: int | None = Field(None, ge=1)
    channel_base: int | None = Field(None, ge=1)
    channel_max: int | None = Field(None, ge=1)
    mapping_layers: int | None = Field(None, ge=1)
    z_dim: int | None = Field(None, ge=1)
    w_dim: int | None = Field(None, ge=1)
    fp32: bool = Field(False, description="disable the fp16 top blocks (the original's --fp32)")
    freeze_d: int = Field(0, ge=0, description="Freeze-D: layers of D kept fixed (the original's --freezed)")


class LossSpec(_Section):
    nir_loss_weight: float = Field(0.1, ge=0, description="λ_NIR on the generator's NIR term")
    nir_r1: bool = Field(True, description="R1 on the NIR D too (false = the original's missing R1)")
    gamma_nir: float | None = Field(None, ge=0, description="R1 weight of the NIR D (default: gamma)")
    pl_weight: float = Field(2.0, ge=0)
    pl_batch_shrink: int = Field(2, ge=1)
    pl_decay: float = Field(0.01, ge=0, le=1)
    style_mixing_prob: float = Field(0.9, ge=0, le=1)
    noise: bool = Field(True, description="G's per-pixel noise inputs during training (the original: on). Off, "
                                          "they are never used and their strengths stay 0: for data without "
                                          "per-pixel stochastic detail, where a small G turns noise into speckle")
    nir_pair: bool = Field(False, description="the NIR D judges each NIR image beside its VIS image's luminance "
                                              "(a 2-channel input), so G learns NIR twins aligned with their VIS "
                                              "image in detail, not only realistic ones (not in the original). "
                                              "Resuming a run without it starts the NIR D fresh")
    diversity_weight: float = Field(0.0, ge=0, description="λ_DIV: G's step pairs samples that share a condition "
                                                           "and penalises a pair whose face regions differ less "
                                                           "than diversity_target times their latents do, so z "
                                                           "carries pose and expression (not in the original; 0 = "
                                                           "off)")
    diversity_target: float = Field(0.1, gt=0, description="τ: the mean |Δ image| / mean |Δ z| a pair is pushed up "
                                                           "to (images in [-1, 1], central half)")
    g_reg_interval: int = Field(4, ge=1)
    d_reg_interval: int = Field(16, ge=1)
    identity_embedder: str | None = Field(
        None, description="a torch face embedder (native .safetensors or insightface .pth) whose features are "
                          "the data's conditions: adds the identity loss 1 - cos(E(G(z, c)), c) to G's loss "
                          "(not in the original; off when unset)")
    identity_weight: float = Field(1.0, ge=0, description="λ_ID on the VIS image (with identity_embedder)")
    identity_nir_weight: float = Field(1.0, ge=0, description="λ_ID on the NIR image (with identity_embedder)")
    identity_blur: bool = Field(True, description="the embedder sees a [1 2 1] binomial blur of G's image, so G "
                                                  "cannot raise the identity term with pixel-level speckle")


class AugmentSpec(_Section):
    mode: Literal["ada", "noaug", "fixed"] = "ada"
    p: float = Field(0.0, ge=0, le=1, description="augmentation probability (--aug fixed)")
    target: float = Field(0.6, gt=0, lt=1, description="ADA target of E[sign(D(real))]")
    pipe: str = Field("bgc", description="augment pipe: blit, geom, color, filter, noise, cutout, bg, bgc, bgcf, "
                                         "bgcfn, bgcfnc (or letters of 'bgcfnx')")
    interval: int = Field(4, ge=1, description="steps between ADA adjustments")
    speed_kimg: float = Field(500, gt=0, description="kimg for p to move 0 -> 1")

    @field_validator("p")
    @classmethod
    def _only_fixed(cls, value: float, info: ValidationInfo) -> float:
        if value != 0 and info.data.get("mode") != "fixed":
            raise ValueError("only applies with augment.mode 'fixed' (as the original's --p)")
        return value


class ScheduleSpec(_Section):
    tick_kimg: float = Field(4.0, gt=0, description="kimg between ticks (log line, stats)")
    snap: int | None = Field(50, ge=1, description="ticks between network snapshots (null = none)")
    image_snap: int | None = Field(None, ge=1, description="ticks between image grids (default: snap)")
    checkpoint_minutes: float | None = Field(10.0, gt=0, description="also checkpoint when this much time passed")
    checkpoint_ticks: int | None = Field(None, ge=1, description="also checkpoint every N ticks")
    keep_checkpoints: int = Field(2, ge=1)
    grid: tuple[int, int] | None = Field(None, description="grid columns x rows (default: the original's)")


METRIC_NAMES = ("fid50k_full", "fid50k", "kid50k_full", "kid50k")


class MetricsSpec(_Section):
    names: tuple[Literal["fid50k_full", "fid50k", "kid50k_full", "kid50k"], ...] = Field(
        ("fid50k_full",), description="metrics at network snapshots (the original's --metrics); [] = none")
    fid_weights: str | None = Field(None, description="Inception feature extractor (state dict) for FID and KID; "
                                                      "null = metrics off")
    fid_images: int = Field(50000, ge=2, description="generated images per metric (the '50k')")
    fid_batch: int = Field(64, ge=1)

    @property
    def active(self) -> tuple[str, ...]:
        """The metrics that will run: the named ones, when the feature extractor is given."""
        return tuple(self.names) if self.fid_weights else ()


class OutputSpec(_Section):
    dir: str = Field(description="where run directories NNNNN-<desc> go (local path or fsspec URI)")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    desc: str | None = Field(None, pattern=r"^[A-Za-z0-9_.+-]+$", description="run name suffix (default: derived)")


class WorkersSpec(_Section):
    """Where a Ray Train job runs and how it recovers (shared by every training spec); does not change
    what is learned."""

    executor: Literal["local", "ray"] = "ray"
    address: str | None = Field(None, description="Ray cluster address (default: local embedded Ray)")
    num_workers: int = Field(1, ge=1, description="Ray Train workers, one per GPU (the original's --gpus)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_failures: int = Field(3, ge=-1, description="automatic restarts from the last checkpoint (-1 = forever)")
    cpus_per_worker: float = Field(1, gt=0)

    @field_validator("num_workers")
    @classmethod
    def _local_is_one(cls, value: int, info: ValidationInfo) -> int:
        if value != 1 and info.data.get("executor") == "local":
            raise ValueError("the local executor runs one worker; use run.executor 'ray'")
        return value


class TrainRunSpec(WorkersSpec):
    cudnn_benchmark: bool = Field(True, description="cuDNN autotuning (the original's --nobench turns it off)")
    allow_tf32: bool = Field(False, description="TF32 matmuls and convolutions (the original's --allow-tf32)")


class TrainSpec(_Section):
    compat: Literal["facegen", "original"] = Field(
        "facegen", description="'original': reproduce the original training where it is not a bug (see "
                               "docs/training.md); the missing NIR R1 stays fixed (loss.nir_r1=false restores it)")
    seed: int = Field(0, ge=0, lt=2**31)
    data: DataSpec
    output: OutputSpec
    config: ConfigSpec = ConfigSpec()
    loss: LossSpec = LossSpec()
    augment: AugmentSpec = AugmentSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    metrics: MetricsSpec = MetricsSpec()
    resume: str | None = Field(None, description="run directory, native snapshot folder or original .pkl")
    run: TrainRunSpec = TrainRunSpec()

    @field_validator("loss")
    @classmethod
    def _facegen_only_terms(cls, value: LossSpec, info: ValidationInfo) -> LossSpec:
        if info.data.get("compat") == "original":
            if value.identity_embedder is not None:
                raise ValueError("identity_embedder adds a loss the original never had; unset it or use compat "
                                 "'facegen'")
            if not value.noise:
                raise ValueError("noise false: the original always trains with noise inputs; use compat 'facegen'")
            if value.nir_pair:
                raise ValueError("nir_pair: the original's NIR D sees the NIR image alone; use compat 'facegen'")
            if value.diversity_weight:
                raise ValueError("diversity_weight adds a loss the original never had; set it to 0 or use compat "
                                 "'facegen'")
        return value


def resolve_hyperparams(spec: TrainSpec, resolution: int, num_workers: int | None = None) -> Hyperparams:
    """`config` at this resolution on `num_workers` (default: `run.num_workers`).

    compat 'original' with `resume`: no EMA ramp-up, as the original's training.py sets for any resume.
    """
    overrides = spec.config.model_dump(exclude={"preset"})
    if spec.compat == "original" and spec.resume is not None:
        overrides["ema_rampup"] = 0
    return resolve(spec.config.preset, resolution, num_workers or spec.run.num_workers, overrides,
                   compat=spec.compat, gamma_nir=spec.loss.gamma_nir, nir_pair=spec.loss.nir_pair)


ORIGINAL_RESUME_ADA_KIMG = 100  # the original's training.py: ADA reacts faster after any --resume


def ada_speed_kimg(spec: TrainSpec) -> float:
    """ADA's speed: `augment.speed_kimg`, or the original's 100 kimg when compat 'original' resumes."""
    if spec.compat == "original" and spec.resume is not None:
        return ORIGINAL_RESUME_ADA_KIMG
    return spec.augment.speed_kimg


def build_train_spec(tree: dict[str, Any], overrides: list[str] = ()) -> TrainSpec:
    """Validate a spec tree after `key=value` overrides; errors name the dotted key."""
    return validate_tree(TrainSpec, tree, overrides, "training spec")



def train_spec_to_yaml(spec: TrainSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)

