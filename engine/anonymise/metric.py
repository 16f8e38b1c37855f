"""How much identity and how much appearance a change of latent code changes.

- **Identity change** `1 − cos(E(x_src), E(x_new))`: the face recogniser's own distance between the
  two images (uint8-quantised, exactly as a saved PNG would be embedded).
- **Appearance change**: the RMS difference, in grey levels (0-255), of the two images after
  area-averaging them to `lowpass_size`² pixels. StyleID measures "everything but identity" with an
  attribute classifier and a perceptual network; neither ships with facegen and nothing may be
  downloaded at run time. What a face recogniser is built to see is fine facial detail (the shape of
  eyes, nose, mouth); what a viewer calls the *appearance* of a photo (pose, expression, lighting,
  skin and hair colour, background) occupies large areas and survives heavy low-pass filtering. So
  the low-pass image is a weights-free proxy for the attributes a swap should keep.
- **Ratio** of a swap unit: mean identity change over the pairs divided by mean appearance change
  plus `epsilon` (half a grey level by default: below that the uint8 image does not change, and
  ratios of invisible changes are noise). High = the unit moves identity cheaply.
- **Score** (what ranks): the ratio. With an `appearance_cap` q < 1, units whose appearance change
  is above the q-quantile of all units of their kind rank after every unit within it (their score
  is their ratio minus 1 + the largest ratio, so they stay in ratio order among themselves). The
  ratio alone puts first a unit that moves identity 100x and appearance 3x as much as the typical
  unit: the fastest way to a new identity, but the top-n swap then changes the picture more than n
  random units do. The cap (0.5 = the median) keeps the top-n swap's appearance change below
  random units' at the price of moving identity less once the strongest identity units are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from facegen.models.embedder import to_uint8_values


@dataclass(frozen=True)
class Metric:
    lowpass_size: int = 16
    epsilon: float = 0.5  # grey levels
    appearance_cap: float = 1.0  # quantile of the units' appearance changes; 1 = no cap (ratio order)

    def lowpass(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [-1, 1] -> their uint8 values area-averaged to at most lowpass_size²."""
        x = to_uint8_values(images)
        size = min(self.lowpass_size, x.shape[-1])
        return F.adaptive_avg_pool2d(x, size) if size != x.shape[-1] else x

    def appearance_change(self, source_lowpass: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """RMS grey-level difference [N] between precomputed source low-pass images and new images."""
        diff = self.lowpass(images) - source_lowpass
        return diff.square().flatten(1).mean(dim=1).sqrt()

    def ratio(self, identity_change, appearance_change):
        return identity_change / (appearance_change + self.epsilon)

    def score(self, identity_change: np.ndarray, appearance_change: np.ndarray) -> np.ndarray:
        """Ranking scores of all units of one kind (see the module docstring), higher first."""
        ratio = self.ratio(identity_change, appearance_change)
        if self.appearance_cap >= 1 or len(ratio) == 0:
            return ratio
        over = appearance_change > np.quantile(appearance_change, self.appearance_cap)
        return np.where(over, ratio - (1.0 + ratio.max()), ratio)


def identity_change(source_embedding: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """1 − cosine between L2-normalised embeddings, row by row."""
    return 1.0 - (source_embedding * embedding).sum(dim=1)
