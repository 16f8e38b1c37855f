"""Flat codes of a generator's latent spaces: layouts, swap units and the swap itself.

The spaces themselves are the family's `models.rendering.LatentSpaces` (for StyleGAN2 its
`StyleGAN2Renderer`, which serves both families facegen loads: ArcBiFaceGAN and rosinality / StyleID
checkpoints, imported as our `Generator`):

- **W+** is `ws [N, num_ws, w_dim]`: one w per modulated layer group, as `G.mapping` returns it.
- **StyleSpace** (Wu et al., "StyleSpace Analysis", CVPR 2021) is the per-layer modulation vectors
  `s = affine(w)` of every convolution and output head ('b8.conv0', 'b8.torgb', 'b8.toseg', ...);
  layers have different widths.

Both spaces are handled as *flat codes* `[N, D]` plus a `Layout` that says which slice of the flat
vector belongs to which layer. A coordinate is (layer, channel); a *unit* is a contiguous run of
channels inside one layer (one channel, a group of channels, or a whole layer). Swapping units
between two codes is then one `torch.where` over a flat mask, whatever the space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from facegen.models.errors import UserError

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


def swap(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Source codes with the masked coordinates taken from the target: StyleID's latent swap.

    `mask` is bool [D] (the same coordinates for every row) or [N, D] (per row)."""
    return torch.where(mask.to(source.device), target, source)
