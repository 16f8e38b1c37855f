"""A generator with planted identity-carrying W+ channels, and a face embedder that sees exactly them.

The generator is a tiny ArcBiFaceGAN (VIS + NIR, conditional) with random weights, edited so that
channels `PLANTED` of the last W+ row (which only the last toRGB/toseg read) each drive one dedicated
feature of the last block: that feature has no conv weights (its map is the const noise, set to a
fine checkerboard, plus a bias: identical for every face) and a colour direction of its own,
orthogonal to the others. So swapping (last row, PLANTED[j]) adds a fixed fine texture d_j to the
image, scaled by the w difference, and nothing else: a detail invisible after low-pass filtering.
The embedder reads the image mostly along d_1, d_2, d_3 (with decreasing strength) and a little
along random directions, like a recogniser that cares about a few fine details. The ranking must
find (last row, PLANTED[0]) first.
"""

from __future__ import annotations

import math

import torch

from facegen.models.embedder import Preprocessing, TorchEmbedder
from facegen.models.generator import Generator, GeneratorConfig
from facegen.models.rendering import LatentSpaces, open_latent_spaces

RESOLUTION = 16
PLANTED = (5, 11, 2)  # W+ channels of the last row, strongest identity first
FEATURES = (0, 1, 2)  # the last block's conv1 output features they drive
STRENGTHS = (1.5, 1.0, 0.6)
COLOURS = ((1.0, -1.0, 0.0), (1.0, 1.0, -2.0), (1.0, 1.0, 1.0))  # orthogonal colour directions
AMPLITUDE = 1.0  # how hard a planted channel modulates its feature
EMBEDDING_DIM = 16


def planted_generator(seed: int = 0) -> Generator:
    config = GeneratorConfig(z_dim=16, c_dim=8, w_dim=16, img_resolution=RESOLUTION, img_channels=3,
                             nir_channels=1, mapping_layers=2, channel_base=256, channel_max=16,
                             num_fp16_res=0, conv_clamp=256)
    torch.manual_seed(seed)
    G = Generator(config)  # default init: a mapping that spreads faces apart, images in about [-1, 1]
    last = getattr(G.synthesis, f"b{RESOLUTION}")
    with torch.no_grad():
        # The planted features' maps become a fixed texture: a checkerboard, lrelu'd around -2/3 so
        # that it is exactly +-sqrt(2)/3 (lrelu(1/3) = -lrelu(-5/3)): zero mean in every 2x2 block.
        checker = torch.ones(RESOLUTION, RESOLUTION)
        checker[0::2, 1::2] = checker[1::2, 0::2] = -1.0
        last.conv1.noise_const.copy_(checker)
        last.conv1.noise_strength.fill_(1.0)
        for block in G.synthesis.blocks():
            block.torgb.weight.mul_(0.3)  # images in about [-1, 1] instead of saturating
        for channel, feature, colour in zip(PLANTED, FEATURES, COLOURS):
            last.conv1.weight[feature] = 0.0  # the feature map no longer depends on the face
            last.conv1.bias[feature] = -2.0 / 3.0
            for head in (last.torgb, last.toseg):
                head.affine.weight[:, channel] = 0.0  # the channel reaches only its own feature...
                head.affine.weight[feature] = 0.0  # ...and the feature only its own channel
            last.torgb.affine.weight[feature, channel] = AMPLITUDE / last.torgb.affine.weight_gain
            last.torgb.affine.bias[feature] = 0.0
            last.torgb.weight[:, feature, 0, 0] = torch.tensor(colour) / math.sqrt(sum(c * c for c in colour))
    return G.eval().requires_grad_(False)


def planted_directions(space: LatentSpaces) -> torch.Tensor:
    """Unit image directions [len(PLANTED), 3 * R * R] that each planted channel moves the image along."""
    ws = space.mean_ws(1)
    directions = []
    with torch.no_grad():
        base, _ = space.render_w_plus(ws)
        for channel in PLANTED:
            moved = ws.clone()
            moved[:, -1, channel] += 10.0
            diff = (space.render_w_plus(moved)[0] - base).flatten()
            directions.append(diff / diff.norm())
    return torch.stack(directions)


class PlantedRecogniser(torch.nn.Module):
    """features = offset + sum_j strength_j <d_j, x - average face> e_j + small random projection of x."""

    def __init__(self, directions: torch.Tensor, average_face: torch.Tensor, seed: int = 5) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        size = directions.shape[1]
        self.register_buffer("directions", directions * torch.tensor(STRENGTHS)[:, None])
        self.register_buffer("noise", torch.randn(EMBEDDING_DIM, size, generator=gen) / math.sqrt(size))
        offset = torch.zeros(EMBEDDING_DIM)
        offset[len(PLANTED):] = 1.0
        self.register_buffer("offset", offset)
        # Read the planted details relative to the average face, as a recogniser reads deviations.
        self.register_buffer("centre", average_face.flatten() @ self.directions.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        planted = flat @ self.directions.T - self.centre
        out = self.offset + 0.5 * flat @ self.noise.T
        return torch.cat([out[:, :len(PLANTED)] + planted, out[:, len(PLANTED):]], dim=1)


def planted_pair() -> tuple[LatentSpaces, TorchEmbedder]:
    space = open_latent_spaces(planted_generator())
    with torch.no_grad():
        average_face = space.render_w_plus(space.mean_ws(1))[0]
    module = PlantedRecogniser(planted_directions(space), average_face)
    return space, TorchEmbedder(module, Preprocessing(input_size=RESOLUTION), dim=EMBEDDING_DIM)
