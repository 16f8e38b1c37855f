"""The generator interface: what generation, preview and projection need from any generator family.

An `ImageGenerator` renders float images in [-1, 1] (VIS [N, C, R, R], and NIR [N, 1, R, R] or None)
from identity conditions c [N, c_dim], latents z [N, z_dim] and, where the family has them, per-sample
noise inputs named by `noise_shapes()`. The family's own settings (for StyleGAN2: truncation, noise
mode, convolution path) are given once, when the generator is opened, and never appear at call sites.

Families with an intermediate latent space also implement `LatentSpaces`: W+ (one w per modulated
layer: `w_plus`, `render_w_plus`) and StyleSpace (per-layer style vectors, Wu et al., "StyleSpace
Analysis", CVPR 2021: `style_space`, passed back as `styles=`), which projection and editing use.

Adding a family (StyleGAN3, a diffusion model) is one module with its nn.Module and a class that
implements these protocols, plus one branch in `open_generator`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from facegen.models.errors import UserError
from facegen.models.generator import Generator, StyleGAN2Renderer

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
    def w_plus(self, z: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """W+ codes [N, num_ws, w_dim] of latents and conditions (the family's truncation applied)."""
        ...

    def render_w_plus(self, ws: torch.Tensor, noise: dict[str, torch.Tensor] | None = None,
                      styles: dict[str, torch.Tensor] | None = None) -> Images:
        """Images from W+ codes; `styles` replaces the StyleSpace vectors of the layers it names."""
        ...

    def style_space(self, ws: torch.Tensor) -> dict[str, torch.Tensor]:
        """StyleSpace of W+ codes: layer name -> style vector [N, C_in]."""
        ...


def open_generator(module: torch.nn.Module, settings: Mapping[str, Any]) -> ImageGenerator:
    """The family's `ImageGenerator` for a loaded generator module, configured by `settings`
    (the job's `generator` section without `path` and `dtype`; each family checks its own keys)."""
    if isinstance(module, Generator):
        return StyleGAN2Renderer.from_settings(module, settings)
    raise UserError(f"no generator family renders a {type(module).__name__}")
