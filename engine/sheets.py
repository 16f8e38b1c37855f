"""Grids of VIS|NIR pairs for people to look at (world samples, generator previews)."""

from __future__ import annotations

import numpy as np

from facegen.engine.report import contact_sheet

GAP = 4  # white pixels between pairs


def pair_tiles(vis: np.ndarray, nir: np.ndarray | None) -> np.ndarray:
    """[n, H, W, 3] VIS and [n, H, W] NIR -> [n, H, 2W, 3]: each sample's VIS with its NIR on the right
    (grey as RGB), so alignment can be judged side by side. Without NIR the VIS tiles are returned."""
    if nir is None:
        return vis
    if nir.shape != vis.shape[:3]:
        raise ValueError(f"pair_tiles: NIR {nir.shape} does not match VIS {vis.shape}")
    return np.concatenate([vis, np.repeat(nir[..., None], 3, axis=3)], axis=2)


def pair_grid(vis: np.ndarray, nir: np.ndarray | None, columns: int) -> np.ndarray:
    """uint8 [rows*(H+GAP)-GAP, columns*(2W+GAP)-GAP, 3]: VIS|NIR pairs, `columns` pairs per row."""
    return contact_sheet(pair_tiles(vis, nir), columns, gap=GAP, fill=255)


def grid_size(count: int, columns: int, resolution: int, nir: bool = True) -> tuple[int, int]:
    """(height, width) of `pair_grid` for `count` samples of `resolution` pixels."""
    columns = min(columns, count)
    rows = -(-count // columns)
    tile_w = resolution * (2 if nir else 1)
    return rows * (resolution + GAP) - GAP, columns * (tile_w + GAP) - GAP
