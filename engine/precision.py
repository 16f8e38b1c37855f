"""Reduced-precision embedding that never costs the privacy certificate.

The embedder may run in bf16 or fp16 (autocast; the output is float32 either way). Its similarities
then differ from an fp32 embedder's on the same uint8 image by a small amount, bounded in practice by
a margin δ that `facegen bench suite` measures (correctness → embedder → max_similarity_change). A
candidate whose reduced-precision privacy similarity lies within δ of the threshold is re-embedded in
fp32 before it is decided, and its fp32 embedding and similarity replace the reduced ones. Every
privacy decision is therefore the one an fp32 audit of the written image makes; δ is recorded in the
report's privacy certificate. Candidates further than δ from the threshold keep their reduced-precision
similarity, which an fp32 audit reproduces to within δ.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Margins by embedder precision when the spec gives none: about 4x the largest similarity change
# measured between fp32 and reduced precision on the same images (CPU bf16 autocast, iResNet-18: 5.5e-3;
# fp16 keeps 3 more mantissa bits than bf16). Measure yours with `facegen bench suite`.
DEFAULT_MARGINS = {"fp32": 0.0, "bf16": 0.02, "fp16": 0.005}

Query = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Precision:
    """The embedder's precision and the recheck margin δ (0 for fp32)."""

    dtype: str = "fp32"
    margin: float = 0.0

    @classmethod
    def of(cls, dtype: str, margin: float | None) -> Precision:
        return cls(dtype, DEFAULT_MARGINS[dtype] if margin is None else float(margin))

    @property
    def reduced(self) -> bool:
        return self.dtype != "fp32"

    def certificate(self) -> dict:
        return {"embedder_dtype": self.dtype, "recheck_margin": self.margin}


def reduced_embedder(embedder, dtype: str):
    """The same embedder running under autocast `dtype` (a shallow copy: weights are shared)."""
    if dtype == "fp32":
        return embedder
    if not hasattr(embedder, "autocast_dtype"):
        from facegen.models.errors import UserError

        raise UserError(f"embedder.dtype {dtype}: only torch embedders run in reduced precision; use fp32")
    reduced = copy.copy(embedder)
    reduced.autocast_dtype = DTYPES[dtype]
    return reduced


def recheck(sims: np.ndarray, rows: np.ndarray, embedding: torch.Tensor, images: torch.Tensor,
            exact_embed: Callable[[torch.Tensor], torch.Tensor], query: Query, threshold: float, margin: float
            ) -> tuple[np.ndarray, np.ndarray, torch.Tensor, np.ndarray]:
    """Re-embed in fp32 every candidate within `margin` of `threshold` (and every non-finite one).

    Returns (sims, rows, embedding, rechecked mask) with the rechecked candidates' values replaced."""
    near = ~(np.abs(sims - threshold) > margin)  # NaN counts as near
    if not near.any():
        return sims, rows, embedding, near
    picked = torch.from_numpy(np.flatnonzero(near)).to(images.device)
    exact = exact_embed(images.index_select(0, picked)).to(embedding.device, torch.float32)
    exact_sims, exact_rows = query(exact)
    sims, rows, embedding = sims.copy(), rows.copy(), embedding.clone()
    sims[near], rows[near] = np.asarray(exact_sims, np.float32), np.asarray(exact_rows, np.int64)
    embedding[picked.to(embedding.device)] = exact
    return sims, rows, embedding, near
