"""Anonymising codes: copy the chosen units of a target face's code into the source's (StyleID).

Three ways to choose, all ending in one flat mask over the space's code:
- the top-n units of a rank table (n is the privacy knob: more units, less of the source's identity);
- whole W+ layers (StyleID swaps layers 5-9 of its 18 at 1024²);
- n random units (the baseline a ranking must beat).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from facegen.engine.anonymise.metric import Metric, identity_change
from facegen.engine.seeding import Stream, draw_keys, uniform
from facegen.models.embedder import FaceEmbedder
from facegen.models.errors import UserError
from facegen.models.latent_space import Layout, swap
from facegen.models.rendering import LatentSpaces


def layer_units(layout: Layout, layers: list[int]) -> np.ndarray:
    """Whole layers as units (layer, 0, width)."""
    bad = [layer for layer in layers if not 0 <= layer < layout.num_layers]
    if bad:
        raise UserError(f"layers {bad}: this generator's {layout.space} has layers 0..{layout.num_layers - 1}")
    return np.asarray([[layer, 0, layout.widths[layer]] for layer in layers], dtype=np.int64).reshape(-1, 3)


def random_units(units: np.ndarray, n: int, seed: int, draw: int) -> np.ndarray:
    """n of the given units, picked uniformly without replacement; `draw` numbers independent picks."""
    keys = draw_keys(seed, Stream.SWAP_BASELINE, np.asarray([draw]))
    order = np.argsort(uniform(keys, len(units))[0], kind="stable")
    return units[np.sort(order[:n])]


@dataclass
class Swapped:
    """Anonymised images and how far each moved from its source."""

    vis: torch.Tensor  # float [N, 3, R, R] in about [-1, 1]
    nir: torch.Tensor | None
    embedding: torch.Tensor  # [N, dim], L2-normalised, of the uint8 image
    source_similarity: np.ndarray  # float32 [N]: cosine to the source image's embedding
    appearance_change: np.ndarray  # float32 [N]: low-pass RMS change from the source image, grey levels


class Swapper:
    """Renders sources, swaps masks of units in from targets, measures identity and appearance change."""

    def __init__(self, space: LatentSpaces, embedder: FaceEmbedder, metric: Metric | None = None,
                 batch_size: int = 32) -> None:
        self.space, self.embedder = space, embedder
        self.metric, self.batch_size = metric or Metric(), batch_size

    @torch.no_grad()
    def sources(self, name: str, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings, low-pass images) of the source codes."""
        embs, lows = [], []
        for part in codes.split(self.batch_size):
            vis, _ = self.space.render_codes(name, part)
            embs.append(self.embedder.embed(vis).cpu())
            lows.append(self.metric.lowpass(vis))
        return torch.cat(embs), torch.cat(lows)

    @torch.no_grad()
    def swap(self, name: str, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
             reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> Swapped:
        """`mask` bool [D] or [N, D]; `reference` = `sources(name, source)` when already computed."""
        source_emb, source_low = reference if reference is not None else self.sources(name, source)
        mask = mask.expand(len(source), -1) if mask.ndim == 1 else mask
        vis, nir, embs, looks = [], [], [], []
        for rows in torch.arange(len(source)).split(self.batch_size):
            image, second = self.space.render_codes(name, swap(source[rows], target[rows], mask[rows]))
            vis.append(image)
            nir.append(second)
            embs.append(self.embedder.embed(image).cpu())
            looks.append(self.metric.appearance_change(source_low[rows], image))
        emb = torch.cat(embs)
        return Swapped(torch.cat(vis), None if nir[0] is None else torch.cat(nir), emb,
                       (1.0 - identity_change(source_emb, emb)).numpy().astype(np.float32),
                       torch.cat(looks).numpy().astype(np.float32))
