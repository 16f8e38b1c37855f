"""A generator whose identity lives in sixteen planted W+ channels, and a face embedder that sees exactly them.

The generator is a tiny ArcBiFaceGAN (VIS + NIR, conditional) with random weights, edited so that
channels `PLANTED` of the last W+ row (which only the last toRGB/toseg read) each add a fixed fine
texture to the VIS image, scaled by the channel's value, and do nothing else:
- `FIXED` features of the last block's conv1 lose their conv weights, so their maps are
  lrelu(tile + bias): the const noise (a 4x4 tile of 16 levels, repeated) through a kink of their own.
  Every 4x4 block of the image holds the same values, and each map is a different function of them.
- The last toRGB mixes those maps in colour; the planted channels modulate only them (and nothing
  else reads the planted channels or the maps), with mixing weights solved so that channel j adds
  exactly `directions[j]`: sixteen orthonormal textures, each with zero mean over every 4x4 block in
  each colour. So a planted channel changes the face's fine detail and nothing a 4x4 low-pass sees.
  (`FIXED` = planted + 3: the three block-mean constraints take one feature each.)
- Each planted channel is scaled by its spread over faces, so its identity effect follows
  `STRENGTHS` rather than how widely the mapping network happens to spread that channel.
The embedder reads the image along those textures with `STRENGTHS` (the first far the strongest) and
a little along random directions, like a recogniser that cares about fine details. So identity is
in the sixteen planted units and a swap of them changes no low-pass appearance; every other unit
moves identity only through the random directions, at a large appearance cost. Two decoys keep a
ranking honest: `DEAD` channels change nothing (least appearance, no identity: last, not first),
and `LOUD` moves identity more than the weakest planted channel does, by repainting the face.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from facegen.engine.anonymise.faces import face_ws
from facegen.engine.seeding import Stream
from facegen.models.embedder import Preprocessing, TorchEmbedder
from facegen.models.generator import Generator, GeneratorConfig
from facegen.models.rendering import LatentSpaces, open_latent_spaces

RESOLUTION = 16
TILE = 4  # the planted textures have zero mean over every TILE x TILE block (use lowpass_size 4)
W_DIM = 32
# W+ channels of the last row that carry identity, strongest first.
PLANTED = (5, 11, 2, 20, 27, 8, 14, 30, 1, 23, 17, 9, 25, 3, 29, 12)
STRENGTHS = (4.0,) + tuple(np.round(np.linspace(2.0, 1.0, len(PLANTED) - 1), 4).tolist())
DEAD = (7, 19)  # last-row channels that change nothing: no identity, no appearance
LOUD = 24  # a last-row channel that repaints the face: some identity, far more appearance
LOUDNESS = 4.0  # how much harder than before it drives the face's own features
FIXED = tuple(range(len(PLANTED) + 3))  # the last block's conv1 features that become fixed maps
TEXTURE_NORM = 0.32  # norm of what one standard deviation of a planted channel adds to a tile (3 x 16 values)
FACE_GAIN = 0.22  # toRGB scale that keeps faces inside [-1, 1], so the textures never clip
READ = 0.25  # how strongly the embedder reads the textures, beside its offset of ones
EMBEDDING_DIM = 24


def planted_generator(seed: int = 0) -> Generator:
    config = GeneratorConfig(z_dim=16, c_dim=8, w_dim=W_DIM, img_resolution=RESOLUTION, img_channels=3,
                             nir_channels=1, mapping_layers=2, channel_base=512, channel_max=32,
                             num_fp16_res=0, conv_clamp=256)
    torch.manual_seed(seed)
    G = Generator(config)  # default init: a mapping that spreads faces apart
    last = getattr(G.synthesis, f"b{RESOLUTION}")
    fixed, planted = list(FIXED), list(PLANTED)
    draws = torch.Generator().manual_seed(seed + 1)
    tile = torch.randperm(TILE * TILE, generator=draws).float().reshape(TILE, TILE) * (2 / (TILE * TILE - 1)) - 1
    kinks = torch.rand(len(fixed), generator=draws) * 1.6 - 0.8
    with torch.no_grad():
        for block in G.synthesis.blocks():
            block.torgb.weight.mul_(FACE_GAIN)
        last.conv1.noise_const.copy_(tile.repeat(RESOLUTION // TILE, RESOLUTION // TILE))
        last.conv1.noise_strength.fill_(1.0)
        last.conv1.weight[fixed] = 0.0
        last.conv1.bias[fixed] = kinks
        maps = F.leaky_relu(tile + kinks[:, None, None], 0.2) * math.sqrt(2)  # what bias_act makes of them
        colours = last.torgb.weight[:, fixed, 0, 0]  # [3, len(FIXED)]
        textures = (colours.T[:, :, None, None] * maps[:, None]).flatten(1).T  # one tile, [3*T*T, len(FIXED)]
        block_means = textures.reshape(3, TILE * TILE, len(fixed)).mean(dim=1)
        mixes = torch.linalg.svd(block_means.double())[2][3:].T.float()  # combinations with zero block mean
        directions, r = torch.linalg.qr(textures @ mixes)
        weights = mixes @ torch.linalg.inv(r)  # textures @ weights = directions: orthonormal
        spread = _last_row_spread(G, seed)
        for head in (last.torgb, last.toseg):
            head.affine.weight[:, planted + list(DEAD)] = 0.0  # the planted channels reach only the fixed maps...
            head.affine.weight[fixed] = 0.0  # ...and the fixed maps only them
            head.affine.bias[fixed] = 0.0
        gain = TEXTURE_NORM / (last.torgb.affine.weight_gain * last.torgb.weight_gain)
        free = [f for f in range(last.torgb.affine.weight.shape[0]) if f not in FIXED]
        last.torgb.affine.weight[free, LOUD] *= LOUDNESS
        for j, channel in enumerate(planted):
            last.torgb.affine.weight[fixed, channel] = weights[:, j] * gain / spread[channel]
    return G.eval().requires_grad_(False)


def _last_row_spread(G: Generator, seed: int) -> torch.Tensor:
    """Standard deviation of each channel of the last W+ row over seeded faces."""
    space = open_latent_spaces(G)
    return face_ws(space, seed, Stream.SWAP_SOURCE, np.arange(4096))[:, -1].std(dim=0)


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
    """features = offset + READ · sum_j strength_j <d_j, x - average face> e_j + small random projection of x."""

    def __init__(self, directions: torch.Tensor, average_face: torch.Tensor, seed: int = 5) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        size = directions.shape[1]
        self.register_buffer("directions", directions * torch.tensor(STRENGTHS)[:, None] * READ)
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
