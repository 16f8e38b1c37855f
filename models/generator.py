"""The StyleGAN2 family: an identity-conditioned dual-branch (VIS + NIR) generator and its renderer.

`Generator(GeneratorConfig(...))` has the parameter/buffer names of StyleGAN2-ADA's `Generator`
(NVlabs/stylegan2-ada-pytorch, training/networks.py) plus ArcBiFaceGAN's `toseg` NIR heads, so an
ArcBiFaceGAN `G_ema` state dict loads with strict=True. `StyleGAN2Renderer` is the family's
`models.rendering.ImageGenerator`: it owns the sampling knobs (truncation, noise mode, convolution path).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from facegen.models.errors import UserError
from facegen.models.latent_space import SPACES, Layout
from facegen.models.layers import MappingNetwork
from facegen.models.netconfig import config_from_dict, is_int, is_number, is_pow2, require
from facegen.models.synthesis import NOISE_MODES, SynthesisNetwork


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


@dataclass(frozen=True)
class StyleGAN2Settings:
    """How the family samples. `noise_mode` "random" takes per-sample noise from the caller (so each
    sample's noise is its own, independent of the batch), "const" uses the trained noise buffers.
    `modulated_conv`: "shared" runs one convolution per layer on NHWC activations (fastest on CPU
    and on GPU at large batch), "fused" one grouped convolution with per-sample weights. Both are
    StyleGAN2's math; their float summation order differs in the last bits."""

    truncation_psi: float = 1.0
    truncation_cutoff: int | None = None
    noise_mode: str = "const"
    modulated_conv: Literal["shared", "fused"] = "shared"

    def __post_init__(self) -> None:
        require(is_number(self.truncation_psi, 0, low_inclusive=True), "generator", "truncation_psi",
                "must be a number >= 0")
        require(self.truncation_cutoff is None or is_int(self.truncation_cutoff, 1), "generator",
                "truncation_cutoff", "must be null or an integer >= 1")
        require(self.noise_mode in NOISE_MODES, "generator", "noise_mode", f"must be one of {NOISE_MODES}")
        require(self.modulated_conv in ("shared", "fused"), "generator", "modulated_conv",
                "must be 'shared' or 'fused'")


class StyleGAN2Renderer:
    """`ImageGenerator` and `LatentSpaces` over a loaded `Generator`, with fixed `StyleGAN2Settings`."""

    def __init__(self, generator: Generator, settings: StyleGAN2Settings = StyleGAN2Settings()) -> None:
        self.generator, self.settings = generator, settings
        self.z_dim, self.c_dim = generator.z_dim, generator.c_dim
        self.num_ws, self.w_dim = generator.num_ws, generator.w_dim
        self.resolution = generator.img_resolution
        self.has_nir = generator.nir_channels > 0
        self._layouts: dict[str, Layout] = {}

    @classmethod
    def from_settings(cls, generator: Generator, settings: Mapping[str, Any]) -> StyleGAN2Renderer:
        return cls(generator, config_from_dict(StyleGAN2Settings, dict(settings), "generator"))

    def noise_shapes(self) -> dict[str, tuple[int, int]]:
        return self.generator.synthesis.noise_shapes() if self.settings.noise_mode == "random" else {}

    # -- W+ and StyleSpace (models.rendering.LatentSpaces) ---------------------------------------
    def w_plus(self, z: torch.Tensor, c: torch.Tensor | None, truncation_psi: float | None = None) -> torch.Tensor:
        s = self.settings
        psi = s.truncation_psi if truncation_psi is None else truncation_psi
        return self.generator.mapping(z, c if self.c_dim else None, truncation_psi=psi,
                                      truncation_cutoff=s.truncation_cutoff)

    def mean_ws(self, count: int = 1) -> torch.Tensor:
        w_avg = self.generator.mapping.w_avg.detach().to(torch.float32)
        return w_avg.view(1, 1, -1).repeat(count, self.num_ws, 1)

    def style_space(self, ws: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.generator.synthesis.compute_styles(ws)

    def layout(self, space: str) -> Layout:
        if space not in SPACES:
            raise UserError(f"latent space: {space!r} is not one of {SPACES}")
        if space not in self._layouts:
            if space == "wplus":
                names, widths = tuple(f"w{i}" for i in range(self.num_ws)), (self.w_dim,) * self.num_ws
            else:
                synthesis = self.generator.synthesis
                names = tuple(synthesis.style_names())
                widths = tuple(getattr(getattr(synthesis, n.split(".")[0]), n.split(".")[1]).affine.out_features
                               for n in names)
            self._layouts[space] = Layout(space, names, widths)
        return self._layouts[space]

    def encode(self, space: str, ws: torch.Tensor) -> torch.Tensor:
        if space == "wplus":
            return ws.reshape(ws.shape[0], -1)
        styles = self.style_space(ws)
        return torch.cat([styles[n] for n in self.layout("style").names], dim=1)

    def render_codes(self, space: str, codes: torch.Tensor,
                     noise: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if space == "wplus":
            return self.render_w_plus(codes.reshape(codes.shape[0], self.num_ws, self.w_dim), noise)
        layout = self.layout(space)
        styles = dict(zip(layout.names, codes.split(list(layout.widths), dim=1)))
        # Every affine is replaced by the given styles, so the ws only provide the batch size.
        return self.render_w_plus(codes.new_zeros(codes.shape[0], self.num_ws, self.w_dim), noise, styles)

    def render_w_plus(self, ws: torch.Tensor, noise: dict[str, torch.Tensor] | None = None,
                      styles: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Caller noise replaces the trained buffers; "const" then only scales it by noise_strength.
        mode = "const" if noise else self.settings.noise_mode
        shared = self.settings.modulated_conv == "shared"
        # The grouped conv cannot use NHWC, so the shared path is the channels-last one.
        return self.generator.synthesis(ws, noise_mode=mode, noise=noise or None, styles=styles, fast=not shared,
                                        channels_last=shared)

    def render(self, z: torch.Tensor, c: torch.Tensor | None,
               noise: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.render_w_plus(self.w_plus(z, c), noise)
