"""W+ and StyleSpace of every generator facegen loads, behind one interface.

Both families become our `Generator` when loaded: ArcBiFaceGAN (VIS + NIR heads, conditional) and
rosinality / StyleID StyleGAN2 checkpoints (`models.importers.rosinality`: no NIR, unconditional,
`latent_avg` as `w_avg`). So one wrapper serves both:

- **W+** is `ws [N, num_ws, w_dim]`: one w per modulated layer group, as `G.mapping` returns it.
- **StyleSpace** (Wu et al., "StyleSpace Analysis", CVPR 2021) is the per-layer modulation vectors
  `s = affine(w)` of every convolution and output head ('b8.conv0', 'b8.torgb', 'b8.toseg', ...);
  layers have different widths.

Both spaces are handled as *flat codes* `[N, D]` plus a `Layout` that says which slice of the flat
vector belongs to which layer. A coordinate is (layer, channel); a *unit* is a contiguous run of
channels inside one layer (one channel, a group of channels, or a whole layer). Swapping units
between two codes is then one `torch.where` over a flat mask, whatever the space.

Rendering, mapping and StyleSpace go through the family's `LatentSpaces` implementation
(`models.rendering`; for StyleGAN2 `StyleGAN2Renderer`), with constant noise (`noise_mode='const'`)
so that a swap is the only thing that changes between two renders: the disentanglement metric
compares images pixel for pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from facegen.models.errors import UserError
from facegen.models.generator import Generator, StyleGAN2Renderer, StyleGAN2Settings

SPACES = ("wplus", "style")


@dataclass(frozen=True)
class Layout:
    """Layer names and widths of a flat code: layer i occupies `[offsets[i], offsets[i] + widths[i])`."""

    space: str
    names: tuple[str, ...]
    widths: tuple[int, ...]

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.widths)[:-1]]).astype(np.int64)

    @property
    def size(self) -> int:
        return int(sum(self.widths))

    @property
    def num_layers(self) -> int:
        return len(self.names)

    @property
    def max_width(self) -> int:
        return max(self.widths)

    def units(self, width: int | None) -> np.ndarray:
        """Swap units as int64 rows (layer, start, width): channels in groups of `width`, or whole layers
        (`width=None`). A layer narrower than `width`, or its remainder, forms one shorter unit."""
        rows = []
        for layer, layer_width in enumerate(self.widths):
            step = layer_width if width is None else width
            if step < 1:
                raise UserError(f"group width must be >= 1, got {width}")
            rows += [(layer, start, min(step, layer_width - start)) for start in range(0, layer_width, step)]
        return np.asarray(rows, dtype=np.int64).reshape(-1, 3)

    def mask(self, units: np.ndarray) -> torch.Tensor:
        """Flat bool mask [size] that is True on every channel of the given units."""
        mask = np.zeros(self.size, dtype=bool)
        offsets = self.offsets
        for layer, start, width in np.asarray(units, dtype=np.int64).reshape(-1, 3):
            begin = offsets[layer] + start
            mask[begin:begin + width] = True
        return torch.from_numpy(mask)

    def unit_masks(self, units: np.ndarray) -> torch.Tensor:
        """One flat mask per unit: bool [len(units), size] (a batch of single-unit swaps)."""
        units = np.asarray(units, dtype=np.int64).reshape(-1, 3)
        begin = self.offsets[units[:, 0]] + units[:, 1]
        channel = np.arange(self.size)[None, :]
        return torch.from_numpy((channel >= begin[:, None]) & (channel < (begin + units[:, 2])[:, None]))

    def to_grid(self, values: np.ndarray, units: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """Per-unit values as a 2-D array [layer, unit within layer] (StyleID's `channels_rank.npy` /
        `group_256_rank.npy` shape); layers with fewer units than the widest are padded with `fill`."""
        units = np.asarray(units, dtype=np.int64).reshape(-1, 3)
        column = _unit_columns(units)
        grid = np.full((self.num_layers, int(column.max()) + 1), fill, dtype=np.float64)
        grid[units[:, 0], column] = values
        return grid

    def from_grid(self, grid: np.ndarray, units: np.ndarray) -> np.ndarray:
        """The inverse of `to_grid`: per-unit values read from a [layer, unit] array."""
        units = np.asarray(units, dtype=np.int64).reshape(-1, 3)
        column = _unit_columns(units)
        need = (self.num_layers, int(column.max()) + 1)
        if grid.ndim != 2 or grid.shape[0] != need[0] or grid.shape[1] < need[1]:
            raise UserError(f"rank array has shape {list(grid.shape)}; this generator's {self.space} with these "
                            f"units needs [{need[0]}, {need[1]}]")
        return np.asarray(grid, dtype=np.float64)[units[:, 0], column]


def _unit_columns(units: np.ndarray) -> np.ndarray:
    """Position of each unit within its layer (0, 1, ...), units listed layer by layer."""
    column = np.zeros(len(units), dtype=np.int64)
    for i in range(1, len(units)):
        column[i] = column[i - 1] + 1 if units[i, 0] == units[i - 1, 0] else 0
    return column


class LatentSpace:
    """Map, encode, decode and render through W+ or StyleSpace of a loaded `Generator`."""

    def __init__(self, generator: Generator) -> None:
        if not isinstance(generator, Generator):
            raise UserError(f"latent space: expected a facegen Generator, got {type(generator).__name__}")
        self.generator = generator.eval().requires_grad_(False)
        self.synthesis = generator.synthesis
        # Constant noise; the shared-weight NHWC convolution, facegen's fastest CPU path at these batches.
        self.renderer = StyleGAN2Renderer(generator, StyleGAN2Settings(noise_mode="const", modulated_conv="shared"))
        names = tuple(self.synthesis.style_names())
        affines = {n: self._style_layer(n).affine.out_features for n in names}
        self.layouts = {
            "wplus": Layout("wplus", tuple(f"w{i}" for i in range(generator.num_ws)),
                            (generator.w_dim,) * generator.num_ws),
            "style": Layout("style", names, tuple(affines[n] for n in names)),
        }

    def _style_layer(self, name: str) -> torch.nn.Module:
        block, layer = name.split(".")
        return getattr(getattr(self.synthesis, block), layer)

    # -- properties of the generator ----------------------------------------------------------
    @property
    def num_ws(self) -> int:
        return self.generator.num_ws

    @property
    def w_dim(self) -> int:
        return self.generator.w_dim

    @property
    def z_dim(self) -> int:
        return self.generator.z_dim

    @property
    def c_dim(self) -> int:
        return self.generator.c_dim

    @property
    def resolution(self) -> int:
        return self.generator.img_resolution

    @property
    def has_nir(self) -> bool:
        return self.generator.nir_channels > 0

    @property
    def w_avg(self) -> torch.Tensor:
        return self.generator.mapping.w_avg

    def layout(self, space: str) -> Layout:
        if space not in self.layouts:
            raise UserError(f"latent space: {space!r} is not one of {SPACES}")
        return self.layouts[space]

    # -- codes ----------------------------------------------------------------------------------
    def map(self, z: torch.Tensor, c: torch.Tensor | None = None, truncation_psi: float = 1.0) -> torch.Tensor:
        """(z, c) -> ws [N, num_ws, w_dim]."""
        renderer = StyleGAN2Renderer(self.generator, StyleGAN2Settings(truncation_psi=truncation_psi))
        with torch.no_grad():
            return renderer.w_plus(z, c if self.c_dim else None)

    def mean_ws(self, count: int = 1) -> torch.Tensor:
        """The average w broadcast to W+ (where projection starts): [count, num_ws, w_dim]."""
        return self.w_avg.detach().to(torch.float32).view(1, 1, -1).repeat(count, self.num_ws, 1)

    def encode(self, space: str, ws: torch.Tensor) -> torch.Tensor:
        """ws -> flat codes [N, D] of `space` (StyleSpace codes are the affine outputs)."""
        if space == "wplus":
            return ws.reshape(ws.shape[0], -1)
        styles = self.renderer.style_space(ws)
        return torch.cat([styles[n] for n in self.layout("style").names], dim=1)

    def ws_of(self, space: str, codes: torch.Tensor) -> torch.Tensor | None:
        """The ws a flat code carries (W+), None for StyleSpace (whose codes replace every affine)."""
        return codes.reshape(codes.shape[0], self.num_ws, self.w_dim) if space == "wplus" else None

    def render(self, space: str, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Flat codes -> (vis [N, C, R, R], nir [N, 1, R, R] or None), float in about [-1, 1].

        Differentiable (callers wrap it in no_grad when they do not optimise)."""
        if space == "wplus":
            return self.renderer.render_w_plus(self.ws_of(space, codes))
        layout = self.layout("style")
        parts = codes.split(list(layout.widths), dim=1)
        styles = dict(zip(layout.names, parts))
        # Every affine is replaced by the given styles, so the ws only provide the batch size.
        ws = codes.new_zeros(codes.shape[0], self.num_ws, self.w_dim)
        return self.renderer.render_w_plus(ws, styles=styles)

    def render_ws(self, ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.render("wplus", ws.reshape(ws.shape[0], -1))


def swap(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Source codes with the masked coordinates taken from the target: StyleID's latent swap.

    `mask` is bool [D] (the same coordinates for every row) or [N, D] (per row)."""
    return torch.where(mask.to(source.device), target, source)
