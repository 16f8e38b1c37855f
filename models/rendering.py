"""The generator interface: what generation, preview and projection need from any generator family.

An `ImageGenerator` renders float images in [-1, 1] (VIS [N, C, R, R], and NIR [N, 1, R, R] or None)
from identity conditions c [N, c_dim], latents z [N, z_dim] and, where the family has them, per-sample
noise inputs named by `noise_shapes()`. The family's own settings (for StyleGAN2: truncation, noise
mode, convolution path) are given once, when the generator is opened, and never appear at call sites.

Families with an intermediate latent space also implement `LatentSpaces`: W+ (one w per modulated
layer: `w_plus`, `render_w_plus`) and StyleSpace (per-layer style vectors, Wu et al., "StyleSpace
Analysis", CVPR 2021: `style_space`, passed back as `styles=`), both also as flat codes with a
`Layout` (`encode`, `render_codes`), which projection, identity swapping and privacy repair use.

Adding a family (StyleGAN3, a diffusion model) is one module with its nn.Module and a class that
implements these protocols, plus one branch in `open_generator`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from facegen.models.errors import UserError
from facegen.models.generator import Generator, StyleGAN2Renderer
from facegen.models.latent_space import Layout

Images = tuple[torch.Tensor, "torch.Tensor | None"]  # (VIS, NIR or None), float in [-1, 1]


@runtime_checkable
class ImageGenerator(Protocol):
    z_dim: int  # latent width (0: no latent)
    c_dim: int  # identity condition width (0: unconditional)

    def noise_shapes(self) -> dict[str, tuple[int, int]]:
        """Per-sample noise inputs the renderer takes under its settings: name -> (H, W); {} if none."""
        ...

    def render(self, z: torch.Tensor, c: torch.Tensor | None,
               noise: dict[str, torch.Tensor] | None = None) -> Images:
        """Images for latents z and conditions c; `noise` tensors are [N, 1, H, W] per `noise_shapes()`."""
        ...


@runtime_checkable
class LatentSpaces(Protocol):
    """W+ and StyleSpace of a generator family, as batches of codes and as flat codes.

    Flat codes `[N, D]` with a `Layout` (models/latent_space.py: which slice belongs to which layer)
    are what identity swapping works on: ranking, anonymisation and privacy repair swap units of them.
    A family implements this once; the same object also renders (it is the family's `ImageGenerator`).
    """

    z_dim: int
    c_dim: int
    num_ws: int
    w_dim: int
    resolution: int
    has_nir: bool

    def w_plus(self, z: torch.Tensor, c: torch.Tensor | None, truncation_psi: float | None = None) -> torch.Tensor:
        """W+ codes [N, num_ws, w_dim] of latents and conditions; truncation toward `w_avg` by the
        family's settings, or by `truncation_psi` when given."""
        ...

    def mean_ws(self, count: int = 1) -> torch.Tensor:
        """The average w in every row of W+ (where projection starts): [count, num_ws, w_dim]."""
        ...

    def render_w_plus(self, ws: torch.Tensor, noise: dict[str, torch.Tensor] | None = None,
                      styles: dict[str, torch.Tensor] | None = None) -> Images:
        """Images from W+ codes; `styles` replaces the StyleSpace vectors of the layers it names."""
        ...

    def style_space(self, ws: torch.Tensor) -> dict[str, torch.Tensor]:
        """StyleSpace of W+ codes: layer name -> style vector [N, C_in]."""
        ...

    def layout(self, space: str) -> Layout:
        """The flat layout of 'wplus' or 'style' (a UserError for any other name)."""
        ...

    def encode(self, space: str, ws: torch.Tensor) -> torch.Tensor:
        """W+ codes -> flat codes [N, D] of `space`."""
        ...

    def render_codes(self, space: str, codes: torch.Tensor,
                     noise: dict[str, torch.Tensor] | None = None) -> Images:
        """Flat codes of `space` -> images (differentiable; callers wrap it in no_grad when not optimising)."""
        ...


def open_generator(module: torch.nn.Module, settings: Mapping[str, Any]) -> ImageGenerator:
    """The family's `ImageGenerator` for a loaded generator module, configured by `settings`
    (the job's `generator` section without `path` and `dtype`; each family checks its own keys)."""
    if isinstance(module, Generator):
        return StyleGAN2Renderer.from_settings(module, settings)
    raise UserError(f"no generator family renders a {type(module).__name__}")


# Swaps compare two renders pixel for pixel, so the noise is the trained constant one; the shared-weight
# NHWC convolution is facegen's fastest CPU path at these batch sizes.
SWAP_SETTINGS = {"noise_mode": "const", "modulated_conv": "shared"}


def open_latent_spaces(module: torch.nn.Module, settings: Mapping[str, Any] = SWAP_SETTINGS) -> LatentSpaces:
    """The family's `LatentSpaces` for a loaded generator (constant noise unless `settings` say otherwise);
    a UserError for a family without an intermediate latent space."""
    renderer = open_generator(module.eval().requires_grad_(False), settings)
    if not isinstance(renderer, LatentSpaces):
        raise UserError(f"{type(module).__name__} has no W+/StyleSpace latent space to swap identity in")
    return renderer
