"""Identity-conditioned dual-branch (VIS + NIR) StyleGAN2 generator (ArcBiFaceGAN, SPEC §2).

`Generator(GeneratorConfig(...))` has the parameter/buffer names of StyleGAN2-ADA's `Generator`
(plus the `toseg` NIR heads), so an ArcBiFaceGAN `G_ema` state dict loads with strict=True.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from facegen.models.layers import MappingNetwork
from facegen.models.netconfig import config_from_dict, is_int, is_number, is_pow2, require
from facegen.models.synthesis import SynthesisNetwork


@dataclass(frozen=True)
class GeneratorConfig:
    """Constructor arguments of the generator (JSON-safe). Defaults are ArcBiFaceGAN's 256² model."""

    z_dim: int = 512
    c_dim: int = 512  # identity feature size; 0 = unconditional
    w_dim: int = 512
    img_resolution: int = 256
    img_channels: int = 3
    nir_channels: int = 1  # 0 = no NIR `toseg` heads (plain StyleGAN2-ADA)
    mapping_layers: int = 8
    channel_base: int = 16384
    channel_max: int = 512
    num_fp16_res: int = 4
    conv_clamp: float | None = 256
    mapping_lr_multiplier: float = 0.01
    w_avg_beta: float = 0.995
    embed_features: int | None = None  # None = w_dim
    layer_features: int | None = None  # None = w_dim

    def __post_init__(self) -> None:
        what = "generator"
        for key in ("z_dim", "c_dim", "nir_channels", "num_fp16_res"):
            require(is_int(getattr(self, key), 0), what, key, "must be an integer >= 0")
        for key in ("w_dim", "img_channels", "mapping_layers", "channel_base", "channel_max"):
            require(is_int(getattr(self, key), 1), what, key, "must be an integer >= 1")
        for key in ("embed_features", "layer_features"):
            v = getattr(self, key)
            require(v is None or is_int(v, 1), what, key,
                     "must be null or an integer >= 1")
        require(self.z_dim + self.c_dim > 0, what, "z_dim", "z_dim and c_dim cannot both be 0")
        require(is_pow2(self.img_resolution), what, "img_resolution", "must be a power of two >= 4")
        require(self.conv_clamp is None or is_number(self.conv_clamp, 0), what, "conv_clamp",
                "must be null or a number > 0")
        require(is_number(self.mapping_lr_multiplier, 0), what, "mapping_lr_multiplier", "must be a number > 0")
        require(is_number(self.w_avg_beta, 0, 1, low_inclusive=True), what, "w_avg_beta", "must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeneratorConfig:
        return config_from_dict(cls, d, "generator")

    @property
    def num_ws(self) -> int:
        return 2 * int(math.log2(self.img_resolution)) - 2


class Generator(torch.nn.Module):
    """mapping: (z, c) -> ws; synthesis: ws -> (vis, nir)."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.z_dim, self.c_dim, self.w_dim = config.z_dim, config.c_dim, config.w_dim
        self.img_resolution = config.img_resolution
        self.img_channels = config.img_channels
        self.nir_channels = config.nir_channels
        self.synthesis = SynthesisNetwork(
            config.w_dim, config.img_resolution, config.img_channels, config.nir_channels,
            channel_base=config.channel_base, channel_max=config.channel_max,
            num_fp16_res=config.num_fp16_res, conv_clamp=config.conv_clamp)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(
            config.z_dim, config.c_dim, config.w_dim, self.num_ws, num_layers=config.mapping_layers,
            embed_features=config.embed_features, layer_features=config.layer_features,
            lr_multiplier=config.mapping_lr_multiplier, w_avg_beta=config.w_avg_beta)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, noise_mode: str = "const", fast: bool = False,
                **synthesis_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, fast=fast, **synthesis_kwargs)


def images_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8, exactly as the original: (x*127.5 + 128).clamp(0, 255), truncated.

    The layout is kept (NCHW in, NCHW out).
    """
    return (x.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
