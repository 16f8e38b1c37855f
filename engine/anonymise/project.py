"""Projecting photos into W+ by optimisation (the StyleGAN2 projector's approach, without VGG/LPIPS).

Start every image at the average face (`w_avg` in every W+ row) and run Adam on the W+ code to
minimise

    mean squared pixel error  +  identity_weight · (1 − cos(E(render), E(photo)))

The identity term uses the face embedder's differentiable path (torch embedders only; with an ONNX
embedder the projection is pixel-only) and keeps the projected face the same *person*, which pixel
error alone under-weights. StyleGAN2's projector uses LPIPS (VGG features); those weights are not
available here, and the identity term plays the part of the feature-space loss.

The loss is a sum of per-image terms and Adam is element-wise, so an image's projection does not
depend on what else is in its batch beyond floating-point summation order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from facegen.models.embedder import FaceEmbedder, TorchEmbedder
from facegen.models.rendering import LatentSpaces


@dataclass(frozen=True)
class ProjectionSettings:
    steps: int = 300
    learning_rate: float = 0.05
    identity_weight: float = 0.1

    def __post_init__(self) -> None:
        from facegen.models.errors import UserError

        if self.steps < 0 or self.learning_rate <= 0 or self.identity_weight < 0:
            raise UserError("projection: steps >= 0, learning rate > 0 and identity weight >= 0 required")


def psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Peak signal-to-noise ratio in dB between uint8 NCHW image batches, per image (inf if equal)."""
    mse = (a.float() - b.float()).square().flatten(1).mean(dim=1)
    with np.errstate(divide="ignore"):
        return (10.0 * np.log10(255.0**2 / mse.double().numpy())).astype(np.float64)


def project(space: LatentSpaces, embedder: FaceEmbedder, photos: torch.Tensor, settings: ProjectionSettings
            ) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 photos [N, 3, R, R] at the generator's resolution -> (W+ codes [N, num_ws, w_dim], PSNR dB [N]).

    The PSNR is that of the projection's uint8 render against the photo."""
    target = photos.float() / 127.5 - 1.0
    use_identity = settings.identity_weight > 0 and isinstance(embedder, TorchEmbedder)
    with torch.no_grad():
        target_embedding = embedder.embed(photos) if use_identity else None
    ws = space.mean_ws(len(photos)).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([ws], lr=settings.learning_rate, betas=(0.9, 0.999))
    for step in range(settings.steps):
        # Cosine decay to a tenth: big moves first, fine detail at the end.
        lr = settings.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / settings.steps)))
        for group in optimiser.param_groups:
            group["lr"] = lr
        vis, _ = space.render_w_plus(ws)
        loss = (vis - target).square().flatten(1).mean(dim=1)
        if use_identity:
            similarity = (embedder.embed_differentiable(vis) * target_embedding).sum(dim=1)
            loss = loss + settings.identity_weight * (1.0 - similarity)
        optimiser.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimiser.step()
    ws = ws.detach()
    with torch.no_grad():
        from facegen.models.generator import images_to_uint8

        return ws, psnr(images_to_uint8(space.render_w_plus(ws)[0]), photos)
